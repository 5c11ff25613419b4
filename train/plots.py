"""Minimal PNG line plots for evaluation reports, drawn with Pillow.

matplotlib is not a dependency of Worldline (and not installed on the training images); the
reports need only a few labelled lines, which Pillow (already required for reference images)
draws in ~50 lines.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["line_plot"]

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def line_plot(path: str | Path, series: dict[str, list[float]], title: str, xlabel: str,
              ylabel: str, x: list[float] | None = None,
              size: tuple[int, int] = (640, 400)) -> Path:
    """One PNG with a line (and markers) per named series; x defaults to 1..N."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    vals = [v for s in series.values() for v in s if v == v]  # drop NaN
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(s) for s in series.values()), default=1)
    xs = x or list(range(1, n + 1))
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (left + (xv - x_lo) / (x_hi - x_lo) * (w - left - right),
                h - bottom - (yv - lo) / (hi - lo) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = lo + (hi - lo) * i / 4
        _, yp = px(x_lo, yv)
        d.line([left - 4, yp, left, yp], fill="black")
        d.text((4, yp - 6), f"{yv:.3g}", fill="black")
    for xv in xs:
        xp, _ = px(xv, lo)
        d.line([xp, h - bottom, xp, h - bottom + 4], fill="black")
        d.text((xp - 4, h - bottom + 6), f"{xv:g}", fill="black")
    d.text((w // 2 - 4 * len(title), 8), title, fill="black")
    d.text((w // 2 - 3 * len(xlabel), h - 20), xlabel, fill="black")
    d.text((4, top - 22), ylabel, fill="black")
    for k, (name, s) in enumerate(series.items()):
        c = _COLOURS[k % len(_COLOURS)]
        pts = [px(xv, yv) for xv, yv in zip(xs, s) if yv == yv]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for xp, yp in pts:
            d.ellipse([xp - 3, yp - 3, xp + 3, yp + 3], fill=c)
        d.text((w - right - 150, top + 6 + 14 * k), f"- {name}", fill=c)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
