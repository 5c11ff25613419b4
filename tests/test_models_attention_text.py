"""Attention dispatch and the built-in text stack (tokenizer + encoder)."""

from __future__ import annotations

import math

import pytest
import torch

from worldline.models.attention import attention, flash_attn_available
from worldline.models.text import ByteTokenizer, TextEncoder, TextEncoderArgs

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)


def naive_attention(q, k, v, mask=None, causal=False):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~tri, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _qkv(b=2, h=3, nq=7, nk=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, nq, d, generator=g),
        torch.randn(b, h, nk, d, generator=g),
        torch.randn(b, h, nk, d, generator=g),
    )


def test_attention_matches_naive_softmax():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        attention(q, k, v, is_causal=True),
        naive_attention(q, k, v, causal=True),
        atol=1e-5,
        rtol=1e-5,
    )


def test_attention_masks_match_naive():
    q, k, v = _qkv(nq=5, nk=9)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, 6:] = False
    kpm[1, 2:] = False
    expected = naive_attention(q, k, v, mask=kpm[:, None, None, :])
    torch.testing.assert_close(
        attention(q, k, v, key_padding_mask=kpm), expected, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        attention(q, k, v, attn_mask=kpm[:, None, None, :]), expected, atol=1e-5, rtol=1e-5
    )
    # Key padding combined with causal masking (square case).
    q, k, v = _qkv(nq=6, nk=6)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1, 4:] = False
    torch.testing.assert_close(
        attention(q, k, v, key_padding_mask=kpm, is_causal=True),
        naive_attention(q, k, v, mask=kpm[:, None, None, :], causal=True),
        atol=1e-5,
        rtol=1e-5,
    )


def test_flash_attn_available_is_bool():
    assert isinstance(flash_attn_available(), bool)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and flash_attn_available()),
    reason="flash-attn path needs CUDA and the flash-attn package",
)
def test_flash_path_matches_sdpa_on_cuda():  # pragma: no cover - GPU only
    q, k, v = (t.cuda().bfloat16() for t in _qkv(nq=33, nk=33, d=64))
    ref = naive_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(attention(q, k, v).float(), ref, atol=2e-2, rtol=2e-2)
    kpm = torch.ones(2, 33, dtype=torch.bool, device="cuda")
    kpm[0, 20:] = False
    ref = naive_attention(q.float(), k.float(), v.float(), mask=kpm[:, None, None, :])
    torch.testing.assert_close(
        attention(q, k, v, key_padding_mask=kpm).float(), ref, atol=2e-2, rtol=2e-2
    )


def test_byte_tokenizer_roundtrip_and_padding():
    tok = ByteTokenizer()
    ids, mask = tok(["héllo", "", "x" * 100], max_len=16)
    assert (
        ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    )
    assert tok.decode(ids[0]) == "héllo"
    assert ids[0, 0] == tok.bos_id and ids[0, mask[0].sum() - 1] == tok.eos_id
    assert mask[1].sum() == 2  # bos + eos for the empty string
    assert mask[2].all() and ids[2, -1] == tok.eos_id  # truncated, still terminated
    assert (ids[~mask] == tok.pad_id).all()
    assert int(ids.max()) < tok.vocab_size == TextEncoderArgs().vocab_size


