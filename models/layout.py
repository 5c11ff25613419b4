"""Token layout of one DiT forward: 3D RoPE angles and the frame-causal attention pattern.

A DiT sequence is ``frames`` video frames (t-major, ``per_frame`` tokens each) followed by
``refs`` reference frames, optionally after ``past`` cached keys (a KV-cached rollout). The
block-causal pattern over it is described by :class:`FrameCausal`, a small frozen (hashable)
value: kernels that can skip whole blocks (FlexAttention, models/flex.py) build their block
mask from it once and cache it, and every other kernel asks for :meth:`FrameCausal.dense`,
the [N, past + N] bool mask. :func:`frame_causal_mask` is that dense mask (kept for callers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from worldline.models.kv_cache import kv_length

__all__ = ["FrameCausal", "frame_causal_mask", "attention_layout", "rope_axis_dims",
           "rope_3d", "REF_TIME_POS"]

# Reserved RoPE time position of reference tokens: just before frame 0, never a video frame.
REF_TIME_POS = -1


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dim over (t, h, w); each even, h == w, t takes the remainder."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_3d(
    grid: tuple[int, int, int], head_dim: int, theta: float, device=None, t_start: int = 0
) -> tuple[Tensor, Tensor]:
    """cos, sin [N, head_dim // 2] for a (t, h, w) token grid flattened t-major.

    Computed from the actual grid on every call, so unseen sizes (longer videos, larger
    frames) just work; `t_start` offsets frame positions (for rolling generation later).
    """
    angles = []
    for size, dim, start in zip(grid, rope_axis_dims(head_dim), (t_start, 0, 0)):
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
        pos = torch.arange(start, start + size, device=device, dtype=torch.float64)
        angles.append(torch.outer(pos, inv_freq))  # [size, dim / 2]
    gt, gh, gw = grid
    at, ah, aw = angles
    full = torch.cat(
        [
            at[:, None, None].expand(gt, gh, gw, -1),
            ah[None, :, None].expand(gt, gh, gw, -1),
            aw[None, None, :].expand(gt, gh, gw, -1),
        ],
        dim=-1,
    ).reshape(gt * gh * gw, head_dim // 2)
    return full.cos().float(), full.sin().float()


@dataclass(frozen=True)
class FrameCausal:
    """Block-causal pattern over ``frames`` video frames then ``refs`` reference frames,
    ``per_frame`` tokens each, after ``past`` cached keys: queries [N], keys [past + N] with
    N = (frames + refs) * per_frame.

    Video frame i attends frames <= i and every reference; references attend references only
    (so they never see the video, and cached reference K/V stay valid). The first ``past``
    keys (a KV cache of earlier frames and references) are visible to every video token and
    to no reference.
    """

    frames: int
    refs: int
    per_frame: int
    past: int = 0

    @property
    def num_queries(self) -> int:
        """N: this call's tokens."""
        return (self.frames + self.refs) * self.per_frame

    @property
    def num_keys(self) -> int:
        """past + N."""
        return self.past + self.num_queries

    def ranks(self, device=None) -> tuple[Tensor, Tensor]:
        """Per-token ranks (q_rank [N], k_rank [past + N]) with attend <=> q_rank >= k_rank.

        A video token's rank is its frame, a reference's is -1; cached keys get rank 0, which
        every video frame (>= 0) passes and no reference (-1) does. One comparison per
        (query, key) is all a FlexAttention mask_mod has to evaluate.
        """
        rank = torch.cat([torch.arange(self.frames, device=device),
                          torch.full((self.refs,), -1, device=device)]
                         ).repeat_interleave(self.per_frame)
        return rank, torch.cat([torch.zeros(self.past, dtype=rank.dtype, device=device), rank])

    def dense(self, device=None) -> Tensor:
        """The [N, past + N] bool mask (True = attend); cached per (layout, device), since
        every layer of a forward asks for the same one. Treat it as read-only."""
        return _dense(self, None if device is None else torch.device(device))


@functools.lru_cache(maxsize=32)
def _dense(layout: FrameCausal, device: torch.device | None) -> Tensor:
    q_rank, k_rank = layout.ranks(device)
    return q_rank[:, None] >= k_rank[None, :]


def frame_causal_mask(
    frames: int, refs: int, per_frame: int, past: int = 0, device=None
) -> Tensor:
    """Block-causal attention mask [N, past + N] bool (True = attend) for token frames
    0..frames-1 followed by `refs` reference frames, `per_frame` tokens each; see
    :class:`FrameCausal` for the rules (this is ``FrameCausal(...).dense(device)``)."""
    return FrameCausal(frames, refs, per_frame, past).dense(device)


def attention_layout(
    grid: tuple[int, int, int], head_dim: int, theta: float, device, t_start: int, refs: int,
    causal: bool, past_kv: list | None = None,
) -> tuple[tuple[Tensor, Tensor], FrameCausal | None]:
    """RoPE angles and attention pattern of one DiT forward (shared by every DiT layout):
    video tokens on ``grid`` at absolute frame positions from ``t_start`` (a rollout keeps
    counting up), then ``refs`` reference frames at REF_TIME_POS; a :class:`FrameCausal`
    when ``causal`` (``models.attention.attention`` takes it as ``attn_mask``), with the KV
    cache ``past_kv`` visible to every video token. None: full attention."""
    rope = rope_3d(grid, head_dim, theta, device, t_start=t_start)
    if refs:
        r_cos, r_sin = rope_3d((1, grid[1], grid[2]), head_dim, theta, device=device,
                               t_start=REF_TIME_POS)
        rope = (torch.cat([rope[0], r_cos.repeat(refs, 1)]),
                torch.cat([rope[1], r_sin.repeat(refs, 1)]))
    mask = None
    if causal and (grid[0] > 1 or refs):
        n_past = 0 if past_kv is None else kv_length(past_kv[0])
        mask = FrameCausal(grid[0], refs, grid[1] * grid[2], n_past)
    return rope, mask
