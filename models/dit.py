"""Latent video diffusion transformer (DiT) with per-frame conditioning.

Input latents [B, C, t, h, w] are cut into spacetime patches (p_t, p_h, p_w) and processed by
`depth` blocks of

    adaLN-modulated full spacetime self-attention (QK-norm, 3D RoPE)
    -> text cross-attention
    -> adaLN-modulated SwiGLU MLP

Conditioning is *per latent frame*: the timestep embedding (t [B] now, [B, t] for diffusion
forcing) plus the actions and camera of the pixel frames that latent frame covers give one
vector c [B, t, D] per frame, and every token is modulated by its own frame's vector.
Grouping follows the causal autoencoder: latent frame 0 <- pixel frame 0, latent frame i <-
pixel frames (i-1)*tf+1 ... i*tf (mean-pooled).

Modulation is "adaLN-single" (PixArt-alpha, Wan): one shared projection c -> 6 * D plus a
learned per-block offset table, instead of a D x 6D projection in every block. That saves
6 D^2 parameters per block (~27% of a block) at no quality cost reported at scale; gates and
projections start at zero (adaLN-zero), so every block is the identity at init.

    >>> dit = VideoDiT(DiTArgs(in_channels=4, hidden_size=128, depth=2, num_heads=4, text_dim=64))
    >>> x = torch.randn(2, 4, 5, 8, 8)                   # [B, C, t, h, w] latents
    >>> v = dit(x, torch.rand(2), text=torch.randn(2, 16, 64))   # velocity, same shape as x
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.attention import CrossAttentionProjections, attention
from worldline.models.audio import AudioCrossAttention, audio_cross_attn
from worldline.models.conditioning import ConditionEmbedder
from worldline.models.flow import velocity_from_x0
from worldline.models.init import reset_default_parameters
from worldline.models.kv_cache import KVBlock
from worldline.models.layout import (  # noqa: F401 - re-exported: the old home of these
    REF_TIME_POS, FrameCausal, attention_layout, frame_causal_mask, rope_3d, rope_axis_dims)

__all__ = ["DiTArgs", "VideoDiT", "rope_3d", "apply_rope", "frame_causal_mask",
           "attention_layout", "REF_TIME_POS", "FrameCausal"]


@dataclass
class DiTArgs:
    """VideoDiT hyper-parameters. Named sizes (hidden/depth/heads of tiny ... 7B) are defined
    once, in conf/model/<size>.yaml (``worldline.train.config.load_model_config``)."""

    in_channels: int = 4  # latent channels
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # [p_t, p_h, p_w]
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * hidden_size (same params as GELU)
    qk_norm: bool = True
    text_dim: int = 256  # 0 disables text cross-attention
    num_action_slots: int = 0  # S independently acted sprites; 0 disables actions
    num_actions: int = 5  # discrete action vocabulary per slot
    action_dim: int = 0  # continuous action vector size per pixel frame; 0 disables
    camera_dim: int = 2  # 0 disables camera conditioning
    temporal_downsample: int = 4  # pixel frames per latent frame (after the first)
    rope_theta: float = 10000.0
    freq_dim: int = 256  # sinusoidal timestep features
    # Image-to-video: one extra input channel marks clean conditioning frames (1) vs noisy (0).
    mask_channel: bool = False
    # What the network outputs: "v" the flow velocity (noise - x0), or "x" the clean latents
    # x0, which forward turns into the velocity (JiT, Li & He 2025: a transformer whose
    # tokens are wider than its hidden size cannot carry the noise through to predict it,
    # but can predict the clean signal; the pixel codec's 768-value tokens need "x").
    prediction: str = "v"
    # Default attention pattern: False = full spacetime, True = block-causal per latent frame
    # (diffusion forcing / rollout). forward(frame_causal=...) overrides per call.
    frame_causal: bool = False
    max_refs: int = 0  # reference-image slots (learned ref embeddings); 0 disables refs
    # Audio features per pixel frame (LogMelFrames' n_mels); 0 disables. audio_mode
    # "modulation": pooled into the per-frame conditioning like camera; "cross_attn": audio
    # cross-attention after every audio_every-th block (models/audio.py).
    audio_dim: int = 0
    audio_mode: str = "modulation"
    audio_every: int = 2
    # Which network: "worldline" = VideoDiT (this file), "wan" = WanDiT (models/wan_dit.py), a
    # weight-compatible diffusers WanTransformer3DModel. The fields below are read by "wan"
    # only; 0 means "not present" (diffusers' None), so Hydra's structured configs stay plain.
    arch: str = "worldline"
    out_channels: int = 0  # output latent channels; 0 = in_channels (Wan i2v: in 36, out 16)
    ffn_dim: int = 0  # GELU MLP hidden size; 0 = int(mlp_ratio * hidden_size)
    cross_attn_norm: bool = True  # affine LayerNorm before the text cross-attention
    eps: float = 1e-6  # LayerNorm / QK-RMSNorm epsilon
    image_dim: int = 0  # CLIP image-feature size of Wan i2v (image_embedder); 0 disables
    added_kv_proj_dim: int = 0  # image K/V projections in cross-attention (Wan i2v); 0 disables
    pos_embed_seq_len: int = 0  # image_embedder position table (Wan FLF2V); 0 disables
    rope_max_seq_len: int = 1024  # kept for the diffusers config (our RoPE has no table limit)
    # A local diffusers WanTransformer3DModel folder to start from (model.dit.pretrained):
    # its config sets the Wan fields above, its weights initialise the run.
    pretrained: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ---------------------------------------------------------------------------------------------
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, H, N, Dh] by angles (cos, sin [N, Dh/2]); fp32 math."""
    # One complex multiply instead of 6 real elementwise ops + a stack: ~3x less memory
    # traffic, which dominates RoPE's cost (and its backward) on CPU and GPU alike.
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    out = torch.view_as_real(xc * torch.complex(cos, sin))
    return out.flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Transformer block
