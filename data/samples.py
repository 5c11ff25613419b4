"""Tar members -> validated samples -> decoded clips (or latents) -> homogeneous batches.

Three stages, so the loader can put a cheap one before its shuffle buffer and re-run it on
resume without decoding anything:

1. ``iter_tar_samples`` streams a shard (local path or webdataset URL such as ``pipe:cat
   x.tar``) and groups members into samples, counting samples exactly as webdataset does
   (a new sample at every change of the name before the first dot). Members of samples
   outside the requested indices, and members nobody asked for, are rejected by name and
   never read into memory (on local files they are seeked over, not even read from disk).
2. ``Codec.inspect`` (cheap: JSON, container headers, annotation checks, bucket choice).
3. ``Codec.decode`` (decord + resize/crop, or safetensors -> tensors) and ``Codec.collate``
   (-> ``batch.Batch``).

Safety: members are decoded by extension in this file only; nothing is ever unpickled.
Extensions that webdataset's default decoders would unpickle or ``torch.load``
(``UNSAFE_EXTENSIONS``) are never read: the whole sample is skipped as ``unsafe_member``.
Every problem raises ``Skip(reason, message)``; ``reason`` becomes a loader ``stats`` counter.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from worldline.data.batch import Batch
from worldline.data.buckets import Bucket, BucketSet, NoBucket
from worldline.data.probe import ProbeError, VideoLimits, probe_video
from worldline.data.sources import SidecarError, decode_text, key_problem, parse_json
from worldline.data.audio import AudioDecodeError, decode_audio_window, window_samples
from worldline.data.video import DEFAULT_MAX_CROP, ClipTooShortError, decode_clip, resize_crop

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "webm", "mkv", "avi")
# webdataset's autodecode maps pyd/pickle/pkl to pickle.loads and pth to torch.load; the
# rest are other common pickle carriers. A sample carrying any of them is never decoded.
UNSAFE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
_REF = re.compile(r"^ref\d*\.(png|jpe?g|webp)$")
_MSG_CHARS = 200  # decord puts whole inputs into some messages: keep warnings short
# A member larger than this is never read (the sample is a too_large skip): sized for real
# video (a 2 GiB clip is minutes of 4K), far below what one hostile member could cost.
MAX_MEMBER_BYTES = 2 << 30


class Skip(Exception):
    """A sample that cannot be used; ``reason`` becomes a ``stats`` counter."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(reason, message)
        self.reason, self.message = reason, str(message)[:_MSG_CHARS]


@dataclass
class RawSample:
    """The members of one sample as stored (``ext -> bytes``), before any decoding."""

    index: int
    key: str
    url: str
    members: dict[str, bytes] = field(default_factory=dict)
    unsafe: list[str] = field(default_factory=list)
    # (reason, message) found while reading: unsafe key, repeated key, oversized member. Its
    # members are then not read; ``check_raw`` turns it into a Skip.
    problem: tuple[str, str] | None = None


def check_raw(raw: RawSample) -> None:
    """The checks every codec's ``inspect`` starts with: a problem found while reading the
    tar, or an unsafe member, is a ``Skip`` naming it."""
    if raw.problem is not None:
        raise Skip(*raw.problem)
    if raw.unsafe:
        raise Skip("unsafe_member", f"never decoded: .{', .'.join(raw.unsafe)}")


def is_unsafe(ext: str) -> bool:
    """Whether a member extension (any dotted part of it) is one that is never read."""
    return any(part in UNSAFE_EXTENSIONS for part in ext.lower().split("."))


