"""One attention entry point for every model in worldline.

`attention(q, k, v)` picks the fastest kernel that is correct for the inputs:

* flash-attn (`flash_attn_func`, or `flash_attn_varlen_func` when a key-padding mask is
  given) when the package imports, the tensors live on CUDA in fp16/bf16 and no arbitrary
  mask is needed;
* on CPU in bf16/fp16 on a CPU with bf16 hardware (AVX512-BF16 or AMX), unless the scores
  would take too much memory, an explicit matmul -> softmax -> matmul over cache-sized query
  chunks (PyTorch's CPU flash kernel is ~2x slower there; see `_use_cpu_matmul`). Without
  bf16 hardware (e.g. AVX2) bf16 is emulated: that path measured 1.9-5.9x slower than SDPA,
  and bf16 SDPA no faster than fp32 SDPA, so train in fp32 on such CPUs (BENCHMARKS.md);
* `torch.nn.functional.scaled_dot_product_attention` otherwise (CPU, fp32, arbitrary masks),
  which itself dispatches to PyTorch's flash / memory-efficient / math kernels.

Block-causal self-attention comes as a :class:`~worldline.models.layout.FrameCausal` in
``attn_mask`` (not a dense mask). The backend switch decides who runs it, and who runs
padded-key cross-attention when flash-attn cannot:

* ``"auto"`` (default): FlexAttention (models/flex.py, compiled, block-sparse) on CUDA; the
  dense [N, past + N] mask (``FrameCausal.dense``) through the kernels above elsewhere. On
  CPU flex is forward-only in torch 2.13, eager flex is an unfused reference, and compiled
  CPU flex takes ~30 s to build: the dense path is the CPU default (BENCHMARKS.md).
* ``"flex"``: FlexAttention wherever torch allows it (on CPU: no gradients; else dense).
* ``"dense"``: never FlexAttention.

Set it with ``set_backend(...)`` or the environment variable ``WORLDLINE_ATTENTION``.
Full (unmasked) attention always stays on flash-attn / SDPA.

flash-attn is optional: nothing here requires it to be installed.

    >>> q = k = v = torch.randn(2, 4, 16, 32)   # [B, heads, N, Dh]
    >>> attention(q, k, v).shape
    torch.Size([2, 4, 16, 32])
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldline.models import flex
from worldline.models.layout import FrameCausal

try:  # Optional dependency; import errors (missing wheel, ABI mismatch) mean "not available".
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func

    _FLASH_ATTN_IMPORT_OK = True
except Exception:  # noqa: BLE001 - any failure to import just disables the fast path
    _flash_attn_func = None
    _flash_attn_varlen_func = None
    _FLASH_ATTN_IMPORT_OK = False

_FLASH_DTYPES = (torch.float16, torch.bfloat16)

_BACKENDS = ("auto", "flex", "dense")
_backend = os.environ.get("WORLDLINE_ATTENTION", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"WORLDLINE_ATTENTION={_backend!r}: expected one of {_BACKENDS}")

# CPU, bf16: an explicit matmul -> softmax -> matmul, over query chunks whose score block stays
# in cache, runs fwd+bwd in well under the time of SDPA's CPU flash kernel on a CPU with bf16
# hardware (AVX512-BF16 / AMX; on AVX2 it loses 2-6x, so it is gated on that) (measured by
# `python -m worldline.scripts.bench_attention`, table in BENCHMARKS.md). In fp32 the two tie
# up to 1024^2 scores per head and SDPA wins beyond, so fp32 stays on SDPA.
_CPU_MATMUL_CHUNK_SCORES = 1 << 18  # per head and query chunk: 512 KiB of bf16 scores
# Unlike flash (which keeps a logsumexp), the matmul path keeps every probability for
# backward: 2^24 elements (32 MiB bf16 per layer) bounds that whatever the batch and heads.
_CPU_MATMUL_MAX_SCORES = 1 << 24

__all__ = ["attention", "flash_attn_available", "CrossAttentionProjections", "set_backend",
           "get_backend", "cpu_bf16_hardware"]


def set_backend(name: str) -> None:
    """Choose who runs structured masks: "auto", "flex" or "dense" (module docstring)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    """The backend set by :func:`set_backend` / ``WORLDLINE_ATTENTION`` (default "auto")."""
    return _backend


