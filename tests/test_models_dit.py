"""Latent video DiT: patchify, RoPE, per-frame conditioning, sizes, FLOPs (meta-device
construction and init replay: test_models_meta.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _models import perturb_zero_init
from worldline.models.conditioning import pool_to_latent_frames
from worldline.models.dit import DiTArgs, VideoDiT, apply_rope, rope_3d
from worldline.models.init import build_on_meta
from worldline.train.config import load_model_config, model_config_names

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)


def tiny_args(**kw) -> DiTArgs:
    base = dict(
        in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=32, num_action_slots=3
    )
    return DiTArgs(**{**base, **kw})


@pytest.mark.parametrize("patch", [[1, 1, 1], [1, 2, 2], [2, 2, 1]])
def test_patchify_unpatchify_are_inverses(patch):
    dit = VideoDiT(tiny_args(patch_size=patch))
    x = torch.randn(2, 4, 6, 8, 10)
    tokens = dit.patchify(x)
    grid = dit.grid(6, 8, 10)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 4 * patch[0] * patch[1] * patch[2])
    assert torch.equal(dit.unpatchify(tokens, grid), x)
    # Token order is t-major: the first h*w tokens all come from the first token frame.
    first = dit.unpatchify(
        torch.cat(
            [tokens[:, : grid[1] * grid[2]], torch.zeros_like(tokens[:, grid[1] * grid[2] :])], 1
        ),
        grid,
    )
    assert torch.equal(first[:, :, : patch[0]], x[:, :, : patch[0]])
    if patch != [1, 1, 1]:
        with pytest.raises(ValueError, match="divisible"):
            dit.grid(6 + (patch[0] > 1), 8 + (patch[1] > 1), 10 + (patch[2] > 1))


def test_rope_is_relative_and_extends_to_unseen_grids():
    head_dim = 24
    cos, sin = rope_3d((3, 4, 4), head_dim, 10000.0)
    assert cos.shape == (48, 12)
    big_cos, big_sin = rope_3d((5, 6, 7), head_dim, 10000.0)
    # Positions shared with the smaller grid get the same angles; new positions differ.
    idx_small = torch.arange(48).view(3, 4, 4)
    idx_big = torch.arange(5 * 6 * 7).view(5, 6, 7)[:3, :4, :4]
    torch.testing.assert_close(big_cos[idx_big.flatten()], cos[idx_small.flatten()])
    assert not torch.allclose(big_cos[-1], big_cos[0])
    # Rotation preserves norms, and scores depend only on relative positions: shifting every
    # frame index by 2 leaves q.k unchanged.
    q, k = torch.randn(1, 1, 48, head_dim), torch.randn(1, 1, 48, head_dim)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))
    scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)
    cos2, sin2 = rope_3d((3, 4, 4), head_dim, 10000.0, t_start=2)
    scores2 = apply_rope(q, cos2, sin2) @ apply_rope(k, cos2, sin2).transpose(-1, -2)
    torch.testing.assert_close(scores, scores2, atol=1e-4, rtol=1e-4)


def test_model_runs_on_unseen_sizes_and_positions_matter():
    torch.manual_seed(0)
    dit = VideoDiT(tiny_args(text_dim=0, num_action_slots=0, camera_dim=0)).eval()
    perturb_zero_init(dit)
    for shape in [(1, 4, 5, 8, 8), (1, 4, 9, 12, 16), (1, 4, 1, 4, 4)]:
        out = dit(torch.randn(shape), torch.rand(1))
        assert out.shape == shape and torch.isfinite(out).all()
    # Identical content at every position: without positions every token would get the same
    # output; RoPE must make them differ.
    x = torch.ones(1, 4, 3, 8, 8)
    out = dit(x, torch.full((1,), 0.5))
    assert out.flatten(2).std(dim=2).min() > 1e-4


def test_zero_init_outputs_zero_and_gates_are_zero():
    dit = VideoDiT(tiny_args())
    x = torch.randn(2, 4, 5, 8, 8)
    assert torch.equal(dit(x, torch.rand(2)), torch.zeros_like(x))
    for block in dit.blocks:
        assert torch.equal(block.modulation, torch.zeros_like(block.modulation))


def test_pool_to_latent_frames_groups_causally():
    e = torch.arange(9.0).view(1, 9, 1)  # pixel frames 0..8, tf=4 -> 3 latent frames
    pooled = pool_to_latent_frames(e, 3, 4)
    torch.testing.assert_close(pooled.flatten(), torch.tensor([0.0, 2.5, 6.5]))
    with pytest.raises(ValueError, match="pixel frames"):
        pool_to_latent_frames(e, 4, 4)


def test_conditioning_is_per_latent_frame():
    torch.manual_seed(0)
    dit = VideoDiT(tiny_args())
    b, tf = 2, 4
    actions = torch.randint(0, 5, (b, 17, 3))
    camera = torch.randn(b, 17, 2)
    t = torch.rand(b)
    c = dit.cond_embed(t, 5, actions, camera)
    assert c.shape == (b, 5, 64)
    # Changing the actions of pixel frames 5..8 (latent frame 2) changes only latent frame 2.
    actions2 = actions.clone()
    actions2[:, 5:9] = (actions2[:, 5:9] + 1) % 5
    c2 = dit.cond_embed(t, 5, actions2, camera)
    changed = (c2 - c).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, False, False]
    # Order inside a group matters (phase embedding), not just the histogram of actions.
    actions3 = actions.clone()
    actions3[:, 5:9] = actions[:, 5:9].flip(1)
    if not torch.equal(actions3, actions):
        assert not torch.allclose(dit.cond_embed(t, 5, actions3, camera)[:, 2], c[:, 2])
    # Per-frame timesteps: a [B] t equals the same t repeated per frame.
    torch.testing.assert_close(dit.cond_embed(t[:, None].expand(b, 5), 5, actions, camera), c)
    with pytest.raises(ValueError, match="slots"):
        dit.cond_embed(t, 5, actions[..., :2], camera)


def test_per_frame_timesteps_in_forward():
    torch.manual_seed(0)
    dit = VideoDiT(tiny_args())
    perturb_zero_init(dit)
    x, t = torch.randn(2, 4, 5, 8, 8), torch.rand(2)
    text = torch.randn(2, 6, 32)
    torch.testing.assert_close(dit(x, t[:, None].expand(2, 5), text), dit(x, t, text))
    t_frames = torch.rand(2, 5)
    assert not torch.allclose(dit(x, t_frames, text), dit(x, t, text))


def test_sizes_on_meta_device():
    # The sizes are defined once, in conf/model/<size>.yaml; counted here with the same
    # conditioning for every size (16 latent channels, text_dim 1024, 3 action slots).
    nominal = {"tiny": 1.3e6, "tiny_pixel": 1.3e6, "small": 30e6, "base": 120e6, "1B": 1e9,
               "3B": 3e9, "7B": 7e9}
    assert set(nominal) == set(model_config_names())
    for name, target in nominal.items():
        size = load_model_config(name).dit
        args = DiTArgs(hidden_size=size.hidden_size, depth=size.depth, num_heads=size.num_heads,
                       in_channels=16, text_dim=1024, num_action_slots=3)
        model = build_on_meta(lambda: VideoDiT(args))
        assert all(p.is_meta for p in model.parameters())
        n = model.num_params()
        assert 0.85 * target < n < 1.2 * target, (name, n)
        assert model.num_params(exclude_embeddings=True) < n
        assert model.args.hidden_size % model.args.num_heads == 0
    with pytest.raises(KeyError, match="13B"):
        load_model_config("13B")


@pytest.mark.parametrize("patch", [[1, 2, 2], [1, 1, 1]])
def test_flops_formula_matches_a_flop_counter(patch):
    """The documented formula (6*P*tokens + attention) vs PyTorch's counter on a real forward."""
    torch.manual_seed(0)
    dit = VideoDiT(tiny_args(patch_size=patch, hidden_size=128, depth=3))
    latent, text_len = (4, 5, 8, 8), 12
    x = torch.randn(1, *latent)
    args = (
        x,
        torch.rand(1),
        torch.randn(1, text_len, 32),
        None,
        torch.randint(0, 5, (1, 17, 3)),
        torch.randn(1, 17, 2),
    )
    # The math SDPA backend decomposes into matmuls the counter sees (fused CPU kernels are
    # not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        dit(*args)
    measured = 3 * counter.get_total_flops()
    assert dit.flops_per_sample(latent, text_len) == pytest.approx(measured, rel=0.02)
