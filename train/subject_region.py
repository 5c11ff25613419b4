"""Reference similarity on the subject's region (synthetic world).

A whole-frame colour histogram barely notices a small sprite: a generated clip whose sprites
are missing still shares the background with the reference and scores almost as high. The
synthetic world knows where it drew every sprite, so the reference group also measures the
similarity of the pixels *inside the sprites' boxes* — in the reference (where the sprites
were in the frame the reference was taken from) and in each generated frame (where the
clip's actions put them at that frame) — with a masked colour histogram. Reported next to
the whole-frame figure by :meth:`FlowEvaluator.reference_consistency` as
``reference/subject_*`` (same paired controls and noise floor, train/evaluate.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["masked_colour_histogram", "sprite_masks", "subject_similarity",
           "subject_region_steering"]


def masked_colour_histogram(images: torch.Tensor, mask: Optional[torch.Tensor],
                            bins: int = 8) -> torch.Tensor:
    """Joint RGB histogram of the pixels where ``mask`` is true (None: all of them; that is
    ``evaluate.colour_histogram``), L2-normalised. images [N, 3, H, W] in [-1, 1], mask
    [N, H, W] bool → [N, bins³]; an empty mask gives a zero vector (cosine 0: no subject)."""
    q = ((images.clamp(-1, 1) + 1) / 2 * (bins - 1e-6)).long()
    idx = ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).flatten(1)
    hist = torch.zeros(images.shape[0], bins**3, device=images.device)
    counts = torch.ones_like(idx, dtype=hist.dtype) if mask is None else mask.flatten(1).to(hist.dtype)
    hist.scatter_add_(1, idx, counts)
    return torch.nn.functional.normalize(hist, dim=1)


def sprite_masks(data: Any, keys: list[Any], num_frames: int, device: torch.device,
                 margin: int = 1) -> torch.Tensor:
    """[B, T, H, W] bool: the boxes (grown by ``margin`` pixels, clipped to the view) of
    every sprite of each clip (synthetic world ``data``, clip index ``key``) at each frame,
    at ``data.resolution``."""
    from worldline.data.synthetic import SyntheticWorldConfig, _sprite_size, render_clip

    syn = SyntheticWorldConfig(**{k: data.synthetic[k] for k in data.synthetic})
    h, w = int(data.resolution[0]), int(data.resolution[1])
    sy, sx = h / syn.height, w / syn.width
    size = _sprite_size(syn)
    out = torch.zeros(len(keys), num_frames, h, w, dtype=torch.bool, device=device)
    for i, key in enumerate(keys):
        clip = render_clip(syn, int(key))
        cam = clip["camera"]
        for s in clip["sprites"]:
            for t in range(min(num_frames, len(cam))):
                x0 = (s["positions"][t][0] - cam[t][0]) * sx
                y0 = (s["positions"][t][1] - cam[t][1]) * sy
                x1, y1 = x0 + size * sx, y0 + size * sy
                xa, ya = max(int(x0) - margin, 0), max(int(y0) - margin, 0)
                xb, yb = min(int(x1 + 0.999) + margin, w), min(int(y1 + 0.999) + margin, h)
                if xa < xb and ya < yb:
                    out[i, t, ya:yb, xa:xb] = True
    return out


def subject_similarity(ref_px: torch.Tensor, ref_mask: torch.Tensor,
                       masks: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sims(video) -> [B]``: cosine similarity of the masked colour histogram of each
    generated frame (``masks`` [B, T, H, W]: the subject's region at that frame) to that of
    the reference ``ref_px`` [B, 3, H, W] inside ``ref_mask`` [B, H, W], averaged over
    the frames where the subject is in view (a clip with none scores 0)."""
    target = masked_colour_histogram(ref_px, ref_mask)

    def sims(video: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = video.shape
        m = masks[:, :t]
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
        f = masked_colour_histogram(frames, m.reshape(b * t, h, w)).view(b, t, -1)
        cos = torch.nn.functional.cosine_similarity(f, target[:, None], dim=-1)
        seen = m.flatten(2).any(-1).to(cos.dtype)  # [B, T]
        return (cos * seen).sum(1) / seen.sum(1).clamp_min(1)

    return sims


def subject_region_steering(ev: Any, ref_px: torch.Tensor, ref_frame: int,
                            videos: tuple[Any, ...], paired: Callable[..., dict[str, Any]]
                            ) -> dict[str, Any]:
    """``reference/subject_*``: the paired reference measurement (``paired``: evaluate's
    ``_paired_steering``, passed in so this module does not import evaluate) of ``videos``
    (with the reference, without, with another clip's reference or None, reseeded) on the
    subject's region; {} off the synthetic world (nothing knows where the subject is)."""
    if ev.data.kind != "synthetic":
        return {}
    t = videos[0].shape[2]
    masks = sprite_masks(ev.data, list(ev.batch["key"]), max(t, ref_frame + 1), ev.device)
    sims = subject_similarity(ref_px, masks[:, ref_frame], masks[:, :t])
    rep = paired("reference", sims, *videos, "colour_histogram on sprite boxes")
    return {k.replace("reference/", "reference/subject_", 1): v for k, v in rep.items()}
