"""Reconstruction metrics for held-out clips: PSNR and SSIM (pure tensor math, no I/O).

Videos are [B, C, T, H, W] (images [B, C, H, W] also work) in [-1, 1] by default; pass
`data_range` for other ranges (e.g. 1.0 for [0, 1], 255.0 for uint8 values).

    >>> psnr(recon, x)           # [B] dB
    >>> ssim(recon, x)           # [B] in [-1, 1], mean over frames
    >>> psnr(recon, x, mask=moving_mask(x))   # [B] dB on the pixels that move

Whole-frame PSNR rewards a static background: an autoencoder that erases every small moving
object (a sprite a few pixels wide) still scores >30 dB. ``moving_mask`` selects the pixels
where consecutive ground-truth frames differ, and PSNR over them says whether what moves
survived, and :func:`moving_verdict` refuses to call a reconstruction good without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MOVING_PSNR_MIN", "moving_mask", "moving_verdict", "psnr", "ssim"]

# The bar for "small moving objects survive" (BENCHMARKS.md, the synthetic world's 2-4 px
# agents): moving-region PSNR at least this many dB.
MOVING_PSNR_MIN = 30.0


def moving_verdict(psnr_whole: float, psnr_moving: float,
                   min_moving: float = MOVING_PSNR_MIN) -> tuple[bool, str]:
    """``(ok, message)``: a reconstruction is good only if its moving-region PSNR reaches
    ``min_moving`` dB, whatever its whole-frame PSNR (which rewards erasing small objects).
    No moving pixels (NaN) is not ok either: nothing showed that what moves survives."""
    if math.isnan(psnr_moving):
        return False, (f"reconstruction unverified: whole-frame PSNR {psnr_whole:.1f} dB, but no "
                       f"pixel moved in these clips, so nothing shows that moving objects survive")
    if psnr_moving < min_moving:
        return False, (f"reconstruction NOT good: moving-region PSNR {psnr_moving:.1f} dB < "
                       f"{min_moving:g} dB (whole-frame {psnr_whole:.1f} dB): small moving "
                       f"objects are blurred or erased, which whole-frame PSNR does not show")
    return True, (f"reconstruction ok: moving-region PSNR {psnr_moving:.1f} dB >= {min_moving:g} "
                  f"dB (whole-frame {psnr_whole:.1f} dB)")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0, mask: Tensor | None = None) -> Tensor:
    """Per-sample peak signal-to-noise ratio in dB: [B, ...] -> [B] (MSE floored at 1e-10).
    ``mask`` (bool, broadcastable to ``x``): only those elements count; a sample with none
    gives NaN (aggregate with ``nanmean``)."""
    err = (x.float() - y.float()).pow(2)
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.expand_as(err).flatten(1).float()
        mse = (err.flatten(1) * m).sum(1) / m.sum(1)  # 0/0 = NaN: nothing moved
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def moving_mask(video: Tensor, threshold: float = 0.05) -> Tensor:
    """Where ``video`` [B, C, T, H, W] moves: bool [B, 1, T, H, W], True where a pixel differs
    from the previous frame (frame 0: from frame 1) by more than ``threshold`` in any channel
    (default 0.05 of the [-1, 1] range, above codec noise). A moving object is marked where
    it was and where it is."""
    v = video.float()
    if v.shape[2] < 2:
        return torch.zeros_like(v[:, :1], dtype=torch.bool)
    d = (v[:, :, 1:] - v[:, :, :-1]).abs().amax(1, keepdim=True) > threshold
    return torch.cat([d[:, :, :1], d], dim=2)


def _gaussian(size: int, sigma: float, device, dtype) -> Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 2.0,
    low: float = -1.0,
    window: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Per-sample structural similarity (Wang et al. 2004), per frame with an 11x11 Gaussian
    window (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over channels, frames and positions
    ('valid' windows only, as in the reference implementation): [B, C, (T,) H, W] -> [B].

    Values are shifted by `low` to [0, data_range] first: SSIM's luminance term is not
    shift-invariant and is defined for non-negative intensities (with zero-mean [-1, 1]
    inputs, x vs -x would score high)."""
    if x.dim() == 5:  # fold frames into the batch
        b, c, t, h, w = x.shape
        xf = x.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        yf = y.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return ssim(xf, yf, data_range, low, window, sigma).view(b, t).mean(1)
    c = x.shape[1]
    window = min(window, x.shape[-2], x.shape[-1])
    g = _gaussian(window, sigma, x.device, torch.float32)
    kern = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    x, y = x.float() - low, y.float() - low

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, kern, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