def iter_tar_samples(
    url: str,
    start: int = 0,
    only: set[int] | None = None,
    wanted: Callable[[str], bool] = lambda ext: True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    repeats: frozenset[str] = frozenset(),
) -> Iterator[RawSample]:
    """Samples ``index >= start`` (and in ``only`` if given) of one tar shard, in tar order.

    A sample whose key is unsafe (``sources.key_problem``: ``..``, ``/``, odd characters), whose
    key already named an earlier sample of the shard or is in ``repeats`` (keys an earlier shard
    holds: ``loader.repeated_keys``; the first wins), or with a member larger
    than ``max_member_bytes`` comes back with ``problem`` set and nothing more read.

    Hand-rolled over ``tarfile`` rather than webdataset's ``tar_file_iterator`` +
    ``group_by_keys`` because we need the true sample index of every sample, including
    samples none of whose members were read (all unsafe or unwanted); webdataset silently
    drops those, which would shift every later index and break resume positions. URL opening
    (``pipe:``, local paths) and the key/extension split are webdataset's.
    """
    last = max(only) if only else None
    if only is not None and not only:
        return
    with gopen(url, "rb") as stream:
        # A local file is opened seekable, so members rejected by name are seeked over, not
        # even read from disk; pipes and remote streams are read through, but still never kept.
        seekable = getattr(stream, "seekable", lambda: False)()
        tar = tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")
        index, prefix, current = -1, None, None
        seen: set[str] = set()  # keys of this shard so far, read or not: first one wins
        for info in tar:
            tar.members = []  # stream mode would otherwise keep every header in memory
            name = info.name
            if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            base, ext = base_plus_ext(name)
            if base is None:  # no extension: belongs to no sample
                continue
            if base != prefix:
                if current is not None:
                    yield current
                    current = None
                index, prefix = index + 1, base
                if last is not None and index > last:
                    return  # nothing further is wanted from this shard
                if index >= start and (only is None or index in only):
                    current = RawSample(index, base, url)
                    bad = key_problem(base)
                    if bad or base in seen or base in repeats:
                        where = "this shard" if base in seen else "an earlier shard"
                        current.problem = ("bad_key", bad) if bad else (
                            "duplicate_key", f"key {base[:80]!r} repeats a sample of {where} (that one is kept)")
                seen.add(base)
            if current is None or current.problem is not None:
                continue  # rejected by name: the member's bytes are never read
            if info.size > max_member_bytes:
                current.problem = ("too_large", f"member .{ext} is {info.size} bytes > "
                                   f"max_member_bytes={max_member_bytes} (data.max_member_bytes)")
                current.members.clear()
                continue
            if is_unsafe(ext):
                current.unsafe.append(ext)
            elif wanted(ext):
                current.members[ext] = tar.extractfile(info).read()
        if current is not None:
            yield current


@dataclass
class Candidate:
    """A sample that passed the cheap checks: what decoding needs, plus its bucket id."""

    key: str
    bucket: str
    video: bytes | None
    meta: dict
    actions: np.ndarray  # int64 [N, S]
    camera: np.ndarray | None  # float64 [N, 2]
    caption: str
    style: list[str]
    refs: list[bytes] = field(default_factory=list)
    tensors: dict[str, np.ndarray] | None = None  # latent mode


def _parse_json(raw: RawSample, required: bool) -> dict:
    data = raw.members.get("json")
    if data is None:
        if required:
            raise Skip("missing_json", f"members: {sorted(raw.members)}")
        return {}
    try:  # UTF-8 (BOM or not) or UTF-16 with a BOM; depth capped (sources.MAX_JSON_DEPTH)
        meta = parse_json(data, f"{raw.key}.json")
    except SidecarError as exc:
        raise Skip(exc.reason, exc.message) from None
    if not isinstance(meta, dict):
        raise Skip("bad_json", f"top level is {type(meta).__name__}, not an object")
    return meta


