"""Raw videos (+ sidecars) -> validated WebDataset tar shards + ``manifest.json``, resumably.

``make_shards(source, out_dir, ...)`` is what ``worldline-shards`` runs:

1. ``sources.discover`` lists the inputs (folder with sidecars, or CSV/JSONL manifest).
2. A process pool prepares each input (``prepare``): reads the video, checks its container
   header (``probe_video``: absurd dimensions, truncation), validates it with decord (opens it
   and decodes the first and last frame, or every frame with ``validate="full"``), optionally
   re-encodes/downscales it with PyAV, and validates the sidecars (actions ``[N, S]`` integer
   and finite, camera ``[N, 2]`` finite, both with exactly N = decoded frame count rows;
   reference images readable and of sane size). A bad input is skipped and reported by path
   with a reason; it never stops the run.
3. The parent writes results *in input order* into shards closed at ``max_count`` samples or
   before exceeding ``max_bytes``, each under a temporary name renamed when complete, and
   appends one line per closed shard to ``.make_shards.journal.jsonl``. ``manifest.json``
   comes last, so a directory with a manifest is complete.

Resume: rerunning on the same ``out_dir`` keeps every journaled shard, skips their inputs (and
the inputs already reported bad), deletes partial files and continues numbering. Because the
order and the shard boundaries are deterministic, the result equals an uninterrupted run's.
A rerun on a finished output is incremental (``data.rerun``): "nothing new", or new and
changed inputs (size + mtime, then sha256) appended, shards from the first changed one redone;
``manifest["run"]`` says which. Other settings are refused, naming ``--overwrite``.

Before an input is read: its key must be safe (``sources.key_problem``), its size within
``max_input_bytes`` (``stat``) and its header sane (``probe_file``: an mp4's boxes through a
memory map, anything else through FFmpeg's header probe; a still image renamed ``.mp4`` is
``image_not_video``); sidecars are size-checked the same way (``max_sidecar_bytes``), JSON
capped at depth 64, text decoded as UTF-8 / UTF-16 with BOM or skipped as ``bad_encoding``,
and ``num_actions`` > 0 bounds action ids (booleans are always refused).

Sample members: ``<key>.mp4``, ``<key>.json`` (``actions``, ``camera`` or ``camera_pose``,
``caption``, ``style``, ``meta``: source path, resolution, fps, frame count, duration, codec,
``audio``: ``{sample_rate, channels, duration, offset, codec}`` or null; ``provenance``:
source, licence, attribution, origin, sha256 of the original file, see ``provenance``),
``<key>.txt`` (caption) and ``<key>.ref<i>.<ext>`` (reference images, original bytes). Inputs
in non-ISO containers (webm, mkv, avi) are re-encoded to H.264 mp4 so every stored video can
be header-probed cheaply by the loader; so are mp4/mov files decord cannot read as they are
(AV1, a rotation in the track matrix, non-square pixels: ``transcode.reencode_reason``).
Re-encoding keeps every frame and its timestamp (VFR stays VFR), so per-frame annotations
stay aligned, keeps colours (range and matrix read per frame, output tagged) and stores the
displayed orientation and shape, and re-encodes the first audio track to AAC with its
timestamps (files stored as-is keep theirs untouched). See ``worldline.data.transcode``.

Tiny CPU example::

    manifest = make_shards("clips/", "/tmp/shards", max_count=64, processes=2)
    # /tmp/shards/shard-000000.tar ..., manifest.json; manifest["skipped"] lists bad inputs
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import string
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from worldline.data.audio import AudioDecodeError, probe_audio
from worldline.data.controls import sample_controls
from worldline.data.probe import ProbeError, VideoInfo, VideoLimits, is_iso_bmff, probe_file, probe_video
from worldline.data.provenance import IngestScreen, OptOut, ProvenanceOptions, summarize_manifest
from worldline.data.provenance import describe as describe_provenance
from worldline.data.rerun import describe, plan_rerun, stat_fingerprint
from worldline.data.samples import parse_actions
from worldline.data.shards import MANIFEST, ClosedShard, Journal, ShardWriter, remove_partial_shards, write_manifest
from worldline.data.sources import (
    IMAGE_SUFFIXES,
    SidecarError,
    SourceItem,
    discover,
    file_sha256,
    key_problem,
    parse_json,
)
from worldline.data.transcode import DECORD_UNDECODABLE, check_encoder, reencode_reason, transcode
from worldline.data.video import open_reader, read_frames

log = logging.getLogger(__name__)

JOURNAL = ".make_shards.journal.jsonl"


class BadInput(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message[:300]


@dataclass(frozen=True)
class IngestOptions:
    """How each input is checked and (optionally) re-encoded."""

    validate: str = "fast"  # "fast": decode first + last frame; "full": every frame
    reencode: str | None = None  # e.g. "libx264": re-encode every video with this codec
    max_side: int | None = None  # downscale (re-encodes) so the longer side is <= this
    crf: int = 20
    limits: VideoLimits = field(default_factory=VideoLimits)
    # A CSV/JSONL manifest may only name files under this folder (None: anywhere).
    source_root: str | None = None
    # Licence / source defaults and --require-license (data/provenance.py).
    provenance: ProvenanceOptions = field(default_factory=ProvenanceOptions)
    num_actions: int = 0  # > 0: action ids must lie in [0, num_actions) (the model's table)
    max_input_bytes: int = 4 << 30  # a larger video file is skipped unread (too_large)
    max_sidecar_bytes: int = 64 << 20  # JSON / .npy / reference image files



def validate_video(data: bytes, full: bool = False, limits: VideoLimits | None = None) -> dict:
    """Header probe + decode check; returns the manifest facts (``resolution`` [H, W], ``fps``,
    ``num_frames``, ``duration``, ``codec``, ``vfr``, ``open_gop``) or raises ``BadInput``.

    ``fps`` and ``vfr`` are measured from the frame timestamps (``probe_video``), not the
    container's declared rate; ``open_gop`` records that decord cannot seek this stream
    exactly, so the loader reads it with ``video.ExactReader`` (the flag is informational:
    the loader re-derives it from the same headers, so older shards are read exactly too).
    ``full`` decodes every frame and then checks that decord's seeks land on the frames of
    that sequential decode (``_seek_mismatches``); a file where they do not, and that the
    headers cannot route to the exact reader, is ``inexact_seek``."""
    import decord

    try:
        info = probe_video(data, limits)
    except ProbeError as exc:
        raise BadInput(exc.reason, str(exc)) from None
    try:
        reader = open_reader(data) if info.open_gop else decord.VideoReader(io.BytesIO(data), num_threads=1)
        n = len(reader)
        if n == 0:
            raise BadInput("decode_error", "decord finds no frames")
        if full:
            crcs: list[int] = []
            for start in range(0, n, 32):
                frames = read_frames(reader, data, np.arange(start, min(n, start + 32)))
                crcs += [zlib.crc32(np.ascontiguousarray(f).tobytes()) for f in frames]
            shape = frames.shape
            wrong = [] if info.open_gop else _seek_mismatches(reader, data, crcs)
            if wrong:
                raise BadInput("inexact_seek", f"decord's seek returns another frame than a sequential decode "
                               f"at frames {wrong[:4]} (of {n}): the stream's keyframe table is wrong")
        else:
            shape = read_frames(reader, data, np.array([0, n - 1])).shape
        end = float(reader.get_frame_timestamp([n - 1])[0][1])
        fps = info.fps if info.fps > 0 else float(reader.get_avg_fps())
    except BadInput:
        raise
    except Exception as exc:  # decord raises RuntimeError / DECORDError on corrupt input
        raise BadInput("decode_error", f"{type(exc).__name__}: {exc}") from None
    return {"resolution": [int(shape[1]), int(shape[2])], "fps": fps, "num_frames": n,
            "duration": end, "codec": info.codec, "vfr": info.vfr, "open_gop": info.open_gop}


def _seek_mismatches(reader, data: bytes, crcs: list[int], checks: int = 8) -> list[int]:
    """Frames (up to ``checks``, evenly spaced, read last first so that every read is a
    backward seek) where decord's random access differs from its sequential decode, whose
    per-frame CRC32s are ``crcs``. The same decoder from the same keyframe is bit-exact, so
    any difference means the seek started from a frame that is not a true keyframe."""
    picks = np.unique(np.linspace(1, len(crcs) - 1, min(checks, len(crcs) - 1)).round().astype(np.int64))
    wrong = []
    for i in picks[::-1]:
        frame = read_frames(reader, data, np.array([i]))[0]
        if zlib.crc32(np.ascontiguousarray(frame).tobytes()) != crcs[i]:
            wrong.append(int(i))
    return sorted(wrong)


def _sidecar_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """A sidecar's bytes, its size checked with ``stat`` before anything is read."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BadInput("too_large", f"{what} {path.name}: {size} bytes > {max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise BadInput(f"bad_{what}", f"{path.name}: {type(exc).__name__}: {exc}") from None


