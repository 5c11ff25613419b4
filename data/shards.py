"""Write WebDataset tar shards (+ ``manifest.json``) and materialise the synthetic dataset.

A shard holds samples of members ``<key>.mp4`` (bytes), ``<key>.json`` (actions, camera,
meta) and ``<key>.txt`` (caption). Crash safety: each shard is written under a temporary
name and renamed when closed, and ``manifest.json`` is written last, so a directory with a
manifest is complete and a directory without one is not a dataset.

Tiny CPU example::

    from worldline.data.synthetic import SyntheticWorldConfig
    root = ensure_synthetic_dataset("/tmp/wl-data", SyntheticWorldConfig(num_clips=8, clips_per_shard=4))
    # -> "/tmp/wl-data/synthetic-<hash>" with shard-000000.tar, shard-000001.tar, manifest.json
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from worldline.data.synthetic import (
    SYNTHETIC_VERSION,
    SyntheticWorldConfig,
    config_dict,
    synthetic_samples,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _encode_member(value, ext: str) -> bytes:
    # Our own encoder instead of webdataset's default, which would pickle unknown objects:
    # shards stay readable without ever unpickling.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json":
        return json.dumps(value, separators=(",", ":")).encode("utf-8")
    raise ValueError(f"cannot encode member .{ext} of type {type(value).__name__}")


def _encode_sample(sample: dict) -> dict:
    return {k: v if k.startswith("__") else _encode_member(v, k) for k, v in sample.items()}


def probe_mp4(mp4: bytes) -> dict:
    """Container-level facts about an mp4 without decoding frames (``probe.probe_video``).

    Returns ``{"resolution": [H, W], "fps": float, "num_frames": int, "duration": float}``;
    values are ``None`` when the bytes are not a readable video.
    """
    from worldline.data.probe import ProbeError, probe_video

    try:
        info = probe_video(mp4)
    except ProbeError as exc:
        log.warning("probe_mp4: unreadable video (%s)", str(exc)[:200])
        return {"resolution": None, "fps": None, "num_frames": None, "duration": None}
    return {"resolution": [info.height, info.width], "fps": info.fps, "num_frames": info.num_frames,
            "duration": info.duration}


def brace_pattern(pattern: str, num_shards: int) -> str | None:
    """``"shard-{:06d}.tar", 8`` -> ``"shard-{000000..000007}.tar"`` (webdataset brace syntax)."""
    if num_shards == 0:
        return None
    parts = list(string.Formatter().parse(pattern))
    fields = [p for p in parts if p[1] is not None]
    if len(fields) != 1:
        raise ValueError(f"shard pattern needs exactly one format field, got {pattern!r}")
    out = []
    for literal, field, spec, _ in parts:
        out.append(literal)
        if field is not None:
            out.append("{" + format(0, spec) + ".." + format(num_shards - 1, spec) + "}")
    return "".join(out)


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    samples_per_shard: int,
    pattern: str = "shard-{:06d}.tar",
) -> dict:
    """Write samples into tar shards of ``samples_per_shard`` each and return the manifest.

    Each sample: ``__key__`` (str without dots: webdataset groups members by the text before
    the first dot), ``mp4`` bytes, ``json`` dict, optional ``txt`` str. The manifest lists
    shard names, per-shard counts, a brace pattern and per-sample key / resolution [H, W] /
    fps / num_frames / duration (probed from the mp4 container, no decoding).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    counts: list[int] = []
    entries: list[dict] = []
    seen: set[str] = set()
    writer = fileobj = None
    tmp_path = final_path = None

    def close_shard() -> None:
        writer.close()
        fileobj.flush()
        os.fsync(fileobj.fileno())
        fileobj.close()
        os.replace(tmp_path, final_path)  # only complete shards ever carry the real name

    try:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key or "." in key or key in seen:
                raise ValueError(f"sample key must be a unique non-empty str without '.', got {key!r}")
            if not isinstance(sample.get("mp4"), (bytes, bytearray)):
                raise ValueError(f"sample {key!r} has no mp4 bytes")
            seen.add(key)
            if writer is None or counts[-1] == samples_per_shard:
                if writer is not None:
                    close_shard()
                name = pattern.format(len(shards))
                final_path = out_dir / name
                tmp_path = out_dir / f".{name}.tmp-{os.getpid()}"
                fileobj = open(tmp_path, "wb")
                # mtime=0: byte-identical shards for identical samples.
                writer = wds.TarWriter(fileobj, encoder=_encode_sample, mtime=0)
                shards.append(name)
                counts.append(0)
            writer.write(sample)
            counts[-1] += 1
            entries.append({"key": key, "shard": shards[-1], **probe_mp4(bytes(sample["mp4"]))})
        if writer is not None:
            close_shard()
            writer = None
    finally:
        if writer is not None:  # failed mid-shard: drop the partial file
            fileobj.close()
            tmp_path.unlink(missing_ok=True)

    manifest = {
        "version": MANIFEST_VERSION,
        "pattern": brace_pattern(pattern, len(shards)),
        "shards": shards,
        "shard_counts": counts,
        "num_samples": sum(counts),
        "samples": entries,
    }
    _atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a dataset directory (``FileNotFoundError`` if incomplete)."""
    return json.loads((Path(dataset_dir) / MANIFEST).read_text())


def synthetic_dataset_dir(root: str | os.PathLike, cfg) -> Path:
    """``root/synthetic-<10-hex hash of (cfg, renderer version)>``."""
    fields = config_dict(cfg)
    fields["fps"] = float(fields["fps"])  # 8 and 8.0 are the same dataset
    blob = json.dumps({"cfg": fields, "version": SYNTHETIC_VERSION}, sort_keys=True)
    return Path(root) / f"synthetic-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive ``flock`` so concurrent callers do the work once; a no-op where the file
    system has no locks (correctness then rests on the atomic directory rename alone)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("no file lock on %s (%s); relying on atomic rename", path, exc)
        yield


def ensure_synthetic_dataset(root: str | os.PathLike, cfg) -> str:
    """Render + shard the synthetic dataset under ``root`` unless already complete.

    ``cfg``: ``SyntheticWorldConfig`` (or a mapping / DictConfig with its fields). Returns the
    dataset directory. Idempotent and safe under concurrent calls (lock + tmp dir + rename).
    """
    cfg = SyntheticWorldConfig(**config_dict(cfg))
    final = synthetic_dataset_dir(root, cfg)
    if (final / MANIFEST).exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / MANIFEST).exists():  # another process finished while we waited
            return str(final)
        if final.exists():  # no manifest: never complete (e.g. manifest removed by hand)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _atomic_write_json(tmp / "config.json", config_dict(cfg))
            write_shards(synthetic_samples(cfg), tmp, cfg.clips_per_shard)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                # Lost a race with a process that could not lock: its copy is as good as ours.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (final / MANIFEST).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
