"""Diffusion forcing, block-causal attention, KV-cached rollout, i2v, references, guidance."""

import pytest
import torch

from worldline.models.conditioning import draw_references
from worldline.models.dit import DiTArgs, VideoDiT, frame_causal_mask
from worldline.models.flow import (
    flow_loss,
    guided_velocity,
    interpolate,
    multi_cfg_velocity,
    sample_frame_timesteps,
    velocity_target,
)
from worldline.models.rollout import KVCache, rollout
from worldline.train.tasks import clean_prefix_inputs

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)


def _dit(**kw) -> VideoDiT:
    """A small DiT with its zero-init parts perturbed, so every path affects the output."""
    torch.manual_seed(0)
    args = dict(in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=32,
                num_action_slots=2, camera_dim=2, frame_causal=True, max_refs=2)
    dit = VideoDiT(DiTArgs(**{**args, **kw}))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit.eval()


def _inputs(b=2, frames=4, hw=8, tf=4, slots=2):
    g = torch.Generator().manual_seed(1)
    t_pix = 1 + (frames - 1) * tf
    return dict(
        x=torch.randn(b, 4, frames, hw, hw, generator=g),
        text=torch.randn(b, 5, 32, generator=g),
        text_mask=torch.ones(b, 5, dtype=torch.bool),
        actions=torch.randint(0, 5, (b, t_pix, slots), generator=g),
        camera=torch.randn(b, t_pix, 2, generator=g),
    )


def test_frame_causal_mask_structure():
    m = frame_causal_mask(3, 1, 2)  # 3 frames + 1 ref, 2 tokens each
    rank = [0, 0, 1, 1, 2, 2, -1, -1]
    for i, ri in enumerate(rank):
        for j, rj in enumerate(rank):
            assert bool(m[i, j]) == (rj <= ri)
    m = frame_causal_mask(1, 0, 2, past=3)
    assert m.shape == (2, 5) and bool(m.all())


@pytest.mark.parametrize("with_refs", [False, True])
def test_causal_mask_blocks_the_future(with_refs):
    dit, inp = _dit(), _inputs()
    t = torch.rand(2, 4)
    refs = torch.randn(2, 2, 4, 8, 8) if with_refs else None
    kw = dict(text=inp["text"], text_mask=inp["text_mask"], actions=inp["actions"],
              camera=inp["camera"], refs=refs)
    with torch.no_grad():
        out = dit(inp["x"], t, **kw)
        x2 = inp["x"].clone()
        x2[:, :, 2:] += torch.randn_like(x2[:, :, 2:])  # perturb frames 2, 3
        t2 = t.clone()
        t2[:, 3] = 0.5
        kw2 = dict(kw, actions=kw["actions"].clone())
        kw2["actions"][:, 5:] = (kw2["actions"][:, 5:] + 1) % 5  # controls of frames >= 2
        out2 = dit(x2, t2, **kw2)
        full = dit(inp["x"], t, frame_causal=False, **kw)
        full2 = dit(x2, t2, frame_causal=False, **kw2)
    torch.testing.assert_close(out[:, :, :2], out2[:, :, :2], atol=1e-5, rtol=1e-5)
    assert (out[:, :, 2:] - out2[:, :, 2:]).abs().max() > 1e-3
    assert (full[:, :, :2] - full2[:, :, :2]).abs().max() > 1e-3  # full attention sees it


