"""Layers of the Wan-architecture DiT (``models/wan_dit.py``), with diffusers' parameter names.

Each class mirrors one piece of diffusers' ``transformer_wan.py`` (WanAttention,
WanTransformerBlock, WanTimeTextImageEmbedding, ...) so that state dicts match key for key,
but runs through Worldline's attention dispatch, RoPE and per-frame modulation. Norms,
modulation and residuals stay in fp32 where diffusers keeps them in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.attention import attention
from worldline.models.dit import DiTArgs, _at_least_fp32, _qk_norm, apply_rope
from worldline.models.kv_cache import KVBlock
from worldline.models.layout import FrameCausal

__all__ = ["FP32LayerNorm", "PatchEmbed", "WanSelfAttention", "WanCrossAttention", "WanBlock",
           "WanConditionEmbedder", "modulate_frames"]


# ---------------------------------------------------------------------------------------------
# Layers (parameter names follow diffusers' transformer_wan.py)
# ---------------------------------------------------------------------------------------------
class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (diffusers' FP32LayerNorm): Wan keeps norms in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D] in x's dtype."""
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class PatchEmbed(nn.Conv3d):
    """Wan's Conv3d patch embedding (kernel = stride = patch), applied as one matmul on
    ``VideoDiT.patchify``'s tokens: the same math as the strided conv, faster on CPU, and the
    parameter keeps its diffusers name and shape ``[D, C, p_t, p_h, p_w]``."""

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        """tokens [B, N, C * p_t * p_h * p_w] (channel-major patches) -> [B, N, D]."""
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class _GeluProj(nn.Module):
    """diffusers' GELU activation module: ``gelu(proj(x))`` (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    """diffusers' FeedForward: ``net.0.proj`` -> GELU -> (dropout) -> ``net.2`` (tanh GELU in
    Wan blocks, exact GELU in the image embedder)."""

    def __init__(self, dim: int, inner: int, out: int | None = None,
                 approximate: str = "tanh") -> None:
        super().__init__()
        self.net = nn.Sequential(_GeluProj(dim, inner, approximate), nn.Identity(),
                                 nn.Linear(inner, out or dim))

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, dim] -> [B, N, out]."""
        return self.net(x)


class _TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TextProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection (gelu_tanh): linear_1 -> GELU -> linear_2."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class _ImageEmbedding(nn.Module):
    """diffusers' WanImageEmbedding: CLIP image features [B, L, image_dim] -> [B, L, D]."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)  # eps 1e-5, affine: as diffusers
        self.ff = _FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        if pos_embed_seq_len:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "pos_embed"):  # FLF2V: two images' features, one position table
            b, n, d = x.shape
            x = x.view(-1, 2 * n, d) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


class WanConditionEmbedder(nn.Module):
    """``condition_embedder``: timestep MLP, 6-way modulation projection, text and image
    projections (diffusers' WanTimeTextImageEmbedding; the sinusoid is ours, same values)."""

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        d = args.hidden_size
        self.time_embedder = _TimestepEmbedding(args.freq_dim, d)
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = _TextProjection(args.text_dim, d)
        if args.image_dim:
            self.image_embedder = _ImageEmbedding(args.image_dim, d, args.pos_embed_seq_len)


def _heads(x: Tensor, h: int) -> Tensor:
    """[B, N, H * Dh] -> [B, H, N, Dh]."""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, H, N, Dh] -> [B, N, H * Dh]."""
    return x.transpose(1, 2).flatten(2)


class WanSelfAttention(nn.Module):
    """``attn1``: separate q/k/v, RMSNorm across all heads (Wan's QK-norm), 3D RoPE. Exposes
    :meth:`project` and ``proj`` like ``dit.SelfAttention`` (used by rollout and CP)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' [Linear, Dropout]
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    @property
    def proj(self) -> nn.Linear:
        """The output projection (``dit.SelfAttention.proj``'s role)."""
        return self.to_out[0]

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, D] -> normed, rotated q, k and v [B, H, N, Dh] in x's compute dtype."""
        h = self.num_heads
        v = _heads(self.to_v(x), h)
        # Norm (over all heads, before the split) and rotation in fp32, one cast back.
        q = apply_rope(_heads(self.norm_q(_at_least_fp32(self.to_q(x))), h), *rope)
        k = apply_rope(_heads(self.norm_k(_at_least_fp32(self.to_k(x))), h), *rope)
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        attn_mask: "Tensor | FrameCausal | None" = None,
        past_kv: "tuple[Tensor, Tensor] | KVBlock | None" = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """As ``dit.SelfAttention.forward``: x [B, N, D] -> (out [B, N, D], this call's (k, v))."""
        q, k, v = self.project(x, rope)
        kv = (k, v)
        if isinstance(past_kv, KVBlock):
            k, v = past_kv.extend(k, v)
        elif past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        out = attention(q, k, v, attn_mask=attn_mask)
        return self.proj(_merge(out)), kv


