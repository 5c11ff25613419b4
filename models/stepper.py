"""Stepwise (interactive) world-model rollout: one latent frame per call, controls read per step.

:func:`worldline.models.rollout.rollout` generates a fixed number of frames in one call. An
interactive player (``worldline-play``) does not know the next action until the user presses
a key, may change the number of sampling steps or the guidance scale between frames, and never
knows the length in advance. :class:`RolloutStepper` keeps the same KV cache and does exactly
the same arithmetic as the cached path of ``rollout`` (so a stepped session with the same
noise and controls gives bitwise the same latents; tested), but one frame per :meth:`step`.

:class:`StreamDecoder` decodes those latents as they arrive, carrying the autoencoder's causal
padding state between calls (its chunked decode), so each step costs one latent frame of
decoding instead of the whole video.

    >>> dit = VideoDiT(DiTArgs(hidden_size=64, depth=2, num_heads=4, text_dim=0,
    ...                        num_action_slots=1, camera_dim=0, frame_causal=True))
    >>> st = RolloutStepper(dit, torch.randn(1, 4, 1, 8, 8), window=4, num_steps=4,
    ...                     context_actions=torch.zeros(1, 1, 1, dtype=torch.long))
    >>> z = st.step(torch.randn(1, 4, 1, 8, 8), actions=torch.zeros(1, 4, 1, dtype=torch.long))
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch import Tensor

from worldline.models.dit import VideoDiT
from worldline.models.flow import guided_velocity, sampling_schedule
from worldline.models.rollout import KVCache, _per_frame
# Re-exported: it lives with the rest of the streaming decode (models/stream_decode.py).
from worldline.models.stream_decode import StreamDecoder

__all__ = ["RolloutStepper", "StreamDecoder"]


class RolloutStepper:
    """A KV-cached rollout advanced one latent frame at a time (see the module docstring).

    ``num_steps``, ``shift``, ``text_scale`` and ``action_scale`` are plain attributes: change
    them between steps. Turning guidance on or off changes the number of batch branches the
    cache holds, so the cache is then rebuilt from the kept clean frames (at their absolute
    positions; the result is close to, not bitwise equal to, an uninterrupted session).
    """

    def __init__(self, dit: VideoDiT, context: Tensor, *, text: Optional[Tensor] = None,
                 text_mask: Optional[Tensor] = None, null_text: Optional[Tensor] = None,
                 refs: Optional[Tensor] = None, window: Optional[int] = None,
                 num_steps: int = 8, shift: float = 1.0, text_scale: float = 1.0,
                 action_scale: float = 1.0, context_actions: Optional[Tensor] = None,
                 context_camera: Optional[Tensor] = None, context_audio: Optional[Tensor] = None,
                 context_audio_valid: Optional[Tensor] = None) -> None:
        """``context``: clean latents [B, C, n0, h, w]; ``context_actions`` / ``_camera`` /
        ``_audio`` (features; ``_audio_valid`` [B, rows] bool): their controls
        [B, 1 + (n0 - 1) * tf, ...] (rollout's rows for the context frames)."""
        if dit.args.patch_size[0] != 1:
            raise ValueError("rollout generates one latent frame per block; needs p_t = 1")
        self.dit, self.text, self.text_mask, self.null_text = dit, text, text_mask, null_text
        self.refs, self.window = refs, window
        self.num_steps, self.shift = num_steps, shift
        self.text_scale, self.action_scale = text_scale, action_scale
        self.batch = context.shape[0]
        # Clean frames the cache covers (with their controls), for a rebuild after a guidance
        # change; bounded by the window like the cache itself.
        self._kept: deque = deque(maxlen=window)
        # Cross-attention audio re-reads the audio of the cached frames (kept with them).
        self._xattn = getattr(dit.args, "audio_mode", "") == "cross_attn" and dit.args.audio_dim
        self._prefill(context, 0, context_actions, context_camera,
                      (context_audio, context_audio_valid))

    @property
    def next_frame(self) -> int:
        """Absolute latent-frame index the next :meth:`step` generates."""
        return self.cache.next_frame

    @property
    def guided(self) -> bool:
        return self.text_scale != 1.0 or self.action_scale != 1.0

    def _branches(self) -> None:
        """Batch layout for the current guidance: full, text dropped, all dropped (rollout's)."""
        b, dev = self.batch, self._dev
        self._nb = 3 if self.guided else 1
        self._drop_a = torch.zeros(self._nb * b, dtype=torch.bool, device=dev)
        self._txt, self._tmask = self.text, self.text_mask
        if self.guided:
            self._drop_a[2 * b:] = True
            if self.text is not None:
                null = self.null_text.to(self.text.dtype).view(1, 1, -1).expand(
                    2 * b, self.text.shape[1], -1)
                self._txt = torch.cat([self.text, null], 0)
                if self.text_mask is not None:
                    ones = torch.ones_like(self.text_mask.bool()).repeat(2, 1)
                    self._tmask = torch.cat([self.text_mask.bool(), ones])

    def _rep(self, x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.repeat(self._nb, *([1] * (x.dim() - 1)))

    def _audio_kwargs(self, aud: tuple) -> dict:
        """DiT audio kwargs for this call's (features, valid) rows, with cross-attention also
        the rows of the cached frames before them (``audio_past``), as rollout passes them."""
        rows = [aud]
        if self._xattn and self.cache.past() is not None:
            rows = [k[3] for k in self._kept] + rows
        if all(r[0] is None for r in rows):
            return {}
        past = 0
        if len(rows) == 1:
            feats, valid = aud
        else:  # some frames without audio (or validity): null (invalid) rows there
            rows = [self._materialise(r, n) for r, n in zip(rows, self._row_counts(len(rows)))]
            feats, valid = (torch.cat([r[j] for r in rows], 1) for j in (0, 1))
            past = feats.shape[1] - rows[-1][0].shape[1]
        return dict(audio=self._rep(feats), audio_valid=self._rep(valid), audio_past=past,
                    drop_audio=self._drop_a)

    def _row_counts(self, frames: int) -> list[int]:
        """Pixel-frame rows of the last ``frames`` frames up to the current call's frame."""
        tf, end = self.dit.args.temporal_downsample, self._call_frame
        return [1 if j == 0 else tf for j in range(end - frames + 1, end + 1)]

    def _materialise(self, aud: tuple, rows: int) -> tuple[Tensor, Tensor]:
        feats, valid = aud
        if feats is None:
            feats = torch.zeros(self.batch, rows, self.dit.args.audio_dim, device=self._dev)
            valid = torch.zeros(self.batch, rows, dtype=torch.bool, device=self._dev)
        elif valid is None:
            valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return feats, valid

    def _call(self, x: Tensor, t: Tensor, start: int, acts: Optional[Tensor],
              cam: Optional[Tensor], aud: tuple = (None, None),
              with_refs: Optional[Tensor] = None, kv: bool = False):
        """One DiT forward over ``x`` [B, C, n, h, w] at flow times ``t`` [B, n] (rollout's);
        ``aud``: (audio features, valid) rows of these frames."""
        if self.dit.args.mask_channel:  # clean (t = 0) frames are the given ones: mask 1
            m = (t == 0).to(x.dtype)[:, None, :, None, None].expand(-1, 1, -1, *x.shape[3:])
            x = torch.cat([x, m], 1)
            if with_refs is not None:
                with_refs = torch.cat([with_refs, torch.ones_like(with_refs[:, :, :1])], 2)
        return self.dit(self._rep(x), self._rep(t), self._txt, self._tmask, self._rep(acts),
                        self._rep(cam), self._drop_a, frame_causal=True,
                        refs=self._rep(with_refs), frame_start=start,
                        past_kv=self.cache.past(), return_kv=kv, **self._audio_kwargs(aud))

    @torch.no_grad()
    def _prefill(self, frames: Tensor, start: int, acts: Optional[Tensor],
                 cam: Optional[Tensor], aud: tuple = (None, None)) -> None:
        """A fresh cache holding the clean ``frames`` [B, C, n, h, w] at ``start``."""
        self._dev = frames.device
        self._branches()
        self.cache = KVCache(self.window)
        self.cache.next_frame = start
        n = frames.shape[2]
        zeros = torch.zeros(self.batch, n, device=self._dev)
        self._call_frame = start + n - 1
        _, kvs = self._call(frames, zeros, start, acts, cam, aud, self.refs, kv=True)
        tok = _per_frame(self.dit, frames)
        ref_tokens = 0 if self.refs is None else kvs[0][0].shape[2] - n * tok
        self.cache.append(kvs, n, tok, ref_tokens)
        tf = self.dit.args.temporal_downsample
        for i in range(n):  # per frame its own control rows (1 for frame 0, else tf)
            lo = 0 if start + i == 0 else (1 + (start + i - 1) * tf) - (1 + (start - 1) * tf
                                                                       if start else 0)
            rows = 1 if start + i == 0 else tf
            a, av = (None if c is None else c[:, lo:lo + rows] for c in aud)
            self._kept.append((frames[:, :, i:i + 1],
                               None if acts is None else acts[:, lo:lo + rows],
                               None if cam is None else cam[:, lo:lo + rows], (a, av)))

    def rebuild(self) -> None:
        """Re-prefill the cache from the kept frames (after guidance was switched on/off)."""
        kept = list(self._kept)
        frames = torch.cat([k[0] for k in kept], 2)
        start = self.cache.next_frame - frames.shape[2]
        acts, cam = (None if kept[0][j] is None else torch.cat([k[j] for k in kept], 1)
                     for j in (1, 2))
        aud = [k[3] for k in kept]
        if any(a[0] is not None for a in aud):  # fill missing rows with null (invalid) audio
            self._call_frame = start + len(kept) - 1
            aud = [self._materialise(a, n) for a, n in zip(aud, self._row_counts(len(aud)))]
            aud = tuple(torch.cat([a[j] for a in aud], 1) for j in (0, 1))
        else:
            aud = (None, None)
        self._kept.clear()
        self._prefill(frames, start, acts, cam, aud)

    @torch.no_grad()
    def step(self, noise: Tensor, actions: Optional[Tensor] = None,
             camera: Optional[Tensor] = None, audio: Optional[Tensor] = None,
             audio_valid: Optional[Tensor] = None) -> Tensor:
        """Generate the next latent frame [B, C, 1, h, w] from ``noise`` (same shape) under
        ``actions`` / ``camera`` / ``audio`` features [B, tf, ...] (this frame's pixel-frame
        controls; ``audio_valid`` [B, tf] bool)."""
        if self._nb != (3 if self.guided else 1):
            self.rebuild()
        b, idx = self.batch, self.cache.next_frame
        ts = sampling_schedule(self.num_steps, self.shift, device=self._dev)
        x = noise
        first_refs = self.refs if (self.cache.past() is None and self.refs is not None) else None
        aud, self._call_frame = (audio, audio_valid), idx
        for s in range(self.num_steps):
            t_cur = ts[s].expand(b, 1)
            v = self._call(x, t_cur, idx, actions, camera, aud, first_refs)
            if self._nb == 3:
                v = guided_velocity(*v.chunk(3), self.text_scale, self.action_scale)
            x = x + (ts[s + 1] - ts[s]).to(x.dtype) * v
        _, kvs = self._call(x, torch.zeros(b, 1, device=self._dev), idx, actions, camera, aud,
                            first_refs, kv=True)
        n_tok = _per_frame(self.dit, x)
        self.cache.append(kvs, 1, n_tok,
                          kvs[0][0].shape[2] - n_tok if first_refs is not None else 0)
        self._kept.append((x, actions, camera, aud))
        return x
