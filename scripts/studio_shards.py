"""``worldline-studio-shards``: a studio's folder of clips and stills → train/val shards for
``stage=finetune``.

Folder layout (everything optional except at least one clip or still)::

    studio/
      shot_01.mp4  shot_01.txt        clips (+ caption), any worldline-shards video format
      still_01.png still_01.txt       stills: become 1-frame videos (the loader's 1-frame bucket)
      moodboard/*.png|jpg|webp        mood-board images: reference images of every sample

It stages a standard worldline-shards folder per split (caption sidecars with the trigger word
prepended, stills encoded as 1-frame mp4s, mood-board images linked as ``<key>.ref<i>.*``) and
runs :func:`worldline.data.ingest.make_shards` on each, writing ``<out>/train`` and
``<out>/val`` (each with manifest.json). The split is a deterministic hash of the file name,
so adding a file never moves another between splits.

Example::

    worldline-studio-shards studio/ runs/_datasets/studio --trigger "wl-studio style" \\
        --val-fraction 0.2
    worldline-train stage=finetune data=webdataset data.shards=runs/_datasets/studio/train \\
        stage.validation.shards=runs/_datasets/studio/val ...
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from worldline.data.sources import IMAGE_SUFFIXES, VIDEO_SUFFIXES

__all__ = ["stage_studio_folder", "make_studio_shards"]

MOODBOARD_DIRS = ("moodboard", "mood_board", "mood-board")


def _caption(path: Path, trigger: str | None) -> str | None:
    """The clip's caption with the trigger word, or ``None`` when its ``.txt`` cannot be read
    as text (``sources.read_text``): the caller stages the file as it is, so ingest reports
    that clip as skipped (e.g. ``bad_encoding``) instead of the whole run failing."""
    from worldline.data.sources import SidecarError, read_text

    side = path.with_suffix(".txt")
    try:
        text = read_text(side).strip() if side.is_file() else ""
    except SidecarError:
        return None
    if trigger:
        text = f"{trigger}, {text}" if text else trigger
    return text


def _is_val(name: str, fraction: float) -> bool:
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def _still_to_mp4(path: Path, fps: float = 8.0) -> bytes:
    """An image → 1-frame H.264 mp4 (even height/width for 4:2:0 chroma)."""
    from PIL import Image

    from worldline.data.video import encode_mp4

    with Image.open(path) as img:
        rgb = np.array(img.convert("RGB"))
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    if min(h, w) < 2:
        raise ValueError(f"{path}: still too small ({rgb.shape[0]}x{rgb.shape[1]})")
    return encode_mp4(rgb[None, :h, :w], fps)


def stage_studio_folder(source: str | Path, staging: str | Path, trigger: str | None = None,
                        val_fraction: float = 0.0, max_refs: int = 4) -> dict[str, int]:
    """Write ``staging/train`` and ``staging/val`` as plain worldline-shards folders (see the
    module docstring). Returns the number of samples per split."""
    src, staging = Path(source), Path(staging)
    if not src.is_dir():
        raise FileNotFoundError(f"studio folder {src} does not exist")
    mood = sorted(p for d in MOODBOARD_DIRS for p in (src / d).glob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES)[:max_refs]
    inputs = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and p.parent.name not in MOODBOARD_DIRS
                    and (p.suffix.lower() in VIDEO_SUFFIXES
                         or (p.suffix.lower() in IMAGE_SUFFIXES and ".ref" not in p.name)))
    if not inputs:
        raise FileNotFoundError(f"no clips ({', '.join(VIDEO_SUFFIXES)}) or stills "
                                f"({', '.join(IMAGE_SUFFIXES)}) under {src}")
    counts = {"train": 0, "val": 0}
    for split in counts:
        (staging / split).mkdir(parents=True, exist_ok=True)
    for p in inputs:
        rel = p.relative_to(src)
        split = "val" if _is_val(str(rel), val_fraction) else "train"
        stem = "_".join(rel.with_suffix("").parts)
        out = staging / split
        if p.suffix.lower() in VIDEO_SUFFIXES:
            target = out / f"{stem}{p.suffix.lower()}"
            if not target.exists():
                os.symlink(p.resolve(), target)
            for side in (".actions.json", ".actions.npy", ".camera.json", ".camera.npy"):
                s = Path(f"{p.with_suffix('')}{side}")
                if s.is_file() and not (out / f"{stem}{side}").exists():
                    os.symlink(s.resolve(), out / f"{stem}{side}")
        else:
            (out / f"{stem}.mp4").write_bytes(_still_to_mp4(p))
        caption = _caption(p, trigger)
        if caption is None:
            os.symlink(p.with_suffix(".txt").resolve(), out / f"{stem}.txt")
        else:
            (out / f"{stem}.txt").write_text(caption, encoding="utf-8")
        for i, m in enumerate(mood):
            ref = out / f"{stem}.ref{i}{m.suffix.lower()}"
            if not ref.exists():
                os.symlink(m.resolve(), ref)
        counts[split] += 1
    if val_fraction > 0 and counts["val"] == 0 and counts["train"] > 1:
        # Tiny sets: the hash may put nothing in val; move the last sample there.
        last = sorted((staging / "train").glob("*.txt"))[-1].name[: -len(".txt")]
        for f in list((staging / "train").glob(f"{last}.*")):
            shutil.move(str(f), staging / "val" / f.name)
        counts["train"] -= 1
        counts["val"] += 1
    return counts


def make_studio_shards(source: str | Path, out: str | Path, trigger: str | None = None,
                       val_fraction: float = 0.1, max_count: int = 64,
                       processes: int = 1) -> dict[str, dict]:
    """Stage then shard a studio folder into ``out/train`` and ``out/val``; returns each
    split's manifest."""
    from worldline.data.ingest import make_shards

    out = Path(out)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    counts = stage_studio_folder(source, staging, trigger, val_fraction)
    manifests = {}
    for split, n in counts.items():
        if n:
            manifests[split] = make_shards(staging / split, out / split, max_count=max_count,
                                           processes=processes, resume=False)
    shutil.rmtree(staging, ignore_errors=True)
    return manifests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="worldline-studio-shards",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("source", help="studio folder (clips, stills, moodboard/)")
    ap.add_argument("out", help="output folder; gets train/ and val/ shard folders")
    ap.add_argument("--trigger", default=None, help="word prepended to every caption")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--max-count", type=int, default=64, help="samples per shard")
    ap.add_argument("--processes", type=int, default=1)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0.0 <= args.val_fraction < 1.0:
        ap.error("--val-fraction must be in [0, 1)")
    try:
        manifests = make_studio_shards(args.source, args.out, args.trigger, args.val_fraction,
                                       args.max_count, args.processes)
    except (FileNotFoundError, ValueError) as e:
        print(f"worldline-studio-shards: error: {e}", file=sys.stderr)
        return 2
    for split, m in manifests.items():
        print(f"{split}: {m['num_samples']} samples, {len(m['skipped'])} skipped → "
              f"{Path(args.out) / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
