"""Causal 3D-convolutional video VAE.

Time is handled causally everywhere: temporal convolutions pad only with past frames (the
first frame replicated), temporal downsampling keeps frame 0 on its own and temporal
upsampling re-emits it alone. Consequences:

* an image is a 1-frame video and encodes to one latent frame;
* T pixel frames -> t = 1 + (T - 1) // temporal_downsample latent frames; latent frame 0
  sees pixel frame 0 only, latent frame i sees pixel frames <= i * temporal_downsample;
* a video can be encoded (or decoded) chunk by chunk later without seams at the start.

Layout: spatial patchify (pixel-unshuffle by `patch_size`, as in LTX-Video) so the first
convolution already runs at 1/patch_size resolution, then `len(channel_mult)` levels of
residual blocks separated by stride-2 downsamplers. Every resampling step (and the latent
bottleneck itself) also has a parameter-free space/time-to-channel shortcut (DC-AE's
"residual autoencoding"): information crosses the bottleneck from step 0, so small
autoencoders converge noticeably faster.
Normalization is a per-position channel RMSNorm: GroupNorm would pool statistics over time
and leak the future into the past.

    >>> ae = VideoAutoencoder(AutoencoderArgs())
    >>> x = torch.rand(2, 3, 17, 64, 64) * 2 - 1       # [B, 3, T, H, W] in [-1, 1]
    >>> recon, mean, logvar = ae(x)                    # mean [2, 4, 5, 8, 8]
    >>> loss, parts = autoencoder_loss(x, recon, mean, logvar, ae.args)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.ae_losses import autoencoder_loss  # re-exported: its old home
from worldline.models.init import reset_default_parameters
from worldline.models.pixel_codec import (PixelDecoder, PixelEncoder, depth_to_space_time,
                                          pixel_latent_channels, space_time_to_depth,
                                          stream_first)

__all__ = ["AutoencoderArgs", "VideoAutoencoder", "autoencoder_loss"]


@dataclass
class AutoencoderArgs:
    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 16
    # One entry per resolution level; len - 1 stride-2 stages follow the patchify.
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 1
    temporal_downsample: int = 4
    spatial_downsample: int = 8
    # Spatial pixel-unshuffle before the first conv (part of spatial_downsample).
    patch_size: int = 2
    # Loss weights (used by autoencoder_loss). KL is a per-latent-element mean, so 1e-4 is a
    # weak regularizer that keeps latents bounded without blurring reconstructions.
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # Optional terms (off by default): weight of a user-supplied perceptual network
    # (models.losses.PerceptualLoss; the path lives in the trainer config).
    perceptual_weight: float = 0.0
    # "conv": the learned causal VAE. "pixel": the lossless, parameter-free codec
    # (models/pixel_codec.py; latent_channels = in_channels * temporal * spatial^2; the conv
    # fields are unused): the world model diffuses in pixel space, as DIAMOND does.
    kind: str = "conv"


def _log2(n: int, name: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a power of 2, got {n}")
    return n.bit_length() - 1


def _stage_plan(args: AutoencoderArgs) -> list[tuple[bool, bool]]:
    """(downsample_time, downsample_space) for each stride-2 stage, earliest first.

    Both are done as early as possible: the rest of the network then runs on fewer voxels.
    """
    spatial = _log2(args.spatial_downsample, "spatial_downsample")
    patch = _log2(args.patch_size, "patch_size")
    temporal = _log2(args.temporal_downsample, "temporal_downsample")
    if patch > spatial:
        raise ValueError("patch_size cannot exceed spatial_downsample")
    n_stages = len(args.channel_mult) - 1
    s_stages = spatial - patch
    if max(s_stages, temporal) > n_stages:
        raise ValueError(
            f"channel_mult {args.channel_mult} gives {n_stages} downsampling stages; need "
            f"{s_stages} spatial (spatial_downsample/patch_size) and {temporal} temporal"
        )
    return [(i < temporal, i < s_stages) for i in range(n_stages)]


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) position of [B, C, T, H, W]; causal by design."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit gain (what init replay calls too, see models/init.py; draws no randomness)."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps).to(x.dtype)
        return x * rms * self.weight.view(1, -1, 1, 1, 1)


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the past side only (replicating frame 0); space is 'same'.

    With kernel k_t and temporal stride s_t, T = 1 + s_t * n frames map to 1 + n frames and
    output frame i depends only on input frames <= i * s_t.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 3, t_stride: int = 1, s_stride: int = 1
    ) -> None:
        super().__init__()
        self.time_pad = kernel - 1
        self.kernel_t, self.t_stride = kernel, t_stride
        # Chunked (streaming) mode: a dict holding the not-yet-consumed tail of the padded
        # input stream, set by VideoAutoencoder._streaming(); None = whole-video mode.
        self._stream: dict | None = None
        self.conv = nn.Conv3d(
            in_ch,
            out_ch,
            kernel_size=kernel,
            stride=(t_stride, s_stride, s_stride),
            padding=(0, kernel // 2, kernel // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        st = self._stream
        tail = None if st is None else st.get("tail")
        if tail is not None:  # later chunk: continue the stream where the last one stopped
            x = torch.cat([tail, x], dim=2)
        elif self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        if st is not None:
            k, s = self.kernel_t, self.t_stride
            n_out = (x.shape[2] - k) // s + 1
            if n_out < 1:
                raise ValueError("chunk too short for this causal conv; use longer chunks")
            st["tail"] = x[:, :, n_out * s :]  # frames the next outputs still need
            x = x[:, :, : (n_out - 1) * s + k]
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_ch)
        self.conv1 = CausalConv3d(in_ch, out_ch)
        self.norm2 = ChannelRMSNorm(out_ch)
        self.conv2 = CausalConv3d(out_ch, out_ch)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 causal conv in time and/or space: T = 1 + 2n -> 1 + n, H -> H / 2.

    Plus a parameter-free shortcut (DC-AE's residual autoencoding): space/time-to-depth then
    channel-group averaging. It lets information pass the bottleneck from step 0, which makes
    small autoencoders converge much faster.
    """

    def __init__(self, in_ch: int, out_ch: int, time: bool, space: bool) -> None:
        super().__init__()
        self.ft, self.fs = (2 if time else 1), (2 if space else 1)
        self.conv = CausalConv3d(in_ch, out_ch, t_stride=self.ft, s_stride=self.fs)
        factor = in_ch * self.ft * self.fs**2
        self.group = factor // out_ch if factor % out_ch == 0 else 0
        self._stream: dict | None = None  # see CausalConv3d

    def forward(self, x: Tensor) -> Tensor:
        first = stream_first(self)
        h = self.conv(x)
        if self.group:
            s = space_time_to_depth(x, self.ft, self.fs, first)
            h = h + s.view(s.shape[0], -1, self.group, *s.shape[2:]).mean(2)
        return h