# ---------------------------------------------------------------------------------------------
def _per_frame(x: Tensor, frames: int) -> Tensor:
    """[B, N, D] -> [B, F, N / F, D] view (tokens are t-major, so each frame is contiguous)."""
    return x.view(x.shape[0], frames, -1, x.shape[-1])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, N, D] * (1 + scale) + shift with per-frame shift/scale [B, F, D]."""
    xf = _per_frame(x, shift.shape[1])
    return torch.addcmul(shift[:, :, None], xf, 1 + scale[:, :, None]).view_as(x)


def gate(x: Tensor, g: Tensor) -> Tensor:
    """x [B, N, D] * per-frame gate [B, F, D]."""
    return (_per_frame(x, g.shape[1]) * g[:, :, None]).view_as(x)


def _at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32 when it is bf16/fp16; fp32 and fp64 stay as they are."""
    return x.float() if x.element_size() < 4 else x


def _qk_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """QK-RMSNorm in (at least) fp32, back in x's dtype. Under bf16 autocast, an fp32 norm
    weight and a bf16 input miss PyTorch's fused RMSNorm kernel (6 ops fwd, more bwd); fp32
    also matches what autocast does for norms on CUDA."""
    return norm(_at_least_fp32(x)).to(x.dtype)


class SelfAttention(nn.Module):
    """Spacetime self-attention: fused QKV, QK-RMSNorm, 3D RoPE (also used, token-sharded, by
    Ulysses context parallelism through :meth:`project`)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, D] -> normed, rotated q, k and v [B, H, N, Dh] in x's compute dtype."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # Norm and rotation both in fp32 (RoPE needs it), one cast back to the compute dtype.
        q = apply_rope(self.q_norm(_at_least_fp32(q)), *rope).to(v.dtype)
        k = apply_rope(self.k_norm(_at_least_fp32(k)), *rope).to(v.dtype)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: "Tensor | FrameCausal | None" = None,
        past_kv: "tuple[Tensor, Tensor] | KVBlock | None" = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, N, D]; attn_mask: a :class:`FrameCausal` or an
        [N, N_past + N] bool mask (True = attend); past_kv: cached
        (k, v) [B, H, N_past, Dh] of earlier tokens (already rotated), or a preallocated
        :class:`KVBlock` holding them, prepended to this call's keys. Returns (out [B, N, D], (k, v) of this call's tokens, for a KV cache)."""
        b, n, d = x.shape
        q, k, v = self.project(x, rope)
        kv = (k, v)
        if isinstance(past_kv, KVBlock):  # preallocated cache: the past is not copied
            k, v = past_kv.extend(k, v)
        elif past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        out = attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), kv


