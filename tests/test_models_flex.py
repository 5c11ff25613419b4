"""FlexAttention for block-causal self-attention and padded-key cross-attention
(models/flex.py, models/layout.py): equal to the dense-mask SDPA path, outputs and gradients.

torch 2.13 refuses flex_attention backward on CPU (a device check; its eager reference
implementation has a backward). Gradient tests lift that check (``cpu_flex_grad``) to compare
the same mask_mods and BlockMasks that the compiled CUDA kernel runs; production code asks
torch's check (``flex.supported``) and falls back to the dense path on CPU training.
"""

import pytest
import torch
import torch.nn.attention.flex_attention as fa
import torch.nn.functional as F

from worldline.models import attention as attn_mod
from worldline.models import flex
from worldline.models.attention import attention, get_backend, set_backend
from worldline.models.dit import DiTArgs, VideoDiT, attention_layout, frame_causal_mask
from worldline.models.kv_cache import KVBlock
from worldline.models.layout import FrameCausal

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _restore_backend():
    before = get_backend()
    yield
    set_backend(before)


@pytest.fixture
def cpu_flex_grad(monkeypatch):
    """Let eager flex_attention run backward on CPU (see the module docstring)."""
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)


def _old_frame_causal_mask(frames, refs, per_frame, past=0):
    """frame_causal_mask as it was before FrameCausal (models/dit.py, 2026-11)."""
    rank = torch.cat([torch.arange(frames), torch.full((refs,), -1)]).repeat_interleave(per_frame)
    mask = rank[:, None] >= rank[None, :]
    if past:
        mask = torch.cat([(rank >= 0)[:, None].expand(-1, past), mask], dim=1)
    return mask


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("refs", [0, 1, 2])
@pytest.mark.parametrize("past", [0, 4, 13])
def test_dense_equals_old_mask(frames, refs, past):
    layout = FrameCausal(frames, refs, 3, past)
    old = _old_frame_causal_mask(frames, refs, 3, past)
    assert torch.equal(layout.dense(), old)
    assert torch.equal(frame_causal_mask(frames, refs, 3, past), old)
    assert old.shape == (layout.num_queries, layout.num_keys)


def _qkv(nq, nk, dtype, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, h, nk, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, nk, d, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def _out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    w = torch.randn_like(out, generator=torch.Generator().manual_seed(9))
    return (out, *torch.autograd.grad((out * w).sum(), (q, k, v)))


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frames,refs,past", [(1, 0, 0), (2, 2, 0), (5, 1, 0), (1, 0, 7),
                                              (2, 1, 7), (5, 2, 9), (2, 0, 40)])
def test_block_causal_equals_dense(cpu_flex_grad, dtype, frames, refs, past):
    """Output and q/k/v gradients; past 7/9/40 differs from N (3/9/24)."""
    layout = FrameCausal(frames, refs, 3, past)
    q, k, v = _qkv(layout.num_queries, layout.num_keys, dtype)
    got = _out_and_grads(lambda *t: flex.block_causal_attention(*t, layout), q, k, v)
    want = _out_and_grads(lambda *t: F.scaled_dot_product_attention(
        *t, attn_mask=layout.dense()), q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
    set_backend("flex")  # the dispatcher takes the layout object as attn_mask
    torch.testing.assert_close(attention(q, k, v, attn_mask=layout), want[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_keys_equals_masked_sdpa(cpu_flex_grad, dtype):
    q, k, v = _qkv(20, 9, dtype)
    keep = torch.tensor([[True] * 6 + [False] * 3, [True, False, True] * 3])  # not trailing
    got = _out_and_grads(lambda *t: flex.padded_keys_attention(*t, keep), q, k, v)
    want = _out_and_grads(lambda *t: F.scaled_dot_product_attention(
        *t, attn_mask=keep[:, None, None, :]), q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])
    set_backend("flex")
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=keep), want[0], **TOL[dtype])