def test_kv_cached_forward_equals_uncached():
    dit, inp = _dit(), _inputs(frames=4)
    t = torch.cat([torch.zeros(2, 3), torch.full((2, 1), 0.7)], 1)
    kw = dict(text=inp["text"], text_mask=inp["text_mask"])
    with torch.no_grad():
        ref = dit(inp["x"], t, actions=inp["actions"], camera=inp["camera"], **kw)
        _, kvs = dit(inp["x"][:, :, :3], t[:, :3], actions=inp["actions"][:, :9],
                     camera=inp["camera"][:, :9], return_kv=True, **kw)
        out = dit(inp["x"][:, :, 3:], t[:, 3:], actions=inp["actions"][:, 9:],
                  camera=inp["camera"][:, 9:], frame_start=3, past_kv=kvs, **kw)
    torch.testing.assert_close(out, ref[:, :, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance", [(1.0, 1.0), (3.0, 2.0)])
def test_kv_cached_rollout_equals_uncached(guidance):
    dit, inp = _dit(), _inputs(frames=2 + 3)
    ctx, noise = inp["x"][:, :, :2], torch.randn(2, 4, 3, 8, 8)
    kw = dict(text=inp["text"], text_mask=inp["text_mask"], null_text=torch.randn(32),
              actions=inp["actions"], camera=inp["camera"], noise=noise, num_steps=3,
              text_scale=guidance[0], action_scale=guidance[1], refs=torch.randn(2, 1, 4, 8, 8))
    a = rollout(dit, ctx, 3, **kw)
    b = rollout(dit, ctx, 3, use_cache=False, **kw)
    assert a.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rollout_window_bounds_the_cache_and_extends_past_training_length():
    dit = _dit(text_dim=0, num_action_slots=0, action_dim=3, camera_dim=0, max_refs=0)
    calls = []

    def act(i):  # interactive controls: 1 pixel frame for frame 0, tf after
        calls.append(i)
        return torch.randn(1, 1 if i == 0 else 4, 3)

    noise = torch.randn(1, 4, 8, 4, 4)
    out = rollout(dit, None, 8, actions=act, window=3, num_steps=2, noise=noise)
    assert out.shape == (1, 4, 8, 4, 4) and torch.isfinite(out).all()
    assert sorted(set(calls)) == list(range(8))
    cache = KVCache(window=3)
    kv = [(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))]
    for _ in range(10):
        cache.append(kv, 1, 4)
    assert cache.num_frames == 3 and cache.next_frame == 10


def test_zeroing_continuous_actions_changes_the_output():
    dit = _dit(num_action_slots=0, action_dim=3)
    inp = _inputs()
    a = torch.randn(2, inp["camera"].shape[1], 3)
    with torch.no_grad():
        v1 = dit(inp["x"], torch.rand(2), inp["text"], actions=a)
        v0 = dit(inp["x"], torch.rand(2).fill_(0.3), inp["text"], actions=torch.zeros_like(a))
        v1b = dit(inp["x"], torch.rand(2).fill_(0.3), inp["text"], actions=a)
        vn = dit(inp["x"], torch.rand(2).fill_(0.3), inp["text"], actions=a,
                 drop_actions=torch.ones(2, dtype=torch.bool))
    assert (v0 - v1b).abs().max() > 1e-3 and (vn - v1b).abs().max() > 1e-3
    assert v1.shape == inp["x"].shape


def test_i2v_inputs_and_masked_loss():
    dit = _dit(mask_channel=True)
    x0, noise = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([0.3, 0.8])
    # Sample 0 is image-to-video (frame 0 clean), sample 1 plain text-to-video.
    x_in, t_f, lm = clean_prefix_inputs(x0, interpolate(x0, noise, t), t,
                                        torch.tensor([1, 0]), mask_channel=True)
    assert x_in.shape == (2, 5, 3, 8, 8)
    torch.testing.assert_close(x_in[0, :4, 0], x0[0, :, 0])
    assert x_in[0, 4, 0].eq(1).all() and x_in[0, 4, 1:].eq(0).all() and x_in[1, 4].eq(0).all()
    assert t_f.tolist()[0] == pytest.approx([0.0, 0.3, 0.3]) and t_f[1].eq(0.8).all()
    assert lm[0, 0, 0].item() == 0 and lm[1, 0, 0].item() == 1
    pred = dit(x_in, t_f)
    assert pred.shape == x0.shape
    loss = flow_loss(pred, velocity_target(x0, noise), mask=lm)
    err = (pred - velocity_target(x0, noise)).pow(2)
    expect = (err[0, :, 1:].sum() + err[1].sum()) / (err[0, :, 1:].numel() + err[1].numel())
    torch.testing.assert_close(loss, expect)


def test_references_are_attended_and_drawn_from_the_clip():
    dit, inp = _dit(), _inputs()
    g = torch.Generator().manual_seed(0)
    refs = draw_references(inp["x"], 2, generator=g)
    assert refs.shape == (2, 2, 4, 8, 8)
    frames = {tuple(inp["x"][0, :, i].flatten()[:4].tolist()) for i in range(4)}
    assert tuple(refs[0, 0].flatten()[:4].tolist()) in frames
    crops = draw_references(inp["x"], 3, generator=g, crop_scale=(0.5, 0.9))
    assert crops.shape == (2, 3, 4, 8, 8)
    with torch.no_grad():
        v1 = dit(inp["x"], torch.rand(2).fill_(0.5), refs=refs)
        v2 = dit(inp["x"], torch.rand(2).fill_(0.5), refs=refs + 1)
    assert v1.shape == inp["x"].shape and (v1 - v2).abs().max() > 1e-3
    with pytest.raises(ValueError):
        dit(inp["x"], torch.rand(2), refs=torch.randn(2, 3, 4, 8, 8))


def test_diffusion_forcing_timesteps_and_training_step():
    g = torch.Generator().manual_seed(0)
    t = sample_frame_timesteps(64, 5, generator=g)
    assert t.shape == (64, 5) and (t > 0).all() and (t < 1).all()
    assert (t.std(1) > 0).all()
    tu = sample_frame_timesteps(64, 5, generator=g, p_uniform=1.0)
    assert (tu.std(1) == 0).all()
    dit, inp = _dit(), _inputs()
    x0, noise = inp["x"], torch.randn_like(inp["x"])
    t = sample_frame_timesteps(2, 4, generator=g)
    pred = dit(interpolate(x0, noise, t), t, inp["text"], inp["text_mask"], inp["actions"],
               inp["camera"], refs=torch.randn(2, 2, 4, 8, 8))
    flow_loss(pred, velocity_target(x0, noise)).backward()
    missing = [n for n, p in dit.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_per_condition_guidance():
    vf, vt, vu = torch.full((2,), 3.0), torch.full((2,), 2.0), torch.full((2,), 1.0)
    assert guided_velocity(vf, vt, vu, 1.0, 1.0).eq(3.0).all()
    assert guided_velocity(vf, vt, vu, 2.0, 1.0).eq(4.0).all()  # 1 + 1 + 2
    assert guided_velocity(vf, vt, vu, 1.0, 3.0).eq(5.0).all()  # 1 + 3 + 1
    calls = []

    def fn(tag):
        return lambda x, t: (calls.append(tag), x * 0 + {"f": 3.0, "t": 2.0, "u": 1.0}[tag])[1]

    f = multi_cfg_velocity(fn("f"), fn("t"), fn("u"), 1.0, 1.0)
    assert f(torch.zeros(2), torch.zeros(2)).eq(3.0).all() and calls == ["f"]
    f = multi_cfg_velocity(fn("f"), fn("t"), fn("u"), 2.0, 3.0)
    assert f(torch.zeros(2), torch.zeros(2)).eq(1 + 3 * 1 + 2 * 1).all()