def _use_flex(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """FlexAttention for this call: per the backend switch, and only where torch runs it."""
    wanted = _backend == "flex" or (_backend == "auto" and q.is_cuda)
    return wanted and flex.supported(q, k, v)


def flash_attn_available() -> bool:
    """True when the flash-attn package imported successfully (says nothing about devices)."""
    return _FLASH_ATTN_IMPORT_OK


def _can_use_flash(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (
        _FLASH_ATTN_IMPORT_OK
        and q.is_cuda
        and q.dtype in _FLASH_DTYPES
        and q.dtype == k.dtype == v.dtype
        # flash-attn supports head dims up to 256.
        and q.shape[-1] <= 256
    )


def cpu_bf16_hardware() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles)."""
    # Private torch probes (cpuinfo); a torch without them counts as "no bf16 hardware".
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


# Decided once: the capability cannot change under a running process.
_CPU_BF16_HARDWARE = cpu_bf16_hardware()


def _use_cpu_matmul(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The explicit-matmul path: CPU with bf16 hardware, reduced precision, bounded score
    memory (see above)."""
    if q.device.type != "cpu" or q.dtype not in _FLASH_DTYPES or not q.dtype == k.dtype == v.dtype:
        return False
    if not _CPU_BF16_HARDWARE:  # emulated bf16 (AVX2): SDPA's kernel measured faster
        return False
    return q.numel() // q.shape[-1] * k.shape[-2] <= _CPU_MATMUL_MAX_SCORES


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(Dh) (+ mask)) v with reduced-precision matmuls, over query chunks.

    The scale goes on q, as in SDPA's math kernel (5x fewer elements than the scores). Scores
    and probabilities stay in q's dtype: PyTorch's CPU softmax accumulates bf16/fp16 in fp32
    (its output equals an fp32 softmax rounded once), so an explicit upcast would only add
    copies of the largest tensor here. Softmax rows are independent, so chunking the queries
    is exact; it keeps each chunk's score block in cache.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    rows = max(1, _CPU_MATMUL_CHUNK_SCORES // nk)
    if rows < nq:
        mask_rows = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == nq
        return torch.cat([
            _matmul_attention(q[..., i:i + rows, :], k, v,
                              attn_mask[..., i:i + rows, :] if mask_rows else attn_mask)
            for i in range(0, nq, rows)], dim=-2)
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    return torch.matmul(s.softmax(dim=-1), v)


def _fold_mask(attn_mask: Tensor | None, keep: Tensor) -> Tensor:
    """Combine an optional mask (bool, True = attend, or additive float) with a bool mask
    ``keep`` broadcastable to it: the result attends only where both allow."""
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def _flash_varlen_keys(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor) -> Tensor:
    """flash-attn with padded keys: queries stay dense, keys/values are unpadded.

    q [B, H, Nq, Dh]; k, v [B, H, Nk, Dh]; key_padding_mask [B, Nk] (True = real token).
    """
    b, h, nq, dh = q.shape
    nk = k.shape[2]
    q_ = q.transpose(1, 2).reshape(b * nq, h, dh)
    mask = key_padding_mask.bool()
    # Boolean indexing syncs with the host once; acceptable for cross-attention on short text.
    k_ = k.transpose(1, 2)[mask]
    v_ = v.transpose(1, 2)[mask]
    seqlens_k = mask.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * nq, nq, device=q.device, dtype=torch.int32)
    # Nk is a valid upper bound for the longest key sequence and avoids a host sync.
    out = _flash_attn_varlen_func(q_, k_, v_, cu_q, cu_k, nq, nk)
    return out.view(b, nq, h, dh).transpose(1, 2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | FrameCausal | None = None,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention with kernel dispatch.

    Args:
        q: [B, heads, Nq, Dh]; k, v: [B, heads, Nk, Dh].
        attn_mask: optional mask broadcastable to [B, heads, Nq, Nk]; bool (True = attend) or
            additive float; or a :class:`FrameCausal` layout (FlexAttention per the backend
            switch, else its dense mask). Rules out flash-attn.
        is_causal: causal (lower-triangular) masking.
        key_padding_mask: optional [B, Nk] bool, True for real keys. Uses flash-attn varlen on
            CUDA, an SDPA mask otherwise. Every row must keep at least one key.

    Returns:
        [B, heads, Nq, Dh], same dtype as q.
    """
    if isinstance(attn_mask, FrameCausal):
        if not is_causal and key_padding_mask is None and _use_flex(q, k, v):
            return flex.block_causal_attention(q, k, v, attn_mask)
        attn_mask = attn_mask.dense(q.device)
    if attn_mask is None and _can_use_flash(q, k, v):
        if key_padding_mask is None:
            # flash-attn layout is [B, N, heads, Dh].
            out = _flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal
            )
            return out.transpose(1, 2)
        if not is_causal:
            return _flash_varlen_keys(q, k, v, key_padding_mask)

    if (key_padding_mask is not None and attn_mask is None and not is_causal
            and _use_flex(q, k, v)):  # CUDA without flash-attn: no [B, 1, Nq, Nk] mask
        return flex.padded_keys_attention(q, k, v, key_padding_mask)
    if key_padding_mask is not None:
        attn_mask = _fold_mask(attn_mask, key_padding_mask.bool()[:, None, None, :])
    use_matmul = _use_cpu_matmul(q, k, v)
    if is_causal and (attn_mask is not None or use_matmul):
        # SDPA rejects mask + is_causal together, and the matmul path takes masks only: fold
        # causality (top-left aligned, as SDPA's is_causal) into the mask.
        nq, nk = q.shape[-2], k.shape[-2]
        attn_mask = _fold_mask(attn_mask, torch.ones(nq, nk, dtype=torch.bool,
                                                     device=q.device).tril())
        is_causal = False
    if use_matmul:
        return _matmul_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class CrossAttentionProjections(nn.Module):
    """The projections of a cross-attention from tokens to a context: ``q``, fused ``kv``,
    ``proj`` and per-head QK RMSNorms (identity without ``qk_norm``). The text cross-attention
    (models/dit.py) and the audio cross-attention (models/audio.py) add their forwards."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