def test_backend_switch_and_cpu_fallback(monkeypatch):
    with pytest.raises(ValueError):
        set_backend("fast")
    calls = []
    real = flex.block_causal_attention
    monkeypatch.setattr(flex, "block_causal_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layout = FrameCausal(2, 1, 3, 0)
    q, k, v = _qkv(9, 9, torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense())
    set_backend("auto")  # CPU: dense
    torch.testing.assert_close(attention(q, k, v, attn_mask=layout), want)
    set_backend("flex")  # CPU with gradients: torch refuses flex backward -> dense
    torch.testing.assert_close(attention(q, k, v, attn_mask=layout), want)
    assert not calls
    with torch.no_grad():  # CPU inference: flex runs
        torch.testing.assert_close(attention(q.detach(), k.detach(), v.detach(),
                                             attn_mask=layout), want,
                                   atol=1e-5, rtol=1e-5)
    assert calls == [1]
    _, mask = attention_layout((2, 2, 2), 8, 1e4, None, 0, 1, True)
    assert mask == FrameCausal(2, 1, 4, 0)
    assert attention_layout((1, 2, 2), 8, 1e4, None, 0, 0, True)[1] is None


def test_block_mask_is_cached():
    a = flex.frame_causal_block_mask(FrameCausal(3, 1, 5, 2), torch.device("cpu"))
    assert flex.frame_causal_block_mask(FrameCausal(3, 1, 5, 2), torch.device("cpu")) is a


def _dit(dtype):
    torch.manual_seed(0)
    dit = VideoDiT(DiTArgs(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=16,
                           num_action_slots=1, camera_dim=0, frame_causal=True, max_refs=2))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit.to(dtype)


def _inputs(dtype, frames=3):
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(2, 4, frames, 4, 4, generator=g, dtype=dtype),
                t=torch.rand(2, frames, generator=g, dtype=dtype),
                text=torch.randn(2, 5, 16, generator=g, dtype=dtype),
                text_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
                actions=torch.zeros(2, 1 + (frames - 1) * 4, 1, dtype=torch.long),
                refs=torch.randn(2, 1, 4, 4, 4, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dit_forward_backward_flex_equals_dense(cpu_flex_grad, dtype):
    dit, inp = _dit(dtype), _inputs(dtype)
    results = {}
    for backend in ("dense", "flex"):
        set_backend(backend)
        dit.zero_grad()
        out = dit(inp["x"], inp["t"], text=inp["text"], text_mask=inp["text_mask"],
                  actions=inp["actions"], refs=inp["refs"])
        out.square().sum().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in dit.parameters()
                                              if p.grad is not None]
    assert len(results["flex"]) == len(results["dense"]) > 10
    for a, b in zip(results["flex"], results["dense"]):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64])
def test_kv_cached_step_flex_equals_dense(dtype):
    """Prefill 2 frames (+ a reference), then 2 new frames over the cache (tuple and KVBlock
    pasts): flex (CPU inference, no gradients: no check lifted) equals dense."""
    dit, inp = _dit(dtype), _inputs(dtype, frames=4)
    a = inp["actions"]
    outs = {}
    with torch.no_grad():
        for backend in ("dense", "flex"):
            set_backend(backend)
            _, kvs = dit(inp["x"][:, :, :2], inp["t"][:, :2], actions=a[:, :5],
                         refs=inp["refs"], return_kv=True)
            blocks = []
            for k, v in kvs:
                blk = KVBlock()
                blk.commit(k, v)
                blocks.append(blk)
            step = dict(actions=a[:, 5:], frame_start=2)
            outs[backend] = [dit(inp["x"][:, :, 2:], inp["t"][:, 2:], past_kv=past, **step)
                             for past in (kvs, blocks)]
    for got, want in zip(outs["flex"], outs["dense"]):
        torch.testing.assert_close(got, want, **TOL[dtype])
