"""Streaming WebDataset loader (decord decode, buckets, shuffle buffer) with exact resume.

Structure. Shards are split across ranks and DataLoader workers: in epoch mode, epoch ``e``'s
shard permutation (seeded by ``seed`` and ``e``; identity with ``shuffle_shards=False``) goes
``order[rank::world_size][stream::num_streams]``, ``num_streams = max(1, num_workers)``.
Each worker plays one sub-stream (``streams.Stream``): it reads its shards in order, inspects
samples (JSON, container headers, bucket) before an optional shuffle buffer, decodes them
after it, and fills per-bucket batches; every batch is homogeneous. Epochs are per
sub-stream; a sub-stream empties its shuffle buffer before it reads the next epoch, so only a
partly filled bucket carries samples over an epoch boundary (``batch["epoch"]`` tags each
sample). Sub-streams with fewer shards run through epochs faster. Batches are
``batch.Batch`` objects (typed, and readable like the dicts they replace); positions are the
dataclasses of ``state`` (``state_dict()`` stays a JSON-safe dict).
Without resampling every sample is delivered exactly once per epoch across all ranks x
workers (skipped samples aside); fewer shards than ``world_size x num_streams`` is an error,
never a silently empty rank. ``resample=True`` is the infinite pretraining mode: each
sub-stream draws shards with replacement (any shard count works).

Resume, same layout (``world_size``, ``num_streams`` and sampling settings unchanged). A
DataLoader over an IterableDataset pulls batches round-robin, so batch ``n`` comes from worker
``n % W``. Every batch carries its sub-stream's position *after* it (work queue with the cursor
inside the current shard, shuffle-buffer and bucket contents as ``[tag, shard, index]``
references, RNG counter). The main process records it only when it hands the batch to the
consumer, so prefetched batches never count. ``state_dict()`` = consumed-batch count + every
sub-stream's position. On resume, worker ``w`` plays sub-stream ``(w + consumed) % W``; it
re-reads only the referenced members (by name; other members are never read) and then sees
exactly the batches the uninterrupted run would have seen, bit for bit.

Resume, different layout (e.g. 2 ranks -> 1, or another worker count, batch size or bucket
set). Pass the list of *all* old ranks' states to ``load_state_dict`` (or a
``merge_states(states)`` result; one state suffices when it came from a 1-rank run). Its
guarantee: every sample of every epoch that any old sub-stream had opened (epoch <= M, the
highest open epoch) that was not yet delivered - unread shard remainders and samples sitting
in old shuffle buffers or partial buckets - is delivered exactly once, with its epoch tag
and its old clip window/crop; no delivered sample is delivered again within its epoch; from
epoch M + 1 on the new layout's regular schedule applies. The batch sequence itself differs
from the old run (it cannot be the same with a different number of consumers). The merge
works on global, rank-independent positions (per shard: epoch, next member index, pending
member indices), lists that work explicitly, and deals it round-robin to the new sub-streams.
In resampled mode only the pending and partly-read work carries over; draws restart with a new
generation seed (no epoch guarantee exists there to keep).

Tiny CPU example::

    from worldline.data.shards import ensure_synthetic_dataset
    from worldline.data.synthetic import SyntheticWorldConfig
    root = ensure_synthetic_dataset("/tmp/wl-data", SyntheticWorldConfig(num_clips=16, clips_per_shard=4))
    loader = ShardLoader(root, batch_size=2, num_frames=8, resolution=(64, 64), shuffle_buffer=8)
    batch = next(iter(loader))      # batch["video"]: uint8 [2, 3, 8, 64, 64]; batch.clip_shape (8, 64, 64)
    state = loader.state_dict()     # JSON-safe; ShardLoader(...).load_state_dict(state) resumes
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from worldline.data.batch import Batch
from worldline.data.buckets import Bucket, BucketSet
from worldline.data.probe import VideoLimits
from worldline.data.provenance import OptOut, count_labels
from worldline.data.samples import MAX_MEMBER_BYTES, LatentCodec, PixelCodec
from worldline.data.state import STATE_VERSION, GlobalState, LoaderState, StreamState, empty_stats, merge_states
from worldline.data.streams import POOL_SLOTS, Delivery, Stream, StreamPlan
from worldline.data.video import CROPS, DEFAULT_MAX_CROP, POSITIONS, resize_crop

log = logging.getLogger(__name__)

_MSG_CHARS = 200
_MAX_CRASH_RESTARTS = 64  # decoder crashes survived per iteration before giving up
INPUTS = ("pixel", "latent")


def _split_top_level(spec: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside braces, so ``a-{0,1}.tar,b.tar`` -> ``["a-{0,1}.tar", "b.tar"]``."""
    parts, depth, current = [], 0, []
    for char in spec:
        depth += (char == "{") - (char == "}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    return [p for p in [*parts, "".join(current)] if p.strip()]


def _inside_root(manifest: Path, name: str) -> str:
    """A shard named by ``manifest`` (a dataset's manifest.json): it must stay inside the
    manifest's folder, the dataset root. A downloaded or hand-edited manifest cannot point the
    loader at ``../../elsewhere`` or an absolute path, nor smuggle in a ``pipe:`` command."""
    root = manifest.parent.resolve()
    target = (root / str(name)).resolve()
    if Path(str(name)).is_absolute() or not target.is_relative_to(root):
        raise ValueError(f"{manifest}: shard {name!r} resolves outside the dataset root {root}")
    return str(manifest.parent / str(name))


def resolve_shards(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard URLs from a list, a dataset dir or its ``manifest.json``, or a string of
    comma-separated brace patterns (``shard-{000000..000009}.tar``, also inside webdataset
    URLs such as ``pipe:cat /data/shard-{000000..000009}.tar``)."""
    if isinstance(shards, (str, os.PathLike)):
        path = Path(shards)
        if path.is_dir():
            if not (path / "manifest.json").is_file():
                raise FileNotFoundError(
                    f"{path} is a folder without manifest.json: not a finished dataset (write it "
                    f"with worldline-shards, or name its shards: '{path}/shard-{{000000..000009}}.tar')")
            path = path / "manifest.json"
        if path.name == "manifest.json" and path.is_file():
            manifest = json.loads(path.read_text())
            return [_inside_root(path, name) for name in manifest["shards"]]
        return [url for part in _split_top_level(str(shards)) for url in expand_urls(part.strip())]
    return [str(s) for s in shards]


def repeated_keys(shards: str | os.PathLike | Sequence[str]) -> dict[int, frozenset[str]]:
    """``{shard index: keys an earlier shard already holds}`` from a dataset's manifest (its
    per-sample ``key``/``shard``), so a key repeated across shards is dropped the same way in
    every epoch and shard order: the first shard's copy wins. Empty without a manifest (a
    repeat within one shard is caught while reading it, ``iter_tar_samples``)."""
    if not isinstance(shards, (str, os.PathLike)):
        return {}
    path = Path(shards)
    path = path / "manifest.json" if path.is_dir() else path
    if path.name != "manifest.json" or not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    order = {name: i for i, name in enumerate(manifest.get("shards", []))}
    by_shard: dict[int, list[str]] = {}
    for entry in manifest.get("samples", []):
        if isinstance(entry, dict) and entry.get("shard") in order and isinstance(entry.get("key"), str):
            by_shard.setdefault(order[entry["shard"]], []).append(entry["key"])
    seen: set[str] = set()
    out: dict[int, frozenset[str]] = {}
    for i in sorted(by_shard):
        keys = set(by_shard[i])
        if keys & seen:
            out[i] = frozenset(keys & seen)
        seen |= keys
    return out


def resize_center_crop(frames: np.ndarray, size: tuple[int, int],
                       max_crop: float = 1.0) -> tuple[torch.Tensor, float]:
    """``frames`` uint8 ``[T, h, w, 3]`` -> (contiguous uint8 ``[T, H, W, 3]``, scale): an
    aspect-preserving resize to cover ``size``, then a centre crop of at most ``max_crop`` of
    each side, letterboxing the rest (see ``video.resize_crop``)."""
    out, scale, _ = resize_crop(frames, size, "center", max_crop=max_crop)
    return out.contiguous(), scale


def _identity(batch):
    return batch


def _worker_init(_: int) -> None:
    # One intra-op thread per worker: workers already parallelise across clips, and more
    # threads than cores only adds contention (decord is given num_threads=1 likewise).
    torch.set_num_threads(1)


class _StreamDataset(IterableDataset):
    """Runs in each DataLoader worker (or in-process when ``num_workers == 0``): worker ``w``
    plays sub-stream ``(w + offset) % num_streams`` (see "Resume" in the module docstring)."""

    def __init__(self, plan: StreamPlan, streams: list[StreamState], offset: int):
        self.plan, self.streams, self.offset = plan, streams, offset

    def __iter__(self) -> Iterator[Delivery]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        local = (worker + self.offset) % self.plan.num_streams
        yield from Stream(self.plan, local, self.streams[local]).batches()


class ShardLoader:
    """Infinite iterator of homogeneous ``Batch``es from WebDataset shards, with exact resume.

    Pixel batch (``input="pixel"``): ``video`` uint8 ``[B, 3, T, H, W]``; ``actions`` int64
    ``[B, T, S]`` (action taken at each sampled frame, zero-padded to the largest S in the
    batch, ``S = 0`` without actions); ``camera`` float32 ``[B, T, 2]``: per-frame camera
    *deltas* (dx, dy) between consecutive sampled frames in output pixels (scaled by the resize
    factor), ``camera[:, 0] = 0``; ``caption`` list[str]; ``key`` list[str]; ``style``
    list[list[str]]; ``epoch`` list[int] (-1 when resampling); ``refs`` (``with_refs``) list of
    uint8 ``[R, 3, H, W]``. Latent batch (``input="latent"``): ``latents`` float ``[B, C, t, h,
    w]`` instead of ``video`` (plus ``text_emb``/``text_mask`` when the cache has them). Every
    batch also carries ``clip_shape`` (T, H, W) of its pixel clip (latents: the clip recorded
    when they were encoded, else ``(num_frames, *resolution)``) and ``num_samples``.

    Clip sampling: ``num_frames`` frames ``frame_stride`` apart, or at ``fps`` (resampled from
    timestamps); temporal ``position`` start/center/random; aspect-preserving resize then
    ``crop`` center/random. ``buckets`` (list of ``Bucket``/dicts/``[H, W, T, B]``) replaces
    the single ``(resolution, num_frames, batch_size)`` bucket; ``upscale`` (default: True for
    the single bucket, False with explicit buckets) lets small videos into bigger buckets.

    ``channels_last=True`` returns ``video`` with the same shape in ``torch.channels_last_3d``
    memory (``[B, T, H, W, 3]``, decord's layout; not contiguous): it saves the channel
    transpose (10-20 % of a clip's CPU time), for a consumer that moves the batch to the GPU
    and calls ``.contiguous()`` there (or feeds channels-last convolutions directly).

    ``audio_rate > 0`` (Hz) adds ``audio`` float32 ``[B, N]`` (mono) and ``audio_mask`` bool
    ``[B, N]``: the audio under each clip's frames, ``N = round(num_frames * audio_rate /
    frame_rate)`` with ``frame_rate = fps`` (or source fps / ``frame_stride``); see
    ``PixelCodec``. Latent caches encoded with audio return it too. 0: nothing is decoded.

    Bad input is skipped, counted in ``stats`` (``skipped``, ``skipped_reasons``,
    ``shard_errors``) and warned about once with shard and key; a sub-stream whose skipped
    fraction exceeds ``max_skip_fraction`` after ``skip_check_after`` samples aborts. A sample
    with an unsafe key (``..``, ``/``, odd characters), a key repeated within its shard (the
    first wins) or a member over ``max_member_bytes`` (never read) is such a skip; ``limits``
    (``VideoLimits``, e.g. a lower ``max_pixels``) refuses larger videos before decoding.
    ``exclude`` (an opt-out file, ``data.provenance.OptOut``): samples whose content hash,
    source or key it lists are skipped as ``opted_out`` (also ones restored from a checkpoint
    taken before they were opted out). Delivered samples are counted per licence and origin
    in ``stats["licenses"]`` / ``stats["sources"]``, which travel with the state.
    Only one iterator should be active at a time; a new ``iter()`` continues from the
    consumed state.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str],
        batch_size: int = 8,
        num_frames: int = 17,
        frame_stride: int = 1,
        resolution: tuple[int, int] = (64, 64),
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        position: str = "start",
        shuffle_shards: bool = True,
        *,
        fps: float | None = None,
        crop: str = "center",
        max_crop: float = DEFAULT_MAX_CROP,
        buckets: Sequence[Bucket | Mapping | Sequence[int]] | None = None,
        upscale: bool | None = None,
        shuffle_buffer: int = 0,
        resample: bool = False,
        input: str = "pixel",
        max_skip_fraction: float = 0.5,
        skip_check_after: int = 100,
        limits: VideoLimits | None = None,
        with_refs: bool = False,
        decode_threads: int = 1,
        channels_last: bool = False,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        audio_rate: int = 0,
        num_actions: int = 0,
        exclude: str | os.PathLike | OptOut | None = None,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ):
        self.shards = resolve_shards(shards)
        self.repeats = repeated_keys(shards)  # skipped as duplicate_key: the first shard's copy wins
        # Not part of the data identity: an opt-out added after a checkpoint must not block
        # the resume, it only withholds the samples it names from then on.
        self.exclude = exclude if isinstance(exclude, OptOut) or exclude is None else OptOut.load(exclude)
        if not self.shards:
            raise ValueError(f"no shards in {shards!r}")
        if position not in POSITIONS or crop not in CROPS or input not in INPUTS:
            raise ValueError(f"position in {POSITIONS}, crop in {CROPS}, input in {INPUTS}; "
                             f"got {position!r}, {crop!r}, {input!r}")
        if batch_size < 1 or num_frames < 1 or frame_stride < 1 or shuffle_buffer < 0:
            raise ValueError("batch_size, num_frames, frame_stride must be >= 1, shuffle_buffer >= 0")
        if fps is not None and (fps <= 0 or frame_stride != 1):
            raise ValueError("fps must be > 0 and cannot be combined with frame_stride != 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.num_frames, self.frame_stride, self.fps = batch_size, num_frames, frame_stride, fps
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.position, self.shuffle_shards = seed, position, shuffle_shards
        self.shuffle_buffer, self.resample, self.input = shuffle_buffer, resample, input
        self.max_skip_fraction, self.skip_check_after = max_skip_fraction, skip_check_after
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.max_member_bytes = int(max_member_bytes)  # not in the signature: a filter, like num_actions
        self.codec: PixelCodec | LatentCodec
        if input == "latent":
            self.codec = LatentCodec(batch_size, (num_frames, *self.resolution), num_actions)
        else:
            explicit = buckets is not None
            bucket_list = list(buckets) if explicit else [Bucket(*self.resolution, num_frames, batch_size)]
            bset = BucketSet(bucket_list, upscale=(not explicit) if upscale is None else upscale,
                             frame_stride=frame_stride, fps=fps)
            self.codec = PixelCodec(bset, position, crop, limits, with_refs, decode_threads, channels_last,
                                    audio_rate=audio_rate, num_actions=num_actions, max_crop=max_crop)
        # Sub-streams are tied to workers; 0 workers means one in-process stream.
        self.num_streams = max(1, num_workers)
        if not resample and len(self.shards) < world_size * self.num_streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed world_size={world_size} x "
                f"num_workers={num_workers} (= {world_size * self.num_streams} sub-streams) "
                f"without leaving one empty; write more, smaller shards, use fewer workers, or "
                f"resample=True"
            )
        digest = hashlib.sha1("\n".join(os.path.basename(s) for s in self.shards).encode())
        self._shards_digest = digest.hexdigest()[:12]
        sampling = json.dumps([self.codec.signature(), shuffle_buffer], sort_keys=True)
        self._sampling_digest = hashlib.sha1(sampling.encode()).hexdigest()[:12]
        self.generation = 0
        # (shard, index) of samples that crashed a decoder process (native segfault): skipped
        # as decoder_crash from then on, in every epoch.
        self.crashed: set[tuple[int, int]] = set()
        # Shared with the workers (see StreamPlan): decoding marks and released pool buffers.
        self._marks: torch.Tensor | None = None
        self._free: torch.Tensor | None = None
        self._outstanding: list = []
        self._streams = [StreamState() for _ in range(self.num_streams)]
        self._consumed = 0
        self._warned: set[tuple[str, str]] = set()
        self.stats: dict = empty_stats()

    # ---------------------------------------------------------------- main process
    def __iter__(self) -> Iterator[Batch]:
        for restart in itertools.count():
            deliveries = self._batches()
            try:
                for delivery in deliveries:
                    stream, batch = delivery.stream, delivery.batch
                    self._track(stream, delivery.slot, batch)
                    expected = self._consumed % self.num_streams
                    if stream != expected:  # guards the round-robin assumption resume relies on
                        raise RuntimeError(f"batch from sub-stream {stream}, expected {expected}")
                    # Book-keeping happens as the consumer receives the batch, never earlier.
                    self._streams[stream] = delivery.state
                    self._consumed += 1
                    self._record(delivery.skips, batch.num_samples, delivery.labels)
                    yield batch
            except RuntimeError as exc:
                culprits = self._crash_culprits(exc)
                if not culprits or restart >= _MAX_CRASH_RESTARTS:
                    raise
                # A worker died inside a native decoder: never decode that sample again and
                # restart the workers from the consumed position (no batch is lost or repeated).
                for ref in culprits:
                    log.warning("data worker crashed decoding sample %s of %s; skipping it from now on",
                                ref[2], self.shards[ref[1]])
                    self.crashed.add((ref[1], ref[2]))
            finally:
                # Stop workers now: left to garbage collection after an error (the traceback
                # keeps this frame alive), torch's worker shutdown waits out a 5 s join timeout.
                shutdown = getattr(deliveries, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()

    def _plan(self) -> StreamPlan:
        """What the sub-streams need for this run of the workers (crashes and the layout
        generation are read now; they change only between runs)."""
        return StreamPlan(
            shards=tuple(self.shards), codec=self.codec, seed=self.seed, rank=self.rank,
            world_size=self.world_size, num_streams=self.num_streams,
            shuffle_shards=self.shuffle_shards, resample=self.resample, generation=self.generation,
            shuffle_buffer=self.shuffle_buffer, max_skip_fraction=self.max_skip_fraction,
            skip_check_after=self.skip_check_after, crashed=frozenset(self.crashed),
            marks=self._marks, free=self._free, exclude=self.exclude,
            max_member_bytes=self.max_member_bytes, repeats=self.repeats,
        )

    def _batches(self) -> Iterator[Delivery]:
        """A fresh DataLoader iterator over the sub-streams, from the consumed position."""
        kwargs = {}
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, worker_init_fn=_worker_init)
            self._marks = torch.full((self.num_streams, 4), -1, dtype=torch.int64).share_memory_()
            self._free = torch.zeros((self.num_streams, POOL_SLOTS), dtype=torch.uint8).share_memory_()
            self._outstanding = []
        dataset = _StreamDataset(self._plan(), [s.copy() for s in self._streams], self._consumed)
        loader = DataLoader(
            dataset,
            batch_size=None,  # batches are formed inside the workers
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        return iter(loader)

    def _track(self, stream: int, slot: int, batch: Batch) -> None:
        """Flag the worker's pooled batch buffers whose batches nobody holds any more (every
        view gone) as free, and start watching this batch's buffer."""
        still = []
        for s, k, ref in self._outstanding:
            if ref.expired():
                self._free[s, k] = 1
            else:
                still.append((s, k, ref))
        self._outstanding = still
        if slot >= 0:
            tensor = batch.video if batch.video is not None else batch.latents
            self._outstanding.append((stream, slot, StorageWeakRef(tensor.untyped_storage())))

    def _crash_culprits(self, exc: RuntimeError) -> list[list[int]]:
        """Samples that dead workers were decoding, from torch's "DataLoader worker (pid(s)
        ...) exited unexpectedly / is killed by signal" error; [] for any other error."""
        found = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", str(exc))
        if self._marks is None or found is None:
            return []
        pids = {int(p) for p in re.findall(r"\d+", found.group(1))}
        return [row[:3] for row in self._marks.tolist() if row[3] in pids]

    def _record(self, skips: list[list[str]], num_samples: int,
                labels: Sequence[tuple[str, str]] = ()) -> None:
        self.stats["batches"] += 1
        self.stats["samples"] += num_samples
        count_labels(self.stats, labels)
        reasons = self.stats["skipped_reasons"]
        for shard, key, reason, message in skips:
            # A bad shard is not a sample: counted apart so "skipped" stays a sample count.
            self.stats["shard_errors" if reason == "bad_shard" else "skipped"] += 1
            reasons[reason] = reasons.get(reason, 0) + 1
            if (shard, key) not in self._warned:
                self._warned.add((shard, key))
                log.warning("skipping sample %r in shard %s: %s %s", key, shard, reason, message[:_MSG_CHARS])

    @property
    def epoch(self) -> int:
        """Lowest epoch with samples this rank has not delivered yet (= epochs completed by
        every sub-stream); 0 in resampled mode."""
        if self.resample:
            return 0
        return min(tag for s in self._streams for tag in s.open_tags())

    def stream_shards(self, epoch: int, stream: int) -> list[int]:
        """Shard ids (indices into ``self.shards``) sub-stream ``stream`` reads in ``epoch``."""
        return self._plan().stream_shards(epoch, stream)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """JSON-safe position after the batches the consumer has received (``LoaderState``)."""
        return LoaderState(
            seed=self.seed, rank=self.rank, world_size=self.world_size, num_streams=self.num_streams,
            shuffle_shards=self.shuffle_shards, resample=self.resample, num_shards=len(self.shards),
            shards_digest=self._shards_digest, sampling_digest=self._sampling_digest,
            generation=self.generation, consumed_batches=self._consumed,
            crashed=sorted(list(r) for r in self.crashed), epoch=self.epoch,
            streams=self._streams, stats=self.stats,
        ).to_dict()  # to_dict deep-copies: the returned dict shares nothing with the loader

    def _check_same_data(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cannot resume: data-loader state version {state.get('version')!r}, "
                             f"this loader reads {STATE_VERSION}")
        for name, mine in (("seed", self.seed), ("shards_digest", self._shards_digest),
                           ("num_shards", len(self.shards)), ("resample", self.resample),
                           ("shuffle_shards", self.shuffle_shards)):
            if state.get(name) != mine:
                raise ValueError(f"cannot resume: state has {name}={state.get(name)!r}, loader has {mine!r}")

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue after the batches recorded in ``state``.

        ``state``: this rank's ``state_dict()``, the list of every old rank's states, or a
        ``merge_states`` result. Same layout and sampling settings -> exact (bit-identical
        batches; a list is searched for this rank's entry). Otherwise the states are merged and
        this rank takes its share of the remaining work (module docstring). The data itself
        (shard list, seed, resample, shuffle_shards) must not change.
        """
        states = list(state) if isinstance(state, (list, tuple)) else [state]
        if not states or any(not isinstance(s, dict) or not s for s in states):
            raise ValueError("cannot resume from an empty data-loader state; after a world-size "
                             "change pass the list of all old ranks' states")
        for s in states:
            self._check_same_data(s)
        if len(states) == 1 and states[0].get("format") == "global":
            self._load_global(GlobalState.from_dict(states[0]))
            return
        mine = [s for s in states if s.get("rank") == self.rank]
        same = (states[0]["world_size"] == self.world_size and states[0]["num_streams"] == self.num_streams
                and states[0].get("sampling_digest") == self._sampling_digest)
        if same and mine:
            s = LoaderState.from_dict(mine[0])
            if len(s.streams) != self.num_streams:
                raise ValueError(f"malformed stream positions in state: {mine[0]['streams']!r}")
            self._streams = s.streams
            self._consumed = int(s.consumed_batches)
            self.generation = int(s.generation)
            self.crashed = {tuple(r) for r in s.crashed}
            self.stats = s.stats
            return
        self._load_global(merge_states(states))

    def _load_global(self, state: GlobalState) -> None:
        total = self.world_size * self.num_streams
        work = state.work
        self._streams = [
            StreamState(epoch=state.next_epoch, todo=[list(w) for w in work[self.rank * self.num_streams + i :: total]])
            for i in range(self.num_streams)
        ]
        self._consumed = 0
        self.generation = int(state.generation)
        self.crashed = {tuple(r) for r in state.crashed}
        # Old counters go to rank 0 only, so summing the new ranks' stats keeps the totals.
        self.stats = copy.deepcopy(state.stats) if self.rank == 0 else empty_stats()
        log.info("data loader: resumed from a %s-rank state with a new layout; %d carried-over "
                 "work items, regular schedule from epoch %d", state.from_world_size,
                 len(work), state.next_epoch)

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """All old ranks' ``state_dict()``s -> one rank-independent ("global") state: the
        explicit list of work left in every open epoch plus where the regular schedule
        resumes. ``load_state_dict`` of any layout takes its share of it."""
        return merge_states(states).to_dict()