class CrossAttention(CrossAttentionProjections):
    """Video tokens attend to (projected) text tokens; no RoPE on either side."""

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        """x [B, N, D] attends ctx [B, L, D] (ctx_mask [B, L] bool, True = real) -> [B, N, D]."""
        b, n, d = x.shape
        q = _qk_norm(self.q_norm, self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2))
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(q, _qk_norm(self.k_norm, k), v, key_padding_mask=ctx_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """Gated MLP: w_down(silu(w_gate x) * w_up x), no biases."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        # 2/3 keeps the parameter count of a 2-matrix GELU MLP; round for matmul-friendly sizes.
        hidden = int(2 * mlp_ratio * dim / 3)
        hidden = 32 * ((hidden + 31) // 32)
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class DiTBlock(nn.Module):
    """One transformer block; all modulation is per frame (F = number of token frames)."""

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        d = args.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, args.num_heads, args.qk_norm)
        self.has_cross = args.text_dim > 0
        if self.has_cross:
            self.norm2 = nn.LayerNorm(d, eps=1e-6)
            self.cross = CrossAttention(d, args.num_heads, args.qk_norm)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(d, args.mlp_ratio)
        # Per-block offsets added to the shared modulation (adaLN-single); zero = identity block.
        self.modulation = nn.Parameter(torch.zeros(6, d))

    def forward(
        self,
        x: Tensor,
        mod: Tensor,
        rope: tuple[Tensor, Tensor],
        ctx: Tensor | None = None,
        ctx_mask: Tensor | None = None,
        attn_mask: "Tensor | FrameCausal | None" = None,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, N, D]; mod [B, F, 6, D] shared modulation; ctx [B, L, D] -> ([B, N, D], kv)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod + self.modulation).unbind(2)
        a, kv = self.attn(modulate(self.norm1(x), shift_a, scale_a), rope, attn_mask, past_kv)
        x = x + gate(a, gate_a)
        if self.has_cross and ctx is not None:
            x = x + self.cross(self.norm2(x), ctx, ctx_mask)
        return x + gate(self.mlp(modulate(self.norm3(x), shift_m, scale_m)), gate_m), kv


class FinalLayer(nn.Module):
    """adaLN-modulated output projection of tokens back to patch values."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [B, N, D], per-frame conditioning c [B, F, D] -> [B, N, patch_dim]."""
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class VideoDiT(nn.Module):
    """Velocity model v(x_t, t, text, actions, camera) on latent videos [B, C, t, h, w]."""

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        d = args.hidden_size
        if d % args.num_heads:
            raise ValueError(f"hidden_size {d} not divisible by num_heads {args.num_heads}")
        if len(args.patch_size) != 3:
            raise ValueError(f"patch_size must be [p_t, p_h, p_w], got {args.patch_size}")
        self.args = args
        self.head_dim = d // args.num_heads
        rope_axis_dims(self.head_dim)  # validate early
        pt, ph, pw = args.patch_size
        self.patch_dim = args.in_channels * pt * ph * pw
        in_dim = (args.in_channels + int(args.mask_channel)) * pt * ph * pw
        self.x_embed = nn.Linear(in_dim, d)
        if args.max_refs > 0:
            # Reference tokens sit at a reserved RoPE time position (REF_TIME_POS, before any
            # frame) and carry a learned per-slot embedding: together these tell the model
            # "this is a reference, not frame k" without giving it a place on the timeline.
            self.ref_embed = nn.Parameter(torch.zeros(args.max_refs, d))
        xattn = audio_cross_attn(args.audio_mode)
        self.cond_embed = ConditionEmbedder(
            d, freq_dim=args.freq_dim, temporal_downsample=args.temporal_downsample,
            num_action_slots=args.num_action_slots, num_actions=args.num_actions,
            action_dim=args.action_dim, camera_dim=args.camera_dim,
            audio_dim=0 if xattn else args.audio_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if args.text_dim > 0:
            self.context_proj = nn.Sequential(
                nn.Linear(args.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
            )
        self.blocks = nn.ModuleList(DiTBlock(args) for _ in range(args.depth))
        self.final = FinalLayer(d, self.patch_dim)
        if xattn and args.audio_dim > 0:
            self.audio_attn = AudioCrossAttention(d, args.audio_dim, args.num_heads, args.depth,
                                                  args.audio_every, args.qk_norm, args.rope_theta)
        # The layers' constructors already drew torch's default init; only ours is left.
        self._init_custom()

    def init_weights(self) -> None:
        """Re-initialize every parameter from scratch, drawing from the RNG exactly as
        construction did (torch's default layer init, then ours): after the same seed, a model
        built on the meta device, ``to_empty``'d and ``init_weights``'d equals an eager one."""
        reset_default_parameters(self)
        self._init_custom()

    @torch.no_grad()
    def _init_custom(self) -> None:
        """Our init on top of torch's defaults: xavier linears, small normal embeddings,
        adaLN-zero (identity blocks, zero output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        ce = self.cond_embed
        for lin in (ce.t_mlp[0], ce.t_mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if hasattr(ce, "action_emb"):
            nn.init.normal_(ce.action_emb.weight, std=0.02)
        if hasattr(self, "ref_embed"):
            nn.init.normal_(self.ref_embed, std=0.02)
        for name in ("action_phase", "null_action", "camera_phase", "null_camera",
                     "audio_phase", "null_audio"):
            if hasattr(ce, name):
                nn.init.normal_(getattr(ce, name), std=0.02)
        # adaLN-zero: modulation starts at zero (identity blocks), output starts at zero.
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
        nn.init.zeros_(self.final.adaLN[1].weight)
        nn.init.zeros_(self.final.adaLN[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if hasattr(self, "audio_attn"):  # last: audio-less models keep their init draws
            self.audio_attn.init_custom()

    # --- patchify -------------------------------------------------------------------------
    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Token grid of a latent of t frames and h x w; sizes must divide by the patch."""
        pt, ph, pw = self.args.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(
                f"latent (t, h, w)=({t}, {h}, {w}) not divisible by patch {self.args.patch_size}"
            )
        return t // pt, h // ph, w // pw

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, t, h, w] -> tokens [B, N, C * p_t * p_h * p_w].

        N = (t / p_t) * (h / p_h) * (w / p_w), flattened t-major (each frame contiguous).
        """
        b, c = x.shape[:2]
        gt, gh, gw = self.grid(*x.shape[2:])
        pt, ph, pw = self.args.patch_size
        x = x.reshape(b, c, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, gt * gh * gw, c * pt * ph * pw)

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Inverse of patchify: tokens [B, N, C * p] on `grid` (t, h, w) -> [B, C, t, h, w]."""
        b = tokens.shape[0]
        gt, gh, gw = grid
        pt, ph, pw = self.args.patch_size
        c = tokens.shape[-1] // (pt * ph * pw)
        x = tokens.reshape(b, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, gt * pt, gh * ph, gw * pw)

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
        audio: Tensor | None = None,
        audio_valid: Tensor | None = None,
        drop_audio: Tensor | None = None,
        audio_past: int = 0,
    ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Predict the flow velocity.

        Args:
            x: noisy latents [B, C(+1 with mask_channel), t, h, w].
            t: flow time in [0, 1], [B] or [B, t] per latent frame (diffusion forcing).
            text: text features [B, L, text_dim]; None skips cross-attention.
            text_mask: [B, L] bool, True on real tokens (None: all real).
            actions: [B, T_pix, S] long in [0, num_actions) (or [B, T_pix, action_dim] float
                when continuous), T_pix = 1 + (t - 1) * tf.
            camera: [B, T_pix, camera_dim] float.
            drop_actions: [B] bool; True replaces that sample's actions and camera by nulls.
            frame_causal: block-causal attention (token frame i sees frames <= i and the
                references; references see only references). None: args.frame_causal.
            refs: clean reference latents [B, K, C(+1), h, w], K <= max_refs, same h, w as x.
            frame_start, past_kv, return_kv: cached rollout (worldline.models.rollout):
                x holds latent frames frame_start.., past_kv is per block the rotated (k, v)
                [B, H, N_past, Dh] of earlier tokens that these frames attend to in full.
            audio: audio features [B, audio_past + T_pix, audio_dim] (LogMelFrames), T_pix
                as for camera; audio_valid [B, audio_past + T_pix] bool (False = no real
                audio: null); drop_audio [B] bool (CFG: null audio); audio_past: leading
                rows of earlier pixel frames (a cached rollout's, seen by cross_attn only).
        Returns:
            velocity [B, C, t, h, w]; with return_kv also per block (k, v) of x's tokens
            (video tokens first, then reference tokens).
        """
        a = self.args
        causal = a.frame_causal if frame_causal is None else frame_causal
        grid = self.grid(*x.shape[2:])
        pt = a.patch_size[0]
        if frame_start % pt:
            raise ValueError(f"frame_start {frame_start} must be a multiple of p_t={pt}")
        h = self.x_embed(self.patchify(x).to(self.x_embed.weight.dtype))
        cur = slice(audio_past, None)  # this call's rows: what modulation reads
        c = self.cond_embed(t, x.shape[2], actions, camera, drop_actions, frame_start,
                            audio=None if audio is None else audio[:, cur], drop_audio=drop_audio,
                            audio_valid=None if audio_valid is None else audio_valid[:, cur])
        if pt > 1:  # several latent frames share a token frame: average them
            c = c.view(c.shape[0], grid[0], pt, -1).mean(dim=2)
        c_all, n_refs = c, 0
        if refs is not None:
            h_ref, c_ref = self._ref_tokens(refs)
            n_refs = refs.shape[1]
            h, c_all = torch.cat([h, h_ref], dim=1), torch.cat([c, c_ref], dim=1)
        rope, mask = attention_layout(grid, self.head_dim, a.rope_theta, x.device,
                                      frame_start // pt, n_refs, causal, past_kv)
        mod = self.adaLN(c_all).unflatten(-1, (6, -1))  # [B, F (+K), 6, D]
        ctx = None
        if a.text_dim > 0 and text is not None:
            ctx = self.context_proj(text.to(h.dtype))
        a_ctx = None if not hasattr(self, "audio_attn") else self.audio_attn.context(
            audio, audio_valid, drop_audio, x.shape[0], grid, frame_start, pt,
            a.temporal_downsample, audio_past)
        kvs = []
        for i, block in enumerate(self.blocks):
            past = None if past_kv is None else past_kv[i]
            h, kv = block(h, mod, rope, ctx, text_mask, mask, past)
            if a_ctx is not None:
                h = self.audio_attn(i, h, a_ctx)
            if return_kv:
                kvs.append(kv)
        n_video = math.prod(grid)
        out = self.unpatchify(self.final(h[:, :n_video], c), grid).to(x.dtype)
        if a.prediction == "x":  # every caller (training, sampler, KV rollout) gets velocity
            out = velocity_from_x0(x, t, out)
        return (out, kvs) if return_kv else out

    def _ref_tokens(self, refs: Tensor) -> tuple[Tensor, Tensor]:
        """refs [B, K, C, h, w] -> tokens [B, K * n, D] and per-ref conditioning [B, K, D]
        (clean: timestep 0, null controls, plus the learned slot embedding)."""
        b, k = refs.shape[:2]
        if k > self.args.max_refs:
            raise ValueError(f"{k} references but max_refs={self.args.max_refs}")
        pt = self.args.patch_size[0]
        # One reference = one token frame: repeat the image p_t times to fill a temporal patch.
        r = refs.flatten(0, 1)[:, :, None].expand(-1, -1, pt, -1, -1)
        h = self.x_embed(self.patchify(r).to(self.x_embed.weight.dtype))
        h = h.view(b, -1, self.args.hidden_size)
        c = self.cond_embed(torch.zeros(b, device=refs.device), k) + self.ref_embed[:k]
        return h, c

    # --- accounting -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the input embedders (patch, timestep,
        action, camera, text projection), leaving the transformer body and output layer."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            emb = [self.x_embed, self.cond_embed] + (
                [self.context_proj] if self.args.text_dim > 0 else []
            )
            n -= sum(p.numel() for m in emb for p in m.parameters())
        return n

    def _matmul_params(self) -> tuple[int, int, int]:
        """Linear weights applied per video token, per text token and per latent frame."""

        def w(*mods: nn.Module) -> int:
            return sum(
                m.weight.numel() for mod in mods for m in mod.modules() if isinstance(m, nn.Linear)
            )

        per_token = w(self.x_embed, self.final.linear)
        per_ctx = w(self.context_proj) if self.args.text_dim > 0 else 0
        for blk in self.blocks:
            per_token += w(blk.attn, blk.mlp)
            if blk.has_cross:
                per_token += w(blk.cross.q, blk.cross.proj)
                per_ctx += w(blk.cross.kv)
        per_frame = w(self.cond_embed, self.adaLN, self.final.adaLN)
        return per_token, per_ctx, per_frame

    def flops_per_sample(
        self, latent_shape: tuple[int, int, int, int] | list[int], text_len: int
    ) -> float:
        """Training FLOPs (forward + backward) for one latent clip (C, t, h, w).

            6 * (P_tok * N + P_ctx * L + P_frame * t)  +  12 * depth * D * (N^2 + N * L)

        N: video tokens, L: text tokens (0 when text_dim == 0), D: hidden size.
        P_tok: Linear weights applied to every video token (patch embed, qkv/out, cross q/out,
        SwiGLU, output); P_ctx: those applied to every text token (text projection, cross
        k/v); P_frame: those applied once per latent frame (timestep/action/camera embedders,
        adaLN). 6 = 2 FLOPs per MAC x (1 forward + 2 backward). Attention scores and the
        weighted sum cost 2 * 2 * N * N_kv * D forward per layer, x3 for training -> 12.
        Audio cross-attention adds its own terms (``AudioCrossAttention.flops``).
        """
        _, t, hh, ww = latent_shape
        n = math.prod(self.grid(t, hh, ww))
        l_ctx = text_len if self.args.text_dim > 0 else 0
        p_tok, p_ctx, p_frame = self._matmul_params()
        d = self.args.hidden_size
        dense = 6 * (p_tok * n + p_ctx * l_ctx + p_frame * t)
        attn = 12 * self.args.depth * d * (n * n + n * l_ctx)
        if hasattr(self, "audio_attn"):  # one audio token per pixel frame
            attn += self.audio_attn.flops(n, 1 + (t - 1) * self.args.temporal_downsample)
        return float(dense + attn)
