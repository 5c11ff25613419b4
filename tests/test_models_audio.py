"""Audio as a control signal (models/audio.py): the log-mel front end, audio conditioning of
VideoDiT (modulation and cross-attention) and WanDiT, zero-init growth, cached rollout."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _models import perturb_zero_init
from worldline.models.audio import LogMelFrames
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.init import build_on_meta, materialize
from worldline.models.rollout import rollout
from worldline.models.stepper import RolloutStepper
from worldline.models.wan_dit import WanDiT
from worldline.train.stages import zero_init_new_controls

torch.set_flush_denormal(True)  # zero-init nets make denormals on CPU (~20x slower)

A, TF = 8, 4  # audio feature size, pixel frames per latent frame
MODES = ["modulation", "cross_attn"]


def _args(**kw) -> DiTArgs:
    base = dict(in_channels=4, hidden_size=64, depth=3, num_heads=4, text_dim=16,
                num_action_slots=1, camera_dim=2, frame_causal=True, temporal_downsample=TF,
                audio_dim=A, audio_every=2)
    return DiTArgs(**{**base, **kw})


def _dit(seed: int = 0, **kw) -> VideoDiT:
    """A small audio DiT with its zero-init parts perturbed (every path reaches the output)."""
    torch.manual_seed(seed)
    dit = VideoDiT(_args(**kw)).eval()
    perturb_zero_init(dit, seed)
    return dit


def _inputs(b: int = 2, frames: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t_pix = 1 + (frames - 1) * TF
    return dict(x=torch.randn(b, 4, frames, 8, 8, generator=g),
                t=torch.rand(b, frames, generator=g),
                text=torch.randn(b, 5, 16, generator=g),
                actions=torch.randint(0, 5, (b, t_pix, 1), generator=g),
                camera=torch.randn(b, t_pix, 2, generator=g),
                audio=torch.randn(b, t_pix, A, generator=g))


def _run(dit, inp, **kw):
    with torch.no_grad():
        return dit(inp["x"], inp["t"], inp["text"], None, inp["actions"], inp["camera"], **kw)


# ---------------------------------------------------------------------------------------------
# LogMelFrames
# ---------------------------------------------------------------------------------------------
def test_log_mel_shapes_buffers_and_rounding():
    mel = LogMelFrames(sample_rate=16000, n_mels=32)
    assert not list(mel.parameters()) and not mel.state_dict()  # buffers are non-persistent
    feats, valid = mel(torch.randn(2, 16001), None, num_frames=17)  # 16001 / 17 not integral
    assert feats.shape == (2, 17, 32) and feats.dtype == torch.float32 and valid.all()
    assert torch.isfinite(feats).all() and feats.abs().max() < 4  # roughly unit scale
    b = mel.segment_bounds(16001, 17)
    assert b[0] == 0 and b[-1] == 16001 and set((b[1:] - b[:-1]).tolist()) <= {941, 942}
    f16, _ = mel(torch.randn(1, 16000, dtype=torch.float64), None, 4)
    assert f16.dtype == torch.float32


@pytest.mark.parametrize("n, frames", [(16000, 9), (4003, 21)])  # long; short (< n_fft)
def test_log_mel_is_causal_per_segment(n, frames):
    mel = LogMelFrames()
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2, n, generator=g)
    bounds = mel.segment_bounds(n, frames)
    feats, _ = mel(audio, None, frames)
    for i in (0, frames // 2, frames - 2):
        later = audio.clone()
        later[:, bounds[i + 1]:] = torch.randn(2, n - int(bounds[i + 1]), generator=g)
        got, _ = mel(later, None, frames)
        assert torch.equal(got[:, : i + 1], feats[:, : i + 1])
        assert not torch.equal(got[:, i + 1], feats[:, i + 1])


def test_log_mel_valid_means_at_least_half_real():
    mel = LogMelFrames()
    n, frames = 8000, 8
    mask = torch.ones(1, n, dtype=torch.bool)
    seg = n // frames
    mask[0, 2 * seg + seg // 2:3 * seg] = False          # frame 2: exactly half real -> valid
    mask[0, 4 * seg + seg // 2 - 1:5 * seg] = False      # frame 4: one short of half -> invalid
    mask[0, 7 * seg:] = False                            # frame 7: padding -> invalid
    audio = torch.randn(1, n)
    feats, valid = mel(audio, mask, frames)
    assert valid[0].tolist() == [True, True, True, True, False, True, True, False]
    # Masked samples do not leak into the features: garbage there changes nothing.
    noisy = torch.where(mask, audio, 100 * torch.randn(1, n))
    assert torch.equal(mel(noisy, mask, frames)[0], feats)


def test_a_tone_lights_its_mel_band():
    sr, n_mels = 16000, 32
    mel = LogMelFrames(sample_rate=sr, n_mels=n_mels)
    centre_hz = mel.fbank.argmax(0).double() * (sr / 2) / (mel.fbank.shape[0] - 1)
    t = torch.arange(sr) / sr
    for f in (300.0, 1000.0, 4000.0):
        feats, _ = mel(torch.sin(2 * math.pi * f * t)[None], None, 6)
        want = int((centre_hz - f).abs().argmin())
        assert (feats[0].argmax(-1) - want).abs().max() <= 1, f
        assert feats[0, :, want].min() > 1.0 and feats[0].median() < -1.0  # loud band, quiet rest


# ---------------------------------------------------------------------------------------------
# Conditioning through the DiT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_audio_conditions_causally(mode):
    dit, inp = _dit(audio_mode=mode), _inputs()
    out = _run(dit, inp, audio=inp["audio"])
    later = dict(inp, audio=inp["audio"].clone())
    later["audio"][:, 1 + TF:] += torch.randn_like(later["audio"][:, 1 + TF:])  # last group
    out2 = _run(dit, later, audio=later["audio"])
    assert torch.equal(out[:, :, :2], out2[:, :, :2])
    assert (out[:, :, 2] - out2[:, :, 2]).abs().max() > 1e-4
    # Invalid frames are nulls: garbage under valid=False changes nothing.
    valid = torch.ones(2, 1 + 2 * TF, dtype=torch.bool)
    valid[:, 2:5] = False
    junk = inp["audio"].clone()
    junk[:, 2:5] = 50.0
    torch.testing.assert_close(_run(dit, inp, audio=inp["audio"], audio_valid=valid),
                               _run(dit, inp, audio=junk, audio_valid=valid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_drop_audio_is_the_null_path(mode):
    dit, inp = _dit(audio_mode=mode), _inputs()
    drop = torch.tensor([True, False])
    with_audio = _run(dit, inp, audio=inp["audio"])
    dropped = _run(dit, inp, audio=inp["audio"], drop_audio=drop)
    none = _run(dit, inp)
    all_invalid = _run(dit, inp, audio=inp["audio"],
                       audio_valid=torch.zeros(2, inp["audio"].shape[1], dtype=torch.bool))
    torch.testing.assert_close(dropped[0], none[0], rtol=0, atol=1e-6)
    assert torch.equal(dropped[1], with_audio[1])  # the other sample keeps its audio
    torch.testing.assert_close(all_invalid, none, rtol=0, atol=1e-6)
    assert (with_audio[0] - none[0]).abs().max() > 1e-4
    # Audio has its own dropout: dropping actions/camera leaves audio in.
    no_act = _run(dit, inp, audio=inp["audio"], drop_actions=torch.ones(2, dtype=torch.bool))
    no_both = _run(dit, inp, audio=inp["audio"], drop_actions=torch.ones(2, dtype=torch.bool),
                   drop_audio=torch.ones(2, dtype=torch.bool))
    assert (no_act - no_both).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_zero_init_audio_leaves_a_pretrained_model_unchanged(mode):
    pre = _dit(seed=3, audio_dim=0)  # "pretrained" without audio, nothing at zero any more
    torch.manual_seed(5)
    grown = VideoDiT(_args(audio_mode=mode)).eval()
    missing, unexpected = grown.load_state_dict(pre.state_dict(), strict=False)
    assert not unexpected and missing and all("audio" in n for n in missing)
    perturb_zero_init(grown, 9)  # even a non-zero init of the new parts ...
    with torch.no_grad():
        for n in missing:
            grown.get_parameter(n).add_(0.1)
    zeroed = zero_init_new_controls(grown, set(missing))  # ... is zeroed where it matters
    want_zeroed = ({"cond_embed.null_audio", "cond_embed.audio_mlp.1.weight",
                    "cond_embed.audio_mlp.1.bias"} if mode == "modulation" else
                   {f"audio_attn.layers.{i}.proj.{w}" for i in range(2) for w in ("weight", "bias")})
    assert set(zeroed) == want_zeroed
    inp = _inputs()
    want = _run(pre, inp)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        audio = 3 * torch.randn(inp["audio"].shape, generator=g)
        valid = torch.rand(audio.shape[:2], generator=g) > 0.3
        assert torch.equal(_run(grown, inp, audio=audio, audio_valid=valid), want)
    assert torch.equal(_run(grown, inp), want)
    assert torch.equal(_run(grown, inp, audio=audio, drop_audio=torch.tensor([True, False])), want)
    # The zeroed layers still learn: their inputs are random, so they get gradients.
    grown.train()
    out = grown(inp["x"], inp["t"], inp["text"], None, inp["actions"], inp["camera"],
                audio=audio)
    out.square().mean().backward()
    assert all(grown.get_parameter(n).grad.abs().sum() > 0 for n in zeroed if "null" not in n)


def test_cross_attn_forward_backward_and_meta_init():
    dit = _dit(audio_mode="cross_attn").train()
    inp = _inputs()
    out = dit(inp["x"], inp["t"], inp["text"], None, inp["actions"], inp["camera"],
              audio=inp["audio"], refs=None)
    assert out.shape == inp["x"].shape
    out.square().mean().backward()
    audio_params = [(n, p) for n, p in dit.named_parameters() if n.startswith("audio_attn.")]
    assert len(audio_params) > 10
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in audio_params
               if n != "audio_attn.null"), [n for n, p in audio_params if p.grad is None]
    with pytest.raises(ValueError, match="pixel-frame rows"):
        dit(inp["x"], inp["t"], audio=inp["audio"][:, :-1])
    with pytest.raises(ValueError, match="audio_mode"):
        VideoDiT(_args(audio_mode="film"))
    for mode in MODES:  # init replay: meta + init_weights == eager
        torch.manual_seed(4)
        eager = VideoDiT(_args(audio_mode=mode)).state_dict()
        meta = build_on_meta(lambda: VideoDiT(_args(audio_mode=mode)))
        torch.manual_seed(4)
        got = materialize(meta, "cpu").state_dict()
        assert list(got) == list(eager) and all(torch.equal(got[k], eager[k]) for k in eager)
        if mode == "cross_attn":  # output projections start at zero: identity layers
            assert not eager["audio_attn.layers.0.proj.weight"].any()
        else:
            assert eager["cond_embed.null_audio"].std() > 0.01  # N(0, 0.02), like camera's


@pytest.mark.parametrize("mode", MODES)
def test_flops_formula_counts_audio(mode):
    torch.manual_seed(0)
    dit = VideoDiT(_args(audio_mode=mode, hidden_size=128, depth=3, audio_every=1))
    latent, text_len = (4, 5, 8, 8), 12
    t_pix = 1 + 4 * TF
    args = (torch.randn(1, *latent), torch.rand(1), torch.randn(1, text_len, 16), None,
            torch.randint(0, 5, (1, t_pix, 1)), torch.randn(1, t_pix, 2))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        dit(*args, audio=torch.randn(1, t_pix, A))
    assert dit.flops_per_sample(latent, text_len) == pytest.approx(
        3 * counter.get_total_flops(), rel=0.02)


# ---------------------------------------------------------------------------------------------
# WanDiT
# ---------------------------------------------------------------------------------------------
def _wan(**kw) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(_args(arch="wan", depth=2, hidden_size=64, num_heads=2, ffn_dim=96, **kw)).eval()


def test_wan_takes_audio_through_its_controls(tmp_path):
    dit = _wan()
    inp = _inputs()
    base = _run(dit, inp)
    # control_proj starts at zero: audio changes nothing until trained (growth from a Wan).
    assert torch.equal(_run(dit, inp, audio=inp["audio"]), base)
    perturb_zero_init(dit)
    a1 = _run(dit, inp, audio=inp["audio"])
    a2 = _run(dit, inp, audio=inp["audio"], drop_audio=torch.tensor([True, False]))
    assert (a1[0] - a2[0]).abs().max() > 1e-4 and torch.equal(a1[1], a2[1])
    torch.testing.assert_close(a2[0], _run(dit, inp)[0], rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="modulation"):
        _wan(audio_mode="cross_attn")
    folder = dit.save_diffusers(tmp_path / "wan")  # audio fields and weights round-trip
    back = WanDiT.from_diffusers(folder).eval()
    assert (back.args.audio_dim, back.args.audio_mode) == (A, "modulation")
    assert torch.equal(_run(back, inp, audio=inp["audio"]), a1)


# ---------------------------------------------------------------------------------------------
# Cached rollout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_kv_cached_forward_with_audio_equals_uncached(mode):
    dit, inp = _dit(audio_mode=mode), _inputs(frames=4)
    t = torch.cat([torch.zeros(2, 3), torch.full((2, 1), 0.7)], 1)
    aud, x = inp["audio"], inp["x"]
    with torch.no_grad():
        ref = dit(x, t, audio=aud)
        _, kvs = dit(x[:, :, :3], t[:, :3], audio=aud[:, :9], return_kv=True)
        out = dit(x[:, :, 3:], t[:, 3:], audio=aud, audio_past=9, frame_start=3, past_kv=kvs)
    torch.testing.assert_close(out, ref[:, :, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("guidance", [(1.0, 1.0), (2.0, 3.0)])
def test_rollout_with_audio_cached_equals_uncached(mode, guidance):
    dit, inp = _dit(audio_mode=mode), _inputs(frames=2 + 3)
    ctx, noise = inp["x"][:, :, :2], torch.randn(2, 4, 3, 8, 8)
    valid = torch.rand(inp["audio"].shape[:2]) > 0.2
    kw = dict(text=inp["text"], null_text=torch.randn(16), actions=inp["actions"],
              camera=inp["camera"], audio=inp["audio"], audio_valid=valid, noise=noise,
              num_steps=3, text_scale=guidance[0], action_scale=guidance[1])
    a = rollout(dit, ctx, 3, **kw)
    b = rollout(dit, ctx, 3, use_cache=False, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    other = rollout(dit, ctx, 3, **dict(kw, audio=torch.randn_like(inp["audio"])))
    assert (other - a).abs().max() > 1e-4  # the audio is heard


@pytest.mark.parametrize("mode", MODES)
def test_stepper_with_audio_equals_rollout_bitwise(mode):
    dit, inp = _dit(audio_mode=mode), _inputs(b=1, frames=2 + 4)
    ctx, noise = inp["x"][:, :, :2], torch.randn(1, 4, 4, 8, 8)
    acts, cam, aud = inp["actions"], inp["camera"], inp["audio"]
    kw = dict(window=2, num_steps=2, action_scale=2.0)
    want = rollout(dit, ctx, 4, actions=acts, camera=cam, audio=aud, noise=noise, **kw)
    n_ctx = 1 + TF
    st = RolloutStepper(dit, ctx, context_actions=acts[:, :n_ctx], context_camera=cam[:, :n_ctx],
                        context_audio=aud[:, :n_ctx], **kw)
    got = []
    for i in range(4):
        lo = n_ctx + i * TF
        got.append(st.step(noise[:, :, i:i + 1], acts[:, lo:lo + TF], cam[:, lo:lo + TF],
                           audio=aud[:, lo:lo + TF]))
    assert torch.equal(torch.cat(got, 2), want)
    st.action_scale = 1.0  # guidance off: the cache (and the audio it hears) is rebuilt
    z = st.step(torch.randn(1, 4, 1, 8, 8), acts[:, :TF], cam[:, :TF])  # no audio this step
    assert torch.isfinite(z).all() and st.cache.num_frames == 2
