"""Conditioning for the latent DiT: per-frame timestep/action/camera embeddings, and the
input builders for image-to-video (mask channel) and reference images.

Everything here is per *latent frame*: the causal autoencoder maps pixel frame 0 to latent
frame 0 and pixel frames (i-1)*tf+1 .. i*tf to latent frame i, and controls follow that
grouping (see `pool_to_latent_frames`).

    >>> x_in, t_f, loss_mask = i2v_inputs(x0, x_t, t)        # first latent frame given clean
    >>> refs = draw_references(x0_latents, k=2, generator=g)  # [B, 2, C, h, w]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # runtime import would be circular (dit imports this module)
    from worldline.models.dit import DiTArgs

__all__ = [
    "timestep_embedding",
    "pool_to_latent_frames",
    "frame_phase",
    "ConditionEmbedder",
    "i2v_inputs",
    "draw_references",
]


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t in [0, 1]: [...] -> [..., dim] (float32).

    t is scaled by 1000 so the frequency range matches the usual integer-step embeddings.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pool_to_latent_frames(e: Tensor, num_latent: int, tf: int) -> Tensor:
    """Causally group per-pixel-frame features into latent frames.

    e [B, T_pix, D] with T_pix = 1 + (num_latent - 1) * tf -> [B, num_latent, D]: latent frame
    0 takes pixel frame 0, latent frame i the mean of pixel frames (i-1)*tf+1 ... i*tf.
    """
    b, t_pix, d = e.shape
    if t_pix != 1 + (num_latent - 1) * tf:
        raise ValueError(
            f"conditioning has {t_pix} pixel frames but the latent has {num_latent} frames; "
            f"expected 1 + ({num_latent} - 1) * {tf} = {1 + (num_latent - 1) * tf}"
        )
    rest = e[:, 1:].reshape(b, num_latent - 1, tf, d).mean(dim=2)
    return torch.cat([e[:, :1], rest], dim=1)


def frame_phase(num_pixel_frames: int, tf: int, device=None) -> Tensor:
    """Position of each pixel frame inside its latent-frame group: [T_pix] long in [0, tf).

    Frame 0 is alone in its group and gets tf - 1 (the last slot, like every group's newest
    frame). Embedding the phase before mean-pooling keeps the order of events within a group.
    """
    f = torch.arange(num_pixel_frames, device=device)
    return torch.where(f == 0, tf - 1, (f - 1) % tf)


class ConditionEmbedder(nn.Module):
    """Per-latent-frame conditioning c [B, t, D] = MLP(timestep) + actions + camera.

    Actions and camera are embedded per pixel frame (with the frame's phase in its group),
    then mean-pooled causally into latent frames. Missing or dropped (classifier-free
    guidance) actions/camera are replaced by learned null vectors, so "no control" is its own
    input rather than a particular action or a zero camera.
    """

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        d, tf = args.hidden_size, args.temporal_downsample
        self.args = args
        self.t_mlp = nn.Sequential(nn.Linear(args.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        if args.num_action_slots > 0:
            # One row per (slot, action): the sum over slots is a linear map of the
            # concatenated one-hots, so which sprite did what is kept.
            self.action_emb = nn.Embedding(args.num_action_slots * args.num_actions, d)
            self.action_phase = nn.Parameter(torch.zeros(tf, d))
            self.action_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
            self.null_action = nn.Parameter(torch.zeros(d))
        if args.action_dim > 0:
            if args.num_action_slots > 0:
                raise ValueError("choose discrete (num_action_slots) or continuous (action_dim)")
            self.action_in = nn.Linear(args.action_dim, d)
            self.action_phase = nn.Parameter(torch.zeros(tf, d))
            self.action_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
            self.null_action = nn.Parameter(torch.zeros(d))
        if args.camera_dim > 0:
            self.camera_in = nn.Linear(args.camera_dim, d)
            self.camera_phase = nn.Parameter(torch.zeros(tf, d))
            self.camera_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
            self.null_camera = nn.Parameter(torch.zeros(d))

    def forward(
        self,
        t: Tensor,
        num_frames: int,
        actions: Tensor | None = None,
        camera: Tensor | None = None,
        drop: Tensor | None = None,
        frame_start: int = 0,
    ) -> Tensor:
        """t [B] or [B, num_frames] in [0, 1]; actions [B, T_pix, S] long (discrete) or
        [B, T_pix, action_dim] float (continuous); camera [B, T_pix, camera_dim]; drop [B]
        bool (null actions and camera) -> [B, num_frames, D].

        frame_start > 0 (rollout): the frames are latent frames frame_start.. of a longer video,
        so T_pix = num_frames * tf (no lone first frame)."""
        a = self.args
        fs = frame_start
        if t.dim() == 1:
            t = t[:, None].expand(-1, num_frames)
        c = self.t_mlp(timestep_embedding(t, a.freq_dim).to(self.t_mlp[0].weight.dtype))
        keep = None if drop is None else (~drop.bool()).view(-1, 1, 1)
        if a.num_action_slots > 0:
            e = None
            if actions is not None:
                if actions.shape[-1] != a.num_action_slots:
                    raise ValueError(
                        f"actions have {actions.shape[-1]} slots, "
                        f"model expects {a.num_action_slots}"
                    )
                offsets = torch.arange(a.num_action_slots, device=actions.device) * a.num_actions
                e = self.action_emb(actions.long() + offsets).sum(dim=2)  # [B, T_pix, D]
                e = self._embed(e, self.action_phase, self.action_mlp, num_frames, fs)
            c = c + self._or_null(e, self.null_action, keep)
        if a.action_dim > 0:
            e = None
            if actions is not None:
                e = self.action_in(actions.to(c.dtype))
                e = self._embed(e, self.action_phase, self.action_mlp, num_frames, fs)
            c = c + self._or_null(e, self.null_action, keep)
        if a.camera_dim > 0:
            e = None
            if camera is not None:
                e = self.camera_in(camera.to(c.dtype))
                e = self._embed(e, self.camera_phase, self.camera_mlp, num_frames, fs)
            c = c + self._or_null(e, self.null_camera, keep)
        return c

    def _embed(self, e: Tensor, phase: Tensor, mlp: nn.Module, num_frames: int, start: int):
        """Per-pixel-frame features e [B, T_pix, D] -> per-latent-frame [B, num_frames, D]."""
        return self._pool(mlp(e + self._phase(phase, e, start)), num_frames, start)

    def _phase(self, table: Tensor, e: Tensor, start: int) -> Tensor:
        tf = self.args.temporal_downsample
        if start > 0:  # groups of tf frames only: phase = position in the group
            return table[torch.arange(e.shape[1], device=e.device) % tf]
        return table[frame_phase(e.shape[1], tf, e.device)]

    def _pool(self, e: Tensor, num_frames: int, start: int) -> Tensor:
        tf = self.args.temporal_downsample
        if start > 0:
            if e.shape[1] != num_frames * tf:
                raise ValueError(f"rollout frames need {num_frames} x {tf} pixel-frame controls")
            return e.view(e.shape[0], num_frames, tf, -1).mean(dim=2)
        return pool_to_latent_frames(e, num_frames, tf)

    @staticmethod
    def _or_null(e: Tensor | None, null: Tensor, keep: Tensor | None) -> Tensor:
        if e is None:
            return null.view(1, 1, -1)
        return e if keep is None else torch.where(keep, e, null.view(1, 1, -1))


# ---------------------------------------------------------------------------------------------
# Image-to-video and references: input builders (pure tensor math, used by trainer and sampler)
# ---------------------------------------------------------------------------------------------
def i2v_inputs(
    x0: Tensor, x_t: Tensor, t: Tensor, num_cond_frames: int = 1, keep: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Image(s)-to-video conditioning with a mask channel.

    The first `num_cond_frames` latent frames are replaced by the clean latents, get flow time
    0 and a mask channel of 1; the rest stay noisy (mask 0) with their time t.

    Args:
        x0: clean latents [B, C, t, h, w]; x_t: noisy latents, same shape.
        t: [B] or [B, t] flow times.
        keep: optional [B] bool; False turns conditioning off for that sample (plain t2v, the
            mask channel all 0), so one model learns both and the condition can be dropped
            for classifier-free guidance.
    Returns:
        x_in [B, C + 1, t, h, w] (DiTArgs.mask_channel=True), t_frames [B, t] and loss_mask
        [B, 1, t, 1, 1] (1 where the loss applies: the generated frames).
    """
    b, _, n = x0.shape[:3]
    cond = torch.zeros(b, n, dtype=torch.bool, device=x0.device)
    cond[:, :num_cond_frames] = True
    if keep is not None:
        cond &= keep.bool().view(b, 1)
    m = cond.view(b, 1, n, 1, 1)
    x = torch.where(m, x0, x_t)
    t_frames = t[:, None].expand(b, n) if t.dim() == 1 else t
    t_frames = torch.where(cond, torch.zeros_like(t_frames), t_frames)
    mask_ch = m.to(x.dtype).expand(b, 1, *x.shape[2:])
    return torch.cat([x, mask_ch], dim=1), t_frames, (~m).to(x.dtype)


def draw_references(
    latents: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    crop_scale: tuple[float, float] = (1.0, 1.0),
) -> Tensor:
    """Draw K reference latents per clip from its own frames (optionally random crops resized
    back to the frame size): latents [B, C, t, h, w] -> [B, K, C, h, w].

    Frames are drawn with replacement, uniformly; a crop keeps a random (scale * h, scale * w)
    window (scale uniform in crop_scale) and resizes it bilinearly. Drawing from the clip
    itself needs no extra data; the model still has to learn to copy appearance, not position.
    For pixel-space crops, crop then encode with the autoencoder as an image (T = 1) instead.
    """
    b, c, n, h, w = latents.shape
    gen_dev = generator.device if generator is not None else latents.device
    idx = torch.randint(0, n, (b, k), generator=generator, device=gen_dev).to(latents.device)
    refs = latents.permute(0, 2, 1, 3, 4)[torch.arange(b, device=latents.device)[:, None], idx]
    lo, hi = crop_scale
    if hi >= 1.0 and lo >= 1.0:
        return refs
    u = torch.rand(b, k, 3, generator=generator, device=gen_dev).tolist()
    out = torch.empty_like(refs)
    for i in range(b):
        for j in range(k):
            s = lo + (hi - lo) * u[i][j][0]
            ch, cw = max(1, round(h * s)), max(1, round(w * s))
            y0, x0 = int(u[i][j][1] * (h - ch + 1)), int(u[i][j][2] * (w - cw + 1))
            crop = refs[i, j, :, y0 : y0 + ch, x0 : x0 + cw]
            out[i, j] = F.interpolate(crop[None], size=(h, w), mode="bilinear",
                                      align_corners=False)[0]
    return out
