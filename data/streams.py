"""One sub-stream of a ``ShardLoader``: work queue -> tar -> shuffle buffer -> buckets -> batches.

A sub-stream runs inside one DataLoader worker (or in-process). It knows its loader only
through a ``StreamPlan`` (the read-only settings plus two shared-memory tables it reports
through), never the loader object itself. Its whole position is a small ``StreamState``
(a JSON dict in checkpoints), so the loader can record it with every batch and restore it
exactly:

- ``todo``: ``[[tag, shard, start, only], ...]``, explicit work read before the regular
  schedule. ``todo[0]`` is the shard being read; ``start`` is the next sample index to read
  and ``only`` (or ``None`` = all) restricts to listed indices. Work carried over from a run
  with another layout lands here (see ``loader``).
- ``epoch``, ``slot``: the regular schedule. Epoch mode: the next shard is slot ``slot`` of
  this sub-stream's share of ``epoch``. Resampled mode: ``epoch`` counts shard draws.
- ``buffer``: ``[[tag, shard, index], ...]``, samples in the shuffle buffer (read, inspected,
  not decoded); ``buckets``: ``[[bucket, [[tag, shard, index], ...]], ...]``, decoded samples
  waiting for their bucket to fill. Only references are stored; on restore the referenced
  members are re-read by name (nothing else in the shard is read) and re-decoded, which is
  deterministic because a sample's random window and crop come from
  ``rng([seed, tag, shard, index])``.
- ``pops`` (shuffle-buffer draws so far: the buffer's RNG is counter-based, so this counter
  *is* its state), ``read``/``skipped`` (for the failure-rate threshold) and ``idle`` (work
  items finished since the last usable sample; guards against a stream of only bad data) and
  ``draining`` (the buffer is being emptied at an epoch boundary).

``tag`` is the epoch in epoch mode; in resampled mode it is a unique draw id (see
``resample_tag``), so two draws of one shard still get different clip windows.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from worldline.data.batch import Batch
from worldline.data.provenance import OptOut, label
from worldline.data.samples import MAX_MEMBER_BYTES, Candidate, Codec, Skip, iter_tar_samples, shared_empty
from worldline.data.state import StreamState, epoch_share

Ref = list  # [tag, shard, index]
# Shared-memory batch buffers a worker keeps for reuse. A fresh 25 MB segment costs ~10 ms to
# create, fault in and free (~1.5 ms per 256x256x16 clip, a quarter of its decode); a
# recycled one costs nothing. The main process flags a buffer free once every view of the
# batch it handed out is gone (ShardLoader._track).
POOL_SLOTS = 16


class DataQualityError(RuntimeError):
    """Too much of the data is unusable (``max_skip_fraction``) or none of it is."""


def resample_tag(generation: int, gid: int, draw: int) -> int:
    """Unique id of one shard draw in resampled mode (layout generation, global sub-stream)."""
    return (((generation << 20) + gid) << 32) + draw


@dataclass(frozen=True, eq=False)
class StreamPlan:
    """Everything a sub-stream needs from its loader, for one run of the workers.

    Read-only settings, plus two shared-memory tables the main process and the workers both
    see (``None`` without worker processes):

    - ``marks`` int64 ``[num_streams, 4]``: per sub-stream ``[tag, shard, index, pid]`` of the
      sample being decoded (pid -1 when none), so the main process can name the sample that
      crashed a worker;
    - ``free`` uint8 ``[num_streams, POOL_SLOTS]``: 1 where the main process released a
      pooled batch buffer (no view of that batch is alive any more).
    """

    shards: tuple[str, ...]
    codec: Codec
    seed: int
    rank: int
    world_size: int
    num_streams: int
    shuffle_shards: bool
    resample: bool
    generation: int
    shuffle_buffer: int
    max_skip_fraction: float
    skip_check_after: int
    crashed: frozenset[tuple[int, int]] = frozenset()  # (shard, index): never decoded again
    exclude: OptOut | None = None  # opt-out list: matching samples are skipped (opted_out)
    marks: torch.Tensor | None = None
    free: torch.Tensor | None = None
    max_member_bytes: int = MAX_MEMBER_BYTES  # larger tar members are never read (too_large)
    repeats: dict[int, frozenset[str]] = field(default_factory=dict)  # shard -> keys held earlier

    def stream_shards(self, epoch: int, stream: int) -> list[int]:
        """Shard ids sub-stream ``stream`` of this rank reads in ``epoch`` (epoch mode)."""
        return epoch_share(len(self.shards), self.seed, self.shuffle_shards, epoch, self.rank,
                           self.world_size, self.num_streams, stream)


@dataclass(eq=False)
class Delivery:
    """What a sub-stream hands the main process: a batch plus its book-keeping.

    ``state``: the sub-stream's position after this batch; ``skips``: ``[shard, key, reason,
    message]`` of samples skipped since the previous batch; ``slot``: the pool slot of the
    batch's buffer (-1 if not pooled); ``labels``: ``(license, origin)`` of each sample of the
    batch, counted when the batch is consumed. Deliberately not a ``Mapping``: some torch versions
    rebuild mappings in their pin-memory thread instead of calling ``pin_memory()``, which
    would turn the ``Batch`` back into a plain dict."""

    batch: Batch
    stream: int
    state: StreamState
    skips: list[list[str]]
    slot: int
    labels: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def pin_memory(self, device: torch.device | str | None = None) -> Delivery:
        """torch's pin-memory thread calls this (``ShardLoader(pin_memory=True)``)."""
        return dataclasses.replace(self, batch=self.batch.pin_memory())


