"""The world model: text encoder + latent video DiT, with classifier-free-guidance dropout.

The trainer draws the dropout masks (with its own generator, so runs stay reproducible) and
passes them in; this module only applies them:

* dropped text  -> every text token is replaced by a learned null embedding (mask all True);
* dropped actions/camera -> learned null control vectors inside the DiT.

    >>> wm = WorldModel(DiTArgs(hidden_size=128, depth=2, num_heads=4, text_dim=64),
    ...                 TextEncoderArgs(dim=64, depth=1, num_heads=4, max_len=32))
    >>> ids, mask = wm.tokenizer(["a red circle moves up", "a blue square"], max_len=32)
    >>> v = wm(torch.randn(2, 4, 5, 8, 8), torch.rand(2), ids, mask)   # [2, 4, 5, 8, 8]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from worldline.models.dit import DiTArgs
from worldline.models.text import ByteTokenizer, TextEncoder, TextEncoderArgs
from worldline.models.wan_dit import build_dit

__all__ = ["WorldModel"]


class WorldModel(nn.Module):
    """Text encoder + latent video DiT (``VideoDiT``, or ``WanDiT`` with
    ``DiTArgs(arch="wan")``): velocity of noisy latents given text and controls."""

    def __init__(self, dit_args: DiTArgs, text_args: Optional[TextEncoderArgs]) -> None:
        """``text_args=None``: no built-in text encoder; text comes as features (``text_emb``)
        from a frozen pretrained encoder that lives outside the trained module."""
        super().__init__()
        if text_args is not None and dit_args.text_dim != text_args.dim:
            raise ValueError(
                f"dit.text_dim ({dit_args.text_dim}) must equal text.dim ({text_args.dim})"
            )
        # Plain attributes: no state, nothing to checkpoint.
        self.tokenizer = ByteTokenizer() if text_args is not None else None
        self.text_encoder = TextEncoder(text_args) if text_args is not None else None
        self.dit = build_dit(dit_args)  # VideoDiT or WanDiT, by dit_args.arch
        self.null_text = nn.Parameter(torch.empty(
            text_args.dim if text_args is not None else dit_args.text_dim))
        self._init_custom()

    def init_weights(self) -> None:
        """Re-initialize every parameter from scratch in construction order (text encoder,
        DiT, then the null text embedding), so the RNG draws match eager construction."""
        if self.text_encoder is not None:
            self.text_encoder.init_weights()
        self.dit.init_weights()
        self._init_custom()

    @torch.no_grad()
    def _init_custom(self) -> None:
        """What this module adds on top of its two submodels: the null text embedding."""
        nn.init.normal_(self.null_text, std=0.02)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """ids [B, L], mask [B, L] -> text features [B, L, text_dim] (cacheable)."""
        return self.text_encoder(text_ids, text_mask)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_ids: Tensor | None,
        text_mask: Tensor | None,
        actions: Tensor | None = None,
        camera: Tensor | None = None,
        drop_text: Tensor | None = None,
        drop_actions: Tensor | None = None,
        *,
        text_emb: Tensor | None = None,
        refs: Tensor | None = None,
        frame_causal: bool | None = None,
        audio: Tensor | None = None,
        audio_valid: Tensor | None = None,
        drop_audio: Tensor | None = None,
        **rollout_kw,
    ) -> Tensor | tuple[Tensor, list]:
        """Velocity prediction.

        Args:
            x_t: noisy latents [B, C, t, h, w]; t: [B] (or [B, t]) flow time in [0, 1].
            text_ids, text_mask: [B, L] tokens and bool mask; both None = unconditional.
            actions: [B, T_pix, S] long; camera: [B, T_pix, camera_dim] float (or None).
            drop_text, drop_actions: [B] bool CFG dropout masks (True = replace by null).
            text_emb: precomputed `encode_text` output [B, L, text_dim] (or an external
                encoder's features, e.g. adapters.HFTextEncoder); skips the encoder.
            refs: reference latents [B, K, C, h, w] (DiTArgs.max_refs > 0).
            frame_causal: block-causal attention override (diffusion forcing); see VideoDiT.
            audio, audio_valid, drop_audio: per-pixel-frame audio features [B, T_pix,
                audio_dim] (LogMelFrames), their validity [B, T_pix] bool and the audio CFG
                dropout mask [B] bool (DiTArgs.audio_dim > 0).
            rollout_kw: the DiT's KV-cache arguments (frame_start, past_kv, return_kv,
                audio_past), so a frame-by-frame rollout can run through the module a
                DDP/FSDP wrapper trains (train/self_forcing.py).
        Returns:
            velocity [B, C, t, h, w] (with return_kv also the per-block K/V).
        """
        b = x_t.shape[0]
        if text_emb is None and text_ids is not None:
            if self.text_encoder is None:
                raise ValueError("this world model takes text features (text_emb) from a "
                                 "pretrained encoder, not token ids")
            text_emb = self.encode_text(text_ids, text_mask)
        if text_emb is None:  # no text at all: one null token per sample
            text_emb = self.null_text.view(1, 1, -1).expand(b, 1, -1)
            text_mask = None
        elif drop_text is not None:
            drop = drop_text.bool()
            null = self.null_text.to(text_emb.dtype).view(1, 1, -1).expand_as(text_emb)
            text_emb = torch.where(drop.view(b, 1, 1), null, text_emb)
            if text_mask is not None:
                # Identical null tokens give the same attention output for any non-empty mask;
                # all True keeps every row valid and independent of the dropped text's length.
                text_mask = text_mask.bool() | drop.view(b, 1)
        return self.dit(x_t, t, text_emb, text_mask, actions, camera, drop_actions, refs=refs,
                        frame_causal=frame_causal, audio=audio, audio_valid=audio_valid,
                        drop_audio=drop_audio, **rollout_kw)

    def num_params(self) -> int:
        """Number of parameters (text encoder + DiT + null text embedding)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(
        self, latent_shape: tuple[int, int, int, int] | list[int], text_len: int
    ) -> float:
        """Training FLOPs (fwd + bwd) per sample: DiT (see VideoDiT.flops_per_sample) plus the
        text encoder over `text_len` tokens (drop the latter when text features are cached)."""
        dit = self.dit.flops_per_sample(latent_shape, text_len)
        if self.text_encoder is None:  # frozen external encoder: no training FLOPs here
            return dit
        return dit + self.text_encoder.flops_per_sample(text_len)
