"""Conditioning for the latent DiT: per-frame timestep/action/camera embeddings, and the
reference-image input builder (image-to-video's clean prefix is train/tasks.py's
``clean_prefix_inputs``).

Everything here is per *latent frame*: the causal autoencoder maps pixel frame 0 to latent
frame 0 and pixel frames (i-1)*tf+1 .. i*tf to latent frame i, and controls follow that
grouping (see `pool_to_latent_frames`).

    >>> refs = draw_references(x0_latents, k=2, generator=g)  # [B, 2, C, h, w]
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "timestep_embedding",
    "pool_to_latent_frames",
    "frame_phase",
    "ConditionEmbedder",
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
    """Per-latent-frame conditioning c [B, t, D] = MLP(timestep) + actions + camera + audio.

    Actions and camera are embedded per pixel frame (with the frame's phase in its group),
    then mean-pooled causally into latent frames. Missing or dropped (classifier-free
    guidance) actions/camera are replaced by learned null vectors, so "no control" is its own
    input rather than a particular action or a zero camera.

    Args (the DiT passes its DiTArgs fields): hidden_size D; freq_dim of the sinusoidal
    timestep features; temporal_downsample tf (pixel frames per latent frame);
    num_action_slots S and num_actions (discrete actions, S = 0 disables) or action_dim
    (continuous, 0 disables); camera_dim (0 disables); audio_dim: per-pixel-frame audio
    features (models/audio.py LogMelFrames; 0 disables), embedded exactly like camera but
    with per-frame validity and its own CFG dropout; timestep=False drops the timestep
    MLP, leaving :meth:`add_controls` (the controls alone, for WanDiT).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        freq_dim: int = 256,
        temporal_downsample: int = 4,
        num_action_slots: int = 0,
        num_actions: int = 5,
        action_dim: int = 0,
        camera_dim: int = 0,
        timestep: bool = True,
        audio_dim: int = 0,
    ) -> None:
        super().__init__()
        if num_action_slots > 0 and action_dim > 0:
            raise ValueError("choose discrete (num_action_slots) or continuous (action_dim)")
        d, tf = hidden_size, temporal_downsample
        self.freq_dim, self.temporal_downsample = freq_dim, tf
        self.num_action_slots, self.num_actions = num_action_slots, num_actions
        self.action_dim, self.camera_dim, self.audio_dim = action_dim, camera_dim, audio_dim
        # Attribute order is construction order, which init replay relies on (models/init.py).
        # timestep=False keeps only the controls (WanDiT embeds time with diffusers' layers).
        if timestep:
            self.t_mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        if num_action_slots > 0:
            # One row per (slot, action): the sum over slots is a linear map of the
            # concatenated one-hots, so which sprite did what is kept.
            self.action_emb = nn.Embedding(num_action_slots * num_actions, d)
        if action_dim > 0:
            self.action_in = nn.Linear(action_dim, d)
        if self.has_actions:
            self.action_phase = nn.Parameter(torch.zeros(tf, d))
            self.action_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
            self.null_action = nn.Parameter(torch.zeros(d))
        if camera_dim > 0:
            self.camera_in = nn.Linear(camera_dim, d)
            self.camera_phase = nn.Parameter(torch.zeros(tf, d))
            self.camera_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
            self.null_camera = nn.Parameter(torch.zeros(d))
        if audio_dim > 0:  # after camera: models without audio keep their init draws
            self.audio_in = nn.Linear(audio_dim, d)
            self.audio_phase = nn.Parameter(torch.zeros(tf, d))
            self.audio_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
            self.null_audio = nn.Parameter(torch.zeros(d))

    @property
    def has_actions(self) -> bool:
        """Whether this embedder takes actions (discrete or continuous)."""
        return self.num_action_slots > 0 or self.action_dim > 0

    def forward(
        self,
        t: Tensor,
        num_frames: int,
        actions: Tensor | None = None,
        camera: Tensor | None = None,
        drop: Tensor | None = None,
        frame_start: int = 0,
        *,
        audio: Tensor | None = None,
        audio_valid: Tensor | None = None,
        drop_audio: Tensor | None = None,
    ) -> Tensor:
        """t [B] or [B, num_frames] in [0, 1]; actions [B, T_pix, S] long (discrete) or
        [B, T_pix, action_dim] float (continuous); camera [B, T_pix, camera_dim]; drop [B]
        bool (null actions and camera); audio [B, T_pix, audio_dim] features, audio_valid
        [B, T_pix] bool (False: that pixel frame has no real audio), drop_audio [B] bool
        (null audio) -> [B, num_frames, D].

        frame_start > 0 (rollout): the frames are latent frames frame_start.. of a longer video,
        so T_pix = num_frames * tf (no lone first frame)."""
        if t.dim() == 1:
            t = t[:, None].expand(-1, num_frames)
        c = self.t_mlp(timestep_embedding(t, self.freq_dim).to(self.t_mlp[0].weight.dtype))
        return self.add_controls(c, actions, camera, drop, frame_start, audio=audio,
                                 audio_valid=audio_valid, drop_audio=drop_audio)

    def add_controls(
        self,
        c: Tensor,
        actions: Tensor | None = None,
        camera: Tensor | None = None,
        drop: Tensor | None = None,
        frame_start: int = 0,
        *,
        audio: Tensor | None = None,
        audio_valid: Tensor | None = None,
        drop_audio: Tensor | None = None,
    ) -> Tensor:
        """c [B, num_frames, D] plus the action, camera and audio embeddings of those frames
        (their learned nulls when missing or dropped); arguments as in :meth:`forward`."""
        fs, num_frames = frame_start, c.shape[1]
        keep = None if drop is None else (~drop.bool()).view(-1, 1, 1)
        if self.has_actions:
            e = None
            if actions is not None:
                e = self._embed(self._action_features(actions, c.dtype), self.action_phase,
                                self.action_mlp, num_frames, fs)
            c = c + self._or_null(e, self.null_action, keep)
        if self.camera_dim > 0:
            e = None
            if camera is not None:
                e = self.camera_in(camera.to(c.dtype))
                e = self._embed(e, self.camera_phase, self.camera_mlp, num_frames, fs)
            c = c + self._or_null(e, self.null_camera, keep)
        if self.audio_dim > 0:
            c = c + self._audio(audio, audio_valid, drop_audio, num_frames, fs, c.dtype)
        return c

    def _audio(self, audio: Tensor | None, valid: Tensor | None, drop: Tensor | None,
               num_frames: int, start: int, dtype: torch.dtype) -> Tensor:
        """Audio embedding per latent frame [B, num_frames, D] (or the null [1, 1, D]).

        Invalid pixel frames become null_audio *before* pooling, so a latent frame whose
        audio is half missing averages real and null frames rather than real and silence."""
        if audio is None:
            return self.null_audio.view(1, 1, -1)
        e = self.audio_in(audio.to(dtype))
        e = self.audio_mlp(e + self._phase(self.audio_phase, e, start))
        if valid is not None:
            e = torch.where(valid.bool()[..., None], e, self.null_audio)
        keep = None if drop is None else (~drop.bool()).view(-1, 1, 1)
        return self._or_null(self._pool(e, num_frames, start), self.null_audio, keep)

    def _action_features(self, actions: Tensor, dtype: torch.dtype) -> Tensor:
        """Per-pixel-frame action features [B, T_pix, D]: the summed per-slot embeddings of
        discrete actions [B, T_pix, S], or a linear map of continuous ones."""
        if self.num_action_slots == 0:
            return self.action_in(actions.to(dtype))
        if actions.shape[-1] != self.num_action_slots:
            raise ValueError(
                f"actions have {actions.shape[-1]} slots, model expects {self.num_action_slots}"
            )
        offsets = torch.arange(self.num_action_slots, device=actions.device) * self.num_actions
        return self.action_emb(actions.long() + offsets).sum(dim=2)

    def _embed(self, e: Tensor, phase: Tensor, mlp: nn.Module, num_frames: int, start: int):
        """Per-pixel-frame features e [B, T_pix, D] -> per-latent-frame [B, num_frames, D]."""
        return self._pool(mlp(e + self._phase(phase, e, start)), num_frames, start)

    def _phase(self, table: Tensor, e: Tensor, start: int) -> Tensor:
        tf = self.temporal_downsample
        if start > 0:  # groups of tf frames only: phase = position in the group
            return table[torch.arange(e.shape[1], device=e.device) % tf]
        return table[frame_phase(e.shape[1], tf, e.device)]

    def _pool(self, e: Tensor, num_frames: int, start: int) -> Tensor:
        tf = self.temporal_downsample
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
# References: input builder (pure tensor math, used by trainer and sampler)
# ---------------------------------------------------------------------------------------------
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
