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
dot); derived keys that collide get a short hash of their path appended. A key a manifest
gives explicitly must already be safe (``key_problem``: ``[A-Za-z0-9_-]``, at most 200
characters; so no ``..``, ``/`` or dot) and unique: an unsafe one is skipped as ``bad_key``,
a repeated one (or a video listed twice) as ``duplicate_key`` (the first row wins).

Every path under a folder is accounted for: files that are not inputs come back as items
with a ``problem`` (``hidden``, ``broken_symlink``, ``symlink_loop``, ``symlink_folder``,
``unused_file``) that ingest reports as skipped, never silently dropped. Text sidecars are
decoded as UTF-8 (a BOM is dropped) or, with a UTF-16 BOM, as UTF-16; anything else (e.g. a
Latin-1 caption) is a ``bad_encoding`` problem of that video only: guessing a legacy
encoding would store mojibake captions without a word.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_REF_NAME = re.compile(r"^(.*)\.ref\d*\.[A-Za-z]+$")
_KNOWN_COLUMNS = {"video", "path", "key", "caption", "actions", "camera", "refs", "style"}
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")
MAX_TEXT_BYTES = 1 << 20  # a caption or style file larger than 1 MiB is not a caption


class SidecarError(ValueError):
    """A sidecar that cannot be used; ``reason`` is the skip reason ingest reports."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a safe sample key (``None`` if it is): keys become tar member
    names and file names downstream, so only ``[A-Za-z0-9_-]``, 1-200 characters."""
    if not isinstance(key, str):
        return f"key {key!r} is not a string"
    if not _SAFE_KEY.fullmatch(key):
        return f"key {key[:80]!r} must be 1-200 characters of [A-Za-z0-9_-] (no '.', '/', '..')"
    return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in ``chunk``-byte pieces (never whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def decode_text(data: bytes, name: str = "text") -> str:
    """Sidecar bytes -> text: UTF-8 (BOM dropped), or UTF-16 with its BOM; else
    ``SidecarError("bad_encoding")`` naming ``name`` and the first bad byte."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise SidecarError("bad_encoding", f"{name}: UTF-16 BOM but {exc.reason} at byte {exc.start}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SidecarError("bad_encoding", f"{name}: not UTF-8 (byte 0x{data[exc.start]:02x} at {exc.start}; "
                           f"save it as UTF-8)") from None


MAX_JSON_DEPTH = 64  # deeper sidecar JSON is no annotation; it only stresses parsers downstream


def json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit to hit)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth


def parse_json(data: bytes, name: str = "json", max_depth: int = MAX_JSON_DEPTH) -> object:
    """JSON bytes (any encoding ``decode_text`` takes) -> value; ``SidecarError``
    (``bad_encoding`` / ``bad_json``) naming ``name`` when unreadable or nested deeper than
    ``max_depth``."""
    text = decode_text(data, name)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SidecarError("bad_json", f"{name}: {exc}") from None
    except RecursionError:  # deeper than the parser's own recursion limit
        raise SidecarError("bad_json", f"{name}: nested too deeply") from None
    if json_depth(value) > max_depth:
        raise SidecarError("bad_json", f"{name}: nested deeper than {max_depth}")
    return value


def read_text(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A text sidecar, size checked with ``stat`` before it is read (``SidecarError``
    ``too_large`` / ``unreadable`` / ``bad_encoding``, naming the file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SidecarError("too_large", f"{path.name}: {size} bytes > {max_bytes}")
        return decode_text(path.read_bytes(), path.name)
    except OSError as exc:
        raise SidecarError("unreadable", f"{path.name}: {type(exc).__name__}: {exc}") from None


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
    # (reason, message): not an input after all; ingest reports it as skipped, unread.
    problem: tuple[str, str] | None = None
    explicit_key: bool = False  # a manifest named the key (duplicates: first wins)


def skipped_item(path: str | os.PathLike, reason: str, message: str) -> SourceItem:
    """A path that is listed but not ingested; its key is the path (never written to a tar)."""
    return SourceItem(key=str(path), video=str(path), problem=(reason, message))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_key(rel: str) -> str:
    """``"a/b c.v2.mp4"`` -> ``"a_b_c_v2"``: a webdataset-safe sample key. A long path is cut
    to 190 characters and a hash of it (so the key stays unique and a collision suffix still
    fits the 200 ``key_problem`` allows)."""
    stem = rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "_"
    if len(key) > 190:
        key = f"{key[:173]}_{hashlib.sha1(rel.encode()).hexdigest()[:16]}"
    return key


def _dedupe(items: list[SourceItem]) -> list[SourceItem]:
    """Unique keys, deterministically: a derived key shared by several paths gets a hash of
    its path appended; an explicit key seen before, or a video listed before, makes the later
    item a ``duplicate_key`` problem (the first wins)."""
    live = [it for it in items if it.problem is None]
    counts: dict[str, int] = {}
    for it in live:
        if not it.explicit_key:
            counts[it.key] = counts.get(it.key, 0) + 1
    first_video: dict[str, str] = {}
    for it in live:
        if counts.get(it.key, 0) > 1 and it.video not in first_video:
            it.key = f"{it.key}_{hashlib.sha1(it.video.encode()).hexdigest()[:8]}"
        first_video.setdefault(it.video, it.key)
    seen: dict[str, str] = {}
    videos: set[str] = set()
    ids: set[str] = set()
    for i, it in enumerate(live):
        if it.key in seen or it.video in videos:
            first = seen.get(it.key) or it.video
            it.problem = ("duplicate_key", f"key {it.key!r} (or its video) already used by {first}; "
                          f"the first one is kept")
            # An id for the report and for reruns (stable while the listing grows).
            it.key = f"{it.key}@{it.video}" if f"{it.key}@{it.video}" not in ids else f"{it.key}@{it.video}#{i}"
            ids.add(it.key)
            continue
        seen[it.key] = it.video
        videos.add(it.video)
    return items


def _split_list(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in re.split(r"[;,\n]", str(value)) if v.strip()]


def _walk(root: Path) -> tuple[list[Path], list[SourceItem]]:
    """Regular files under ``root`` (sorted, symlinks to files resolved by the OS) and a
    skipped item for every other entry: hidden files and folders (not descended into),
    broken or looping symlinks, symlinks to folders (not followed: they may loop)."""
    files: list[Path] = []
    skipped: list[SourceItem] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted(dirnames):
            p = here / name
            if name.startswith("."):
                skipped.append(skipped_item(p, "hidden", "hidden folder (name starts with '.'), not searched"))
            elif p.is_symlink():
                skipped.append(skipped_item(p, "symlink_folder", "symlink to a folder, not followed"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink())
        for name in sorted(filenames):
            p = here / name
            if name.startswith("."):
                skipped.append(skipped_item(p, "hidden", "hidden file (name starts with '.')"))
                continue
            try:
                mode = p.stat().st_mode  # follows symlinks
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    skipped.append(skipped_item(p, "symlink_loop", f"symlink loop: {exc.strerror}"))
                elif p.is_symlink():
                    skipped.append(skipped_item(p, "broken_symlink", f"-> {os.readlink(p)} does not exist"))
                else:
                    skipped.append(skipped_item(p, "unreadable", f"{type(exc).__name__}: {exc}"))
                continue
            if not stat.S_ISREG(mode):  # a FIFO or device would block or never end a read
                skipped.append(skipped_item(p, "not_a_file", "not a regular file (FIFO, socket or device)"))
                continue
            files.append(p)
    return sorted(files), skipped


def discover_folder(root: str | Path) -> list[SourceItem]:
    """Videos under ``root`` (recursive, sorted) with their sidecar files, then a skipped
    item for every path that is not used (module docstring)."""
    root = Path(root)
    files, skipped = _walk(root)
    present = set(files)
    used: set[Path] = set()
    refs: dict[tuple[Path, str], list[str]] = {}
    for p in files:  # <stem>.ref<N>.<image ext>, grouped by the video they belong to
        m = _REF_NAME.match(p.name)
        if m and p.suffix.lower() in IMAGE_SUFFIXES:
            refs.setdefault((p.parent, m.group(1)), []).append(str(p))
    items = []
    for path in (p for p in files if p.suffix.lower() in VIDEO_SUFFIXES):
        stem = path.with_suffix("")
        used.add(path)

        def side(suffix: str) -> str | None:
            p = Path(f"{stem}{suffix}")
            if p in present:
                used.add(p)
                return str(p)
            return None

        caption, style = side(".txt"), side(".style.txt")
        side(".license.txt"), side(".attribution.txt")  # read by data/provenance.py
        item = SourceItem(
            key=make_key(str(path.relative_to(root))),
            video=str(path),
            actions=side(".actions.json") or side(".actions.npy"),
            camera=side(".camera.json") or side(".camera.npy"),
            refs=sorted(refs.get((path.parent, path.stem), [])),
            meta_path=side(".json"),
        )
        used.update(Path(r) for r in item.refs)
        try:  # a bad caption or style file costs this video only, with the file named
            item.caption = read_text(caption).strip() if caption else None
            item.style = _split_list(read_text(style)) if style else []
        except SidecarError as exc:
            item.problem = (exc.reason, exc.message)
        items.append(item)
    unused = [skipped_item(p, "unused_file", f"not a video ({' '.join(VIDEO_SUFFIXES)}) nor a sidecar of one")
              for p in files if p not in used]
    return _dedupe(items) + sorted(skipped + unused, key=lambda it: it.video)


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


def _manifest_rows(path: Path) -> list[tuple[int, dict | None, str]]:
    """``(line, row or None, problem)`` of a ``.csv``/``.jsonl`` manifest; a JSONL line that
    is not a JSON object is a problem of that line only."""
    text = decode_text(path.read_bytes(), path.name)  # UTF-8 (BOM: spreadsheets) or UTF-16
    if path.suffix.lower() == ".csv":
        return [(i + 2, row, "") for i, row in enumerate(csv.DictReader(io.StringIO(text, newline="")))]
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ValueError(f"manifest must be .csv or .jsonl, got {path.name}")
    rows: list[tuple[int, dict | None, str]] = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            rows.append((i + 1, None, f"not JSON: {type(exc).__name__}: {str(exc)[:120]}"))
            continue
        rows.append((i + 1, row, "") if isinstance(row, dict) else (i + 1, None, "not a JSON object"))
    return rows


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[SourceItem]:
    """Items of a ``.csv`` or ``.jsonl`` manifest (module docstring). With ``root``, every
    path the manifest names must resolve inside it (``ValueError`` naming the row otherwise).
    A row without a video, an unparsable line or an unsafe key is a skipped item naming the
    line; the other rows go on."""
    path = Path(path)
    base = path.parent
    items = []
    for line, row, problem in _manifest_rows(path):
        where = f"{path.name}:{line}"
        video = (row.get("video") or row.get("path")) if row is not None else None
        if row is None or not video:
            items.append(skipped_item(where, "bad_row", problem or "no 'video' (or 'path') column"))
            continue
        video = str(_resolve(base, str(video)))
        rel = Path(video).relative_to(base) if Path(video).is_relative_to(base) else Path(video).name
        refs = row.get("refs")
        refs = _split_list(refs) if not isinstance(refs, list) else [str(r) for r in refs]
        explicit = row.get("key") not in (None, "")
        key = row["key"] if explicit else make_key(str(rel))
        if isinstance(key, int) and not isinstance(key, bool):  # JSONL "key": 17 is "17"
            key = str(key)
        bad_key = key_problem(key)
        if bad_key:
            items.append(skipped_item(f"{where} {video}", "bad_key", bad_key))
            continue
        items.append(SourceItem(
            key=key, video=video, caption=str(row["caption"]) if row.get("caption") else None,
            actions=_resolve(base, row.get("actions")) or None,
            camera=_resolve(base, row.get("camera")) or None,
            refs=[str(_resolve(base, r)) for r in refs],
            style=_split_list(row.get("style")),
            meta={k: v for k, v in row.items() if k not in _KNOWN_COLUMNS and v not in (None, "")},
            explicit_key=explicit,
        ))
    if root is not None:
        for it in items:
            if it.problem is None:
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
