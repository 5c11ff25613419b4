"""Typed positions of a ``ShardLoader``: one sub-stream's (``StreamState``), one rank's
(``LoaderState``) and the rank-independent merge of all ranks' (``GlobalState``).

Checkpoints store them as JSON-safe dicts; ``to_dict()`` writes exactly the dicts earlier
versions wrote and ``from_dict()`` reads them back (``ValueError`` on anything malformed), so
old checkpoints keep loading. Field meanings are in ``streams`` (sub-stream positions) and
``loader`` (resume guarantees).

Shapes of the small lists inside (all ints unless said):

- a sample reference ``[tag, shard, index]``; ``tag`` is the epoch (or a resample draw id);
- a work item ``[tag, shard, start, only]``: read ``shard`` from sample ``start`` on, only the
  indices in ``only`` (a list) unless it is ``None``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = ["STATE_VERSION", "GlobalState", "LoaderState", "StreamState", "empty_stats",
           "epoch_share", "merge_states"]

STATE_VERSION = 2


def empty_stats() -> dict:
    """Loader counters: batches and samples delivered, samples skipped (by reason), bad shards,
    and the delivered samples per licence and per source origin (``data.provenance``)."""
    return {"batches": 0, "samples": 0, "skipped": 0, "shard_errors": 0, "skipped_reasons": {},
            "licenses": {}, "sources": {}}


def epoch_share(num_shards: int, seed: int, shuffle: bool, epoch: int, rank: int,
                world_size: int, num_streams: int, stream: int) -> list[int]:
    """Shard ids that sub-stream ``stream`` of ``rank`` reads in ``epoch`` (epoch mode): the
    epoch's permutation split across ranks, then across a rank's sub-streams."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
    return order[rank::world_size][stream::num_streams].tolist()


