"""Streaming WebDataset loader (decord decode) with exact, sample-level resume.

Structure. The shard list is permuted per epoch (``seed``, ``epoch``), split across ranks
(``order[rank::world_size]``) and then across ``num_streams = max(1, num_workers)``
sub-streams (``[stream::num_streams]``). Each DataLoader worker plays one sub-stream: it
walks its shards in order, samples in tar order, and batches inside the worker. A
sub-stream's position is ``[epoch, shard_slot, sample_index]`` (the next sample to read),
so epochs are per sub-stream: batches may straddle an epoch boundary.

Resume. A DataLoader over an IterableDataset pulls batches round-robin, so batch ``n``
comes from worker ``n % W``. Every batch carries its sub-stream id and post-batch position;
the main process records them only when it hands the batch to the consumer, so prefetched
batches never count. ``state_dict()`` = consumed-batch count + each sub-stream's position.
On resume, worker ``w`` plays sub-stream ``(w + consumed) % W`` from its saved position,
skipping already-read samples at the tar-member level (members are never read or decoded).

Tiny CPU example::

    from worldline.data.shards import ensure_synthetic_dataset
    from worldline.data.synthetic import SyntheticWorldConfig
    root = ensure_synthetic_dataset("/tmp/wl-data", SyntheticWorldConfig(num_clips=16, clips_per_shard=4))
    loader = ShardLoader(root, batch_size=2, num_frames=8, resolution=(64, 64))
    batch = next(iter(loader))      # batch["video"]: uint8 [2, 3, 8, 64, 64]
    state = loader.state_dict()     # JSON-safe; ShardLoader(...).load_state_dict(state) resumes
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from worldline.data.video import POSITIONS, ClipTooShortError, decode_clip

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MSG_CHARS = 200  # decord puts the whole input into some messages: keep warnings short


class _Skip(Exception):
    """A sample that cannot be used; ``reason`` becomes a ``stats`` counter."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(reason, message)
        self.reason, self.message = reason, message[:_MSG_CHARS]


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