class WanCrossAttention(nn.Module):
    """``attn2``: video tokens attend to the projected text and, in Wan i2v, separately to the
    projected CLIP image tokens (``add_k_proj``/``add_v_proj``); the two outputs are summed."""

    def __init__(self, dim: int, num_heads: int, eps: float, added_kv_proj_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None = None,
                img: Tensor | None = None) -> Tensor:
        """x [B, N, D] attends ctx [B, L, D] (ctx_mask [B, L], True = real) and img
        [B, L_img, D] (all real) -> [B, N, D]."""
        h = self.num_heads
        q = _heads(_qk_norm(self.norm_q, self.to_q(x)), h)
        k = _heads(_qk_norm(self.norm_k, self.to_k(ctx)), h)
        out = attention(q, k, _heads(self.to_v(ctx), h), key_padding_mask=ctx_mask)
        if img is not None:
            if not hasattr(self, "add_k_proj"):
                raise ValueError("image_emb given but the model has no added_kv_proj_dim")
            k_img = _heads(_qk_norm(self.norm_added_k, self.add_k_proj(img)), h)
            out = out + attention(q, k_img, _heads(self.add_v_proj(img), h))
        return self.to_out[0](_merge(out))


def modulate_frames(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, N, D] * (1 + scale) + shift, shift/scale per token frame [B, F, D] (diffusers'
    operation order, so fp32 results match it bit for bit)."""
    xf = x.view(x.shape[0], shift.shape[1], -1, x.shape[-1])
    return (xf * (1 + scale[:, :, None]) + shift[:, :, None]).view_as(x)


def _gated(x: Tensor, g: Tensor) -> Tensor:
    """x [B, N, D] * per-frame gate g [B, F, D] (fp32)."""
    return (x.view(x.shape[0], g.shape[1], -1, x.shape[-1]) * g[:, :, None]).view_as(x)


class WanBlock(nn.Module):
    """One Wan block (diffusers' WanTransformerBlock) with per-frame modulation; forward has
    ``dit.DiTBlock``'s signature (x, mod, rope, ctx, ctx_mask, attn_mask, past_kv)."""

    def __init__(self, args: DiTArgs, ffn_dim: int) -> None:
        super().__init__()
        d, eps = args.hidden_size, args.eps
        self.norm1 = FP32LayerNorm(d, eps, elementwise_affine=False)
        self.attn1 = WanSelfAttention(d, args.num_heads, eps)
        self.attn2 = WanCrossAttention(d, args.num_heads, eps, args.added_kv_proj_dim)
        self.norm2 = (FP32LayerNorm(d, eps, elementwise_affine=True) if args.cross_attn_norm
                      else nn.Identity())
        self.ffn = _FeedForward(d, ffn_dim)
        self.norm3 = FP32LayerNorm(d, eps, elementwise_affine=False)
        # diffusers draws randn / sqrt(D) here; ours is drawn in WanDiT._init_custom so that
        # meta construction + init_weights replays it (no RNG use in constructors but layers').
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, d))

    @property
    def attn(self) -> WanSelfAttention:
        """Self-attention under VideoDiT's block attribute name (rollout / CP helpers)."""
        return self.attn1

    def forward(
        self,
        x: Tensor,
        mod: Tensor,
        rope: tuple[Tensor, Tensor],
        ctx: Tensor | None = None,
        ctx_mask: Tensor | None = None,
        attn_mask: "Tensor | FrameCausal | None" = None,
        past_kv: "tuple[Tensor, Tensor] | KVBlock | None" = None,
        img: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, N, D]; mod [B, F, 6, D] (time_proj output per token frame); ctx [B, L, D];
        img [B, L_img, D] -> (x [B, N, D], (k, v) of x's tokens)."""
        # Modulation and residuals in fp32, as diffusers does (Wan keeps these in fp32).
        e = (self.scale_shift_table[None] + mod.float()).unbind(2)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = e
        n = modulate_frames(self.norm1(x.float()), shift_a, scale_a).type_as(x)
        a, kv = self.attn1(n, rope, attn_mask, past_kv)
        x = (x.float() + _gated(a, gate_a)).type_as(x)
        if ctx is not None:
            x = x + self.attn2(self.norm2(x.float()).type_as(x), ctx, ctx_mask, img)
        n = modulate_frames(self.norm3(x.float()), shift_m, scale_m).type_as(x)
        x = (x.float() + _gated(self.ffn(n).float(), gate_m)).type_as(x)
        return x, kv
