"""Preallocated key/value storage of one attention layer, for KV-cached rollouts.

Concatenating the cached keys with each new frame's keys copies the whole cache once per
layer per denoising step, which makes a long rollout's per-frame cost grow with its context
through memory traffic alone. A :class:`KVBlock` keeps ``[B, H, capacity, Dh]`` buffers
instead: a step writes its keys after the committed ones and attends to a view of the
buffer, so the past is never copied; a finished frame is committed in place; a rolling window
drops the oldest frame with one shift of the kept part, once per frame.
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["KVBlock", "kv_length"]


class KVBlock:
    """K/V of one layer: ``k``, ``v`` buffers [B, H, capacity, Dh], the first ``length``
    tokens committed (RoPE already applied at their absolute positions)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def _reserve(self, like: Tensor, need: int) -> None:
        if self.k is not None and self.k.shape[2] >= need:
            return
        cap = max(need, 2 * (0 if self.k is None else self.k.shape[2]), 16)
        shape = (like.shape[0], like.shape[1], cap, like.shape[3])
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Committed tokens followed by ``k``/``v`` [B, H, n, Dh] (not committed): views
        [B, H, length + n, Dh] for one attention call."""
        need = self.length + k.shape[2]
        self._reserve(k, need)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        return self.k[:, :, :need], self.v[:, :, :need]

    def commit(self, k: Tensor, v: Tensor) -> None:
        """Append ``k``/``v`` [B, H, n, Dh] for good."""
        self.extend(k, v)
        self.length += k.shape[2]

    def drop(self, start: int, count: int) -> None:
        """Forget tokens ``start .. start + count - 1`` (keeps the order of the rest)."""
        end = self.length
        if count <= 0:
            return
        for buf in (self.k, self.v):
            buf[:, :, start : end - count] = buf[:, :, start + count : end].clone()
        self.length -= count


def kv_length(past: "KVBlock | tuple[Tensor, Tensor]") -> int:
    """Number of cached tokens of one layer's past (a KVBlock or a (k, v) pair)."""
    return past.length if isinstance(past, KVBlock) else past[0].shape[2]
