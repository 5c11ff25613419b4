"""``make_shards`` past one machine: N independent partitions, then one merge.

A scaled-out ``worldline-shards`` run is ``N`` partition tasks (a SLURM array, or any N
processes on hosts sharing the output file system) and one merge:

1. Every task lists the *same* inputs (``sources.discover``: deterministic order, keys
   de-duplicated over the full list) and keeps the contiguous block ``partition(items, n, i)``;
   ``make_partition`` writes that block with the ordinary ``make_shards`` into
   ``out/parts/part-<i>/``. It is as resumable and idempotent as ``make_shards`` itself: a
   finished partition (its ``manifest.json`` exists) is not redone, an interrupted one
   continues from its journal.
2. ``merge_parts(out, n)`` renames the partitions' shards, in partition order, into one
   numbered sequence in ``out/`` and writes ONE ``manifest.json`` (last, atomically). It is
   resumable too: the plan is a pure function of the part manifests, so a rerun after a crash
   finds each shard either still in its part folder or already at its final name.

The merged manifest equals a single-process ``make_shards`` run's in everything about the
samples: keys and their order (input order, since partitions are contiguous blocks), every
sample entry, the ``skipped`` list (input order) and the ``provenance`` summary; the shards
hold byte-identical members. Exact de-duplication spans partitions: a later copy of content
kept by an earlier partition is dropped at merge (its shard rewritten without it) and listed
as ``duplicate``, naming the first copy, as one process would. What may differ is where the
shard boundaries fall: each partition closes its last shard early, so with ``max_count=4``
and 10 inputs in 2 partitions the shards hold 4,1,4,1 samples instead of 4,4,2. The source
must not change while the partition tasks run (each lists it on its own; overlapping blocks
are refused at merge).

Tiny CPU example::

    for i in range(2):  # on any hosts, in any order, also concurrently
        make_partition("clips/", "/data/shards", 2, i, max_count=64)
    manifest = merge_parts("/data/shards", 2)
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from worldline.data.atomic import atomic_write_json
from worldline.data.ingest import JOURNAL, IngestOptions, make_shards
from worldline.data.provenance import IngestScreen, summarize_manifest
from worldline.data.shards import MANIFEST, TarShard, write_manifest
from worldline.data.sources import discover

log = logging.getLogger(__name__)

T = TypeVar("T")
PARTS = "parts"
KEYS = "keys.json"  # a part's input keys in input order (bad inputs included)


def partition(items: Sequence[T], n: int, i: int) -> list[T]:
    """The ``i``-th of ``n`` contiguous, near-equal blocks of ``items`` (sizes differ by at
    most one). Contiguous, not strided: concatenating the blocks in order gives the input
    order back, which is what lets the merge reproduce a single run's sample order."""
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"partition {i} of {n}: need n >= 1 and 0 <= i < n")
    return list(items[len(items) * i // n: len(items) * (i + 1) // n])


@dataclass(frozen=True)
class Partition:
    """``make_shards``' ``select``: keep block ``i`` of ``n``. Its ``str`` is journaled, so a
    part folder is never resumed under another partitioning."""

    n: int
    i: int

    def __call__(self, items: list) -> list:
        return partition(items, self.n, self.i)

    def __str__(self) -> str:
        return f"partition {self.i} of {self.n}"


def part_dir(out_dir: str | os.PathLike, i: int) -> Path:
    """``out/parts/part-<i>``: where partition ``i`` is written."""
    return Path(out_dir) / PARTS / f"part-{i}"


def make_partition(source: str | os.PathLike, out_dir: str | os.PathLike, n: int, i: int,
                   **kwargs: Any) -> dict:
    """Write partition ``i`` of ``n`` of ``source`` with ``make_shards`` (``kwargs``: its
    keyword arguments) into ``part_dir(out_dir, i)``; returns that part's manifest. A part
    already finished returns its manifest without doing anything."""
    Partition(n, i)([])  # validates n and i before any file is touched
    folder = part_dir(out_dir, i)
    if (folder / MANIFEST).exists() and kwargs.get("resume", True):
        return json.loads((folder / MANIFEST).read_text())
    # The block's keys in input order: the merge sorts skipped inputs of all parts by them.
    options = kwargs.get("options") or IngestOptions()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / KEYS, [it.key for it in partition(discover(source, options.source_root), n, i)])
    return make_shards(source, folder, select=Partition(n, i), **kwargs)


def _part_manifests(out: Path, n: int) -> list[dict]:
    """The ``n`` finished part manifests, checked to come from the same ``n``-way split."""
    missing = [i for i in range(n) if not (part_dir(out, i) / MANIFEST).exists()]
    if missing:
        raise FileNotFoundError(f"{out}: partitions {missing} of {n} are not finished "
                                f"(no {PARTS}/part-<i>/{MANIFEST}); run them first")
    extra = sorted(p.name for p in (out / PARTS).iterdir()
                   if p.name.startswith("part-") and p.name not in {f"part-{i}" for i in range(n)})
    if extra:
        raise ValueError(f"{out}/{PARTS} holds {extra}: written with more than {n} partitions")
    manifests = []
    for i in range(n):
        with open(part_dir(out, i) / JOURNAL) as f:
            header = json.loads(f.readline())["header"]
        pattern = header.get("pattern")
        if header.get("select") != str(Partition(n, i)):
            raise ValueError(f"{part_dir(out, i)} was written as {header.get('select')!r}, "
                             f"not {str(Partition(n, i))!r}")
        manifest = json.loads((part_dir(out, i) / MANIFEST).read_text())
        manifest["_pattern"] = pattern
        manifests.append(manifest)
    if len({m["_pattern"] for m in manifests}) != 1:
        raise ValueError(f"{out}: the partitions use different shard name patterns")
    return manifests


def _strip(src: Path, dst: Path, drop: set[str]) -> tuple[int, int]:
    """Copy shard ``src`` to ``dst`` without the samples keyed ``drop`` (members keep their
    bytes and order); returns (samples, bytes) of ``dst``, which is not written when empty."""
    samples: dict[str, dict] = {}
    with tarfile.open(src) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if key not in drop and m.isfile():
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    if not samples:
        return 0, 0
    shard = TarShard(dst)
    for sample in samples.values():
        shard.write(sample)
    closed = shard.close()
    return closed.count, closed.bytes


def merge_parts(out_dir: str | os.PathLike, n: int) -> dict:
    """Merge the ``n`` finished partitions under ``out_dir/parts`` into one dataset in
    ``out_dir`` (module docstring) and return its manifest; a merged folder returns its
    manifest as it is."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        return json.loads((out / MANIFEST).read_text())
    parts = _part_manifests(out, n)
    pattern = parts[0]["_pattern"]

    # Exact de-duplication over the whole input order, as one process's IngestScreen does:
    # a partition only saw its own block. ``moved``: a dropped key -> the first copy it
    # duplicates, so duplicates a partition already skipped in favour of it are re-pointed.
    screen = IngestScreen()
    drop: set[str] = set()
    moved: dict[str, tuple[str, str]] = {}
    entries: list[dict] = []
    skipped: list[dict] = []
    for part in parts:
        for e in part["samples"]:
            refused = screen.check(e["key"], e["source"], e.get("provenance") or {})
            if refused is None:
                entries.append(e)
                continue
            moved[e["key"]] = screen.first[e["provenance"]["sha256"]]
            drop.add(e["key"])
            skipped.append({"key": e["key"], "path": e["source"], "reason": refused[0],
                            "message": refused[1], "input": e.get("input")})
        for b in part["skipped"]:
            skipped.append(_repoint(b, moved))
    if drop:
        log.info("merge_parts: %d duplicates across partitions dropped", len(drop))
    # One process lists skipped inputs in input order; the keys files give that order.
    listed = [k for i in range(n) for k in _keys(out, i)]
    rank = {k: j for j, k in enumerate(listed)}
    if len(rank) != len(listed):  # tasks listed different inputs: the blocks overlap
        raise ValueError(f"{out}: partitions list some inputs twice; the source changed while "
                         f"they ran (rerun them with --overwrite on an unchanging source)")
    skipped.sort(key=lambda b: rank[b["key"]])

    names, counts, sizes, renamed = [], [], [], {}
    for i, part in enumerate(parts):
        for name, count, size in zip(part["shards"], part["shard_counts"], part["shard_bytes"]):
            src, dst = part_dir(out, i) / name, out / pattern.format(len(names))
            gone = {e["key"] for e in part["samples"] if e["shard"] == name} & drop
            if gone:
                if src.exists():
                    count, size = _strip(src, dst, gone)
                    src.unlink()
                elif dst.exists():  # stripped by an interrupted merge
                    with tarfile.open(dst) as tar:
                        count = len({m.name.partition(".")[0] for m in tar})
                    size = dst.stat().st_size
                else:  # emptied by an interrupted merge
                    count = 0
                if count == 0:
                    continue
            elif src.exists():
                os.replace(src, dst)  # same file system: a rename, no copy
            elif not dst.exists():
                raise FileNotFoundError(f"{src} is gone and was not merged into {dst}")
            renamed[(i, name)] = dst.name
            names.append(dst.name)
            counts.append(count)
            sizes.append(size)
    part_of = {e["key"]: i for i, part in enumerate(parts) for e in part["samples"]}
    entries = [{**e, "shard": renamed[(part_of[e["key"]], e["shard"])]} for e in entries]
    return write_manifest(out, names, counts, entries, pattern=pattern, shard_bytes=sizes,
                          skipped=skipped, provenance=summarize_manifest(entries, skipped))


def _repoint(bad: dict, moved: dict[str, tuple[str, str]]) -> dict:
    """A partition's ``duplicate`` record names the copy it kept; when the merge dropped that
    copy for an earlier one (``moved``), name the earlier one, as a single run would."""
    if bad["reason"] != "duplicate":
        return bad
    for key, (first_key, first_source) in moved.items():
        if bad["message"].endswith(f" (key {key}), kept"):
            head = bad["message"][: bad["message"].rindex(" as ")]
            return {**bad, "message": f"{head} as {first_source} (key {first_key}), kept"}
    return bad


def _keys(out: Path, i: int) -> list[str]:
    return json.loads((part_dir(out, i) / KEYS).read_text())
