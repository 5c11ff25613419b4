"""The autoencoder's training loss, with reconstruction weighted toward what moves.

Whole-frame L1/L2 is dominated by the static background: a tiny autoencoder reaches >30 dB
whole-frame PSNR while erasing every 2-4 px moving object (models/metrics.py), because those
pixels are well under 1 % of the frame. ``moving_weight`` counts each pixel that moves
(``moving_mask`` of the ground truth, grown by ``moving_dilate`` pixels so the object's edge
counts too) ``1 + moving_weight`` times in L1 and L2. The mask comes from the input clip
alone, so it costs one frame difference and needs no labels.

    >>> loss, parts = autoencoder_loss(x, recon, mean, logvar, ae.args, moving_weight=20.0)
    >>> parts["l1"], parts["l1_moving"]   # unweighted L1 overall and on moving pixels
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldline.models.metrics import moving_mask

__all__ = ["autoencoder_loss", "moving_weights"]


def moving_weights(x: Tensor, moving_weight: float, dilate: int = 1) -> Tensor:
    """Per-pixel loss weights [B, 1, T, H, W]: 1, and ``1 + moving_weight`` where ``x``
    [B, C, T, H, W] moves (``moving_mask``, dilated by ``dilate`` pixels in H and W)."""
    m = moving_mask(x).float()
    if dilate > 0:
        k = 2 * dilate + 1
        m = F.max_pool3d(m, (1, k, k), stride=1, padding=(0, dilate, dilate))
    return 1.0 + moving_weight * m


def autoencoder_loss(
    x: Tensor,
    recon: Tensor,
    mean: Tensor,
    logvar: Tensor,
    args: Any,
    *,
    perceptual: nn.Module | None = None,
    disc_logits: Tensor | None = None,
    adv_weight: float | Tensor = 0.0,
    moving_weight: float = 0.0,
    moving_dilate: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted L1 + L2 reconstruction + KL(q(z|x) || N(0, I)) [+ perceptual] [+ GAN].

    All terms are means (per pixel, per latent element) so weights do not depend on clip
    size. Returns (total loss, {"loss", "l1", "l2", "kl"[, "l1_moving"][, "perceptual"]
    [, "g_adv"]}) as tensors; no host sync. The logged ``l1``/``l2`` are unweighted, so runs
    with different ``moving_weight`` compare.

    moving_weight: pixels that move count ``1 + moving_weight`` times in L1/L2
        (:func:`moving_weights`; 0 = plain means). perceptual: a models.losses.PerceptualLoss
        (or any (recon, x) -> scalar module), weighted by args.perceptual_weight. disc_logits:
        discriminator logits on `recon` (gradients must flow to recon), hinge generator loss
        weighted by adv_weight (0 before the discriminator's warm-up ends).
    """
    diff = recon.float() - x.float()
    ad, d2 = diff.abs(), diff.pow(2)
    l1, l2 = ad.mean(), d2.mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    parts = {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}
    if moving_weight > 0:
        with torch.no_grad():  # the mask is data, not a path for gradients
            w = moving_weights(x, moving_weight, moving_dilate)
        rec = (w * (args.l1_weight * ad + args.l2_weight * d2)).mean()
        with torch.no_grad():
            m = w > 1
            parts["l1_moving"] = (ad * m).sum() / (m.sum() * x.shape[1]).clamp_min(1)
    else:
        rec = args.l1_weight * l1 + args.l2_weight * l2
    loss = rec + args.kl_weight * kl
    if perceptual is not None and args.perceptual_weight > 0:
        p = perceptual(recon, x)
        loss = loss + args.perceptual_weight * p
        parts["perceptual"] = p.detach()
    if disc_logits is not None:
        g = -disc_logits.float().mean()  # hinge GAN, generator side: -mean D(G(z))
        loss = loss + adv_weight * g
        parts["g_adv"] = g.detach()
    return loss, {"loss": loss.detach(), **parts}
