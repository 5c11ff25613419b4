"""WanDiT: parity with diffusers' WanTransformer3DModel (t2v, i2v, per-frame time), diffusers
folders in and out, zero-init controls, frame-causal KV rollout, meta init, WorldModel."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.init import build_on_meta
from worldline.models.rollout import rollout
from worldline.models.text import TextEncoderArgs
from worldline.models.wan_dit import WanDiT, build_dit
from worldline.models.wan_io import diffusers_config, dit_args_from_diffusers_config
from worldline.models.world_model import WorldModel

diffusers = pytest.importorskip("diffusers")
WanTransformer3DModel = diffusers.WanTransformer3DModel

torch.set_flush_denormal(True)  # zero-init nets make denormals; flushing keeps CPU fast

C, TEXT = 4, 24
# Tiny Wan: dim 64 = 2 heads x 32 (RoPE split t/h/w = 12/10/10), 2 layers.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=C,
           out_channels=C, text_dim=TEXT, freq_dim=32, ffn_dim=96, num_layers=2,
           cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64)
# i2v the Wan way: [noisy C, 4 mask channels, first-frame latents C] in, C out; CLIP features.
WAN_I2V = dict(WAN, in_channels=2 * C + 4, image_dim=16, added_kv_proj_dim=64)


def _diffusers(seed: int = 0, **kw) -> "WanTransformer3DModel":
    """A tiny diffusers Wan with every parameter perturbed (so each path shows in the output)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**{**WAN, **kw}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    ref = _diffusers()
    path = tmp_path_factory.mktemp("wan_t2v")
    ref.save_pretrained(path)
    return path, ref


def _ref_out(ref, x, t, text, image=None):
    """diffusers forward with flow time t [B] or [B, F] (per frame -> per token, x1000)."""
    ts = t * 1000
    if t.dim() == 2:  # Wan 2.2's per-token timesteps: every token of a frame shares its time
        ts = ts.repeat_interleave(x.shape[3] * x.shape[4] // 4, dim=1)
    with torch.no_grad():
        return ref(x, ts, text, encoder_hidden_states_image=image, return_dict=False)[0]


def _inputs(b=2, frames=3, hw=8, ch=C, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, ch, frames, hw, hw, generator=g), torch.rand(b, generator=g),
            torch.randn(b, text_len, TEXT, generator=g))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_frame", [False, True])