def resolve_shards(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard paths from a list, a dataset dir or its ``manifest.json``, or a string of
    comma-separated brace patterns (``shard-{000000..000009}.tar``)."""
    if isinstance(shards, (str, os.PathLike)):
        path = Path(shards)
        if path.is_dir():
            path = path / "manifest.json"
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            return [str(path.parent / name) for name in manifest["shards"]]
        return [url for part in _split_top_level(str(shards)) for url in expand_urls(part.strip())]
    return [str(s) for s in shards]


def resize_center_crop(frames: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """Aspect-preserving resize to cover ``size`` then centre crop.

    ``frames`` uint8 ``[T, h, w, 3]`` -> (uint8 ``[T, H, W, 3]``, scale factor). A no-op copy
    when the size already matches. Bilinear with antialias so downscaling does not alias.
    """
    out_h, out_w = size
    _, h, w, _ = frames.shape
    video = torch.from_numpy(np.ascontiguousarray(frames))
    if (h, w) == (out_h, out_w):
        return video, 1.0
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    if (new_h, new_w) == (h, w):  # only the aspect ratio differs: crop, no resampling
        return video[:, top : top + out_h, left : left + out_w].contiguous(), 1.0
    x = video.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    x = x[:, :, top : top + out_h, left : left + out_w]
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), scale


def _identity(batch):
    return batch


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("webdataset: %s", str(exn)[:_MSG_CHARS])
    return True


class _StreamDataset(IterableDataset):
    """Runs in each DataLoader worker (or in-process when ``num_workers == 0``)."""

    def __init__(self, loader: ShardLoader, positions: list[list[int]], offset: int):
        self.loader, self.positions, self.offset = loader, positions, offset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        stream = (worker + self.offset) % self.loader.num_streams
        yield from self.loader._stream_batches(stream, list(self.positions[stream]))


class ShardLoader:
    """Infinite iterator of video batches from WebDataset shards, with exact resume.

    Batch: ``video`` uint8 ``[B, 3, T, H, W]``; ``actions`` int64 ``[B, T, S]`` (action taken
    at each sampled frame; zero-padded to the largest S in the batch, ``S = 0`` without
    actions); ``camera`` float32 ``[B, T, 2]``: per-frame camera *deltas* (dx, dy) between
    consecutive sampled frames in output pixels (scaled by the resize factor), ``camera[:, 0]
    = 0``; ``caption`` list[str]; ``key`` list[str].

    ``stats`` counts delivered batches/samples and skipped samples by reason. Only one
    iterator should be active at a time; a new ``iter()`` continues from the consumed state.
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
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ):
        self.shards = resolve_shards(shards)
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if batch_size < 1 or num_frames < 1 or frame_stride < 1:
            raise ValueError("batch_size, num_frames and frame_stride must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.num_frames, self.frame_stride = batch_size, num_frames, frame_stride
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.position, self.shuffle_shards = seed, position, shuffle_shards
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        # Sub-streams are tied to workers; 0 workers means one in-process stream.
        self.num_streams = max(1, num_workers)
        if len(self.shards) < world_size * self.num_streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed world_size={world_size} x "
                f"num_workers={num_workers} (= {world_size * self.num_streams} sub-streams); "
                f"write more, smaller shards or use fewer workers"
            )
        digest = hashlib.sha1("\n".join(os.path.basename(s) for s in self.shards).encode())
        self._shards_digest = digest.hexdigest()[:12]
        self._positions = [[0, 0, 0] for _ in range(self.num_streams)]
        self._consumed = 0
        self._warned: set[tuple[str, str]] = set()
        self.stats: dict = {"batches": 0, "samples": 0, "skipped": 0, "shard_errors": 0, "skipped_reasons": {}}

    # ---------------------------------------------------------------- main process
    def __iter__(self) -> Iterator[dict]:
        dataset = _StreamDataset(self, copy.deepcopy(self._positions), self._consumed)
        kwargs = {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(
            dataset,
            batch_size=None,  # batches are formed inside the workers
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            **kwargs,
        )
        for batch in loader:
            stream, pos, skips = batch.pop("_stream"), batch.pop("_pos"), batch.pop("_skips")
            expected = self._consumed % self.num_streams
            if stream != expected:  # guards the round-robin assumption resume relies on
                raise RuntimeError(f"batch from sub-stream {stream}, expected {expected}")
            # Book-keeping happens as the consumer receives the batch, never earlier.
            self._positions[stream] = [int(v) for v in pos]
            self._consumed += 1
            self._record(skips, len(batch["key"]))
            yield batch

    def _record(self, skips: list[list[str]], num_samples: int) -> None:
        self.stats["batches"] += 1
        self.stats["samples"] += num_samples
        reasons = self.stats["skipped_reasons"]
        for shard, key, reason, message in skips:
            # A bad shard is not a sample: counted apart so "skipped" stays a sample count.
            self.stats["shard_errors" if reason == "bad_shard" else "skipped"] += 1
            reasons[reason] = reasons.get(reason, 0) + 1
            message = message[:_MSG_CHARS]
            if (shard, key) not in self._warned:
                self._warned.add((shard, key))
                log.warning("skipping sample %r in shard %s: %s %s", key, shard, reason, message)

    @property
    def epoch(self) -> int:
        """Epochs every sub-stream of this rank has completed (informational)."""
        return min(p[0] for p in self._positions)

    def state_dict(self) -> dict:
        """JSON-safe state after the batches the consumer has received (ints/strs/lists)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "shuffle_shards": self.shuffle_shards,
            "shards_digest": self._shards_digest,
            "consumed_batches": self._consumed,
            "epoch": self.epoch,
            "streams": copy.deepcopy(self._positions),
            "stats": copy.deepcopy(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches recorded in ``state``.

        The stream layout must match (seed, rank, world_size, workers, shard list); batch
        size, clip length and resolution may change (positions are per sample).
        """
        mine = self.state_dict()
        for name in ("version", "seed", "rank", "world_size", "num_streams", "shuffle_shards", "shards_digest"):
            if state.get(name) != mine[name]:
                raise ValueError(
                    f"cannot resume: state has {name}={state.get(name)!r}, loader has {mine[name]!r}"
                )
        streams = state["streams"]
        if len(streams) != self.num_streams or any(len(p) != 3 for p in streams):
            raise ValueError(f"malformed stream positions in state: {streams!r}")
        self._positions = [[int(v) for v in p] for p in streams]
        self._consumed = int(state["consumed_batches"])
        self.stats = copy.deepcopy(state.get("stats", self.stats))

    # ---------------------------------------------------------------- worker side
    def stream_shards(self, epoch: int, stream: int) -> list[int]:
        """Shard ids (indices into ``self.shards``) sub-stream ``stream`` reads in ``epoch``."""
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_shards else np.arange(n)
        return order[self.rank :: self.world_size][stream :: self.num_streams].tolist()

    def _iter_shard(self, path: str, skip: int) -> Iterator[tuple[int, dict]]:
        """``(index, raw sample)`` for samples ``index >= skip`` of one tar shard.

        Members of the first ``skip`` samples are rejected by name in ``select_files``, so
        the tar iterator never reads (let alone decodes) them. Counting key changes here is
        exactly how ``group_by_keys`` forms samples, so indices agree.
        """
        groups = {"index": -1, "prefix": None}

        def select(fname: str) -> bool:
            prefix, _ = base_plus_ext(fname)
            if prefix is None:
                return False
            if prefix != groups["prefix"]:
                groups["index"] += 1
                groups["prefix"] = prefix
            return groups["index"] >= skip

        with gopen(path, "rb") as stream:
            files = tar_file_iterator(stream, handler=_warn_and_continue, select_files=select)
            files = ({**f, "__url__": path} for f in files)
            samples = group_by_keys(files, handler=_warn_and_continue)
            yield from enumerate(samples, start=skip)

    def _decode(self, raw: dict, epoch: int, shard_id: int, index: int) -> dict:
        """Raw tar members -> one sample (or ``_Skip``). Members are decoded by extension
        here; no webdataset decoder runs, so nothing is ever unpickled."""
        mp4 = raw.get("mp4")
        if mp4 is None:
            raise _Skip("missing_mp4", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
        if len(mp4) == 0:
            raise _Skip("empty_mp4")
        if raw.get("json") is None:
            raise _Skip("missing_json")
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"top level is {type(meta).__name__}, not an object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _Skip("bad_json", str(exc)) from None
        caption = raw["txt"].decode("utf-8", "replace") if raw.get("txt") is not None else meta.get("caption", "")
        # Per-sample generator: the random window depends on nothing but where the sample is.
        rng = np.random.default_rng([self.seed, epoch, shard_id, index])
        try:
            frames, idx = decode_clip(mp4, self.num_frames, self.frame_stride, self.position, rng)
        except ClipTooShortError as exc:
            raise _Skip("too_short", str(exc)) from None
        except Exception as exc:  # decord raises RuntimeError/DECORDError on corrupt input
            raise _Skip("decode_error", f"{type(exc).__name__}: {exc}") from None
        video, scale = resize_center_crop(frames, self.resolution)
        try:
            actions = np.asarray(meta.get("actions", np.zeros((idx[-1] + 1, 0))), dtype=np.int64)
            camera = np.asarray(meta.get("camera", np.zeros((idx[-1] + 1, 2))), dtype=np.float64)
            if actions.ndim != 2 or camera.ndim != 2 or camera.shape[1] != 2:
                raise ValueError(f"actions {actions.shape} / camera {camera.shape} not [N, S] / [N, 2]")
            if min(len(actions), len(camera)) <= idx[-1]:
                raise ValueError(f"actions/camera shorter than frame {idx[-1]}")
        except (ValueError, TypeError) as exc:
            raise _Skip("bad_annotations", str(exc)) from None
        cam = camera[idx]
        deltas = np.diff(cam, axis=0, prepend=cam[:1]) * scale
        return {
            "video": video.permute(3, 0, 1, 2),  # [T, H, W, 3] -> [3, T, H, W]
            "actions": torch.from_numpy(actions[idx]),
            "camera": torch.from_numpy(deltas.astype(np.float32)),
            "caption": caption,
            "key": raw["__key__"],
        }

    def _collate(self, items: list[dict], stream: int, pos: list[int], skips: list) -> dict:
        num_actors = max(it["actions"].shape[1] for it in items)
        actions = torch.zeros((len(items), self.num_frames, num_actors), dtype=torch.int64)
        for i, it in enumerate(items):
            actions[i, :, : it["actions"].shape[1]] = it["actions"]
        return {
            "video": torch.stack([it["video"] for it in items]),
            "actions": actions,
            "camera": torch.stack([it["camera"] for it in items]),
            "caption": [it["caption"] for it in items],
            "key": [it["key"] for it in items],
            "_stream": stream,
            "_pos": list(pos),
            "_skips": skips,
        }

    def _stream_batches(self, stream: int, pos: list[int]) -> Iterator[dict]:
        """Batches of sub-stream ``stream`` from position ``[epoch, shard_slot, sample]``."""
        epoch, slot, skip = pos
        items: list[dict] = []
        skips: list[list[str]] = []
        while True:
            shard_ids = self.stream_shards(epoch, stream)
            full_pass, valid = slot == 0 and skip == 0, 0
            while slot < len(shard_ids):
                shard_id = shard_ids[slot]
                path = self.shards[shard_id]
                name = os.path.basename(path)
                samples = self._iter_shard(path, skip)
                while True:
                    try:
                        index, raw = next(samples)
                    except StopIteration:
                        break
                    except Exception as exc:  # unreadable / truncated tar: keep what was read
                        skips.append([name, "*", "bad_shard", f"{type(exc).__name__}: {exc}"])
                        break
                    try:
                        items.append(self._decode(raw, epoch, shard_id, index))
                        valid += 1
                    except _Skip as exc:
                        skips.append([name, raw["__key__"], exc.reason, exc.message])
                    if len(items) == self.batch_size:
                        yield self._collate(items, stream, [epoch, slot, index + 1], skips)
                        items, skips = [], []
                slot, skip = slot + 1, 0
            if full_pass and valid == 0:
                raise RuntimeError(
                    f"rank {self.rank} sub-stream {stream} found no usable sample in a full pass "
                    f"over shards {[self.shards[i] for i in shard_ids]}"
                )
            epoch, slot = epoch + 1, 0
