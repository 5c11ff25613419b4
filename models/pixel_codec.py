"""The lossless, parameter-free "autoencoder" (``model.autoencoder.kind=pixel``) and the causal
space/time-to-depth rearrangements it shares with the learned one.

A learned autoencoder trained for minutes on a CPU erases objects a few pixels wide: the
tiny one reached 21 dB whole-frame and 6 dB on the synthetic world's 2-4 px agent dots after
300 steps (BENCHMARKS.md, "Small moving objects"), so no world model trained on its latents
can show them move. For small frames the world model can instead diffuse in pixel space, as
DIAMOND does: the pixel codec folds each ``temporal_downsample x spatial_downsample^2`` block
of pixels into channels (causally: frame 0 stands alone, as in the learned autoencoder), so
latents are the pixels themselves, rearranged, and decoding is exact. Latent frames keep the
learned autoencoder's time layout (1 + n per 1 + n * tf pixel frames), so the KV-cached
rollout, streaming decode and ``worldline-play`` work unchanged.

Its cost is in the transformer: ``latent_channels = in_channels * tf * fs^2`` values per
latent position (192 for 3 x 4 x 4^2), so choose ``spatial_downsample`` and the DiT patch so
tokens stay few (``model=tiny_pixel``: 64 tokens per latent frame at 64x64).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# log-variance the pixel codec reports: the posterior is a point (exp(-15) ~ 3e-7 std, the
# learned autoencoder's clamp floor), so sampling it changes nothing that survives uint8.
POINT_LOGVAR = -30.0


def space_time_to_depth(x: Tensor, ft: int, fs: int, first: bool = True) -> Tensor:
    """[B, C, T, H, W] -> [B, C*ft*fs*fs, T', H/fs, W/fs], causally: with ft = 2 frame 0 is
    replicated in front so T = 1 + 2n -> 1 + n and output frame i holds frames 2i-1, 2i.
    first=False (a later chunk of a stream): no replication, T = 2n -> n."""
    if ft > 1 and first:
        x = torch.cat([x[:, :, :1].expand(-1, -1, ft - 1, -1, -1), x], dim=2)
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


def depth_to_space_time(x: Tensor, ft: int, fs: int, first: bool = True) -> Tensor:
    """Inverse of space_time_to_depth (drops the replicated leading frames when first)."""
    b, c, t, h, w = x.shape
    c_out = c // (ft * fs * fs)
    x = x.view(b, c_out, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, c_out, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :] if first else x


def stream_first(m: nn.Module) -> bool:
    """True unless m is streaming and has already seen a chunk (then marks it as seen)."""
    st = m._stream
    if st is None:
        return True
    first = not st.get("seen", False)
    st["seen"] = True
    return first


def pixel_latent_channels(in_channels: int, ft: int, fs: int) -> int:
    """The latent channels the pixel codec produces (what the DiT's in_channels must be)."""
    return in_channels * ft * fs * fs


class PixelEncoder(nn.Module):
    """x [B, C, T, H, W] -> moments [B, 2 * C*ft*fs^2, t, h, w]: the rearranged pixels as the
    mean, a point posterior as the log-variance (the learned Encoder's contract)."""

    def __init__(self, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        self._stream: dict | None = None  # chunked mode (VideoAutoencoder._streaming)

    def forward(self, x: Tensor) -> Tensor:
        mean = space_time_to_depth(x, self.ft, self.fs, stream_first(self))
        return torch.cat([mean, torch.full_like(mean, POINT_LOGVAR)], dim=1)


class PixelDecoder(nn.Module):
    """z [B, C*ft*fs^2, t, h, w] -> [B, C, T, H, W]: the exact inverse of PixelEncoder."""

    def __init__(self, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        self._stream: dict | None = None

    def forward(self, z: Tensor) -> Tensor:
        return depth_to_space_time(z, self.ft, self.fs, stream_first(self))