class _DictState:
    """``to_dict``/``from_dict`` for a flat dataclass of JSON values (deep copies both ways,
    so a state handed out or taken in is never shared with a running loader)."""

    # Keys a dict must have; the others fall back to their field defaults.
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        """The JSON-safe dict checkpoints store (a deep copy)."""
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        # "version" and "format" lead, as in the dicts earlier versions wrote.
        lead = [n for n in ("version", "format") if n in names]
        return {n: self._dump(n, getattr(self, n)) for n in lead + [n for n in names if n not in lead]}

    def _dump(self, name: str, value: Any) -> Any:
        return copy.deepcopy(value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Parse a ``to_dict()`` result (or an older checkpoint's dict); ``ValueError`` if
        it is not a dict, has unknown keys or misses required ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"malformed {cls.__name__}: {type(data).__name__}, not a dict")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        missing = [k for k in cls.REQUIRED if k not in data]
        if unknown or missing:
            raise ValueError(f"malformed {cls.__name__}: unknown keys {sorted(unknown)}, "
                             f"missing keys {missing}")
        return cls(**{k: copy.deepcopy(v) for k, v in data.items()})

    def copy(self):
        """A deep copy (states cross processes and are kept per batch)."""
        return copy.deepcopy(self)


@dataclass
class StreamState(_DictState):
    """Position of one sub-stream (``streams.Stream``); see the ``streams`` module docstring."""

    todo: list[list] = field(default_factory=list)  # work items; todo[0] is being read
    epoch: int = 0  # regular schedule: epoch (or draw counter when resampling) ...
    slot: int = 0  # ... and the next slot of this sub-stream's share of it
    buffer: list[list[int]] = field(default_factory=list)  # refs in the shuffle buffer
    buckets: list[list] = field(default_factory=list)  # [[bucket id, [ref, ...]], ...]
    pops: int = 0  # shuffle-buffer draws so far (the buffer RNG's whole state)
    read: int = 0  # samples read, and ...
    skipped: int = 0  # ... skipped: the failure-rate check
    idle: int = 0  # work items finished since the last usable sample
    draining: bool = False  # the shuffle buffer is being emptied at an epoch boundary

    REQUIRED: ClassVar[tuple[str, ...]] = ("todo", "epoch", "slot", "buffer", "buckets")

    def pending_refs(self) -> list[list[int]]:
        """Samples read but not delivered: the shuffle buffer, then the partial buckets."""
        return list(self.buffer) + [r for _, refs in self.buckets for r in refs]

    def open_tags(self) -> list[int]:
        """Epoch tags this sub-stream still has work or samples of."""
        return [self.epoch] + [it[0] for it in self.todo] + [r[0] for r in self.pending_refs()]


@dataclass
class LoaderState(_DictState):
    """One rank's ``ShardLoader.state_dict()``: data identity, layout, and every sub-stream's
    position after the batches the consumer received."""

    seed: int
    rank: int
    world_size: int
    num_streams: int
    shuffle_shards: bool
    resample: bool
    num_shards: int
    shards_digest: str
    sampling_digest: str | None
    generation: int
    consumed_batches: int
    crashed: list[list[int]]  # [shard, index] of samples that crashed a decoder process
    epoch: int
    streams: list[StreamState]
    stats: dict = field(default_factory=empty_stats)
    version: int = STATE_VERSION
    format: str = "rank"

    REQUIRED: ClassVar[tuple[str, ...]] = ("seed", "rank", "world_size", "num_streams", "num_shards",
                                           "shards_digest", "consumed_batches", "streams")

    def _dump(self, name: str, value: Any) -> Any:
        return [s.to_dict() for s in value] if name == "streams" else copy.deepcopy(value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoaderState:
        """As ``_DictState.from_dict``; keys added after the first v2 states get defaults."""
        data = dict(data) if isinstance(data, Mapping) else data
        if isinstance(data, dict):
            data.setdefault("sampling_digest", None)
            data.setdefault("generation", 0)
            data.setdefault("crashed", [])
            data.setdefault("epoch", 0)
            streams = data.get("streams")
            if not isinstance(streams, list):
                raise ValueError(f"malformed stream positions in state: {streams!r}")
            data["streams"] = [StreamState.from_dict(s) for s in streams]
        return super().from_dict(data)


@dataclass
class GlobalState(_DictState):
    """All old ranks' states merged (``merge_states``): the explicit work left in every open
    epoch plus where the regular schedule resumes; any layout takes its share of it."""

    seed: int
    num_shards: int
    shards_digest: str
    resample: bool
    shuffle_shards: bool
    generation: int
    next_epoch: int
    work: list[list]  # work items, in delivery order
    stats: dict = field(default_factory=empty_stats)
    from_world_size: int | None = None
    crashed: list[list[int]] = field(default_factory=list)
    version: int = STATE_VERSION
    format: str = "global"

    REQUIRED: ClassVar[tuple[str, ...]] = ("seed", "num_shards", "shards_digest", "generation",
                                           "next_epoch", "work")


def merge_states(states: Sequence[Mapping[str, Any]]) -> GlobalState:
    """All old ranks' ``state_dict()``s -> one ``GlobalState`` (see ``ShardLoader.merge_states``)."""
    states = list(states)
    if len(states) == 1 and states[0].get("format") == "global":
        return GlobalState.from_dict(states[0])
    world = states[0]["world_size"]
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)) or any(s.get("format") != "rank" for s in states):
        raise ValueError(f"need the data-loader states of all {world} ranks of the old run "
                         f"(got ranks {ranks}) to resume with a different layout")
    first = states[0]
    for s in states:
        for name in ("version", "seed", "shards_digest", "num_shards", "resample",
                     "shuffle_shards", "num_streams", "generation"):
            if s.get(name) != first.get(name):
                raise ValueError(f"rank states disagree on {name}: {s.get(name)!r} vs {first.get(name)!r}")
    ranked = [LoaderState.from_dict(s) for s in states]
    head = ranked[0]
    n, seed, shuffle, resample = head.num_shards, head.seed, head.shuffle_shards, head.resample
    streams = [(s.rank, i, st) for s in ranked for i, st in enumerate(s.streams)]
    work: list[list] = []
    for _, _, st in streams:
        work += [list(it) for it in st.todo]
        pending: dict[tuple[int, int], list[int]] = {}
        for tag, shard, index in st.pending_refs():
            pending.setdefault((tag, shard), []).append(index)
        work += [[tag, shard, 0, sorted(idx)] for (tag, shard), idx in pending.items()]
    next_epoch = 0
    if not resample:
        last = max(st.epoch for _, _, st in streams)
        for rank, i, st in streams:  # the rest of every open epoch's regular share
            for epoch in range(st.epoch, last + 1):
                share = epoch_share(n, seed, shuffle, epoch, rank, world, head.num_streams, i)
                work += [[epoch, shard, 0, None] for shard in share[st.slot if epoch == st.epoch else 0:]]
        next_epoch = last + 1
    perms: dict[int, dict[int, int]] = {}

    def order(item: list) -> tuple:
        # Epoch by epoch; within one, carried-over pending samples first, then by the
        # epoch's shard permutation, then by position in the shard.
        tag, shard, start, only = item
        if not resample and shuffle and tag not in perms:
            perms[tag] = {int(s): p for p, s in enumerate(np.random.default_rng([seed, tag]).permutation(n))}
        return (tag, only is None, perms[tag][shard] if tag in perms else shard, start)

    work.sort(key=order)
    stats = empty_stats()
    for s in ranked:  # every counter sums: plain ints, and per-name tables (reasons, licences)
        for k, v in s.stats.items():
            if isinstance(v, dict):
                table = stats.setdefault(k, {})
                for name, count in v.items():
                    table[name] = table.get(name, 0) + count
            else:
                stats[k] = stats.get(k, 0) + v
    return GlobalState(
        seed=seed, num_shards=n, shards_digest=head.shards_digest, resample=resample,
        shuffle_shards=shuffle, generation=head.generation + 1, next_epoch=next_epoch, work=work,
        stats=stats, from_world_size=world,
        crashed=[list(r) for r in sorted({tuple(r) for s in ranked for r in s.crashed})],
    )
