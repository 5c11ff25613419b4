"""Wan-architecture latent video DiT, weight-compatible with diffusers' WanTransformer3DModel.

``WanDiT`` holds exactly the parameters of ``diffusers.WanTransformer3DModel`` (same names and
shapes: ``patch_embedding``, ``condition_embedder.*``, ``blocks.N.*``, ``norm_out``, ``proj_out``,
``scale_shift_table``), so a diffusers folder (Wan 2.1 / 2.2 T2V, I2V, TI2V transformers) loads
into it with ``strict=True`` on that part, and it exports back to a folder diffusers opens. It
computes the same function as diffusers (tests/test_models_wan.py: parity <= 1e-5 in fp32),
behind VideoDiT's forward contract:

* t is flow time in [0, 1], [B] or per latent frame [B, t] (diffusion forcing); Wan's layers
  take 0..1000, the same flow convention (x_t = (1 - t) x0 + t noise, v = noise - x0);
* modulation is per token frame (Wan 2.2's per-token ``timestep_proj``, one row per frame);
* self-attention goes through ``worldline.models.attention`` with VideoDiT's RoPE
  (``rope_3d``: the same head-dim split and interleaved pairs as ``WanRotaryPosEmbed``), so
  frame-causal masks, ``frame_start`` offsets and KV caches (``models/rollout.py``) work;
* Worldline's controls (actions/camera: ``ConditionEmbedder`` without its timestep MLP) enter
  through ``control_proj``, a zero-initialised linear added to Wan's time embedding, so adding
  them to a pretrained Wan leaves its output bitwise unchanged until they are trained;
  references (``max_refs``) are tokens at RoPE time ``REF_TIME_POS`` with a learned slot
  embedding, as in VideoDiT; ``mask_channel`` adds one input channel to ``patch_embedding``.

Layers live in ``models/wan_layers.py``; loading and saving diffusers folders
(``WanDiT.from_diffusers`` / ``save_diffusers``) in ``models/wan_io.py``.

    >>> dit = WanDiT(DiTArgs(arch="wan", in_channels=4, hidden_size=64, depth=2, num_heads=2,
    ...                      text_dim=32, camera_dim=0))
    >>> v = dit(torch.randn(1, 4, 3, 8, 8), torch.rand(1), torch.randn(1, 7, 32))  # [1, 4, 3, 8, 8]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.audio import audio_cross_attn
from worldline.models.conditioning import ConditionEmbedder, timestep_embedding
from worldline.models.dit import (
    DiTArgs,
    VideoDiT,
    attention_layout,
    rope_axis_dims,
)
from worldline.models.init import reset_default_parameters
from worldline.models.wan_io import EXTRA_PREFIXES, load_wan, save_wan
from worldline.models.wan_layers import (
    FP32LayerNorm,
    PatchEmbed,
    WanBlock,
    WanConditionEmbedder,
    modulate_frames,
)

__all__ = ["WanDiT", "build_dit", "EXTRA_PREFIXES"]


def build_dit(args: DiTArgs) -> nn.Module:
    """The DiT that ``args.arch`` names: VideoDiT ("worldline") or WanDiT ("wan")."""
    if args.arch == "worldline":
        return VideoDiT(args)
    if args.arch == "wan":
        return WanDiT(args)
    raise ValueError(f"DiTArgs.arch must be 'worldline' or 'wan', got {args.arch!r}")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class WanDiT(nn.Module):
    """Velocity model v(x_t, t, text, actions, camera) with Wan's architecture and weights."""

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        d = args.hidden_size
        if d % args.num_heads:
            raise ValueError(f"hidden_size {d} not divisible by num_heads {args.num_heads}")
        if len(args.patch_size) != 3:
            raise ValueError(f"patch_size must be [p_t, p_h, p_w], got {args.patch_size}")
        if args.text_dim <= 0:
            raise ValueError("arch='wan' always has text cross-attention: text_dim must be > 0")
        if audio_cross_attn(args.audio_mode) and args.audio_dim > 0:
            raise NotImplementedError("arch='wan' takes audio through its controls only: use "
                                      "audio_mode='modulation' (cross_attn is VideoDiT's)")
        self.args = args
        self.head_dim = d // args.num_heads
        rope_axis_dims(self.head_dim)  # validate early
        pt, ph, pw = args.patch_size
        self.out_channels = args.out_channels or args.in_channels
        self.in_dim = args.in_channels + int(args.mask_channel)  # patch_embedding channels
        # Construction order = diffusers' (rope has no parameters), then Worldline's extras.
        self.patch_embedding = PatchEmbed(self.in_dim, d, kernel_size=tuple(args.patch_size),
                                          stride=tuple(args.patch_size))
        self.condition_embedder = WanConditionEmbedder(args)
        ffn_dim = args.ffn_dim or int(args.mlp_ratio * d)
        self.blocks = nn.ModuleList(WanBlock(args, ffn_dim) for _ in range(args.depth))
        self.norm_out = FP32LayerNorm(d, args.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(d, self.out_channels * pt * ph * pw)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, d))
        if (args.num_action_slots > 0 or args.action_dim > 0 or args.camera_dim > 0
                or args.audio_dim > 0):
            self.control_embed = ConditionEmbedder(
                d, freq_dim=args.freq_dim, temporal_downsample=args.temporal_downsample,
                num_action_slots=args.num_action_slots, num_actions=args.num_actions,
                action_dim=args.action_dim, camera_dim=args.camera_dim, timestep=False,
                audio_dim=args.audio_dim)
            # Zero-init: temb + control_proj(controls) == temb exactly until trained.
            self.control_proj = nn.Linear(d, d)
        if args.max_refs > 0:
            self.ref_embed = nn.Parameter(torch.zeros(args.max_refs, d))
        self._init_custom()

    # --- init -----------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Re-initialize every parameter from scratch, drawing from the RNG exactly as
        construction did (torch's default layer init, then ours): after the same seed, a model
        built on the meta device, ``to_empty``'d and ``init_weights``'d equals an eager one."""
        reset_default_parameters(self)
        self._init_custom()

    def extra_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """Worldline's additions that diffusers does not know, by name (see EXTRA_PREFIXES)."""
        names = ("control_embed", "control_proj", "ref_embed")
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    @torch.no_grad()
    def _init_custom(self) -> None:
        """Wan's own from-scratch init (xavier linears, N(0, 0.02) time/text embedders, zero
        output head) plus diffusers' randn / sqrt(D) modulation tables, then the extras."""
        extra = [m for m in self.extra_modules().values() if isinstance(m, nn.Module)]
        skip = {id(p) for m in extra for p in m.parameters()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in skip:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        pe = self.patch_embedding
        nn.init.xavier_uniform_(pe.weight.view(pe.weight.shape[0], -1))
        nn.init.zeros_(pe.bias)
        ce = self.condition_embedder
        for lin in (ce.time_embedder.linear_1, ce.time_embedder.linear_2,
                    ce.text_embedder.linear_1, ce.text_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        d = self.args.hidden_size
        for table in [b.scale_shift_table for b in self.blocks] + [self.scale_shift_table]:
            nn.init.normal_(table, std=d**-0.5)
        if hasattr(ce, "image_embedder") and hasattr(ce.image_embedder, "pos_embed"):
            nn.init.zeros_(ce.image_embedder.pos_embed)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.init_extras()

    @torch.no_grad()
    def init_extras(self, names: list[str] | None = None, reset_defaults: bool = False) -> None:
        """Initialize Worldline's extras (all, or those in ``names``): the control embedder as
        in VideoDiT, ``control_proj`` zero (identity on Wan's output), refs N(0, 0.02).
        ``reset_defaults`` first replays torch's layer init (for extras added to a loaded
        Wan, whose storage is fresh)."""
        for name, m in self.extra_modules().items():
            if names is not None and name not in names:
                continue
            if isinstance(m, nn.Parameter):  # ref_embed
                nn.init.normal_(m, std=0.02)
                continue
            if reset_defaults:
                reset_default_parameters(m)
            if name == "control_proj":
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
                continue
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
            if hasattr(m, "action_emb"):
                nn.init.normal_(m.action_emb.weight, std=0.02)
            for p in ("action_phase", "null_action", "camera_phase", "null_camera",
                      "audio_phase", "null_audio"):
                if hasattr(m, p):
                    nn.init.normal_(getattr(m, p), std=0.02)

    # --- patchify -------------------------------------------------------------------------
    grid = VideoDiT.grid
    patchify = VideoDiT.patchify

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """proj_out tokens [B, N, p_t * p_h * p_w * C] (Wan packs channels last) on ``grid``
        -> [B, C, t, h, w]."""
        b = tokens.shape[0]
        gt, gh, gw = grid
        pt, ph, pw = self.args.patch_size
        x = tokens.reshape(b, gt, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, gt * pt, gh * ph, gw * pw)

    # --- forward --------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        actions: Tensor | None = None,
        camera: Tensor | None = None,
        drop_actions: Tensor | None = None,
        *,
        frame_causal: bool | None = None,
        refs: Tensor | None = None,
        frame_start: int = 0,
        past_kv: list[tuple[Tensor, Tensor]] | None = None,
        return_kv: bool = False,
        image_emb: Tensor | None = None,
        audio: Tensor | None = None,
        audio_valid: Tensor | None = None,
        drop_audio: Tensor | None = None,
        audio_past: int = 0,
    ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Predict the flow velocity; arguments and returns as ``VideoDiT.forward``, plus:

        Args:
            x: [B, in_channels (+1 with mask_channel), t, h, w]; for Wan i2v in_channels is
                Wan's concat (noisy latents, 4 mask channels, first-frame latents: 36).
            text: raw text-encoder features [B, L, text_dim] (UMT5: 4096); None skips the
                cross-attention (text and image). Wan itself has no text mask (it attends
                zero-padded tokens); text_mask [B, L] bool masks keys when given.
            image_emb: Wan i2v CLIP image features [B, L_img, image_dim].
            audio, audio_valid, drop_audio, audio_past: as VideoDiT (modulation mode: through
                the zero-initialised control projection; past rows are not read).
        Returns:
            velocity [B, out_channels, t, h, w] (+ per block (k, v) with return_kv).
        """
        a = self.args
        causal = a.frame_causal if frame_causal is None else frame_causal
        if x.shape[1] != self.in_dim:
            raise ValueError(f"x has {x.shape[1]} channels, patch_embedding takes {self.in_dim}")
        grid = self.grid(*x.shape[2:])
        pt = a.patch_size[0]
        if frame_start % pt:
            raise ValueError(f"frame_start {frame_start} must be a multiple of p_t={pt}")
        w = self.patch_embedding.weight
        h = self.patch_embedding(self.patchify(x).to(w.dtype))
        if t.dim() == 1:
            t = t[:, None].expand(-1, x.shape[2])
        aud = None if audio is None else (  # this call's rows: modulation ignores the past
            audio[:, audio_past:], None if audio_valid is None else audio_valid[:, audio_past:],
            drop_audio)
        temb = self._time_embedding(t, actions, camera, drop_actions, frame_start, aud)
        if pt > 1:  # several latent frames share a token frame: average them
            temb = temb.view(temb.shape[0], grid[0], pt, -1).mean(dim=2)
        temb_all, n_refs = temb, 0
        if refs is not None:
            h_ref, temb_ref = self._ref_tokens(refs)
            n_refs = refs.shape[1]
            h, temb_all = torch.cat([h, h_ref], dim=1), torch.cat([temb, temb_ref], dim=1)
        rope, mask = attention_layout(grid, self.head_dim, a.rope_theta, x.device,
                                      frame_start // pt, n_refs, causal, past_kv)
        ce = self.condition_embedder
        mod = ce.time_proj(F.silu(temb_all)).unflatten(-1, (6, -1))  # [B, F (+K), 6, D]
        ctx = img = None
        if text is not None:
            ctx = ce.text_embedder(text.to(h.dtype))
            if image_emb is not None:
                if not hasattr(ce, "image_embedder"):
                    raise ValueError("image_emb given but the model has no image_dim")
                img = ce.image_embedder(image_emb.to(h.dtype))
        kvs = []
        for i, block in enumerate(self.blocks):
            past = None if past_kv is None else past_kv[i]
            h, kv = block(h, mod, rope, ctx, text_mask, mask, past, img)
            if return_kv:
                kvs.append(kv)
        out = self.unpatchify(self._head(h[:, : math.prod(grid)], temb), grid).to(x.dtype)
        return (out, kvs) if return_kv else out

    def _time_embedding(self, t: Tensor, actions=None, camera=None, drop=None,
                        frame_start: int = 0, audio: tuple | None = None) -> Tensor:
        """Wan's temb per latent frame [B, t, D] from flow time t [B, t] (x1000 inside the
        sinusoid: Wan's 0..1000 scale), plus the zero-initialised control projection;
        audio: (features, valid, drop) of this call's pixel frames, or None (null audio)."""
        lin = self.condition_embedder.time_embedder.linear_1
        temb = self.condition_embedder.time_embedder(
            timestep_embedding(t, self.args.freq_dim).to(lin.weight.dtype))
        if hasattr(self, "control_embed"):
            feats, valid, drop_a = audio if audio is not None else (None, None, None)
            ctrl = self.control_embed.add_controls(
                temb.new_zeros(temb.shape), actions, camera, drop, frame_start, audio=feats,
                audio_valid=valid, drop_audio=drop_a)
            temb = temb + self.control_proj(ctrl.to(self.control_proj.weight.dtype))
        return temb

    def _head(self, h: Tensor, temb: Tensor) -> Tensor:
        """Output norm + per-frame shift/scale from temb [B, F, D] + projection."""
        shift, scale = (self.scale_shift_table[None] + temb[:, :, None]).unbind(2)
        return self.proj_out(modulate_frames(self.norm_out(h.float()), shift, scale).type_as(h))

    def _ref_tokens(self, refs: Tensor) -> tuple[Tensor, Tensor]:
        """refs [B, K, C, h, w] -> tokens [B, K * n, D] and their temb [B, K, D] (clean:
        time 0, null controls, plus the learned slot embedding), as VideoDiT."""
        b, k = refs.shape[:2]
        if k > self.args.max_refs:
            raise ValueError(f"{k} references but max_refs={self.args.max_refs}")
        pt = self.args.patch_size[0]
        r = refs.flatten(0, 1)[:, :, None].expand(-1, -1, pt, -1, -1)
        w = self.patch_embedding.weight
        h = self.patch_embedding(self.patchify(r).to(w.dtype)).view(b, -1, self.args.hidden_size)
        temb = self._time_embedding(torch.zeros(b, k, device=refs.device))
        return h, temb + self.ref_embed[:k].to(temb.dtype)

    # --- diffusers folders (models/wan_io.py) -----------------------------------------------
    @classmethod
    def from_diffusers(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", **extra) -> "WanDiT":
        """Load a local diffusers WanTransformer3DModel folder; ``extra`` sets Worldline's
        DiTArgs fields (actions, camera, refs, mask_channel, ...). See wan_io.load_wan."""
        return load_wan(cls, folder, dtype=dtype, device=device, **extra)

    def save_diffusers(self, folder: str | Path, max_shard_bytes: int = 10 << 30,
                       drop_mask_channel: bool = False) -> Path:
        """Write a diffusers WanTransformer3DModel folder (+ Worldline extras). See
        wan_io.save_wan."""
        return save_wan(self, folder, max_shard_bytes=max_shard_bytes,
                        drop_mask_channel=drop_mask_channel)

    def wan_state_dict(self) -> dict[str, Tensor]:
        """The diffusers part of the state dict (everything but EXTRA_PREFIXES)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(EXTRA_PREFIXES)}

    # --- accounting -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the input embedders (patch, condition
        embedder, controls, refs), leaving the transformer body and output layer."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            emb = [self.patch_embedding, self.condition_embedder,
                   *[m for m in self.extra_modules().values() if isinstance(m, nn.Module)]]
            n -= sum(p.numel() for m in emb for p in m.parameters())
            n -= self.ref_embed.numel() if hasattr(self, "ref_embed") else 0
        return n

    def _matmul_params(self) -> tuple[int, int, int, int]:
        """Weights applied per video token, per text token, per image token, per frame."""

        def w(*mods: nn.Module) -> int:
            return sum(m.weight.numel() for mod in mods for m in mod.modules()
                       if isinstance(m, (nn.Linear, nn.Conv3d)))

        ce = self.condition_embedder
        per_token = w(self.patch_embedding, self.proj_out)
        per_ctx = w(ce.text_embedder)
        per_img = w(ce.image_embedder) if hasattr(ce, "image_embedder") else 0
        for blk in self.blocks:
            per_token += w(blk.attn1, blk.ffn, blk.attn2.to_q, blk.attn2.to_out)
            per_ctx += w(blk.attn2.to_k, blk.attn2.to_v)
            if hasattr(blk.attn2, "add_k_proj"):
                per_img += w(blk.attn2.add_k_proj, blk.attn2.add_v_proj)
        per_frame = w(ce.time_embedder, ce.time_proj) + sum(
            w(m) for m in self.extra_modules().values() if isinstance(m, nn.Module))
        return per_token, per_ctx, per_img, per_frame

    def flops_per_sample(self, latent_shape: tuple[int, int, int, int] | list[int],
                         text_len: int, image_len: int = 0) -> float:
        """Training FLOPs (forward + backward) for one latent clip (C, t, h, w), VideoDiT's
        formula with Wan's image tokens added:

            6 * (P_tok * N + P_ctx * L + P_img * L_img + P_frame * t)
              + 12 * depth * D * (N^2 + N * (L + L_img))

        P_tok: patch embed, q/k/v/out, cross q/out, FFN, proj_out; P_ctx: text projection and
        cross k/v; P_img: image embedder and added k/v (i2v); P_frame: time embedder,
        time_proj and the controls (per latent frame; control per-pixel-frame work is small).
        """
        _, t, hh, ww = latent_shape
        n = math.prod(self.grid(t, hh, ww))
        p_tok, p_ctx, p_img, p_frame = self._matmul_params()
        l_img = image_len if p_img else 0
        d = self.args.hidden_size
        dense = 6 * (p_tok * n + p_ctx * text_len + p_img * l_img + p_frame * t)
        attn = 12 * self.args.depth * d * (n * n + n * (text_len + l_img))
        return float(dense + attn)