def test_text_encoder_shapes_and_padding_invariance():
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderArgs(dim=32, depth=2, num_heads=4, max_len=24)).eval()
    tok = ByteTokenizer()
    ids, mask = tok(["a red circle", "a blue square moving left"], max_len=24)
    out = enc(ids, mask)
    assert out.shape == (2, 24, 32)
    assert (out[~mask] == 0).all()
    # Padding content and length must not leak into real tokens.
    ids_short, mask_short = tok(["a red circle"], max_len=16)
    torch.testing.assert_close(out[0, :16], enc(ids_short, mask_short)[0], atol=1e-5, rtol=1e-5)
    assert enc.flops_per_sample(24) > 0 and enc.num_params() > 0


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "frame_mask", "additive"])
def test_cpu_bf16_matmul_path_matches_sdpa_values_and_grads(case, monkeypatch):
    """bf16 on CPU takes the explicit matmul path (small scores); it must agree with SDPA in
    fp32 on outputs and on the gradients of q, k and v, for every kind of mask."""
    import worldline.models.attention as attn_mod

    monkeypatch.setattr(attn_mod, "_CPU_BF16_HARDWARE", True)  # the path, whatever this CPU

    q, k, v = _qkv(b=2, h=3, nq=12, nk=12, d=16)
    kw: dict = {}
    if case == "causal":
        kw["is_causal"] = True
    elif case == "padding":
        kpm = torch.ones(2, 12, dtype=torch.bool)
        kpm[1, 7:] = False
        kw["key_padding_mask"] = kpm
    elif case == "frame_mask":  # block-causal over 3 frames of 4 tokens
        rank = torch.arange(3).repeat_interleave(4)
        kw["attn_mask"] = rank[:, None] >= rank[None, :]
    elif case == "additive":
        kw["attn_mask"] = torch.randn(12, 12)
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    assert attn_mod._use_cpu_matmul(q16, k16, v16)
    out16 = attention(q16, k16, v16, **kw)
    assert out16.dtype == torch.bfloat16
    q32, k32, v32 = (t.bfloat16().float().requires_grad_() for t in (q, k, v))
    out32 = attention(q32, k32, v32, **kw)  # fp32 never takes the matmul path: SDPA reference
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)
    g = torch.randn_like(out32)
    out16.backward(g.bfloat16())
    out32.backward(g)
    for a, b in ((q16, q32), (k16, k32), (v16, v32)):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


def test_cpu_matmul_path_only_for_reduced_precision_and_bounded_scores(monkeypatch):
    import worldline.models.attention as attn_mod

    small = torch.zeros(1, 2, 64, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(attn_mod, "_CPU_BF16_HARDWARE", False)  # AVX2: SDPA measured faster
    assert not attn_mod._use_cpu_matmul(small, small, small)
    monkeypatch.setattr(attn_mod, "_CPU_BF16_HARDWARE", True)  # AVX512-BF16 / AMX
    small = torch.zeros(1, 2, 64, 16, dtype=torch.bfloat16)
    assert attn_mod._use_cpu_matmul(small, small, small)
    assert not attn_mod._use_cpu_matmul(small.float(), small.float(), small.float())
    many_heads = torch.zeros(1, 1 + attn_mod._CPU_MATMUL_MAX_SCORES // 64 ** 2, 64, 8,
                             dtype=torch.bfloat16)
    assert not attn_mod._use_cpu_matmul(many_heads, many_heads, many_heads)  # memory bound


@pytest.mark.parametrize("mask", ["none", "frame", "padding"])
def test_cpu_matmul_query_chunks_are_exact(monkeypatch, mask):
    """Query chunks (forced small here) give the unchunked result, masks sliced per chunk."""
    import worldline.models.attention as attn_mod

    monkeypatch.setattr(attn_mod, "_CPU_BF16_HARDWARE", True)
    q, k, v = (t.bfloat16() for t in _qkv(b=2, h=2, nq=12, nk=12, d=8))
    kw: dict = {}
    if mask == "frame":
        rank = torch.arange(3).repeat_interleave(4)
        kw["attn_mask"] = rank[:, None] >= rank[None, :]
    elif mask == "padding":
        kw["key_padding_mask"] = torch.tensor([[True] * 12, [True] * 5 + [False] * 7])
    whole = attention(q, k, v, **kw)
    monkeypatch.setattr(attn_mod, "_CPU_MATMUL_CHUNK_SCORES", 5 * 12)  # 5-row chunks: 5+5+2
    torch.testing.assert_close(attention(q, k, v, **kw), whole, atol=0, rtol=0)
