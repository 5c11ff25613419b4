"""Decode-free video facts from container headers, and the sanity limits checked on them.

Why a hand-written ISO-BMFF (mp4/mov) box walk instead of PyAV: opening a container with
FFmpeg (``av.open``) runs ``avformat_find_stream_info``, which may decode frames, costs ~0.7 ms
per clip (≈8 % of a whole small-clip decode in the loader) and is exactly what a hostile file
with absurd dimensions should never reach. Reading ``tkhd``/``stsd``/``mdhd``/``stts`` (plus
``ctts``/``stss`` for the timing below: 0.5-0.6 ms for a 300- or 3000-frame B-frame mp4 on a
loaded 2-core machine, 0.1-0.2 ms before) lets the loader reject a file *before* any decoder
allocates frames. Anything that is not ISO-BMFF (webm, mkv, avi) and fragmented mp4 without
sample tables fall back to a PyAV probe, which demuxes (never decodes) the packets for timing.

What is checked: the boxes are well formed and complete (a cut file is ``truncated_video``),
a video track exists (else ``not_video``), its sample tables agree with each other and stay
inside the file (else ``corrupt_video``: decord 0.6 segfaults on some such files), and the
declared size and frame count are within ``VideoLimits`` (else ``absurd_dimensions``). Not
checked: a bitstream whose own parameter sets (e.g. an H.264 SPS) disagree with the container
header, or damage inside the compressed frames (the decoder reports that as an error).

Timing is measured from the frame timestamps, not taken from a declared rate (``_timing``):
``vfr`` is set only when the presentation-time steps differ by more than the timestamps'
own precision (one tick of the time base, at least 1 ms: mkv/webm store milliseconds, so a
24 fps file steps 41, 42, 42 ms and is still constant-rate), and ``fps`` of a constant-rate
file is the simplest rate (integer or NTSC ``k/1.001``) those timestamps allow (24, not
24.004). ``open_gop`` marks a stream where a keyframe is followed, in decode order, by frames
shown before it (open-GOP x264/x265 leading pictures): decoding from such a keyframe cannot
produce them, so decord's seek-then-count returns later frames than asked and
``video.decode_clip`` reads these files with its exact PyAV reader instead.

Tiny CPU example::

    from worldline.data.video import encode_mp4
    info = probe_video(encode_mp4(np.zeros((8, 32, 48, 3), np.uint8), fps=8.0))
    # VideoInfo(height=32, width=48, num_frames=8, fps=8.0, duration=1.0, span=0.875, ...)
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["ProbeError", "VideoInfo", "VideoLimits", "probe_video", "probe_file", "is_iso_bmff"]

# FFmpeg demuxers of still images: an image renamed .mp4 opens as a "video" of one frame.
_IMAGE_FORMATS = {"image2", "gif", "apng", "webp", "ico"}

# Boxes whose payload is a list of boxes (the ones on the path to the sample tables).
_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf", b"mvex", b"edts"}
# Plausible first boxes of an ISO-BMFF file (mp4, mov, m4v, 3gp).
_TOP_LEVEL = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid",
              b"sidx", b"moof", b"mfra", b"meta", b"pdin", b"junk"}


class ProbeError(ValueError):
    """Header problem; ``reason`` is a loader ``stats`` counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on declared dimensions, checked before any decoding."""

    max_side: int = 8192
    max_pixels: int = 8192 * 8192
    max_frames: int = 1_000_000

    def check(self, info: "VideoInfo") -> None:
        h, w, n = info.height, info.width, info.num_frames
        if h <= 0 or w <= 0:
            raise ProbeError("absurd_dimensions", f"declared size {h}x{w}")
        if max(h, w) > self.max_side or h * w > self.max_pixels:
            raise ProbeError("absurd_dimensions",
                             f"declared size {h}x{w} exceeds max_side={self.max_side} / "
                             f"max_pixels={self.max_pixels}")
        if n > self.max_frames:
            raise ProbeError("absurd_dimensions", f"declares {n} frames > max_frames={self.max_frames}")


@dataclass(frozen=True)
class VideoInfo:
    """Container-level facts. ``span`` is the time from the first to the last frame's start
    (what a clip sampled at a target fps must fit in); ``vfr`` marks frame durations that
    differ beyond the timestamps' precision; ``open_gop`` marks a stream that decord cannot
    seek exactly (keyframes with leading frames: module docstring)."""

    height: int
    width: int
    num_frames: int
    fps: float
    duration: float
    span: float
    vfr: bool = False
    codec: str = ""
    container: str = "mp4"
    # Display geometry (mp4/mov only): clockwise degrees the track matrix (tkhd) turns the
    # frame by when shown, and the pixel aspect ratio (pasp). Decoders (decord) ignore both,
    # so ingest re-encodes such files upright with square pixels (``transcode``).
    rotation: int = 0
    sar: Fraction = Fraction(1)
    open_gop: bool = False


def is_iso_bmff(data: bytes) -> bool:
    """Whether ``data`` starts like an mp4/mov (a known top-level box with a sane size)."""
    if len(data) < 8:
        return False
    size = struct.unpack_from(">I", data, 0)[0]
    return data[4:8] in _TOP_LEVEL and (size in (0, 1) or size >= 8)


def _boxes(buf: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """``(type, payload_start, box_end)`` of the boxes in ``buf[start:end]``."""
    off = start
    while off < end:
        if end - off < 8:
            raise ProbeError("truncated_video", f"{end - off} stray bytes at offset {off}")
        size, kind = struct.unpack_from(">I4s", buf, off)
        header = 8
        if size == 1:  # 64-bit size follows the type
            if end - off < 16:
                raise ProbeError("truncated_video", f"box {kind!r} cut inside its header")
            size, header = struct.unpack_from(">Q", buf, off + 8)[0], 16
        elif size == 0:  # extends to the end of the enclosing box
            size = end - off
        if size < header:
            raise ProbeError("not_video", f"box {kind!r} at {off} has impossible size {size}")
        if off + size > end:
            raise ProbeError("truncated_video",
                             f"box {kind.decode('latin-1')!r} at {off} needs {size} bytes, "
                             f"{end - off} left")
        yield kind, off + header, off + size
        off += size


def _children(buf: bytes, payload: int, end: int) -> dict[bytes, list[tuple[int, int]]]:
    out: dict[bytes, list[tuple[int, int]]] = {}
    for kind, p, e in _boxes(buf, payload, end):
        out.setdefault(kind, []).append((p, e))
    return out


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProbeError("not_video", f"malformed {what} box")


def _video_track(buf: bytes, trak: tuple[int, int]) -> dict | None:
    """Header fields of ``trak`` if it is a video track, else ``None``."""
    kids = _children(buf, *trak)
    mdia = kids.get(b"mdia")
    if not mdia:
        return None
    mdia_kids = _children(buf, *mdia[0])
    hdlr = mdia_kids.get(b"hdlr")
    if not hdlr or hdlr[0][1] - hdlr[0][0] < 12 or buf[hdlr[0][0] + 8 : hdlr[0][0] + 12] != b"vide":
        return None
    track: dict = {"height": 0, "width": 0}
    if b"tkhd" in kids:  # presentation size, 16.16 fixed point, last 8 bytes
        p, e = kids[b"tkhd"][0]
        _need(e - p >= 84, "tkhd")
        w, h = struct.unpack_from(">II", buf, e - 8)
        track.update(width=w >> 16, height=h >> 16, rotation=_matrix_rotation(buf, e - 44))
    p, e = mdia_kids.get(b"mdhd", [(0, 0)])[0]
    _need(e - p >= 24, "mdhd")
    if buf[p] == 1:
        _need(e - p >= 36, "mdhd")
        timescale, duration = struct.unpack_from(">IQ", buf, p + 20)
    else:
        timescale, duration = struct.unpack_from(">II", buf, p + 12)
    track.update(timescale=timescale, media_duration=duration, deltas=[], codec="")
    minf = mdia_kids.get(b"minf")
    stbl = _children(buf, *minf[0]).get(b"stbl") if minf else None
    if not stbl:
        return track
    tables = _children(buf, *stbl[0])
    if b"stsd" in tables:  # first VisualSampleEntry: coded size at fixed offsets
        p, e = tables[b"stsd"][0]
        _need(e - p >= 8 + 36, "stsd")
        track["codec"] = buf[p + 12 : p + 16].decode("latin-1")
        sw, sh = struct.unpack_from(">HH", buf, p + 8 + 32)
        track["sar"] = _pasp(buf, p + 8, e)
        # Trust the larger of the two declarations: the check is about what may be allocated.
        track.update(width=max(track["width"], sw), height=max(track["height"], sh))
    if b"stsz" in tables:  # sample sizes: one uniform size, or a table
        p, e = tables[b"stsz"][0]
        _need(e - p >= 12, "stsz")
        uniform, count = struct.unpack_from(">II", buf, p + 4)
        if uniform:
            track["sizes"] = (count, uniform, uniform * count)
        else:
            _need(e - p >= 12 + 4 * count, "stsz")
            sizes = np.frombuffer(buf, ">u4", count, p + 12)
            track["sizes"] = (count, int(sizes.max(initial=0)), int(sizes.sum(dtype=np.int64)))
    for kind, width in ((b"stco", 4), (b"co64", 8)):  # chunk offsets into the file
        if kind in tables:
            p, e = tables[kind][0]
            _need(e - p >= 8, kind.decode())
            count = struct.unpack_from(">I", buf, p + 4)[0]
            _need(e - p >= 8 + width * count, kind.decode())
            offsets = np.frombuffer(buf, f">u{width}", count, p + 8)
            track["max_offset"] = int(offsets.max(initial=0))
    if b"stts" in tables:  # run-length coded sample durations in decode order
        p, e = tables[b"stts"][0]
        _need(e - p >= 8, "stts")
        count = struct.unpack_from(">I", buf, p + 4)[0]
        _need(e - p >= 8 + 8 * count, "stts")
        track["deltas"] = [struct.unpack_from(">II", buf, p + 8 + 8 * i) for i in range(count)]
    if b"ctts" in tables:  # composition offsets (B-frames): pts = dts + offset, run-length coded
        p, e = tables[b"ctts"][0]
        _need(e - p >= 8, "ctts")
        count = struct.unpack_from(">I", buf, p + 4)[0]
        _need(e - p >= 8 + 8 * count, "ctts")
        runs = np.frombuffer(buf, ">u4", 2 * count, p + 8).reshape(-1, 2)
        # Version 1 offsets are signed; version 0 ones are read as signed too, as FFmpeg does.
        track["ctts"] = (runs[:, 0].astype(np.int64), runs[:, 1].astype(np.uint32).view(np.int32).astype(np.int64))
    if b"stss" in tables:  # sync samples (keyframes), 1-based; absent: every sample is one
        p, e = tables[b"stss"][0]
        _need(e - p >= 8, "stss")
        count = struct.unpack_from(">I", buf, p + 4)[0]
        _need(e - p >= 8 + 4 * count, "stss")
        track["stss"] = np.frombuffer(buf, ">u4", count, p + 8).astype(np.int64) - 1
    return track


def _matrix_rotation(buf: bytes, off: int) -> int:
    """Clockwise degrees (0/90/180/270) of the tkhd matrix at ``off`` ({a, b, u, c, d, v, x, y,
    w}, 16.16 fixed point); what players (and ``ffmpeg``'s autorotate) turn the frame by."""
    a, b, _, c, d = struct.unpack_from(">iiiii", buf, off)
    turns = {(1, 0, 0, 1): 0, (0, 1, -1, 0): 90, (-1, 0, 0, -1): 180, (0, -1, 1, 0): 270}
    key = tuple(int(np.sign(x)) for x in (a, b, c, d))
    return turns.get(key, 0)  # skews and mirrors: shown as stored


def _pasp(buf: bytes, entry: int, end: int) -> Fraction:
    """Pixel aspect ratio of the VisualSampleEntry at ``entry`` (its ``pasp`` child; 1 if none).
    The entry's child boxes start after its 86-byte fixed part (78 + 8-byte header)."""
    size = struct.unpack_from(">I", buf, entry)[0]
    stop, off = min(end, entry + size), entry + 86
    while off + 16 <= stop:
        box, kind = struct.unpack_from(">I4s", buf, off)
        if box < 8:
            break
        if kind == b"pasp":
            h, v = struct.unpack_from(">II", buf, off + 8)
            return Fraction(h, v) if h and v else Fraction(1)
        off += box
    return Fraction(1)


def _fragment_frames(buf: bytes, top: dict[bytes, list[tuple[int, int]]]) -> int:
    """Sample count of a fragmented mp4 (sum of ``trun`` sample counts)."""
    n = 0
    for moof in top.get(b"moof", []):
        for traf in _children(buf, *moof).get(b"traf", []):
            for p, e in _children(buf, *traf).get(b"trun", []):
                _need(e - p >= 8, "trun")
                n += struct.unpack_from(">I", buf, p + 4)[0]
    return n


def _probe_iso(buf: bytes) -> VideoInfo | None:
    top = _children(buf, 0, len(buf))
    if b"moov" not in top:
        raise ProbeError("truncated_video" if b"mdat" in top else "not_video", "no moov box")
    tracks = [t for t in (_video_track(buf, tr) for tr in _children(buf, *top[b"moov"][0]).get(b"trak", []))
              if t is not None]
    if not tracks:
        raise ProbeError("not_video", "no video track")
    t = tracks[0]
    num_frames = sum(c for c, _ in t["deltas"])
    # Sample tables that point outside the file crash some demuxers (decord segfaults on a
    # corrupted stsz); they are cheap to check here, before anything reads samples.
    if "sizes" in t:
        count, largest, total = t["sizes"]
        if count != num_frames or largest > len(buf) or total > len(buf):
            raise ProbeError("corrupt_video", f"sample table: {count} samples for {num_frames} "
                             f"frames, largest {largest} B, total {total} B, file {len(buf)} B")
    if t.get("max_offset", 0) >= len(buf):
        raise ProbeError("corrupt_video", f"chunk offset {t['max_offset']} beyond the file ({len(buf)} B)")
    if num_frames == 0:
        frames = _fragment_frames(buf, top)
        if frames:  # fragmented: size is known, timing needs the PyAV probe
            return VideoInfo(t["height"], t["width"], frames, 0.0, 0.0, 0.0, codec=t["codec"],
                             rotation=t.get("rotation", 0), sar=t.get("sar", Fraction(1)))
        raise ProbeError("not_video", "video track has no samples")
    total = sum(c * d for c, d in t["deltas"])
    scale = t["timescale"] or 1
    counts = np.array([c for c, _ in t["deltas"]], np.int64)
    steps = np.array([d for _, d in t["deltas"]], np.int64)
    dts = np.concatenate([[0], np.cumsum(np.repeat(steps, counts))[:-1]])
    pts = dts.copy()
    if "ctts" in t:
        runs, offsets = t["ctts"]
        offsets = np.repeat(offsets, runs)[:num_frames]
        if len(offsets) == num_frames:  # a short table is malformed: keep decode times
            pts = dts + offsets
    keys = t.get("stss")
    if keys is not None and (keys.min(initial=0) < 0 or keys.max(initial=0) >= num_frames):
        raise ProbeError("corrupt_video", f"sync sample table names samples outside 1..{num_frames}")
    fps, span, vfr, open_gop = _timing(pts, keys, 1.0 / scale, total / scale)
    return VideoInfo(t["height"], t["width"], num_frames, fps, total / scale, span, vfr, t["codec"],
                     rotation=t.get("rotation", 0), sar=t.get("sar", Fraction(1)),
                     open_gop=open_gop)


def _snap_rate(frames: int, span: float, tick: float, declared: float = 0.0) -> float:
    """``frames / span`` snapped to the simplest rate the timestamps allow (within the span's
    quantisation error, ``tick`` s at each end): the container's ``declared`` rate if they
    agree with it, else the nearer of the integer and the NTSC ``k / 1.001`` rate."""
    rate = frames / span
    slack = rate * 2 * tick / span + 1e-9
    if declared > 0 and abs(declared - rate) <= slack:
        return float(declared)
    candidate = min((round(rate), round(rate * 1.001) / 1.001), key=lambda r: abs(r - rate))
    return float(candidate) if candidate > 0 and abs(candidate - rate) <= slack else rate


def _timing(pts: np.ndarray, keys: np.ndarray | None, tick: float, duration: float,
            declared: float = 0.0) -> tuple[float, float, bool, bool]:
    """``(fps, span, vfr, open_gop)`` from per-frame presentation times ``pts`` (ticks of
    ``tick`` seconds, decode order) and the decode-order indices of the keyframes (``None``:
    every frame is one); ``duration`` (s) is the fallback rate's denominator, ``declared``
    the container's rate (used only where the timestamps agree with it)."""
    shown = np.sort(pts) if (np.diff(pts) < 0).any() else pts  # reordered by B-frames
    span = float(shown[-1] - shown[0]) * tick
    steps = np.diff(shown)
    # Timestamps are exact to a tick and (mkv/webm, or files muxed from them) to a millisecond.
    slack = max(1.0, 1e-3 / tick) if tick > 0 else 1.0
    vfr = bool(len(steps) > 1 and steps.max() - steps.min() > slack + 1e-9)
    if len(shown) > 1 and span > 0 and not vfr:
        fps = _snap_rate(len(shown) - 1, span, max(tick, 1e-3), declared)
    else:
        fps = len(shown) / duration if duration > 0 else 0.0
    open_gop = False
    if keys is not None and len(keys):
        # A frame after a keyframe (decode order) but shown before it: a leading picture.
        marker = np.full(len(pts), np.iinfo(np.int64).min, np.int64)
        marker[keys] = pts[keys]
        open_gop = bool((pts < np.maximum.accumulate(marker)).any())
    return fps, span, vfr, open_gop


def _probe_pyav(data: bytes | str, max_frames: int = VideoLimits.max_frames) -> VideoInfo:
    """Header facts through FFmpeg, timing from the packets' timestamps (demuxed, not decoded;
    at most ``max_frames + 1`` packets are read, enough to fail the frame-count limit)."""
    import av  # lazy: only non-mp4 containers get here

    try:
        with av.open(data if isinstance(data, str) else io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            cc = stream.codec_context
            n = stream.frames or 0
            duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
            if not duration and container.duration:
                duration = container.duration / av.time_base
            fmt = container.format.name.split(",")[0]
            if fmt in _IMAGE_FORMATS or fmt.endswith("_pipe"):
                raise ProbeError("image_not_video", f"a still image ({fmt}), not a video")
            tick = float(stream.time_base or 0)
            pts, keys, end = [], [], None
            for packet in container.demux(stream):
                if packet.size == 0 or len(pts) > max_frames:
                    continue  # flush packet / past the limit (the check below fails the file)
                if packet.pts is None:
                    pts = None
                    break
                if packet.is_keyframe:
                    keys.append(len(pts))
                pts.append(packet.pts)
                if packet.duration:
                    end = max(end or 0, packet.pts + packet.duration)
            if pts and tick > 0:  # measured: count, span, rate, VFR and open GOP
                ticks = np.array(pts, np.int64)
                if end is not None:
                    duration = max(duration, float(end - ticks.min()) * tick)
                fps, span, vfr, open_gop = _timing(ticks, np.array(keys, np.int64), tick, duration, rate)
                return VideoInfo(cc.height, cc.width, len(pts), fps, duration, span, vfr, cc.name, fmt,
                                 open_gop=open_gop)
            if not n and rate and duration:
                n = int(round(duration * rate))
            return VideoInfo(cc.height, cc.width, n, rate, duration,
                             max(0.0, duration - (1 / rate if rate else 0.0)), False, cc.name, fmt)
    except ProbeError:
        raise
    except (av.error.FFmpegError, IndexError, ValueError, TypeError) as exc:
        raise ProbeError("not_video", f"{type(exc).__name__}: {exc}") from None


def _probe(buf: bytes | mmap.mmap, source: bytes | str, limits: VideoLimits) -> VideoInfo:
    """The box walk of ``buf`` (mp4/mov), else or for fragmented mp4 FFmpeg's probe of
    ``source`` (the same bytes, or the file's path)."""
    info = None
    if is_iso_bmff(buf):
        try:
            info = _probe_iso(buf)
        except (struct.error, IndexError, UnicodeDecodeError) as exc:  # malformed, not cut
            raise ProbeError("not_video", f"malformed mp4 boxes: {exc}") from None
        limits.check(info)  # before any fallback can touch a decoder
        if info.fps > 0:
            return info
    full = _probe_pyav(source, limits.max_frames)
    if info is not None:  # fragmented mp4: keep the box-derived size and count
        full = VideoInfo(info.height, info.width, info.num_frames, full.fps, full.duration,
                         full.span, full.vfr, info.codec, "mp4", info.rotation, info.sar,
                         open_gop=full.open_gop)
    limits.check(full)
    return full


def probe_video(data: bytes, limits: VideoLimits | None = None) -> VideoInfo:
    """Header facts of video ``data`` (no frame is decoded for mp4/mov); raises ``ProbeError``
    with ``reason`` in ``empty_video | not_video | truncated_video | corrupt_video |
    absurd_dimensions | image_not_video``."""
    if len(data) == 0:
        raise ProbeError("empty_video", "0 bytes")
    return _probe(data, data, limits or VideoLimits())


def probe_file(path: str | os.PathLike, limits: VideoLimits | None = None) -> VideoInfo:
    """``probe_video`` of a file without reading it whole: an mp4/mov is memory-mapped, so
    only the pages of the boxes the walk touches (``moov``, box headers) are read; anything
    else is opened by FFmpeg from the path, which reads its header only. A junk or hostile
    file is refused before any caller reads its bytes. (A file truncated while mapped raises
    SIGBUS: ingest runs this in pool workers, whose death is reported as ``decoder_crash``.)"""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ProbeError("empty_video", "0 bytes")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _probe(buf, os.fspath(path), limits or VideoLimits())
        finally:
            try:
                buf.close()
            except BufferError:  # an array view of it lives on in a traceback; gc closes it
                pass