class Upsample(nn.Module):
    """Nearest upsampling then a causal conv. Time: [z0, z1, ..] -> [z0, z1, z1, z2, z2, ..]
    (frame 0 stays single, so 1 + n frames -> 1 + 2n). Shortcut: channel repeat then
    depth-to-space/time (the mirror of Downsample's)."""

    def __init__(self, in_ch: int, out_ch: int, time: bool, space: bool) -> None:
        super().__init__()
        self.ft, self.fs = (2 if time else 1), (2 if space else 1)
        self.conv = CausalConv3d(in_ch, out_ch)
        factor = out_ch * self.ft * self.fs**2
        self.repeats = factor // in_ch if factor % in_ch == 0 else 0
        self._stream: dict | None = None  # see CausalConv3d

    def forward(self, x: Tensor) -> Tensor:
        first = stream_first(self)
        h = x
        if self.ft > 1:
            h = h.repeat_interleave(2, dim=2)[:, :, (1 if first else 0) :]
        if self.fs > 1:
            h = h.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        h = self.conv(h)
        if self.repeats:
            rep = x.repeat_interleave(self.repeats, dim=1)
            h = h + depth_to_space_time(rep, self.ft, self.fs, first)
        return h


def _pixel_unshuffle(x: Tensor, p: int) -> Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def _pixel_shuffle(x: Tensor, p: int) -> Tensor:
    """Inverse of _pixel_unshuffle."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.view(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, t, h * p, w * p)


class Encoder(nn.Module):
    def __init__(self, args: AutoencoderArgs) -> None:
        super().__init__()
        plan = _stage_plan(args)
        chs = [args.base_channels * m for m in args.channel_mult]
        self.patch_size = args.patch_size
        self.conv_in = CausalConv3d(args.in_channels * args.patch_size**2, chs[0])
        layers: list[nn.Module] = []
        ch = chs[0]
        for level, out_ch in enumerate(chs):
            for _ in range(args.num_res_blocks):
                layers.append(ResBlock(ch, out_ch))
                ch = out_ch
            if level < len(plan):
                time, space = plan[level]
                layers.append(Downsample(ch, chs[level + 1], time, space))
                ch = chs[level + 1]
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(ch, ch)
        self.norm_out = ChannelRMSNorm(ch)
        self.conv_out = CausalConv3d(ch, 2 * args.latent_channels)
        self.latent_channels = args.latent_channels
        # Shortcut into the latent mean (channel-group average), as in Downsample.
        self.group = ch // args.latent_channels if ch % args.latent_channels == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        """x [B, 3, T, H, W] -> moments [B, 2 * C, t, h, w] (mean then logvar)."""
        h = self.conv_in(_pixel_unshuffle(x, self.patch_size))
        h = self.mid(self.down(h))
        moments = self.conv_out(F.silu(self.norm_out(h)))
        if self.group:
            short = h.view(h.shape[0], self.latent_channels, self.group, *h.shape[2:]).mean(2)
            moments = moments + F.pad(short, (0, 0, 0, 0, 0, 0, 0, self.latent_channels))
        return moments


class Decoder(nn.Module):
    def __init__(self, args: AutoencoderArgs) -> None:
        super().__init__()
        plan = _stage_plan(args)
        chs = [args.base_channels * m for m in args.channel_mult]
        self.patch_size = args.patch_size
        ch = chs[-1]
        self.conv_in = CausalConv3d(args.latent_channels, ch)
        self.repeats = ch // args.latent_channels if ch % args.latent_channels == 0 else 0
        self.mid = ResBlock(ch, ch)
        layers: list[nn.Module] = []
        for level in reversed(range(len(chs))):
            for _ in range(args.num_res_blocks):
                layers.append(ResBlock(ch, chs[level]))
                ch = chs[level]
            if level > 0:
                time, space = plan[level - 1]
                layers.append(Upsample(ch, chs[level - 1], time, space))
                ch = chs[level - 1]
        self.up = nn.Sequential(*layers)
        self.norm_out = ChannelRMSNorm(ch)
        self.conv_out = CausalConv3d(ch, args.in_channels * args.patch_size**2)

    def forward(self, z: Tensor) -> Tensor:
        """z [B, C, t, h, w] -> [B, 3, T, H, W]."""
        h = self.conv_in(z)
        if self.repeats:
            h = h + z.repeat_interleave(self.repeats, dim=1)
        h = self.up(self.mid(h))
        return _pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.patch_size)


def _tiled(
    fn, x: Tensor, tile: int, overlap: int, scale: float, out_ch: int
) -> Tensor:
    """Apply fn to overlapping spatial tiles of x [B, C, T, H, W] and blend the outputs.

    fn maps a tile of (th, tw) to (th * scale, tw * scale); outputs are averaged with linear
    ramps across each overlap (weights sum to 1 everywhere), hiding seams.
    """
    h, w = x.shape[-2:]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile_overlap {overlap} must be smaller than tile_size {tile}")

    def starts(n: int) -> list[int]:
        s = list(range(0, max(n - tile, 0) + 1, stride))
        if s[-1] + tile < n:
            s.append(n - tile)  # last tile flush with the border
        return s

    out = weight = None
    ov = max(1, round(overlap * scale))
    for y in starts(h):
        for xx in starts(w):
            o = fn(x[..., y : y + tile, xx : xx + tile])
            th, tw = o.shape[-2:]
            if out is None:
                shape = (*o.shape[:3], round(h * scale), round(w * scale))
                out, weight = o.new_zeros(shape), o.new_zeros(shape[-2:])
            # Ramps only on sides that have a neighbour, so the borders keep weight 1.
            wy = _ramp(th, ov, y > 0, y + tile < h, o)
            wx = _ramp(tw, ov, xx > 0, xx + tile < w, o)
            m = wy[:, None] * wx[None, :]
            oy, ox = round(y * scale), round(xx * scale)
            out[..., oy : oy + th, ox : ox + tw] += o * m
            weight[oy : oy + th, ox : ox + tw] += m
    return out / weight


def _ramp(n: int, ov: int, lo: bool, hi: bool, like: Tensor) -> Tensor:
    r = torch.ones(n, dtype=like.dtype, device=like.device)
    ramp = (torch.arange(ov, dtype=like.dtype, device=like.device) + 1) / (ov + 1)
    ov = min(ov, n)
    if lo:
        r[:ov] = ramp[:ov]
    if hi:
        r[n - ov :] = torch.minimum(r[n - ov :], ramp[:ov].flip(0))
    return r


class VideoAutoencoder(nn.Module):
    """Causal video VAE: [B, 3, T, H, W] in [-1, 1] <-> latents [B, C, t, h, w]."""

    def __init__(self, args: AutoencoderArgs) -> None:
        super().__init__()
        self.args = args
        if args.kind == "pixel":
            ft, fs = args.temporal_downsample, args.spatial_downsample
            _log2(ft, "temporal_downsample"), _log2(fs, "spatial_downsample")
            want = pixel_latent_channels(args.in_channels, ft, fs)
            if args.latent_channels != want:
                raise ValueError(f"the pixel codec's latent_channels must be in_channels x "
                                 f"temporal_downsample x spatial_downsample^2 = {want}, got "
                                 f"{args.latent_channels}")
            self.encoder: nn.Module = PixelEncoder(ft, fs)
            self.decoder: nn.Module = PixelDecoder(ft, fs)
        elif args.kind == "conv":
            _stage_plan(args)  # validate before building anything
            self.encoder = Encoder(args)
            self.decoder = Decoder(args)
        else:
            raise ValueError(f"autoencoder kind must be 'conv' or 'pixel', got {args.kind!r}")
        # Per-channel latent statistics, measured after AE training and used by the diffusion
        # stage so its inputs are ~unit variance. Persistent: they travel with checkpoints.
        self.register_buffer("latent_mean", torch.empty(args.latent_channels))
        self.register_buffer("latent_std", torch.empty(args.latent_channels))
        # The convolutions' constructors already drew torch's default init; only ours is left.
        self._init_custom()

    def init_weights(self) -> None:
        """Re-initialize every parameter and buffer from scratch, drawing from the RNG exactly
        as construction did (torch's default conv init); see models/init.py."""
        reset_default_parameters(self)
        self._init_custom()

    @torch.no_grad()
    def _init_custom(self) -> None:
        """Identity latent statistics (mean 0, std 1) until measured; no RNG draws."""
        self.latent_mean.zero_()
        self.latent_std.fill_(1.0)

    # --- shapes -------------------------------------------------------------------------
    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the latent of a [*, 3, T, H, W] video."""
        a = self.args
        if T < 1 or (T - 1) % a.temporal_downsample:
            raise ValueError(
                f"number of frames T={T} must satisfy (T - 1) % {a.temporal_downsample} == 0 "
                f"(e.g. {1 + a.temporal_downsample * max(1, (T - 1) // a.temporal_downsample)}); "
                "an image is T=1"
            )
        if H % a.spatial_downsample or W % a.spatial_downsample:
            raise ValueError(f"H={H}, W={W} must be multiples of {a.spatial_downsample}")
        return (
            a.latent_channels,
            1 + (T - 1) // a.temporal_downsample,
            H // a.spatial_downsample,
            W // a.spatial_downsample,
        )

    # --- encode / decode ----------------------------------------------------------------
    def encode(
        self,
        x: Tensor,
        *,
        chunk_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 16,
    ) -> tuple[Tensor, Tensor]:
        """x [B, 3, T, H, W] in [-1, 1] -> (mean, logvar), each [B, C, t, h, w].

        chunk_frames: encode k * temporal_downsample pixel frames at a time (the first chunk
            has one extra frame); the causal padding state is carried between chunks, so the
            result equals a whole-video encode up to float rounding, at a fraction of the
            activation memory.
        tile_size, tile_overlap: encode overlapping spatial tiles of tile_size pixels and
            blend latents linearly across the overlap (approximate: tiles do not see each
            other beyond the overlap). Both are multiples of spatial_downsample.
        """
        self.latent_shape(*x.shape[2:])

        def enc(v: Tensor) -> Tensor:
            if chunk_frames is None:
                return self.encoder(v)
            tf = self.args.temporal_downsample
            step = max(1, chunk_frames // tf) * tf
            bounds = [0, 1 + step] + list(range(1 + 2 * step, v.shape[2] + step, step))
            with self._streaming(self.encoder):
                return torch.cat([self.encoder(v[:, :, a:b]) for a, b in
                                  zip(bounds[:-1], bounds[1:]) if a < v.shape[2]], dim=2)

        f = self.args.spatial_downsample
        if tile_size is not None:
            moments = _tiled(enc, x, tile_size, tile_overlap, 1 / f, 2 * self.args.latent_channels)
        else:
            moments = enc(x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(
        self,
        z: Tensor,
        *,
        chunk_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 2,
    ) -> Tensor:
        """z [B, C, t, h, w] -> x_hat [B, 3, 1 + (t - 1) * temporal_downsample, H, W].

        chunk_frames: decode this many latent frames at a time with carried causal state
            (equals the whole decode up to rounding). tile_size, tile_overlap: spatial tiles
            in latent pixels, blended linearly in pixel space (approximate).
        """

        def dec(v: Tensor) -> Tensor:
            if chunk_frames is None:
                return self.decoder(v)
            with self._streaming(self.decoder):
                return torch.cat([self.decoder(v[:, :, a : a + chunk_frames])
                                  for a in range(0, v.shape[2], chunk_frames)], dim=2)

        if tile_size is not None:
            f = self.args.spatial_downsample
            return _tiled(dec, z, tile_size, tile_overlap, f, self.args.in_channels)
        return dec(z)

    @contextmanager
    def _streaming(self, root: nn.Module):
        """Chunked mode for every causal module under root; state dropped on exit."""
        mods = [m for m in root.modules() if hasattr(m, "_stream")]
        for m in mods:
            m._stream = {}
        try:
            yield
        finally:
            for m in mods:
                m._stream = None

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, draw z ~ N(mean, exp(logvar)) (reparameterized), decode.

        generator: optional torch.Generator for the posterior noise; draws happen on the
            generator's device, so a CPU generator makes runs bit-reproducible anywhere.
        Returns (recon [B, 3, T, H, W], mean, logvar [B, C, t, h, w]).
        """
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            gen_device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
        return self.decode(z), mean, logvar

    # --- latent normalization for the diffusion stage -----------------------------------
    def normalize(self, z: Tensor) -> Tensor:
        """(z - latent_mean) / latent_std per channel; z [B, C, t, h, w]."""
        return (z - self.latent_mean.view(-1, 1, 1, 1)) / self.latent_std.view(-1, 1, 1, 1)

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of normalize."""
        return z * self.latent_std.view(-1, 1, 1, 1) + self.latent_mean.view(-1, 1, 1, 1)

    # --- accounting ---------------------------------------------------------------------
    def num_params(self) -> int:
        """Number of parameters (encoder + decoder)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, T: int, H: int, W: int) -> float:
        """Training FLOPs (encode + decode, fwd + bwd) for one [3, T, H, W] clip.

        Sum over every conv of 2 * output numel * (in_ch / groups) * kernel volume, i.e.
        2 FLOPs per MAC, times 3 for forward + backward. Shapes come from a forward pass of a
        clone on the meta device, so the count tracks the architecture with no hand upkeep and
        allocates nothing. Norms and activations are ignored (conventional, < 1%).
        """
        self.latent_shape(T, H, W)
        with torch.device("meta"):
            clone = VideoAutoencoder(self.args)
        macs = 0

        def hook(mod: nn.Module, _inp, out: Tensor) -> None:
            nonlocal macs
            macs += out.numel() * mod.weight[0].numel()  # weight[0]: in/groups * kernel volume

        for m in clone.modules():
            if isinstance(m, nn.Conv3d):
                m.register_forward_hook(hook)
        with torch.no_grad():
            clone(torch.empty(1, self.args.in_channels, T, H, W, device="meta"), sample=False)
        return float(3 * 2 * macs)
