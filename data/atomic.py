"""Atomic file writes: a file appears under its final name complete, or not at all.

Everything here writes to a temporary sibling ``.<name>.tmp-<pid>`` (same directory, so the
rename never crosses a file system), fsyncs it, then ``os.replace``s it over the final name.
A crash leaves at most a ``.tmp-`` file behind, never a truncated file under the real name;
readers that see the name (a shard, ``manifest.json``, a checkpoint's ``latest`` pointer,
``status.json``) can trust its content.

Tiny CPU example::

    atomic_write_json("/tmp/x/manifest.json", {"shards": []})
    with atomic_path("/tmp/x/clip.mp4") as tmp:   # write by path (encoders, PIL, tar writers)
        tmp.write_bytes(b"...")                   # renamed into place only if this succeeds
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["fsync_path", "AtomicFile", "atomic_path", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "temp_name", "TMP_MARK"]

# Part of every temporary name: writers that resume (ingest, latents) delete files holding it.
TMP_MARK = ".tmp-"


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary sibling of ``path`` this process writes: ``.<name>.tmp-<pid>`` (hidden,
    and per process, so two writers of one name never share a half-written file)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by path (a directory: makes a rename inside it durable).

    A second descriptor flushes the same inode's dirty pages, so callers may write through
    any API (tar writers, PIL, write_bytes) and close it before the commit."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A pending write of ``path``: write ``tmp``, then ``commit()`` (fsync + rename into
    place) or ``discard()`` (delete it). For writes that span calls (a shard filled sample by
    sample); ``atomic_path`` is the context-manager form."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True) -> None:
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.fsync = fsync

    def commit(self) -> Path:
        """Make the written temp file visible under ``path`` (its content durable first when
        ``fsync``, so a power loss never leaves the final name pointing at missing blocks)."""
        if self.fsync:
            fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop the temp file (after a failure); the final name is untouched."""
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write ``path`` through; on success it is fsynced and renamed into
    place, on an exception it is deleted and the exception propagates."""
    pending = AtomicFile(path, fsync)
    try:
        yield pending.tmp
    except BaseException:
        pending.discard()
        raise
    pending.commit()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1,
                      fsync: bool = True) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``indent=1``: small, still diffable)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent), fsync)