def _load_array(value, what: str, max_bytes: int = IngestOptions.max_sidecar_bytes):
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        data = _sidecar_bytes(path, what, max_bytes)
        try:
            if path.suffix.lower() == ".npy":
                return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle
            return parse_json(data, path.name)
        except SidecarError as exc:  # encoding, nesting depth
            raise BadInput(exc.reason if exc.reason == "bad_encoding" else f"bad_{what}", exc.message) from None
        except (ValueError, EOFError) as exc:
            raise BadInput(f"bad_{what}", f"{path.name}: {type(exc).__name__}: {exc}") from None
    return value


def _annotations(item: SourceItem, meta: dict, num_frames: int, opts: IngestOptions | None = None) -> dict:
    opts = opts or IngestOptions()
    out: dict = {}
    actions = _load_array(item.actions, "actions", opts.max_sidecar_bytes)
    actions = meta.pop("actions", None) if actions is None else actions
    if actions is not None:
        try:
            arr = parse_actions(actions, opts.num_actions)
        except (ValueError, TypeError) as exc:
            raise BadInput("bad_actions", str(exc)) from None
        if len(arr) != num_frames:
            raise BadInput("bad_actions", f"{len(arr)} action rows for {num_frames} frames")
        out["actions"] = arr.tolist()
    camera = _load_array(item.camera, "camera", opts.max_sidecar_bytes)
    camera = meta.pop("camera", None) if camera is None else camera
    if camera is not None:
        try:
            cam = np.asarray(camera, dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise BadInput("bad_camera", str(exc)) from None
        if cam.ndim != 2 or not np.isfinite(cam).all():
            raise BadInput("bad_camera", f"camera must be finite [N, D], got shape {cam.shape}")
        if len(cam) != num_frames:
            raise BadInput("bad_camera", f"{len(cam)} camera rows for {num_frames} frames")
        # [N, 2] is the view's (x, y) the loader turns into per-frame deltas; other poses are
        # stored for custom loaders under their own name.
        out["camera" if cam.shape[1] == 2 else "camera_pose"] = cam.tolist()
    return out


def _refs(item: SourceItem, limits: VideoLimits, max_bytes: int = IngestOptions.max_sidecar_bytes
          ) -> dict[str, bytes]:
    from PIL import Image

    out = {}
    for i, path in enumerate(item.refs):
        ext = Path(path).suffix.lower().lstrip(".")
        if f".{ext}" not in IMAGE_SUFFIXES:
            raise BadInput("bad_reference", f"{path}: not an image file")
        data = _sidecar_bytes(Path(path), "reference", max_bytes)
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if max(h, w) > limits.max_side or h * w > limits.max_pixels:
                    raise BadInput("bad_reference", f"{path}: {h}x{w} is too large")
                img.verify()
        except BadInput:
            raise
        except Exception as exc:
            raise BadInput("bad_reference", f"{path}: {type(exc).__name__}: {exc}") from None
        out[f"ref{i}.{'jpg' if ext == 'jpeg' else ext}"] = data
    return out


def _provenance(item: SourceItem, meta: dict, sha256: str, opts: ProvenanceOptions) -> dict:
    """The sample's ``provenance`` record (data/provenance.py), or ``BadInput``: a malformed
    field (``bad_provenance``), or no licence under ``require_license`` (``no_license``)."""
    try:
        prov = describe_provenance(item.video, meta, sha256, opts)
    except ValueError as exc:
        raise BadInput("bad_provenance", str(exc)) from None
    if opts.require_license and not prov["license"]:
        raise BadInput("no_license", "no license field, .license.txt sidecar or --default-license")
    return prov


def _precheck(item: SourceItem, opts: IngestOptions) -> tuple[dict, VideoInfo]:
    """Everything decided before the video is read: a listed-but-unusable path, an unsafe
    key, the file's size (``stat``) and its header (``probe_file``: only the boxes it needs);
    returns the input's fingerprint (size, mtime, sha256: what a rerun compares, ``data.rerun``)
    and that header."""
    if item.problem is not None:
        raise BadInput(*item.problem)
    if bad := key_problem(item.key):
        raise BadInput("bad_key", bad)
    try:
        st = os.stat(item.video)
        fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError as exc:
        raise BadInput("unreadable", f"{type(exc).__name__}: {exc}") from None
    if fp["size"] == 0:
        raise BadInput("empty_video", "0 bytes")
    if fp["size"] > opts.max_input_bytes:
        raise BadInput("too_large", f"{fp['size']} bytes > max_input_bytes={opts.max_input_bytes} (--max-input-size)")
    try:
        header = probe_file(item.video, opts.limits)
    except ProbeError as exc:
        raise BadInput(exc.reason, str(exc)) from None
    except OSError as exc:
        raise BadInput("unreadable", f"{type(exc).__name__}: {exc}") from None
    return {**fp, "sha256": file_sha256(item.video)}, header


def prepare(item: SourceItem, opts: IngestOptions) -> dict:
    """One input -> ``{"ok": True, "sample": {...}, "entry": {...}}`` or ``{"ok": False,
    "key", "path", "reason", "message"}``. Runs in pool workers; never raises for bad data."""
    try:
        fp, probed = _precheck(item, opts)
        try:
            data = Path(item.video).read_bytes()
        except OSError as exc:
            raise BadInput("unreadable", f"{type(exc).__name__}: {exc}") from None
        if len(data) == 0:
            raise BadInput("empty_video", "0 bytes")
        original_bytes = data
        # Check the original before handing it to an encoder, then the result again. Inputs
        # the loader cannot read correctly as they are (reencode_reason) are always re-encoded.
        # The precheck's header is these bytes' (same probe); None marks a non-ISO container.
        header = probed if is_iso_bmff(data) else None
        why = reencode_reason(header)
        undecodable = header is not None and header.codec in DECORD_UNDECODABLE
        original = None if why in ("container", "codec") else validate_video(data, full=False, limits=opts.limits)
        if opts.reencode or opts.max_side or why:
            try:
                data = transcode(data, opts.reencode or "libx264", opts.crf, opts.max_side, opts.limits)
            except ProbeError as exc:  # the displayed size (e.g. an absurd pixel aspect ratio)
                raise BadInput(exc.reason, f"re-encoded {exc}") from None
            except Exception as exc:
                if undecodable:
                    raise BadInput("unsupported_codec", f"{DECORD_UNDECODABLE[header.codec]} video cannot be "
                                   f"decoded here ({type(exc).__name__}: {exc}); re-encode it to H.264 first "
                                   f"(e.g. worldline-shards --reencode libx264 on a machine whose FFmpeg "
                                   f"decodes it)") from None
                raise BadInput("reencode_error" if original else "not_video", f"{type(exc).__name__}: {exc}") from None
        facts = validate_video(data, full=opts.validate == "full", limits=opts.limits) \
            if original is None or data is not original_bytes or opts.validate == "full" else original
        try:
            facts = {**facts, "audio": probe_audio(data)}  # None: no audio track
        except AudioDecodeError as exc:
            raise BadInput("bad_audio", str(exc)) from None
        meta = dict(item.meta)
        if item.meta_path:
            path = Path(item.meta_path)
            try:
                extra = parse_json(_sidecar_bytes(path, "json", opts.max_sidecar_bytes), path.name)
            except SidecarError as exc:
                raise BadInput(exc.reason, exc.message) from None
            if not isinstance(extra, dict):
                raise BadInput("bad_json", f"{Path(item.meta_path).name}: not a JSON object")
            meta = {**extra, **meta}
        provenance = _provenance(item, meta, fp["sha256"], opts.provenance)
        record = _annotations(item, meta, facts["num_frames"], opts)
        caption = item.caption if item.caption is not None else str(meta.pop("caption", "") or "")
        style = item.style or meta.pop("style", [])
        record.update(caption=caption, style=[style] if isinstance(style, str) else list(style),
                      meta={**meta, "source": item.video, **facts}, provenance=provenance)
        refs = _refs(item, opts.limits, opts.max_sidecar_bytes)
        sample = {"__key__": item.key, "mp4": data, "json": record, "txt": caption, **refs}
        entry = {"key": item.key, "source": item.video, **facts, "input": fp,
                 "provenance": provenance, "controls": sample_controls(record, len(refs))}
        return {"ok": True, "key": item.key, "sample": sample, "entry": entry}
    except BadInput as exc:
        return {"ok": False, "key": item.key, "path": item.video, "reason": exc.reason, "message": exc.message}
    except RecursionError:  # a structure too deep to encode; never the run's end
        return {"ok": False, "key": item.key, "path": item.video, "reason": "bad_json",
                "message": "annotations nested too deeply to store"}


def _pattern_regex(pattern: str) -> re.Pattern:
    """``"shard-{:06d}.tar"`` -> a regex matching the names it produces."""
    parts = [re.escape(lit) + (r"\d+" if fld is not None else "") for lit, fld, _, _ in string.Formatter().parse(pattern)]
    return re.compile("".join(parts))


def _ordered_results(fn: Callable, items: list, processes: int, window: int,
                     on_crash: Callable[[object], dict]) -> Iterator[dict]:
    """``fn(item)`` for every item in worker processes, results in input order, at most
    ``window`` in flight (so a slow writer never piles up decoded videos in memory).

    A worker that dies (a native decoder crash on a hostile file) must not hang or kill the
    run: everything that was in flight is re-run alone in a fresh process, the item whose
    process dies again gets ``on_crash(item)``, and a new pool carries on. ``processes=0``
    runs in this process (debugging; no crash protection).
    """
    if processes <= 0:
        yield from map(fn, items)
        return
    import multiprocessing as mp
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context()
    it = iter(items)
    pending: deque = deque()
    pool = ProcessPoolExecutor(processes, mp_context=ctx)

    def refill() -> None:
        while len(pending) < window:
            item = next(it, None)
            if item is None:
                return
            try:
                future = pool.submit(fn, item)
            except BrokenProcessPool as exc:  # a worker died since the last result came back:
                future = Future()  # handled like the others when this item's turn comes
                future.set_exception(exc)
            pending.append((item, future))

    def isolated(item) -> dict:
        with ProcessPoolExecutor(1, mp_context=ctx) as one:
            try:
                return one.submit(fn, item).result()
            except BrokenProcessPool:
                return on_crash(item)

    try:
        refill()
        while pending:
            item, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                suspects = [item] + [i for i, _ in pending]
                pending.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                log.warning("make_shards: a worker process died; re-checking %d inputs one by one", len(suspects))
                yield from map(isolated, suspects)
                pool = ProcessPoolExecutor(processes, mp_context=ctx)
                refill()
                continue
            yield result
            refill()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _crashed(item: SourceItem) -> dict:
    return {"ok": False, "key": item.key, "path": item.video, "reason": "decoder_crash",
            "message": "the process validating this file died (native decoder crash)"}


class _Prepare:  # picklable partial for the pool
    def __init__(self, opts: IngestOptions):
        self.opts = opts

    def __call__(self, item: SourceItem) -> dict:
        return prepare(item, self.opts)


def make_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_count: int | None = None,
    max_bytes: int | None = None,
    pattern: str = "shard-{:06d}.tar",
    processes: int = 1,
    options: IngestOptions | None = None,
    resume: bool = True,
    exclude: OptOut | None = None,
    select: Callable[[list[SourceItem]], list[SourceItem]] | None = None,
) -> dict:
    """Write shards for every input under ``source`` into ``out_dir``; return the manifest
    (``shards``, ``shard_counts``, ``shard_bytes``, ``samples`` with per-sample resolution /
    fps / num_frames / duration / ``provenance``, ``skipped`` inputs with path and reason,
    and the ``provenance`` summary). Inputs on the ``exclude`` opt-out list are skipped as
    ``opted_out``, later copies of identical content as ``duplicate``. ``select`` picks the
    inputs this call writes from the full discovered list (keys stay those of the full list;
    its ``str()`` goes into the journal header): ``ingest_dist.Partition`` for a scaled-out run."""
    options = options or IngestOptions()
    if max_count is None and max_bytes is None:
        raise ValueError("give max_count (samples per shard) and/or max_bytes (bytes per shard)")
    if (max_count is not None and max_count < 1) or (max_bytes is not None and max_bytes < 1):
        raise ValueError("max_count and max_bytes must be >= 1")
    if options.reencode:  # before any work: an unknown encoder used to skip every input
        check_encoder(options.reencode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / JOURNAL, {"source": str(Path(source).resolve()), "pattern": pattern,
                                      "max_count": max_count, "max_bytes": max_bytes,
                                      "options": {**asdict(options), "limits": asdict(options.limits)},
                                      **({"select": str(select)} if select is not None else {})},
                      restart="--overwrite (make_shards(..., resume=False))")
    ours = _pattern_regex(pattern)
    records: list[dict] = []
    previous = journal.records() if resume else None
    items = discover(source, options.source_root)
    if select is not None:  # one partition of the inputs (data/ingest_dist.py)
        items = select(items)
    if previous is not None:
        complete = (out / MANIFEST).exists()
        for r in previous:  # keep journaled shards up to the first one that went missing
            if r.get("shard") is not None and not (out / r["shard"]).is_file():
                complete = False
                break
            records.append(r)
        kept, items, run = plan_rerun(records, items, complete)
        log.info("make_shards: %s", describe(run))
        if run["action"] == "nothing new":
            return {**json.loads((out / MANIFEST).read_text()), "run": run}
        keep = {r["shard"] for r in kept if r.get("shard")}
        if len(kept) != len(records) or any(a["bad"] != b["bad"] for a, b in zip(kept, records)):
            journal.rewrite(kept)  # first: a crash from here on resumes from the kept shards
        for name in os.listdir(out):  # the stale manifest, shards being redone
            if name == MANIFEST or (ours.fullmatch(name) and name not in keep):
                (out / name).unlink()
        records = kept
    else:
        run = {"action": "fresh", "new": len(items), "changed": 0, "retried": 0, "redone_shards": 0, "gone": []}
        existing = [n for n in os.listdir(out) if n == MANIFEST or n.endswith(".tar")]
        if existing and resume:
            raise ValueError(f"{out} already holds {existing[:3]}... not written by worldline-shards; "
                             f"choose an empty folder, or pass --overwrite (make_shards(..., "
                             f"resume=False)) to replace our own files there")
        for name in os.listdir(out):
            if name in (MANIFEST, JOURNAL) or ours.fullmatch(name):
                (out / name).unlink()
        journal.start()
    remove_partial_shards(out)  # of an interrupted run
    log.info("make_shards: %d inputs to do, %d shards kept from a previous run", len(items),
             sum(1 for r in records if r.get("shard")))

    # What the open shard holds, and the inputs reported bad since the last journal record.
    entries: list[dict] = []
    bad: list[dict] = []

    def append_record(record: dict) -> None:
        journal.append(record)
        records.append(record)
        entries.clear()
        bad.clear()

    def closed(shard: ClosedShard) -> None:
        append_record({"shard": shard.name, "count": shard.count, "bytes": shard.bytes,
                       "entries": list(entries), "bad": list(bad)})

    screen = IngestScreen(exclude, [e for r in records for e in r["entries"]])
    results = _ordered_results(_Prepare(options), items, processes, 4 * max(1, processes), _crashed)
    with ShardWriter(out, pattern, max_count=max_count, max_bytes=max_bytes,
                     start=sum(1 for r in records if r.get("shard")),
                     on_close=closed) as writer:
        for result in results:
            if not result["ok"]:
                log.warning("make_shards: skipping %s: %s %s", result["path"], result["reason"], result["message"])
                bad.append({**{k: result[k] for k in ("key", "path", "reason", "message")},
                            "input": stat_fingerprint(result["path"])})
                continue
            refused = screen.check(result["key"], result["entry"]["source"], result["entry"]["provenance"])
            if refused is not None:
                log.warning("make_shards: skipping %s: %s %s", result["entry"]["source"], *refused)
                bad.append({"key": result["key"], "path": result["entry"]["source"],
                            "reason": refused[0], "message": refused[1],
                            "input": result["entry"]["input"]})
                continue
            shard = writer.write(result["sample"])
            entries.append({**result["entry"], "shard": shard})
    if bad:
        append_record({"shard": None, "count": 0, "bytes": 0, "entries": [], "bad": list(bad)})

    shards = [r for r in records if r.get("shard")]
    entries_all = [e for r in shards for e in r["entries"]]
    skipped = [b for r in records for b in r["bad"]]
    return write_manifest(
        out, [r["shard"] for r in shards], [r["count"] for r in shards], entries_all,
        pattern=pattern, shard_bytes=[r["bytes"] for r in shards], skipped=skipped,
        provenance=summarize_manifest(entries_all, skipped), run=run,
    )
