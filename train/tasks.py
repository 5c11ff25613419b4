"""Flow-stage task mix: text-to-video, image-to-video and continuation in one model.

Every task is the same flow-matching loss on latents [B, C, t, h, w]; they differ only in how
many leading latent frames are given clean (a *clean prefix*, mask channel 1, flow time 0, no
loss): 0 for text-to-video, 1 for image-to-video, 2..t-1 for continuation. With diffusion
forcing each latent frame also draws its own noise level, so the same model learns
next-frame prediction under any amount of past noise (what the KV-cached rollout needs).

Pure tensor math; the trainer passes its own generator so a run stays reproducible::

    prefix = sample_prefix_lengths(b, t_lat, TaskProbs(0.5, 0.3, 0.2), g)   # [B] long
    x_in, t_in, loss_mask = clean_prefix_inputs(x0, x_t, t, prefix, mask_channel=True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TaskProbs", "sample_prefix_lengths", "clean_prefix_inputs"]


@dataclass
class TaskProbs:
    """Unnormalised task probabilities (see conf/stage/pretrain.yaml ``stage.tasks``)."""

    t2v: float = 1.0
    i2v: float = 0.0
    continuation: float = 0.0

    def tensor(self) -> Tensor:
        """Normalised probabilities [3] float64 in the order t2v, i2v, continuation."""
        p = torch.tensor([self.t2v, self.i2v, self.continuation], dtype=torch.float64)
        return p / p.sum()


def sample_prefix_lengths(b: int, frames: int, probs: TaskProbs, generator: torch.Generator,
                          device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Draw a task per sample and its clean-prefix length in latent frames.

    Returns (prefix [B] long, task [B] long: 0 t2v, 1 i2v, 2 continuation, the order of
    TaskProbs' fields). Continuation gives 2..frames-1
    frames (1 when the clip has only 2 latent frames); a 1-frame latent can only be t2v.
    """
    gen_dev = generator.device
    task = torch.multinomial(probs.tensor().float().to(gen_dev), b, replacement=True,
                             generator=generator)
    u = torch.rand(b, generator=generator, device=gen_dev)
    lo = min(2, frames - 1)
    hi = max(lo, frames - 1)
    cont = lo + (u * (hi - lo + 1)).long().clamp_max(hi - lo)
    prefix = torch.where(task == 0, 0, torch.where(task == 1, 1, cont))
    if frames < 2:
        prefix = torch.zeros_like(prefix)
    return prefix.to(device), task.to(device)


def clean_prefix_inputs(x0: Tensor, x_t: Tensor, t: Tensor, prefix: Tensor,
                        mask_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Give each sample's first ``prefix[i]`` latent frames clean.

    Args:
        x0: clean latents [B, C, t, h, w]; x_t: their noisy version (same shape).
        t: flow times [B] or [B, t].
        prefix: [B] long, clean frames per sample (0 = plain text-to-video).
        mask_channel: append the conditioning mask channel (DiTArgs.mask_channel).
    Returns:
        x_in [B, C(+1), t, h, w], per-frame times [B, t] (0 on clean frames) and the loss mask
        [B, 1, t, 1, 1] (1 on generated frames).
    """
    b, _, n = x0.shape[:3]
    cond = torch.arange(n, device=x0.device)[None, :] < prefix.to(x0.device)[:, None]  # [B, t]
    m = cond.view(b, 1, n, 1, 1)
    x = torch.where(m, x0, x_t)
    t_frames = t[:, None].expand(b, n) if t.dim() == 1 else t
    t_frames = torch.where(cond, torch.zeros_like(t_frames), t_frames)
    if mask_channel:
        x = torch.cat([x, m.to(x.dtype).expand(b, 1, *x.shape[2:])], dim=1)
    return x, t_frames, (~m).to(x0.dtype)
