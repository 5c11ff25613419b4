"""Write WebDataset tar shards (+ ``manifest.json``) and materialise the synthetic dataset.

A shard holds samples of members ``<key>.mp4`` (bytes), ``<key>.json`` (actions, camera,
meta) and ``<key>.txt`` (caption). Crash safety: each shard is written under a temporary
name and renamed when closed, and ``manifest.json`` is written last, so a directory with a
manifest is complete and a directory without one is not a dataset.

Every shard writer of the package goes through this file: ``TarShard`` (one shard, temp name
+ rename), ``ShardWriter`` (rolling shards of at most N samples / bytes), ``Journal`` (the
resume log of ``ingest`` and ``latents``) and ``write_manifest``.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from worldline.data.atomic import TMP_MARK, AtomicFile, atomic_write_json, atomic_write_text
from worldline.data.controls import sample_controls, summarize_controls
from worldline.data.synthetic import (
    SYNTHETIC_VERSION,
    SyntheticWorldConfig,
    config_dict,
    synthetic_samples,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def encode_member(value: Any, ext: str) -> bytes:
    """One member's bytes: bytes as they are, ``str`` as UTF-8, a ``.json`` member's object as
    compact JSON. Our own encoder instead of webdataset's default, which would pickle unknown
    objects: shards stay readable without ever unpickling."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json":
        return json.dumps(value, separators=(",", ":")).encode("utf-8")
    raise ValueError(f"cannot encode member .{ext} of type {type(value).__name__}")


def encode_sample(sample: dict) -> dict:
    """``{"__key__": k, ext: value, ...}`` -> the same with every member encoded to bytes."""
    return {k: v if k.startswith("__") else encode_member(v, k) for k, v in sample.items()}


def tar_bytes(sample: dict) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per member plus padded data."""
    total = 0
    for k, v in encode_sample(sample).items():
        if not k.startswith("__"):
            total += 512 + (len(v) + 511) // 512 * 512
    return total


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


# ---------------------------------------------------------------------------- shard writers
@dataclass(frozen=True)
class ClosedShard:
    """A finished shard: its file name, sample count and size on disk."""

    name: str
    count: int
    bytes: int


class TarShard:
    """One tar shard being written: samples go to a temporary file that ``close()`` renames to
    ``path`` (fsynced first), so only complete shards ever carry the real name; ``abort()``
    deletes it. Tar headers get ``mtime=0``: identical samples give byte-identical shards."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._file = AtomicFile(path)
        self._handle = open(self._file.tmp, "wb")
        self._tar = wds.TarWriter(self._handle, encoder=encode_sample, mtime=0)
        self.count = 0

    @property
    def name(self) -> str:
        """The shard's final file name."""
        return self._file.path.name

    def write(self, sample: dict) -> None:
        """Append one sample (``__key__`` plus members; see ``encode_member``)."""
        self._tar.write(sample)
        self.count += 1

    def close(self) -> ClosedShard:
        """Finish the tar and rename it into place."""
        self._tar.close()  # the tar end blocks; it leaves the handle open
        self._handle.close()
        path = self._file.commit()
        return ClosedShard(self.name, self.count, os.path.getsize(path))

    def abort(self) -> None:
        """Drop the partial shard (after a failure)."""
        try:
            self._tar.close()  # else its tarfile writes on the closed file when collected
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self._handle.close()
        self._file.discard()