class Stream:
    """Runs sub-stream ``local`` of ``plan``'s rank from position ``state``."""

    def __init__(self, plan: StreamPlan, local: int, state: StreamState):
        self.plan, self.local = plan, local
        self.gid = plan.rank * plan.num_streams + local  # global sub-stream id
        self.state = state.copy()
        self.skips: list[list[str]] = []
        self.accs: dict[str, object] = {}  # bucket -> batch buffer being filled
        self.pool: list[torch.Tensor] = []  # shared-memory batch buffers, by slot
        self.sent: set[int] = set()  # slots handed to the main process, not yet released
        self.filling: set[int] = set()  # slots being filled by a bucket

    # ------------------------------------------------------------------ reading work
    def _regular_item(self) -> list:
        lo, s = self.plan, self.state
        if lo.resample:
            draw = s.epoch
            s.epoch += 1
            rng = np.random.default_rng([lo.seed, 1, lo.generation, self.gid, draw])
            return [resample_tag(lo.generation, self.gid, draw), int(rng.integers(len(lo.shards))), 0, None]
        while True:
            share = lo.stream_shards(s.epoch, self.local)
            if s.slot < len(share):
                s.slot += 1
                return [s.epoch, share[s.slot - 1], 0, None]
            s.epoch, s.slot = s.epoch + 1, 0

    def _skip(self, url: str, key: str, exc: Skip) -> None:
        # An opt-out is consent, not bad data: it never counts towards max_skip_fraction.
        self.state.skipped += exc.reason not in ("bad_shard", "opted_out")
        self.skips.append([os.path.basename(url), key, exc.reason, exc.message])
        lo, s = self.plan, self.state
        if s.read >= lo.skip_check_after and s.skipped > lo.max_skip_fraction * s.read:
            reasons: dict[str, int] = {}
            for _, _, reason, _ in self.skips:
                reasons[reason] = reasons.get(reason, 0) + 1
            raise DataQualityError(
                f"rank {lo.rank} sub-stream {self.local}: {s.skipped} of {s.read} samples "
                f"skipped ({s.skipped / s.read:.0%}) > max_skip_fraction="
                f"{lo.max_skip_fraction:g} (checked after {lo.skip_check_after} samples); recent "
                f"reasons {reasons}; last: {self.skips[-1][0]}:{self.skips[-1][1]} {self.skips[-1][3]}"
            )

    def candidates(self) -> Iterator[tuple[Ref, Candidate]]:
        """Inspected samples in read order, forever; updates ``todo[0]``'s cursor as it goes.
        Yields ``(None, None)`` where the epoch changes (epoch mode) so the shuffle buffer can
        be drained first: a sub-stream then delivers all of an epoch before the next one, up to
        partially filled buckets."""
        lo, s = self.plan, self.state
        previous = None
        while True:
            if not s.todo:
                s.todo.append(self._regular_item())
            item = s.todo[0]
            tag, shard, start, only = item
            if not lo.resample and previous is not None and tag != previous:
                yield None, None  # epoch boundary, before any sample of the next epoch is read
            previous = tag
            url = lo.shards[shard]
            samples = iter_tar_samples(url, start, None if only is None else set(only), lo.codec.wanted,
                                       lo.max_member_bytes, lo.repeats.get(shard, frozenset()))
            while True:
                try:
                    raw = next(samples)
                except StopIteration:
                    break
                except Exception as exc:  # unreadable / truncated tar: keep what was read
                    self._skip(url, "*", Skip("bad_shard", f"{type(exc).__name__}: {exc}"))
                    break
                item[2] = raw.index + 1
                s.read += 1
                try:
                    cand = lo.codec.inspect(raw)
                    self._check_consent(cand)
                except Skip as exc:
                    self._skip(url, raw.key, exc)
                    continue
                s.idle = 0
                yield [tag, shard, raw.index], cand
            s.todo.pop(0)
            s.idle += 1
            if s.idle > 2 * len(lo.shards) + 1:
                raise DataQualityError(
                    f"rank {lo.rank} sub-stream {self.local} read {s.idle} shards without one "
                    f"usable sample (last: {url}); recent skips: {self.skips[-3:]}"
                )

    def _check_consent(self, cand: Candidate) -> None:
        """``Skip("opted_out")`` for a sample on the plan's opt-out list (by content hash,
        source or key), so a clip withdrawn after sharding is never trained on."""
        exclude = self.plan.exclude
        hit = exclude.match(cand.key, cand.meta) if exclude is not None else None
        if hit is not None:
            raise Skip("opted_out", f"on the opt-out list {exclude.path} ({hit})")

    # ------------------------------------------------------------------ batching
    def _decode(self, ref: Ref, cand: Candidate) -> dict:
        lo = self.plan
        tag, shard, index = ref
        if (shard, index) in lo.crashed:
            raise Skip("decoder_crash", "crashed a decoder process before; never decoded again")
        rng = np.random.default_rng([lo.seed, tag, shard, index])
        marks = lo.marks
        if marks is None:
            return self._labelled(lo.codec.decode(cand, rng, -1 if lo.resample else tag), cand)
        # Say what this process decodes: if a native decoder crash kills it, the main process
        # learns which sample did it (ShardLoader.__iter__).
        marks[self.local] = torch.tensor([tag, shard, index, os.getpid()])
        try:
            return self._labelled(lo.codec.decode(cand, rng, -1 if lo.resample else tag), cand)
        finally:
            marks[self.local, 3] = -1

    @staticmethod
    def _labelled(item: dict, cand: Candidate) -> dict:
        # The (license, origin) the consumer counts this sample under (collate ignores it).
        item["provenance"] = label(cand.meta)
        return item

    def _restore(self) -> tuple[list, dict]:
        """Rebuild the shuffle buffer and partial buckets from their references."""
        lo, s = self.plan, self.state
        refs = s.pending_refs()
        wanted: dict[int, set[int]] = {}
        for _, shard, index in refs:
            wanted.setdefault(shard, set()).add(index)
        raws = {}
        for shard, indices in sorted(wanted.items()):
            for raw in iter_tar_samples(lo.shards[shard], 0, indices, lo.codec.wanted, lo.max_member_bytes,
                                        lo.repeats.get(shard, frozenset())):
                raws[(shard, raw.index)] = raw

        def inspect(ref: Ref) -> Candidate | None:
            raw = raws.get((ref[1], ref[2]))
            if raw is None:
                raise RuntimeError(f"cannot restore loader state: sample {ref[2]} of "
                                   f"{lo.shards[ref[1]]} is gone (did the shards change?)")
            try:
                cand = lo.codec.inspect(raw)
            except Skip as exc:
                raise RuntimeError(f"cannot restore loader state: {raw.key} in {raw.url} now "
                                   f"fails ({exc.reason}: {exc.message})") from None
            try:  # opted out since the checkpoint: dropped and counted, not fatal
                self._check_consent(cand)
            except Skip as exc:
                self._skip(raw.url, raw.key, exc)
                return None
            return cand

        buffer = [(ref, c) for ref in s.buffer if (c := inspect(ref)) is not None]
        buckets: dict = {}
        for bucket, bucket_refs in s.buckets:
            for ref in bucket_refs:
                cand = inspect(ref)
                if cand is None:
                    continue
                try:
                    self._put(ref, bucket, self._decode(ref, cand), buckets)
                except Skip as exc:
                    raise RuntimeError(f"cannot restore loader state: {exc.reason} {exc.message}") from None
        s.buffer, s.buckets = [], []
        return buffer, buckets

    def _put(self, ref: Ref, bucket: str, item: dict, buckets: dict) -> list:
        """Append a decoded sample to its bucket (its pixels go straight into the batch)."""
        entries = buckets.setdefault(bucket, [])
        self.accs[bucket] = self.plan.codec.place(self.accs.get(bucket), bucket, len(entries), item,
                                                  self._alloc)
        entries.append((ref, item))
        return entries

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A batch buffer: a released pool buffer of this shape, a new pool buffer, or (pool
        full, or no workers) a one-off one."""
        flags = self.plan.free
        if flags is None:
            return shared_empty(shape, dtype)
        row = flags[self.local]
        for slot in [s for s in self.sent if row[s]]:
            row[slot] = 0
            self.sent.discard(slot)
        for slot, buf in enumerate(self.pool):
            if slot not in self.sent and slot not in self.filling and buf.shape == shape and buf.dtype == dtype:
                self.filling.add(slot)
                return buf
        if len(self.pool) < POOL_SLOTS:
            self.pool.append(shared_empty(shape, dtype))
            self.filling.add(len(self.pool) - 1)
            return self.pool[-1]
        return shared_empty(shape, dtype)

    def _slot(self, buf) -> int:
        """Pool slot of ``buf`` (now on its way to the main process), or -1."""
        for slot, pooled in enumerate(self.pool):
            if buf is pooled:
                self.filling.discard(slot)
                self.sent.add(slot)
                return slot
        return -1

    def _snapshot(self, buffer: list, buckets: dict) -> StreamState:
        """The position after the batch being handed out: the live buffer and buckets become
        references (``self.state`` keeps them empty while they live in memory)."""
        snap = copy.deepcopy(self.state)
        snap.buffer = [list(ref) for ref, _ in buffer]
        snap.buckets = [[b, [list(ref) for ref, _ in entries]] for b, entries in buckets.items()]
        return snap

    def batches(self) -> Iterator[Delivery]:
        """Batches forever, each with its book-keeping (``Delivery``)."""
        lo, s = self.plan, self.state
        buffer, buckets = self._restore()
        if s.draining:  # the snapshot was taken while an epoch's tail was draining
            yield from self._drain(buffer, buckets)
        for ref, cand in self.candidates():
            if ref is None:
                yield from self._drain(buffer, buckets)
                continue
            if lo.shuffle_buffer > 0:
                buffer.append((ref, cand))
                if len(buffer) <= lo.shuffle_buffer:
                    continue
                ref, cand = self._pop(buffer)
            yield from self._add(ref, cand, buffer, buckets)

    def _pop(self, buffer: list) -> tuple[Ref, Candidate]:
        # Counter-based draw: the buffer's RNG state is just ``pops``.
        lo, s = self.plan, self.state
        rng = np.random.default_rng([lo.seed, 2, lo.generation, self.gid, s.pops])
        s.pops += 1
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        return buffer.pop()

    def _drain(self, buffer: list, buckets: dict) -> Iterator[Delivery]:
        self.state.draining = True
        while buffer:
            yield from self._add(*self._pop(buffer), buffer, buckets)
        self.state.draining = False

    def _add(self, ref: Ref, cand: Candidate, buffer: list, buckets: dict) -> Iterator[Delivery]:
        """Decode one sample into its bucket; yields the bucket's batch when it is full."""
        lo, codec = self.plan, self.plan.codec
        try:
            item = self._decode(ref, cand)
        except Skip as exc:
            self._skip(lo.shards[ref[1]], cand.key, exc)
            return
        self.state.idle = 0
        entries = self._put(ref, cand.bucket, item, buckets)
        if len(entries) < codec.batch_size(cand.bucket):
            return
        del buckets[cand.bucket]
        acc = self.accs.pop(cand.bucket)
        batch = codec.collate([it for _, it in entries], cand.bucket, acc)
        delivery = Delivery(batch, self.local, self._snapshot(buffer, buckets), self.skips, self._slot(acc),
                            [it["provenance"] for _, it in entries])
        self.skips = []
        yield delivery