def parse_actions(value, num_actions: int = 0) -> np.ndarray:
    """Per-frame actions -> int64 ``[N, S]`` (a flat list is ``S = 1``); ``ValueError`` if
    ragged, non-finite (NaN/inf), not integral, booleans, negative, or (``num_actions`` > 0)
    not below ``num_actions``: an id out of range would index another slot's embedding rows."""
    if np.asarray(value).dtype == bool or any(
            isinstance(v, (bool, np.bool_)) for v in np.asarray(value, dtype=object).ravel()):
        raise ValueError("actions must be integers, not booleans")
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"actions must be [N] or [N, S], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("actions contain non-finite values (NaN/inf)")
    if (arr != np.round(arr)).any():
        raise ValueError("actions must be integers")
    if arr.size and arr.min() < 0:  # an id is an index: never negative, whatever the table
        raise ValueError(f"action ids must be >= 0, got {int(arr.min())}")
    if num_actions > 0 and arr.size and arr.max() >= num_actions:
        raise ValueError(f"action ids must be in [0, {num_actions}) (model.dit.num_actions), "
                         f"got {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int64)


def parse_camera(value) -> np.ndarray:
    """Per-frame camera (x, y) view positions -> finite float64 ``[N, 2]``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"camera must be [N, 2] (x, y per frame), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("camera contains non-finite values (NaN/inf)")
    return arr


def _caption(raw: RawSample, meta: dict) -> str:
    """The ``.txt`` member (UTF-8, or UTF-16 with a BOM: else a ``bad_encoding`` skip, never
    a caption of replacement characters), else the JSON's ``caption``."""
    if raw.members.get("txt") is None:
        return str(meta.get("caption", ""))
    try:
        return decode_text(raw.members["txt"], f"{raw.key}.txt")
    except SidecarError as exc:
        raise Skip(exc.reason, exc.message) from None


def _annotations(raw: RawSample, meta: dict, num_actions: int = 0
                 ) -> tuple[np.ndarray, np.ndarray | None, str, list[str]]:
    try:
        actions = parse_actions(meta["actions"], num_actions) if meta.get("actions") is not None \
            else np.zeros((0, 0), np.int64)
    except (ValueError, TypeError) as exc:
        raise Skip("bad_actions", str(exc)) from None
    try:
        camera = parse_camera(meta["camera"]) if meta.get("camera") is not None else None
    except (ValueError, TypeError) as exc:
        raise Skip("bad_camera", str(exc)) from None
    caption = _caption(raw, meta)
    style = meta.get("style", [])
    style = [style] if isinstance(style, str) else [str(s) for s in style] if isinstance(style, list) else []
    return actions, camera, caption, style


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch buffer; in a DataLoader worker it is created in shared memory directly (as
    torch's own ``default_collate`` does), so handing it to the main process moves no bytes."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class Codec(Protocol):
    """How one kind of shard (pixel or latent) becomes batches; ``streams.Stream`` drives it."""

    input: str

    def signature(self) -> list:
        """JSON-safe sampling settings: a resumed run with another signature cannot be exact."""
        ...

    def wanted(self, ext: str) -> bool:
        """Whether tar members with extension ``ext`` are read at all."""
        ...

    def batch_size(self, bucket: str) -> int:
        """Samples per batch of ``bucket``."""
        ...

    def inspect(self, raw: RawSample) -> Candidate:
        """Cheap checks and bucket choice, before the shuffle buffer; raises ``Skip``."""
        ...

    def decode(self, cand: Candidate, rng: np.random.Generator, tag: int) -> dict:
        """The sample's tensors (clip window and crop drawn from ``rng``); raises ``Skip``."""
        ...

    def place(self, acc: torch.Tensor | None, bucket: str, i: int, item: dict,
              alloc: Callable | None = None) -> torch.Tensor | None:
        """Copy ``item``'s bulk data into slot ``i`` of the bucket's batch buffer ``acc``."""
        ...

    def collate(self, items: list[dict], bucket: str, acc: torch.Tensor | None) -> Batch:
        """A full bucket's decoded samples -> one ``Batch``."""
        ...


class PixelCodec:
    """mp4 samples -> ``video`` uint8 ``[B, 3, T, H, W]`` batches (see ``ShardLoader``).

    ``audio_rate > 0`` adds each clip's audio window (``audio`` float32 ``[B, N]`` mono at
    that rate, ``audio_mask`` bool ``[B, N]``): from the clip's start (``ClipTiming.start``)
    for ``T / frame_rate`` seconds, ``N = round(T * audio_rate / frame_rate)`` with
    ``frame_rate = fps`` when resampling by time (one N per bucket), else the source's
    average rate / ``frame_stride``. Under ``frame_stride`` sources of different frame rates
    give different N; a batch then pads the shorter windows at the end (mask False) to its
    longest, so N is fixed per bucket whenever its sources share a rate (module docs of
    ``data.audio`` for the clocks). A file without audio gives zeros and an all-False mask;
    undecodable audio skips the sample as ``bad_audio``.
    """

    input = "pixel"

    def __init__(self, buckets: BucketSet, position: str = "start", crop: str = "center",
                 limits: VideoLimits | None = None, with_refs: bool = False, decode_threads: int = 1,
                 channels_last: bool = False, audio_rate: int = 0, num_actions: int = 0,
                 max_crop: float = DEFAULT_MAX_CROP):
        if audio_rate < 0:
            raise ValueError(f"audio_rate must be >= 0 (0: no audio), got {audio_rate}")
        self.buckets, self.position, self.crop, self.channels_last = buckets, position, crop, channels_last
        self.limits, self.with_refs, self.decode_threads = limits or VideoLimits(), with_refs, decode_threads
        self.audio_rate = int(audio_rate)
        # Not in the signature: a filter of bad samples, fixed for a model, and runs saved
        # before it existed keep resuming.
        self.num_actions = int(num_actions)
        # Not in the signature either: it changes a sample's pixels, not which samples are
        # drawn or in what order, so a resumed stream stays exact.
        self.max_crop = float(max_crop)

    def signature(self) -> list:
        sig = ["pixel", self.buckets.signature(), self.position, self.crop, self.with_refs, self.channels_last]
        # Only when on: states saved before audio existed keep resuming exactly.
        return sig + [{"audio_rate": self.audio_rate}] if self.audio_rate else sig

    def wanted(self, ext: str) -> bool:
        return ext in VIDEO_EXTENSIONS or ext in ("json", "txt") or (self.with_refs and bool(_REF.match(ext)))

    def batch_size(self, bucket: str) -> int:
        return self.buckets[int(bucket)].batch_size

    def inspect(self, raw: RawSample) -> Candidate:
        check_raw(raw)
        ext = next((e for e in VIDEO_EXTENSIONS if e in raw.members), None)
        if ext is None:
            raise Skip("missing_video", f"members: {sorted(raw.members)}")
        video = raw.members[ext]
        if len(video) == 0:
            raise Skip("empty_video", f"0-byte .{ext}")
        meta = _parse_json(raw, required=True)
        actions, camera, caption, style = _annotations(raw, meta, self.num_actions)
        try:
            info = probe_video(video, self.limits)
            bucket = self.buckets.assign(info)
        except (ProbeError, NoBucket) as exc:
            raise Skip(exc.reason, str(exc)) from None
        refs = [raw.members[e] for e in sorted(raw.members) if _REF.match(e)] if self.with_refs else []
        return Candidate(raw.key, str(bucket), video, meta, actions, camera, caption, style, refs)

    def decode(self, cand: Candidate, rng: np.random.Generator, tag: int) -> dict:
        bucket: Bucket = self.buckets[int(cand.bucket)]
        try:
            frames, idx, *timing = decode_clip(cand.video, bucket.num_frames, self.buckets.frame_stride,
                                               self.position, rng, fps=self.buckets.fps,
                                               num_threads=self.decode_threads, as_tensor=True,
                                               return_timing=self.audio_rate > 0)
        except ClipTooShortError as exc:
            raise Skip("too_short", str(exc)) from None
        except Exception as exc:  # decord raises RuntimeError/DECORDError on corrupt input
            raise Skip("decode_error", f"{type(exc).__name__}: {exc}") from None
        # A view of decord's buffer (or of the resized frames): ``place`` copies it, once.
        video, scale, _ = resize_crop(frames, (bucket.height, bucket.width), self.crop, rng, self.max_crop)
        last = int(idx[-1])
        if cand.actions.size and len(cand.actions) <= last:
            raise Skip("bad_actions", f"{len(cand.actions)} action rows, clip needs frame {last}")
        actions = cand.actions[idx] if cand.actions.size else np.zeros((len(idx), 0), np.int64)
        if cand.camera is not None:
            if len(cand.camera) <= last:
                raise Skip("bad_camera", f"{len(cand.camera)} camera rows, clip needs frame {last}")
            cam = cand.camera[idx]
            camera = np.diff(cam, axis=0, prepend=cam[:1]) * scale  # output-pixel deltas
        else:
            camera = np.zeros((len(idx), 2))
        item = {"video": video, "actions": actions, "camera": camera.astype(np.float32),
                "caption": cand.caption, "key": cand.key, "style": cand.style, "epoch": tag}
        if self.with_refs:
            item["refs"] = self._refs(cand, bucket)
        if self.audio_rate:
            n = window_samples(timing[0].duration, self.audio_rate)
            try:
                pcm, mask = decode_audio_window(cand.video, timing[0].start, n / self.audio_rate, self.audio_rate)
            except AudioDecodeError as exc:
                raise Skip("bad_audio", f"{cand.key}: {exc}") from None
            item["audio"], item["audio_mask"] = pcm, mask
        return item

    def _refs(self, cand: Candidate, bucket: Bucket) -> torch.Tensor:
        from PIL import Image

        out = []
        for data in cand.refs:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size  # header only: refuse huge images before decoding them
                    if max(h, w) > self.limits.max_side or h * w > self.limits.max_pixels:
                        raise Skip("absurd_dimensions", f"reference image {h}x{w}")
                    rgb = np.array(img.convert("RGB"))
            except Skip:
                raise
            except Image.DecompressionBombError as exc:  # PIL's own size guard fired first
                raise Skip("absurd_dimensions", f"reference image: {exc}") from None
            except Exception as exc:
                raise Skip("bad_reference", f"{type(exc).__name__}: {exc}") from None
            img_t, _, _ = resize_crop(rgb[None], (bucket.height, bucket.width), "center", max_crop=self.max_crop)
            out.append(img_t[0].permute(2, 0, 1))
        if not out:
            return torch.zeros((0, 3, bucket.height, bucket.width), dtype=torch.uint8)
        return torch.stack(out).contiguous()

    def place(self, acc: torch.Tensor | None, bucket: str, i: int, item: dict,
              alloc: Callable | None = None) -> torch.Tensor:
        """Copy ``item``'s frames into slot ``i`` of its bucket's batch buffer (allocated on
        the first sample) while they are still in cache: the only copy a clip's pixels get
        between decord's buffer and the batch. ``channels_last`` makes it a plain memcpy;
        otherwise it also transposes ``[T, H, W, 3] -> [3, T, H, W]`` (~10 % of a decode)."""
        if acc is None:
            b = self.buckets[int(bucket)]
            shape = (b.batch_size, b.num_frames, b.height, b.width, 3) if self.channels_last \
                else (b.batch_size, 3, b.num_frames, b.height, b.width)
            acc = (alloc or shared_empty)(shape, torch.uint8)
        video = item.pop("video")
        acc[i].copy_(video if self.channels_last else video.permute(3, 0, 1, 2))
        return acc

    def collate(self, items: list[dict], bucket: str, acc: torch.Tensor) -> Batch:
        """Decoded samples of one full bucket (pixels already in ``acc``) -> a ``Batch``."""
        b = self.buckets[int(bucket)]
        n = len(items)
        # channels_last: [B, T, H, W, 3] memory seen as [B, 3, T, H, W] (not contiguous).
        video = acc.permute(0, 4, 1, 2, 3) if self.channels_last else acc
        actors = max(it["actions"].shape[1] for it in items)
        actions = torch.zeros((n, b.num_frames, actors), dtype=torch.int64)
        for i, it in enumerate(items):
            actions[i, :, : it["actions"].shape[1]] = torch.from_numpy(it["actions"])
        return Batch(
            video=video,
            actions=actions,
            camera=torch.from_numpy(np.stack([it["camera"] for it in items])),
            caption=[it["caption"] for it in items],
            key=[it["key"] for it in items],
            style=[it["style"] for it in items],
            epoch=[it["epoch"] for it in items],
            refs=[it["refs"] for it in items] if self.with_refs else None,
            clip_shape=(b.num_frames, b.height, b.width),
            **(_stack_audio(items) if self.audio_rate else {}),
        )


def _stack_audio(items: list[dict]) -> dict[str, torch.Tensor]:
    """Per-sample audio windows -> ``audio`` float32 ``[B, N]`` + ``audio_mask`` bool ``[B, N]``,
    N the longest window (shorter ones, from sources of another frame rate, padded: mask False)."""
    n = max(len(it["audio"]) for it in items)
    audio = shared_empty((len(items), n), torch.float32)
    mask = shared_empty((len(items), n), torch.bool)
    audio.zero_()
    mask.zero_()
    for i, it in enumerate(items):
        audio[i, : len(it["audio"])] = torch.from_numpy(np.asarray(it["audio"], np.float32))
        mask[i, : len(it["audio_mask"])] = torch.from_numpy(np.asarray(it["audio_mask"], bool))
    return {"audio": audio, "audio_mask": mask}


def _encoded_clip_shape(meta: dict) -> tuple[int, int, int] | None:
    """``(num_frames, height, width)`` of the pixel clip a latent sample was encoded from, as
    ``encode_latent_shards`` records it in the sample's JSON (``clip``); None if absent/bad."""
    clip = meta.get("clip")
    try:
        shape = (int(clip["num_frames"]), int(clip["resolution"][0]), int(clip["resolution"][1]))
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    return shape if min(shape) >= 1 else None


class LatentCodec:
    """Latent-shard samples (``<key>.safetensors`` written by ``encode_latent_shards``) ->
    ``latents`` float ``[B, C, t, h, w]`` batches; one bucket per latent shape.

    ``clip_shape`` is the pixel clip ``(num_frames, H, W)`` assumed for samples whose JSON does
    not record the clip they were encoded from (hand-made caches)."""

    input = "latent"

    def __init__(self, batch_size: int, clip_shape: tuple[int, int, int] = (17, 64, 64),
                 num_actions: int = 0):
        self._batch_size = batch_size
        self.clip_shape = clip_shape
        self.num_actions = int(num_actions)  # as PixelCodec: ids outside it are bad_actions
        self._warned_mixed = False

    def signature(self) -> list:
        return ["latent", self._batch_size]

    def wanted(self, ext: str) -> bool:
        return ext in ("safetensors", "json", "txt")

    def batch_size(self, bucket: str) -> int:
        return self._batch_size

    def inspect(self, raw: RawSample) -> Candidate:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        check_raw(raw)
        data = raw.members.get("safetensors")
        if data is None:
            raise Skip("missing_latents", f"members: {sorted(raw.members)}")
        meta = _parse_json(raw, required=False)
        try:
            tensors = load(data)  # safetensors: a JSON header + raw buffers, no code paths
        except (SafetensorError, ValueError, TypeError, OSError) as exc:
            raise Skip("bad_latents", f"{type(exc).__name__}: {exc}") from None
        lat = tensors.get("latents")
        if lat is None or lat.ndim != 4 or lat.dtype.kind != "f":
            raise Skip("bad_latents", f"need float latents [C, t, h, w], got {None if lat is None else (lat.dtype, lat.shape)}")
        if not np.isfinite(lat).all():
            raise Skip("bad_latents", "latents contain non-finite values")
        audio, amask = tensors.get("audio"), tensors.get("audio_mask")
        if audio is not None and (audio.ndim != 1 or audio.dtype.kind != "f" or not np.isfinite(audio).all()
                                  or amask is None or amask.shape != audio.shape):
            raise Skip("bad_latents", f"audio must be finite float [N] with an audio_mask [N], got "
                       f"{audio.dtype} {audio.shape} / {None if amask is None else amask.shape}")
        caption = _caption(raw, meta)
        style = meta.get("style", [])
        style = [style] if isinstance(style, str) else list(style) if isinstance(style, list) else []
        actions = tensors.get("actions", np.zeros((0, 0), np.int64))
        try:
            if actions.size:
                parse_actions(actions, self.num_actions)
        except (ValueError, TypeError) as exc:
            raise Skip("bad_actions", str(exc)) from None
        bucket = "x".join(str(s) for s in lat.shape)
        return Candidate(raw.key, bucket, None, meta, actions, tensors.get("camera"), caption,
                         style, tensors=tensors)

    def decode(self, cand: Candidate, rng: np.random.Generator, tag: int) -> dict:
        t = cand.tensors
        n = len(t["camera"]) if t.get("camera") is not None else len(t.get("actions", ()))
        item = {
            "latents": torch.from_numpy(np.ascontiguousarray(t["latents"])),
            "actions": np.asarray(t.get("actions", np.zeros((n, 0))), np.int64),
            "camera": np.asarray(t["camera"] if t.get("camera") is not None else np.zeros((n, 2)), np.float32),
            "caption": cand.caption, "key": cand.key, "style": cand.style, "epoch": tag,
            "clip_shape": _encoded_clip_shape(cand.meta) or self.clip_shape,
        }
        for name in ("text_emb", "text_mask"):
            if name in t:
                item[name] = torch.from_numpy(np.ascontiguousarray(t[name]))
        if t.get("audio") is not None and t.get("audio_mask") is not None:
            item["audio"] = np.asarray(t["audio"], np.float32)
            item["audio_mask"] = np.asarray(t["audio_mask"], bool)
        return item

    def place(self, acc, bucket: str, i: int, item: dict, alloc: Callable | None = None) -> None:
        """Nothing: latents are small, stacked at collate time."""
        return None

    def collate(self, items: list[dict], bucket: str, acc=None) -> Batch:
        """Decoded samples of one latent shape -> a ``Batch`` (latents stacked here)."""
        lat = [it["latents"] for it in items]
        out = shared_empty((len(lat), *lat[0].shape), lat[0].dtype)
        torch.stack(lat, out=out)
        frames = max(len(it["actions"]) for it in items)
        actors = max(it["actions"].shape[1] for it in items)
        actions = torch.zeros((len(items), frames, actors), dtype=torch.int64)
        camera = torch.zeros((len(items), max(len(it["camera"]) for it in items), 2))
        for i, it in enumerate(items):
            actions[i, : len(it["actions"]), : it["actions"].shape[1]] = torch.from_numpy(it["actions"])
            camera[i, : len(it["camera"])] = torch.from_numpy(it["camera"])
        text = {name: torch.stack([it[name] for it in items]) if all(name in it for it in items) else None
                for name in ("text_emb", "text_mask")}
        clips = {it["clip_shape"] for it in items}
        if len(clips) > 1 and not self._warned_mixed:
            # Batching is by latent shape only (as it always was); say so once rather than fail.
            self._warned_mixed = True
            log.warning("latent batch mixes samples encoded from clips %s; reporting the first", sorted(clips))
        return Batch(latents=out, actions=actions, camera=camera,
                     caption=[it["caption"] for it in items], key=[it["key"] for it in items],
                     style=[it["style"] for it in items], epoch=[it["epoch"] for it in items],
                     clip_shape=items[0]["clip_shape"], **text,
                     **(_stack_audio(items) if all("audio" in it for it in items) else {}))
