"""FlexAttention kernels for structured masks: block-causal self-attention and padded keys.

``torch.nn.attention.flex_attention`` evaluates a ``mask_mod(b, h, q_idx, kv_idx)`` per score
and, through a ``BlockMask``, skips every (128 x 128) tile that the mask rules out entirely.
For frame-causal attention that skips roughly half the tiles of a long video and never
materialises an [N, past + N] mask, which SDPA / the matmul path need.

* :func:`block_causal_attention` takes a :class:`~worldline.models.layout.FrameCausal`; its
  ``BlockMask`` is built once per (layout, device) and kept in a bounded cache.
* :func:`padded_keys_attention` takes a [B, Nk] key-padding mask (text cross-attention); its
  ``BlockMask`` depends on the batch, so it is built per call (cheap next to the attention).

On CUDA the kernel is a ``torch.compile``d ``flex_attention`` (module level, compiled lazily
on first use: the eager op is an unfused reference implementation). On CPU the eager op is
used unless ``compiled=True`` is passed: compiled CPU flex ran a block-causal forward in 0.38
of the dense-mask SDPA time (8 frames, N=1024, AVX2) but took ~34 s to compile per shape, and
torch 2.13 has no flex backward on CPU (BENCHMARKS.md, issue 16). Which calls come here is
decided by ``models.attention`` (its backend switch).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
import torch.nn.attention.flex_attention as _fa
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from worldline.models.layout import FrameCausal

__all__ = ["block_causal_attention", "padded_keys_attention", "frame_causal_block_mask",
           "supported"]

_compiled: Callable | None = None


def _kernel(device: torch.device, compiled: bool | None) -> Callable:
    """flex_attention, compiled (once per process) on CUDA or when ``compiled`` asks."""
    global _compiled
    if compiled is None:
        compiled = device.type == "cuda"
    if not compiled:
        return flex_attention
    if _compiled is None:
        # dynamic=False: shapes of a training run are few; one graph per shape is fastest.
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether torch runs flex_attention on these inputs: in torch 2.13 not on CPU when a
    gradient is needed (torch's own check is asked, so a later torch lifts this by itself)."""
    check = getattr(_fa, "_validate_device", None)  # private: absent in a later torch = no limit
    if check is None:
        return True
    try:
        check(q, k, v)
    except (NotImplementedError, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=64)
def frame_causal_block_mask(layout: FrameCausal, device: torch.device) -> BlockMask:
    """The BlockMask of ``layout`` (queries [N], keys [past + N]) on ``device``, cached: every
    layer and step of a run with the same layout reuses it (64 entries bound the memory of
    rollouts whose KV length keeps changing)."""
    q_rank, k_rank = layout.ranks(device)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_rank[q_idx] >= k_rank[kv_idx]

    # B=None, H=None: the pattern is the same for every batch row and head (one mask).
    return create_block_mask(mask_mod, None, None, layout.num_queries, layout.num_keys,
                             device=device)


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, layout: FrameCausal,
                           compiled: bool | None = None) -> Tensor:
    """Attention of q [B, H, N, Dh] over k, v [B, H, past + N, Dh] under ``layout``; equals
    SDPA with ``layout.dense()`` as the mask. ``compiled``: None = compile on CUDA only."""
    if (q.shape[-2], k.shape[-2]) != (layout.num_queries, layout.num_keys):
        raise ValueError(f"q/k lengths {q.shape[-2]}/{k.shape[-2]} do not match {layout}")
    block_mask = frame_causal_block_mask(layout, q.device)
    return _kernel(q.device, compiled)(q, k, v, block_mask=block_mask)


def padded_keys_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor,
                          compiled: bool | None = None) -> Tensor:
    """Attention of q [B, H, Nq, Dh] over k, v [B, H, Nk, Dh] where only keys with
    ``key_padding_mask`` [B, Nk] True count (every row needs one); no dense [B, 1, Nq, Nk]
    mask is built. Padding need not be trailing: the mask is read per key."""
    keep = key_padding_mask.to(device=q.device, dtype=torch.bool)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep[b, kv_idx]

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[-2], k.shape[-2],
                                   device=q.device)
    return _kernel(q.device, compiled)(q, k, v, block_mask=block_mask)