def test_t2v_parity_with_diffusers(t2v_dir, per_frame):
    path, ref = t2v_dir
    dit = WanDiT.from_diffusers(path).eval()
    assert set(dit.state_dict()) == set(ref.state_dict())
    assert all(dit.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())
    x, t, text = _inputs()
    if per_frame:  # diffusion forcing: one flow time per latent frame
        t = torch.rand(2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dit(x, t, text)
    err = (out - _ref_out(ref, x, t, text)).abs().max().item()
    print(f"t2v parity (per_frame={per_frame}): max abs diff {err:.2e}")
    assert out.shape == x.shape and err <= 1e-5


@pytest.mark.parametrize("flf2v", [False, True])
def test_i2v_parity_with_diffusers(tmp_path, flf2v):
    kw = dict(WAN_I2V, pos_embed_seq_len=2 * 5) if flf2v else WAN_I2V
    ref = _diffusers(1, **{k: v for k, v in kw.items() if k not in WAN or WAN[k] != v})
    ref.save_pretrained(tmp_path)
    dit = WanDiT.from_diffusers(tmp_path).eval()
    assert (dit.args.in_channels, dit.args.out_channels, dit.args.image_dim) == (12, C, 16)
    # diffusers splits image tokens off the front of a 512-token text (its hard-coded length).
    x, t, text = _inputs(b=1, ch=2 * C + 4, text_len=512)
    image = torch.randn(2 if flf2v else 1, 5, 16)  # FLF2V: first and last frame features
    with torch.no_grad():
        out = dit(x, t, text, image_emb=image)
    err = (out - _ref_out(ref, x, t, text, image)).abs().max().item()
    print(f"i2v parity (flf2v={flf2v}): max abs diff {err:.2e}")
    assert out.shape == (1, C, 3, 8, 8) and err <= 1e-5


# ---------------------------------------------------------------------------------------------
# Folders in and out
# ---------------------------------------------------------------------------------------------
def test_save_diffusers_opens_in_diffusers(t2v_dir, tmp_path):
    path, _ = t2v_dir
    dit = WanDiT.from_diffusers(path).eval()
    dit.save_diffusers(tmp_path / "single")
    dit.save_diffusers(tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    x, t, text = _inputs()
    with torch.no_grad():
        want = dit(x, t, text)
    for name in ("single", "sharded"):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["_class_name"] == "WanTransformer3DModel" and "_diffusers_version" in cfg
        back = WanTransformer3DModel.from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(_ref_out(back, x, t, text), want, atol=1e-5, rtol=0)
        again = WanDiT.from_diffusers(tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(again(x, t, text), want)


def test_extras_round_trip(t2v_dir, tmp_path):
    path, _ = t2v_dir
    extra = dict(num_action_slots=2, camera_dim=3, max_refs=2, mask_channel=True,
                 frame_causal=True)
    dit = WanDiT.from_diffusers(path, **extra)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dit.save_diffusers(tmp_path)
    meta = json.loads((tmp_path / "worldline_extra.json").read_text())
    assert meta["dit_args"]["num_action_slots"] == 2 and meta["extra_keys"]
    assert (tmp_path / "worldline_extra.safetensors").is_file()
    back = WanDiT.from_diffusers(tmp_path)
    assert back.args == dit.args
    sd, sd2 = dit.state_dict(), back.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # diffusers opens the same folder (a C+1-channel Wan) and ignores the extras.
    hf = WanTransformer3DModel.from_pretrained(tmp_path)
    assert hf.config.in_channels == C + 1 and hf.config.out_channels == C


def test_zero_init_controls_leave_the_output_unchanged(t2v_dir):
    path, _ = t2v_dir
    plain = WanDiT.from_diffusers(path).eval()
    ctrl = WanDiT.from_diffusers(path, num_action_slots=2, camera_dim=3).eval()
    x, t, text = _inputs()
    t_pix = 1 + (3 - 1) * 4
    actions = torch.randint(0, 5, (2, t_pix, 2))
    camera = torch.randn(2, t_pix, 3)
    with torch.no_grad():
        want = plain(x, t, text)
        assert torch.equal(ctrl(x, t, text, actions=actions, camera=camera), want)
        assert torch.equal(ctrl(x, t, text), want)  # null controls too
    # ... and they are trainable: control_proj receives a gradient.
    ctrl.train()
    ctrl(x, t, text, actions=actions, camera=camera).square().mean().backward()
    assert ctrl.control_proj.weight.grad.abs().sum() > 0


def test_mask_channel_on_a_plain_checkpoint_starts_inert(t2v_dir):
    path, _ = t2v_dir
    plain = WanDiT.from_diffusers(path).eval()
    masked = WanDiT.from_diffusers(path, mask_channel=True).eval()
    assert masked.patch_embedding.weight.shape[1] == C + 1
    x, t, text = _inputs()
    m = torch.ones_like(x[:, :1])
    with torch.no_grad():
        torch.testing.assert_close(masked(torch.cat([x, m], 1), t, text), plain(x, t, text),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", ["missing", "hub", "class", "pipeline"])
def test_bad_folders_fail_clearly(tmp_path, bad):
    if bad == "missing":
        folder, exc, match = tmp_path / "nope", FileNotFoundError, "no such folder"
    elif bad == "hub":
        folder, exc, match = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", FileNotFoundError, "Hub id"
    elif bad == "class":
        folder, exc, match = tmp_path, ValueError, "_class_name='UNet2DConditionModel'"
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    else:
        folder, exc, match = tmp_path, FileNotFoundError, "transformer/ subfolder"
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(exc, match=match) as info:
        WanDiT.from_diffusers(folder)
    assert str(folder) in str(info.value)


def test_config_round_trip():
    args = dit_args_from_diffusers_config({**WAN_I2V, "_class_name": "WanTransformer3DModel"})
    assert args.arch == "wan" and args.hidden_size == 64 and args.camera_dim == 0
    cfg = diffusers_config(args)
    assert {k: (tuple(v) if k == "patch_size" else v) for k, v in cfg.items()
            if k in WAN_I2V} == WAN_I2V
    with pytest.raises(ValueError, match="arch"):
        build_dit(DiTArgs(arch="sora"))
    assert isinstance(build_dit(DiTArgs(hidden_size=64, depth=1, num_heads=2)), VideoDiT)


# ---------------------------------------------------------------------------------------------
# Frame-causal KV rollout, refs
# ---------------------------------------------------------------------------------------------
def _causal_wan(t2v_dir, **kw) -> WanDiT:
    dit = WanDiT.from_diffusers(t2v_dir[0], num_action_slots=2, camera_dim=3, max_refs=2,
                                frame_causal=True, **kw)
    with torch.no_grad():  # train the zero-init controls a little
        dit.control_proj.weight.normal_(std=0.05)
    return dit.eval()


def test_kv_cached_forward_equals_uncached_frame_causal(t2v_dir):
    dit = _causal_wan(t2v_dir)
    x, _, text = _inputs(frames=4)
    t = torch.cat([torch.zeros(2, 3), torch.full((2, 1), 0.7)], 1)  # per-frame times
    acts, cam = torch.randint(0, 5, (2, 13, 2)), torch.randn(2, 13, 3)
    with torch.no_grad():
        ref = dit(x, t, text, actions=acts, camera=cam)
        _, kvs = dit(x[:, :, :3], t[:, :3], text, actions=acts[:, :9], camera=cam[:, :9],
                     return_kv=True)
        out = dit(x[:, :, 3:], t[:, 3:], text, actions=acts[:, 9:], camera=cam[:, 9:],
                  frame_start=3, past_kv=kvs)
        # frame-causal: frames 0..2 do not see frame 3
        x2 = x.clone()
        x2[:, :, 3] += 1.0
        early = dit(x2, t, text, actions=acts, camera=cam)[:, :, :3]
    torch.testing.assert_close(out, ref[:, :, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(early, ref[:, :, :3], atol=1e-5, rtol=1e-5)


def test_kv_cached_rollout_equals_uncached(t2v_dir):
    dit = _causal_wan(t2v_dir)
    g = torch.Generator().manual_seed(5)
    ctx, noise = torch.randn(1, C, 2, 8, 8, generator=g), torch.randn(1, C, 2, 8, 8, generator=g)
    kw = dict(text=torch.randn(1, 7, TEXT, generator=g), null_text=torch.randn(TEXT),
              actions=torch.randint(0, 5, (1, 1 + 3 * 4, 2), generator=g),
              camera=torch.randn(1, 13, 3, generator=g), refs=torch.randn(1, 1, C, 8, 8),
              noise=noise, num_steps=2, text_scale=2.0)
    a = rollout(dit, ctx, 2, **kw)
    b = rollout(dit, ctx, 2, use_cache=False, **kw)
    assert a.shape == (1, C, 2, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Construction, accounting, WorldModel
# ---------------------------------------------------------------------------------------------
def _wan_args(**kw) -> DiTArgs:
    return DiTArgs(**{**dict(arch="wan", in_channels=C, hidden_size=64, depth=2, num_heads=2,
                             text_dim=TEXT, freq_dim=32, ffn_dim=96, camera_dim=0), **kw})


@pytest.mark.parametrize("kw", [{}, dict(in_channels=12, out_channels=C, image_dim=16,
                                         added_kv_proj_dim=64, pos_embed_seq_len=10,
                                         num_action_slots=2, camera_dim=2, max_refs=2,
                                         mask_channel=True, cross_attn_norm=False)])
def test_meta_then_init_weights_equals_eager(kw):
    torch.manual_seed(7)
    eager = WanDiT(_wan_args(**kw)).state_dict()
    meta = build_on_meta(lambda: WanDiT(_wan_args(**kw)))
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for p in meta.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(7)
    meta.init_weights()
    got = meta.state_dict()
    assert list(got) == list(eager)
    assert all(torch.equal(got[k], eager[k]) for k in eager)


def test_flops_formula_matches_a_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dit = WanDiT(_wan_args(image_dim=16, added_kv_proj_dim=64))
    latent, text_len = (C, 3, 8, 8), 7
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        dit(torch.randn(1, *latent), torch.rand(1), torch.randn(1, text_len, TEXT),
            image_emb=torch.randn(1, 5, 16))
    measured = 3 * counter.get_total_flops()
    assert dit.flops_per_sample(latent, text_len, image_len=5) == pytest.approx(measured, rel=0.03)
    assert 0 < dit.num_params(exclude_embeddings=True) < dit.num_params()


def test_world_model_with_wan_trains():
    torch.manual_seed(0)
    wm = WorldModel(_wan_args(num_action_slots=1, camera_dim=2),
                    TextEncoderArgs(dim=TEXT, depth=1, num_heads=2, max_len=16))
    assert isinstance(wm.dit, WanDiT)
    ids, mask = wm.tokenizer(["a red ball", "a blue cube rolls"], max_len=16)
    x = torch.randn(2, C, 3, 8, 8)
    v = wm(x, torch.rand(2, 3), ids, mask, actions=torch.randint(0, 5, (2, 9, 1)),
           camera=torch.randn(2, 9, 2), drop_text=torch.tensor([True, False]))
    assert v.shape == x.shape
    v.square().mean().backward()
    assert wm.dit.blocks[0].attn1.to_q.weight.grad is not None
    assert wm.null_text.grad is not None