class ShardWriter:
    """Rolling tar shards ``out_dir/pattern.format(i)``, ``i = start, start + 1, ...``.

    A shard is closed before a sample would take it past ``max_count`` samples or, by the
    ``tar_bytes`` estimate, past ``max_bytes`` bytes (a lone larger sample still gets a shard).
    ``on_close(shard)`` runs after every close (e.g. to journal it); ``closed`` lists this
    writer's shards. Use it as a context manager: leaving normally closes the last shard,
    leaving by an exception deletes the partial one.
    """

    def __init__(self, out_dir: str | os.PathLike, pattern: str = "shard-{:06d}.tar", *,
                 max_count: int | None = None, max_bytes: int | None = None, start: int = 0,
                 on_close: Callable[[ClosedShard], None] | None = None) -> None:
        if (max_count is not None and max_count < 1) or (max_bytes is not None and max_bytes < 1):
            raise ValueError("max_count and max_bytes must be >= 1")
        self.out_dir, self.pattern = Path(out_dir), pattern
        self.max_count, self.max_bytes, self.on_close = max_count, max_bytes, on_close
        self.closed: list[ClosedShard] = []
        self._next = start
        self._shard: TarShard | None = None
        self._bytes = 0

    def write(self, sample: dict) -> str:
        """Write ``sample``, rolling to a new shard first when it would overflow this one;
        returns the name of the shard it went into."""
        size = tar_bytes(sample) if self.max_bytes is not None else 0
        shard = self._shard
        if shard is not None and (
            (self.max_count is not None and shard.count >= self.max_count)
            or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
        ):
            self.close()
        if self._shard is None:
            self._shard = TarShard(self.out_dir / self.pattern.format(self._next))
            self._next += 1
            self._bytes = 0
        self._shard.write(sample)
        self._bytes += size
        return self._shard.name

    def close(self) -> None:
        """Close the open shard, if any (the next ``write`` opens a new one)."""
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        closed = shard.close()
        self.closed.append(closed)
        if self.on_close is not None:
            self.on_close(closed)

    def abort(self) -> None:
        """Delete the open, partial shard."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            shard.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_partial_shards(out_dir: str | os.PathLike) -> None:
    """Delete the temporary files of shards an interrupted writer left in ``out_dir``."""
    for name in os.listdir(out_dir):
        if f".tar{TMP_MARK}" in name:
            (Path(out_dir) / name).unlink()


class Journal:
    """A resumable writer's log ``path``: JSON lines, ``{"header": settings}`` first, then one
    record per finished shard (appended and fsynced as each shard is renamed into place), so
    a rerun keeps exactly the shards recorded as done."""

    def __init__(self, path: str | os.PathLike, settings: dict, restart: str = "resume=False") -> None:
        self.path = Path(path)
        self.restart = restart  # how the user starts over: the CLI flag, not a Python argument
        # Round-tripped so tuples etc. compare equal to what a previous run wrote.
        self.header = json.loads(json.dumps({"header": settings}))

    def records(self) -> list[dict] | None:
        """The records of a previous run with the same settings, or ``None`` without a
        journal; ``ValueError`` if it was written with other settings."""
        if not self.path.exists():
            return None
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if not lines or lines[0] != self.header:
            raise ValueError(f"{self.path.parent} was written with other settings ({self.path}); "
                             f"use another output folder or {self.restart} to start over")
        return lines[1:]

    def start(self) -> None:
        """Begin a new journal (drops any previous one)."""
        self.path.write_text(json.dumps(self.header) + "\n")

    def rewrite(self, records: list[dict]) -> None:
        """Replace the journal by the header and ``records`` (atomically): a rerun that
        redoes later shards forgets them before deleting their files."""
        text = "".join(json.dumps(line) + "\n" for line in [self.header, *records])
        atomic_write_text(self.path, text)

    def append(self, record: dict) -> None:
        """Record one finished shard, durably."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_manifest(out_dir: str | os.PathLike, shards: list[str], counts: list[int],
                   samples: list[dict], pattern: str | None = None, **extra: Any) -> dict:
    """Write ``out_dir/manifest.json`` (atomically, last: its presence means "complete") and
    return it: ``version``, ``pattern`` (brace form, when shards follow one), ``shards``,
    ``shard_counts``, ``num_samples``, per-sample ``samples`` entries, then ``extra``, and the
    ``controls`` the entries record (``data.controls``)."""
    manifest: dict = {"version": MANIFEST_VERSION}
    if pattern is not None:
        manifest["pattern"] = brace_pattern(pattern, len(shards))
    manifest.update(shards=list(shards), shard_counts=list(counts), num_samples=sum(counts),
                    samples=samples, **extra)
    controls = summarize_controls(samples)
    if controls is not None:
        manifest["controls"] = controls
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


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
    entries: list[dict] = []
    seen: set[str] = set()
    with ShardWriter(out_dir, pattern, max_count=samples_per_shard) as writer:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key or "." in key or key in seen:
                raise ValueError(f"sample key must be a unique non-empty str without '.', got {key!r}")
            if not isinstance(sample.get("mp4"), (bytes, bytearray)):
                raise ValueError(f"sample {key!r} has no mp4 bytes")
            seen.add(key)
            shard = writer.write(sample)
            entries.append({"key": key, "shard": shard, **probe_mp4(bytes(sample["mp4"])),
                            "controls": sample_controls(sample.get("json") or {})})
    return write_manifest(out_dir, [s.name for s in writer.closed], [s.count for s in writer.closed],
                          entries, pattern=pattern)


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a dataset directory (``FileNotFoundError`` if incomplete)."""
    return json.loads((Path(dataset_dir) / MANIFEST).read_text())


def synthetic_dataset_dir(root: str | os.PathLike, cfg) -> Path:
    """``root/synthetic-<10-hex hash of (cfg, renderer version)>``."""
    fields = config_dict(cfg)
    fields["fps"] = float(fields["fps"])  # 8 and 8.0 are the same dataset
    if not fields.get("audio"):  # silent worlds keep the names they had before sound existed
        fields.pop("audio", None)
        fields.pop("audio_rate", None)
    if not fields.get("agents"):  # worlds without agent dots keep their pre-agent names
        fields.pop("agents", None)
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
            atomic_write_json(tmp / "config.json", config_dict(cfg))
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
