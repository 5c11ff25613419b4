"""Where raw videos come from: a folder with sidecar files, or a CSV / JSONL manifest.

Folder layout (sidecars share the video's stem; all optional)::

    clips/walk_01.mp4            the video (also .m4v .mov .webm .mkv .avi), searched recursively
    clips/walk_01.txt            caption
    clips/walk_01.json           extra metadata (may also hold caption/actions/camera/style)
    clips/walk_01.actions.json   per-frame actions: [[a_0, ...], ...] or [a_0, ...]
    clips/walk_01.actions.npy    ... or the same as .npy (loaded with allow_pickle=False)
    clips/walk_01.camera.json    per-frame camera: [[x, y], ...] (or [N, D] poses, see ingest)
    clips/walk_01.camera.npy
    clips/walk_01.ref0.png       reference images (.ref*.png/.jpg/.jpeg/.webp)
    clips/walk_01.style.txt      style tags, comma- or newline-separated
    clips/walk_01.license.txt    licence id (first line); also .attribution.txt (data/provenance.py)

Manifest: ``.csv`` (header row) or ``.jsonl`` (one object per line) with a ``video`` (or
``path``) column and optional ``key``, ``caption``, ``actions``, ``camera`` (a path to .json /
.npy, or in JSONL an inline list), ``refs`` (list, or ``;``-separated paths) and ``style``
(list, or ``;``/``,``-separated). Relative paths are relative to the manifest's folder; any
other column is kept as metadata.

Keys are the path relative to the folder (or manifest) without extension, with every
character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (webdataset splits keys at the first
dot); colliding keys get a short hash of their path appended.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_REF_NAME = re.compile(r"^(.*)\.ref\d*\.[A-Za-z]+$")
_KNOWN_COLUMNS = {"video", "path", "key", "caption", "actions", "camera", "refs", "style"}


@dataclass
class SourceItem:
    """One input video and its annotations (paths or inline values, not yet validated)."""

    key: str
    video: str
    caption: str | None = None
    actions: object = None  # path to .json/.npy, or an inline list
    camera: object = None
    refs: list[str] = field(default_factory=list)
    style: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    meta_path: str | None = None  # <stem>.json sidecar, read by the worker


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_key(rel: str) -> str:
    """``"a/b c.v2.mp4"`` -> ``"a_b_c_v2"``: a webdataset-safe sample key."""
    stem = rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "_"


def _dedupe(items: list[SourceItem]) -> list[SourceItem]:
    counts: dict[str, int] = {}
    for it in items:
        counts[it.key] = counts.get(it.key, 0) + 1
    for it in items:
        if counts[it.key] > 1:
            it.key = f"{it.key}_{hashlib.sha1(it.video.encode()).hexdigest()[:8]}"
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate sample keys after de-duplication; give explicit keys")
    return items


def _split_list(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in re.split(r"[;,\n]", str(value)) if v.strip()]


def discover_folder(root: str | Path) -> list[SourceItem]:
    """Videos under ``root`` (recursive, sorted) with their sidecar files."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    present = set(files)
    refs: dict[tuple[Path, str], list[str]] = {}
    for p in files:  # <stem>.ref<N>.<image ext>, grouped by the video they belong to
        m = _REF_NAME.match(p.name)
        if m and p.suffix.lower() in IMAGE_SUFFIXES:
            refs.setdefault((p.parent, m.group(1)), []).append(str(p))
    items = []
    for path in (p for p in files if p.suffix.lower() in VIDEO_SUFFIXES):
        stem = path.with_suffix("")

        def side(suffix: str) -> str | None:
            p = Path(f"{stem}{suffix}")
            return str(p) if p in present else None

        caption, style = side(".txt"), side(".style.txt")
        items.append(SourceItem(
            key=make_key(str(path.relative_to(root))),
            video=str(path),
            caption=Path(caption).read_text(encoding="utf-8").strip() if caption else None,
            actions=side(".actions.json") or side(".actions.npy"),
            camera=side(".camera.json") or side(".camera.npy"),
            refs=sorted(refs.get((path.parent, path.stem), [])),
            style=_split_list(Path(style).read_text(encoding="utf-8")) if style else [],
            meta_path=side(".json"),
        ))
    return _dedupe(items)


def _resolve(base: Path, value) -> object:
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(base / value)
    return value


def _confine(manifest: Path, root: Path, item: SourceItem) -> None:
    """Every file an item names must lie under ``root`` (symlinks and ``..`` resolved)."""
    for what, f in (("video", item.video), ("actions", item.actions),
                    ("camera", item.camera), *(("refs", r) for r in item.refs)):
        if isinstance(f, str) and not Path(f).resolve().is_relative_to(root):
            raise ValueError(f"{manifest}: {item.key}: {what} path {f!r} is outside the "
                             f"dataset root {root}")


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[SourceItem]:
    """Items of a ``.csv`` or ``.jsonl`` manifest (module docstring). With ``root``, every
    path the manifest names must resolve inside it (``ValueError`` naming the row otherwise)."""
    path = Path(path)
    base = path.parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"manifest must be .csv or .jsonl, got {path.name}")
    items = []
    for i, row in enumerate(rows):
        video = row.get("video") or row.get("path")
        if not video:
            raise ValueError(f"{path}: row {i + 1} has no 'video' (or 'path') column")
        video = str(_resolve(base, video))
        rel = Path(video).relative_to(base) if Path(video).is_relative_to(base) else Path(video).name
        refs = row.get("refs")
        refs = _split_list(refs) if not isinstance(refs, list) else [str(r) for r in refs]
        items.append(SourceItem(
            key=str(row["key"]) if row.get("key") else make_key(str(rel)),
            video=video,
            caption=row.get("caption") or None,
            actions=_resolve(base, row.get("actions")) or None,
            camera=_resolve(base, row.get("camera")) or None,
            refs=[str(_resolve(base, r)) for r in refs],
            style=_split_list(row.get("style")),
            meta={k: v for k, v in row.items() if k not in _KNOWN_COLUMNS and v not in (None, "")},
        ))
    for it in items:
        if "." in it.key or not it.key:
            raise ValueError(f"{path}: key {it.key!r} must be non-empty and contain no '.'")
        if root is not None:
            _confine(path, Path(root).resolve(), it)
    return _dedupe(items)


def discover(source: str | Path, root: str | Path | None = None) -> list[SourceItem]:
    """A folder, or a ``.csv``/``.jsonl`` manifest -> input items (``root``: see
    :func:`read_manifest`)."""
    source = Path(source)
    if source.is_dir():
        return discover_folder(source)
    if source.is_file():
        return read_manifest(source, root)
    raise FileNotFoundError(f"no such folder or manifest: {source}")
