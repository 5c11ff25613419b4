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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.attention import attention

__all__ = [
    "DiTArgs",
    "DIT_SIZES",
    "dit_args",
    "VideoDiT",
    "timestep_embedding",
    "pool_to_latent_frames",
    "rope_3d",
    "apply_rope",
]


@dataclass
class DiTArgs:
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
    camera_dim: int = 2  # 0 disables camera conditioning
    temporal_downsample: int = 4  # pixel frames per latent frame (after the first)
    rope_theta: float = 10000.0
    freq_dim: int = 256  # sinusoidal timestep features


# hidden/depth/heads per named size; head dim 128 from 1B up (flash-attn's sweet spot).
# Parameter counts (text_dim 1024 for 1B+) are checked by tests/test_models_dit.py on meta.
DIT_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),  # ~1.3M
    "small": dict(hidden_size=384, depth=12, num_heads=6),  # ~30M
    "base": dict(hidden_size=768, depth=12, num_heads=12),  # ~121M
    "1B": dict(hidden_size=2048, depth=16, num_heads=16),  # ~1.13B
    "3B": dict(hidden_size=2560, depth=28, num_heads=20),  # ~3.0B
    "7B": dict(hidden_size=4096, depth=26, num_heads=32),  # ~7.2B
}


def dit_args(size: str, **overrides) -> DiTArgs:
    """DiTArgs for a named size from DIT_SIZES, with field overrides."""
    if size not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {size!r}; choose from {sorted(DIT_SIZES)}")
    return DiTArgs(**{**DIT_SIZES[size], **overrides})


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
    ) -> Tensor:
        """t [B] or [B, num_frames] in [0, 1]; actions [B, T_pix, S] long; camera
        [B, T_pix, camera_dim]; drop [B] bool (null actions and camera) -> [B, num_frames, D]."""
        a = self.args
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
                e = self._pool(self.action_mlp(e + self._phase(self.action_phase, e)), num_frames)
            c = c + self._or_null(e, self.null_action, keep)
        if a.camera_dim > 0:
            e = None
            if camera is not None:
                e = self.camera_in(camera.to(c.dtype))
                e = self._pool(self.camera_mlp(e + self._phase(self.camera_phase, e)), num_frames)
            c = c + self._or_null(e, self.null_camera, keep)
        return c

    def _phase(self, table: Tensor, e: Tensor) -> Tensor:
        return table[frame_phase(e.shape[1], self.args.temporal_downsample, e.device)]

    def _pool(self, e: Tensor, num_frames: int) -> Tensor:
        return pool_to_latent_frames(e, num_frames, self.args.temporal_downsample)

    @staticmethod
    def _or_null(e: Tensor | None, null: Tensor, keep: Tensor | None) -> Tensor:
        if e is None:
            return null.view(1, 1, -1)
        return e if keep is None else torch.where(keep, e, null.view(1, 1, -1))


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ---------------------------------------------------------------------------------------------
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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x [B, H, N, Dh] by angles (cos, sin [N, Dh/2]); fp32 math."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
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


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        out = attention(q, k, v)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Video tokens attend to (projected) text tokens; no RoPE on either side."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q = self.q_norm(self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2))
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(q, self.k_norm(k), v, key_padding_mask=ctx_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        # 2/3 keeps the parameter count of a 2-matrix GELU MLP; round for matmul-friendly sizes.
        hidden = int(2 * mlp_ratio * dim / 3)
        hidden = 32 * ((hidden + 31) // 32)
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
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
    ) -> Tensor:
        """x [B, N, D]; mod [B, F, 6, D] shared modulation; ctx [B, L, D] -> [B, N, D]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod + self.modulation).unbind(2)
        x = x + gate(self.attn(modulate(self.norm1(x), shift_a, scale_a), rope), gate_a)
        if self.has_cross and ctx is not None:
            x = x + self.cross(self.norm2(x), ctx, ctx_mask)
        return x + gate(self.mlp(modulate(self.norm3(x), shift_m, scale_m)), gate_m)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
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
        self.x_embed = nn.Linear(self.patch_dim, d)
        self.cond_embed = ConditionEmbedder(args)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if args.text_dim > 0:
            self.context_proj = nn.Sequential(
                nn.Linear(args.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
            )
        self.blocks = nn.ModuleList(DiTBlock(args) for _ in range(args.depth))
        self.final = FinalLayer(d, self.patch_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter; also used after materializing from the meta device."""
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
        for name in ("action_phase", "null_action", "camera_phase", "null_camera"):
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
    ) -> Tensor:
        """Predict the flow velocity.

        Args:
            x: noisy latents [B, C, t, h, w].
            t: flow time in [0, 1], [B] (or [B, t] per latent frame).
            text: text features [B, L, text_dim]; None skips cross-attention.
            text_mask: [B, L] bool, True on real tokens (None: all real).
            actions: [B, T_pix, S] long in [0, num_actions), T_pix = 1 + (t - 1) * tf.
            camera: [B, T_pix, camera_dim] float.
            drop_actions: [B] bool; True replaces that sample's actions and camera by nulls.
        Returns:
            velocity [B, C, t, h, w].
        """
        a = self.args
        grid = self.grid(*x.shape[2:])
        h = self.x_embed(self.patchify(x).to(self.x_embed.weight.dtype))
        c = self.cond_embed(t, x.shape[2], actions, camera, drop_actions)  # [B, t, D]
        if a.patch_size[0] > 1:  # several latent frames share a token frame: average them
            c = c.view(c.shape[0], grid[0], a.patch_size[0], -1).mean(dim=2)
        mod = self.adaLN(c).unflatten(-1, (6, -1))  # [B, F, 6, D]
        rope = rope_3d(grid, self.head_dim, a.rope_theta, device=x.device)
        ctx = None
        if a.text_dim > 0 and text is not None:
            ctx = self.context_proj(text.to(h.dtype))
        for block in self.blocks:
            h = block(h, mod, rope, ctx, text_mask)
        return self.unpatchify(self.final(h, c), grid).to(x.dtype)

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
        """
        _, t, hh, ww = latent_shape
        n = math.prod(self.grid(t, hh, ww))
        l_ctx = text_len if self.args.text_dim > 0 else 0
        p_tok, p_ctx, p_frame = self._matmul_params()
        d = self.args.hidden_size
        dense = 6 * (p_tok * n + p_ctx * l_ctx + p_frame * t)
        attn = 12 * self.args.depth * d * (n * n + n * l_ctx)
        return float(dense + attn)
