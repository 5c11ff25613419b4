"""Codec I/O: uint8 frames <-> in-memory mp4 bytes, clip sampling, resize/crop, previews.

Encoding uses PyAV (libx264 by default; mpeg4, libvpx-vp9 and libx265 work too), decoding uses
decord on in-memory bytes, because decord is what the loader workers use (random-access
``get_batch``, no temp files).

Frame-exact decoding. Frame ``i`` of a video is the ``i``-th frame a full FFmpeg decode
outputs, and a clip holds exactly those frames. decord seeks to the keyframe before a frame and
counts decoded frames from there, which is exact only for closed GOPs: in an open-GOP stream
(x264 ``open-gop=1``, x265's default CRA keyframes) the frames that follow a keyframe in
decode order but are shown before it (leading pictures) cannot be decoded from it, the count
slips, and decord returns later frames than asked (``tests/test_data_frame_exact.py``, keyint
8, 40 frames: 20 of 40 single-frame reads wrong for x264, 16 of 40 for x265; 8-frame clips at
``center`` all 8 frames 2-3 late) while the actions taken at the asked indices belong to other
frames. ``probe_video`` finds such streams from the
container's sample tables (a keyframe followed by a frame shown before it: ``open_gop``,
decode-free) and ``open_reader`` sends them to ``ExactReader``: PyAV, seeking to the last
keyframe shown at or before the first wanted frame and picking frames by presentation time,
never by count (~35-45 ms for a 16-frame 256x256 clip of a 300-frame file, decord on the same
file closed-GOP ~90-100 ms: only the GOP before the clip is decoded). Its index of presentation
times comes from demuxing every packet on each open (~8 us a packet: 5 ms for 300 frames, 25 ms
for 3,000), so very long open-GOP files pay that per clip. Closed-GOP files (B-frames
included), VFR and every frame rate go through decord as before. Ingest records the flag in
each sample's ``meta.open_gop``; the loader re-derives it, so older shards are read exactly too.

Clip sampling. A clip is ``num_frames`` frames taken either every ``stride`` source frames or
at a target ``fps`` resampled from the source's per-frame timestamps (so variable-frame-rate
video is sampled in real time, not in frame counts; frames repeat when the target rate is
above the source's). Resampled windows start on a frame, and a frame counts as shown at a
sample time it starts up to 1/8 frame after, so timestamps rounded by the container (mkv/webm
milliseconds: 24 fps frames at 0, 42, 83 ms) still give every frame at ``fps`` = the source
rate (before: ``[0, 1, 1, 3, 4, 4, ...]``). ``position`` places the window at the ``start``, the ``center`` or a
``random`` point. A video shorter than the window raises ``ClipTooShortError``; the loader
counts that as ``too_short`` (or, with buckets, routes the video to a shorter bucket).

Odd frame sizes: H.264 in yuv420p subsamples chroma 2x2, so x264 rejects odd widths/heights
and the bitstream cannot crop by a single pixel. With the default ``pix_fmt="yuv420p"`` we
therefore pad the right column / bottom row by edge replication up to the next even size, so
an ``[T, 45, 63, 3]`` clip decodes as ``[T, 46, 64, 3]`` whose top-left ``45x63`` is the clip.
The loader's resize + crop absorbs the extra pixel. Pass ``pix_fmt="yuv444p"`` to keep odd
sizes exactly (libx264, libx265, libvpx-vp9; valid, but some players cannot show 4:4:4).

Tiny CPU example::

    frames = np.zeros((8, 64, 64, 3), np.uint8)
    mp4 = encode_mp4(frames, fps=8.0)
    clip, idx = decode_clip(mp4, num_frames=4, stride=2)          # [4, 64, 64, 3], [0, 2, 4, 6]
    clip, idx = decode_clip(mp4, num_frames=4, fps=4.0)           # same frames, chosen by time
    out, scale, _ = resize_crop(clip, (32, 48))                   # uint8 [4, 32, 48, 3]
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from worldline.data.atomic import atomic_write_bytes
from worldline.data.scheduling import keep_scheduling

POSITIONS = ("start", "center", "random")
CROPS = ("center", "random")
# Loader default for ``resize_crop(max_crop=)``: a crop may remove at most a quarter of a
# side; beyond that the clip is letterboxed rather than losing what was at its edges.
DEFAULT_MAX_CROP = 0.25

# Float slack when matching sample times to frame timestamps (timestamps are in seconds).
_TIME_EPS = 1e-6


class ClipTooShortError(ValueError):
    """The video has fewer frames (or less time) than the requested window."""


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("cannot encode a video with 0 frames")
    return frames


def _codec_options(codec: str, crf: int, preset: str) -> dict[str, str]:
    # One thread per encoder: clips are small and shard writing parallelises over clips.
    if codec == "libx264":
        return {"crf": str(crf), "preset": preset, "threads": "1"}
    if codec == "libx265":
        return {"crf": str(crf), "preset": preset,
                "x265-params": "log-level=error:pools=1:frame-threads=1"}
    if codec == "libvpx-vp9":  # constant quality (b=0), fast realtime encoding
        return {"crf": str(min(63, crf + 14)), "b": "0", "deadline": "realtime",
                "cpu-used": "8", "threads": "1"}
    return {}


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
    *,
    pix_fmt: str = "yuv420p",
    preset: str = "veryfast",
    timestamps: Sequence[float] | None = None,
    bit_rate: int | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    audio_codec: str = "aac",
) -> bytes:
    """Encode uint8 frames ``[T, H, W, 3]`` (RGB) into mp4 bytes, entirely in memory.

    ``timestamps`` (seconds, one per frame, increasing) writes a variable-frame-rate file with
    those presentation times (millisecond time base); otherwise frames are ``1 / fps`` apart.
    With a 4:2:0 ``pix_fmt`` odd sizes are padded to even by edge replication (module
    docstring). Codecs without CRF (``mpeg4``) get ``bit_rate`` (default ~1 bit per pixel·s).

    ``audio`` (float32 mono ``[N]`` in [-1, 1], sample ``j`` at ``j / audio_rate`` s) adds an
    ``audio_codec`` (AAC) track that starts at time 0 with the video; FFmpeg's mp4 muxer
    writes an edit list for the AAC encoder delay, so decoders see sample 0 at time 0.
    Without ``audio`` the output is exactly what it was before audio existed.
    """
    frames = _check_frames(frames)
    if audio is not None:
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or not np.isfinite(audio).all() or audio_rate <= 0:
            raise ValueError(f"audio must be finite float32 mono [N] and audio_rate > 0, got "
                             f"{audio.dtype} {audio.shape} at {audio_rate} Hz")
        audio = np.clip(audio, -1.0, 1.0)
    if pix_fmt.startswith(("yuv420", "nv12")):
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    if timestamps is not None:
        pts = np.round(np.asarray(timestamps, np.float64) * 1000).astype(np.int64)
        if pts.shape != (len(frames),) or (np.diff(pts) <= 0).any():
            raise ValueError("timestamps must be one increasing value (ms-distinct) per frame")
    _, height, width, _ = frames.shape
    buf = io.BytesIO()
    with keep_scheduling(), av.open(buf, mode="w", format="mp4") as container:
        # limit_denominator keeps NTSC rates (29.97 -> 30000/1001) exact and others small.
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        options = _codec_options(codec, crf, preset)
        if options:
            stream.options = options
        else:
            stream.bit_rate = bit_rate or max(200_000, int(height * width * fps))
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        sound = _AudioTrack(container, audio, audio_rate, audio_codec) if audio is not None else None
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if timestamps is not None:
                video_frame.pts, video_frame.time_base = int(pts[i]), Fraction(1, 1000)
            container.mux(stream.encode(video_frame))
            if sound is not None:  # interleave: audio up to this frame's end
                sound.write_until(pts[i + 1] / 1000 if timestamps is not None and i + 1 < len(frames)
                                  else (i + 1) / fps)
        container.mux(stream.encode())  # flush delayed (B-)frames
        if sound is not None:
            sound.close()
    return buf.getvalue()


class _AudioTrack:
    """A mono audio track of ``encode_mp4``, written in pieces between video frames so the
    muxer's interleaving queue stays short. PyAV re-chunks frames to the encoder's frame size
    and converts to its sample format (planar float for AAC, s16 for FLAC)."""

    def __init__(self, container, audio: np.ndarray, rate: int, codec: str):
        self.container, self.audio, self.rate, self.done = container, audio, int(rate), 0
        self.stream = container.add_stream(codec, rate=self.rate)
        self.stream.layout = "mono"

    def write_until(self, seconds: float | None) -> None:
        end = len(self.audio) if seconds is None else min(len(self.audio), int(round(seconds * self.rate)))
        if end <= self.done:
            return
        frame = av.AudioFrame.from_ndarray(self.audio[None, self.done : end], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.done, Fraction(1, self.rate)
        self.container.mux(self.stream.encode(frame))
        self.done = end

    def close(self) -> None:
        self.write_until(None)
        self.container.mux(self.stream.encode())  # flush the encoder's delay


def clip_indices(
    length: int,
    num_frames: int,
    stride: int = 1,
    position: str = "start",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices ``[num_frames]`` of a strided window inside a video of ``length`` frames.

    The window spans ``(num_frames - 1) * stride + 1`` frames. ``position="random"`` draws the
    start from ``rng`` (a fresh unseeded generator when ``None``, i.e. not reproducible).
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    span = (num_frames - 1) * stride + 1
    if length < span:
        raise ClipTooShortError(
            f"video too short: has {length} frames, needs {span} "
            f"(num_frames={num_frames}, stride={stride})"
        )
    if position == "start":
        start = 0
    elif position == "center":
        start = (length - span) // 2
    else:
        start = int((rng or np.random.default_rng()).integers(0, length - span + 1))
    return start + stride * np.arange(num_frames, dtype=np.int64)


def resample_indices(
    timestamps: np.ndarray,
    num_frames: int,
    fps: float,
    position: str = "start",
    rng: np.random.Generator | None = None,
    end: float | None = None,
    return_start: bool = False,
) -> np.ndarray | tuple[np.ndarray, float]:
    """Indices ``[num_frames]`` of the frames shown at times ``t0 + k / fps`` (with
    ``return_start``: ``(indices, t0)``, the window's first sample time in seconds).

    ``timestamps``: presentation time (seconds) of each frame, increasing; frame ``i`` is shown
    from ``timestamps[i]`` until the next frame (the last one until ``end``, default: its own
    start). So a VFR video is sampled by time, and a target rate above the source's repeats
    frames. All sample times must fall before ``end``: the video must last longer than the
    window's ``(num_frames - 1) / fps`` seconds.

    ``t0`` is the start of a frame (the one shown at the drawn start), and a frame counts as
    shown at ``t`` if it starts up to ``_slack(timestamps)`` (1/8 of the median frame step)
    after it: timestamps are quantised by the container (mkv/webm store milliseconds, so 24 fps
    frames start at 0, 42, 83 ms, not k/24 s), and without both a target equal to the source
    rate would repeat one frame and drop the next. With them it returns every frame.
    """
    if num_frames < 1 or not fps > 0:
        raise ValueError(f"num_frames must be >= 1 and fps > 0, got {num_frames}, {fps}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    ts = np.asarray(timestamps, np.float64)
    if len(ts) == 0:
        raise ClipTooShortError("video has no frames")
    slack = _slack(ts)
    # Last admissible start for the final sample: just before the last frame stops showing.
    last = float(end) - _TIME_EPS if end is not None and end > ts[-1] else float(ts[-1])
    span = (num_frames - 1) / fps
    room = last - float(ts[0]) - span
    if room < -slack - _TIME_EPS:
        raise ClipTooShortError(
            f"video too short: lasts {last - ts[0] + _TIME_EPS:.3f} s ({len(ts)} frames), needs "
            f"{span:.3f} s (num_frames={num_frames}, fps={fps:g})"
        )
    room = max(room, 0.0)
    if position == "start":
        offset = 0.0
    elif position == "center":
        offset = room / 2
    else:
        offset = float((rng or np.random.default_rng()).uniform(0.0, room)) if room > 0 else 0.0
    first = max(0, int(np.searchsorted(ts, ts[0] + offset + _TIME_EPS, side="right")) - 1)
    times = ts[first] + np.arange(num_frames) / fps
    idx = np.searchsorted(ts, times + slack + _TIME_EPS, side="right") - 1
    idx = np.clip(idx, 0, len(ts) - 1).astype(np.int64)
    return (idx, float(times[0])) if return_start else idx


def _slack(ts: np.ndarray) -> float:
    """How far after a sample instant a frame may start and still count as shown at it: 1/8
    of the median frame step, far above timestamp rounding (<= 1 ms) at any real frame rate
    and far below a frame, so VFR sampling keeps its meaning."""
    steps = np.diff(ts)
    steps = steps[steps > 0]
    return float(np.median(steps)) / 8 if len(steps) else 0.0


class ExactReader:
    """Frame-exact random access over PyAV, with the part of ``decord.VideoReader``'s interface
    that ``decode_clip`` uses (``len``, ``get_frame_timestamp``, ``get_avg_fps``, frames by
    index through ``read_frames``).

    Frame ``i`` is the ``i``-th presentation time among the stream's packets (what a full
    FFmpeg decode outputs as frame ``i``), found by its timestamp, never by counting: decoding
    starts at the last keyframe shown at or before the first wanted frame, steps back one
    keyframe if that one's leading pictures were among the wanted frames, and decodes from the
    start of the file as the last resort. For streams decord seeks inexactly (open GOP:
    module docstring), and frame sizes decord cannot copy out.
    """

    def __init__(self, data: bytes):
        self.data = data
        pts, keys, durations = [], [], []
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            self.time_base = float(stream.time_base)
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's flush packet
                if packet.pts is None:
                    raise ValueError("video packets without timestamps: no frame-exact access")
                pts.append(packet.pts)
                durations.append(packet.duration or 0)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        if not pts:
            raise ValueError("video stream has no packets")
        order = np.argsort(pts, kind="stable")
        self.pts = np.asarray(pts, np.int64)[order]
        self.keys = np.unique(np.asarray(keys, np.int64))
        steps = np.diff(self.pts)
        last = int(np.asarray(durations)[order][-1]) or (int(np.median(steps)) if len(steps) else 1)
        starts = self.pts * self.time_base
        self._times = np.stack([starts, np.append(starts[1:], (self.pts[-1] + last) * self.time_base)], 1)

    def __len__(self) -> int:
        return len(self.pts)

    def get_frame_timestamp(self, indices) -> np.ndarray:
        """``[len(indices), 2]`` (start, end) presentation times in seconds, as decord's."""
        return self._times[np.asarray(indices, np.int64)]

    def get_avg_fps(self) -> float:
        """Frames per second of presentation time."""
        return len(self) / max(float(self._times[-1, 1] - self._times[0, 0]), _TIME_EPS)

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """Frames ``indices`` (presentation order) as ``uint8 [T, H, W, 3]``."""
        wanted = {int(self.pts[int(i)]) for i in indices}
        first = min(wanted)
        starts = [int(k) for k in self.keys[self.keys <= first][::-1][:2]] + [None]
        for start in starts:
            got = self._decode(start, wanted)
            if len(got) == len(wanted):
                return np.stack([got[int(self.pts[int(i)])] for i in indices])
        missing = sorted(wanted - set(got))
        raise RuntimeError(f"frames at pts {missing[:4]} were never decoded")

    def _decode(self, start: int | None, wanted: set[int]) -> dict[int, np.ndarray]:
        last, got = max(wanted), {}
        with av.open(io.BytesIO(self.data)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # loader workers already decode clips in parallel
            if start is not None:
                container.seek(start, backward=True, any_frame=False, stream=stream)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if frame.pts in wanted:
                    got[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts >= last:
                    break
        return got


def open_reader(mp4: bytes, num_threads: int = 1):
    """decord's ``VideoReader`` on ``mp4``, or an ``ExactReader`` for a stream decord cannot
    seek exactly (``probe_video(...).open_gop``). An unprobeable file goes to decord, which
    reports its own error."""
    from worldline.data.probe import ProbeError, probe_video

    try:
        exact = probe_video(mp4).open_gop
    except ProbeError:
        exact = False
    if exact:
        return ExactReader(mp4)
    import decord  # lazy: decord is heavy and only needed where clips are decoded

    return decord.VideoReader(io.BytesIO(mp4), num_threads=num_threads)


def read_frames(reader, mp4: bytes, indices: np.ndarray, as_tensor: bool = False):
    """``reader.get_batch(indices)`` as ``uint8 [T, H, W, 3]``: a numpy array, or with
    ``as_tensor`` a torch tensor sharing decord's buffer through DLPack (no copy; the loader
    copies each clip exactly once, into its batch).

    decord 0.6 cannot copy out frames of a few small widths (a scan of 2..2100 px found 2-8,
    12, 16, 24, 48 and 72 px; it raises "DECORDArrayCopyFromTo: The size must exactly
    match"), so those clips fall back to a PyAV decode of the same frames (``ExactReader``,
    which is also what ``reader`` is for streams decord cannot seek exactly).
    """
    if isinstance(reader, ExactReader):
        frames = reader.frames(indices)
        if as_tensor:
            import torch

            return torch.from_numpy(frames)
        return frames
    try:
        batch = reader.get_batch(indices.tolist())
    except Exception as exc:  # decord's DECORDError is not importable as a stable name
        if "DECORDArrayCopyFromTo" not in str(exc):
            raise
        frames = ExactReader(mp4).frames(indices)
        if as_tensor:
            import torch

            return torch.from_numpy(frames)
        return frames
    if as_tensor:
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(batch.to_dlpack())
    return batch.asnumpy()


@dataclass(frozen=True)
class ClipTiming:
    """When a decoded clip happens, on the video's clock (decord's frame timestamps: seconds
    from the video stream's start). The clip covers ``[start, start + duration)``.

    ``start``: the first frame's presentation time (stride sampling) or the first sample
    instant ``t0`` of fps resampling (frame ``k`` of the clip is the frame shown at ``t0 +
    k / fps``; ``t0`` is the first frame's presentation time: resampled windows start on a frame).
    ``frame_rate``: clip frames per second, ``fps`` when resampling by time, else the
    source's average rate divided by the stride. ``times``: each clip frame's presentation time.
    """

    start: float
    frame_rate: float
    times: np.ndarray
    num_frames: int

    @property
    def duration(self) -> float:
        """Seconds the clip stands for: ``num_frames / frame_rate``."""
        return self.num_frames / self.frame_rate


def decode_clip(
    mp4: bytes,
    num_frames: int,
    stride: int = 1,
    position: str = "start",
    rng: np.random.Generator | None = None,
    *,
    fps: float | None = None,
    num_threads: int = 1,
    as_tensor: bool = False,
    return_timing: bool = False,
):
    """Decode a ``num_frames`` clip from video bytes with decord (from memory, no temp file).

    Frames are ``stride`` apart, or sampled at ``fps`` from the frame timestamps when given.
    Returns ``(frames uint8 [T, H, W, 3], source frame indices int64 [T])``, plus a
    ``ClipTiming`` with ``return_timing`` (what the matching audio window needs); frames are
    numpy, or a torch tensor viewing decord's buffer with ``as_tensor``. Raises
    ``ClipTooShortError`` (a ``ValueError``) when the video is shorter than the window and
    ``RuntimeError`` (decord's) if it cannot be decoded. ``num_threads=1`` by default because
    loader workers already parallelise across clips.
    """
    if len(mp4) == 0:
        raise ValueError("empty mp4 (0 bytes)")
    reader = open_reader(mp4, num_threads)
    if fps is None:
        indices = clip_indices(len(reader), num_frames, stride, position, rng)
    else:
        times = reader.get_frame_timestamp(np.arange(len(reader)))  # [N, 2] start, end (s)
        indices, t0 = resample_indices(times[:, 0], num_frames, fps, position, rng, end=times[-1, 1],
                                       return_start=True)
    frames = read_frames(reader, mp4, indices, as_tensor)
    if not return_timing:
        return frames, indices
    shown = np.asarray(reader.get_frame_timestamp(indices.tolist()), np.float64)[:, 0]
    if fps is None:
        rate = float(reader.get_avg_fps())
        if not rate > 0:  # no usable average rate in the headers: the first frame's duration
            first = reader.get_frame_timestamp([int(indices[0])])[0]
            rate = 1.0 / max(float(first[1] - first[0]), _TIME_EPS)
        timing = ClipTiming(float(shown[0]), rate / stride, shown, num_frames)
    else:
        timing = ClipTiming(t0, float(fps), shown, num_frames)
    return frames, indices, timing


def resize_crop(
    frames,
    size: tuple[int, int],
    crop: str = "center",
    rng: np.random.Generator | None = None,
    max_crop: float = 1.0,
):
    """Aspect-preserving resize into ``size``, cropping at most ``max_crop`` of each side's
    extent and letterboxing (black bars) the rest.

    ``max_crop=1`` is the classic resize-to-cover + crop: a portrait clip in a square bucket
    loses its top and bottom, and whatever was there (a controlled object, a face) is gone
    from training. ``max_crop=0`` fits the whole frame inside the bucket. In between, the
    resize covers the bucket when that crops no more than ``max_crop`` of the resized
    width/height, else it shrinks until the crop is exactly ``max_crop`` and pads the other
    axis. ``crop`` (center/random) places the crop window; padding is always centred.

    ``frames`` uint8 ``[T, h, w, 3]`` (numpy or torch) -> ``(uint8 tensor [T, H, W, 3] (a
    view, maybe strided, unless padded), scale, (top, left))``: ``scale`` maps source to
    output pixels and ``(top, left)`` is the output's corner in the resized frame (negative
    when padded). Frames stay uint8 throughout: torch's uint8 bilinear+antialias kernel runs
    on the channels-last layout decord already produces, about 10x faster than a float round
    trip. No resampling at all when only the aspect differs within the bound.
    """
    import torch
    import torch.nn.functional as F

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if not 0.0 <= max_crop <= 1.0:
        raise ValueError(f"max_crop must be in [0, 1] (fraction of a side a crop may remove), got {max_crop}")
    out_h, out_w = size
    _, h, w, _ = frames.shape
    video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    scale = max(out_h / h, out_w / w)
    if max_crop < 1.0:
        # Largest scale whose crop removes at most max_crop of the resized extent per axis
        # (each bound is >= the fit-inside scale, so the frame never shrinks below a fit).
        keep = 1.0 - max_crop
        scale = min(scale, out_h / (h * keep), out_w / (w * keep))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if max_crop >= 1.0:  # cover: never a pixel short of the bucket
        new_h, new_w = max(out_h, new_h), max(out_w, new_w)
    if (new_h, new_w) == (h, w):
        scale = 1.0
    over_h, over_w = max(0, new_h - out_h), max(0, new_w - out_w)
    if crop == "center":
        top, left = over_h // 2, over_w // 2
    else:
        rng = rng or np.random.default_rng()
        top, left = int(rng.integers(0, over_h + 1)), int(rng.integers(0, over_w + 1))
    if (new_h, new_w) != (h, w):
        x = video.permute(0, 3, 1, 2)  # [T, 3, h, w] view, channels-last strides
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        video = x.permute(0, 2, 3, 1)
    video = video[:, top : top + out_h, left : left + out_w]
    pad_h, pad_w = out_h - video.shape[1], out_w - video.shape[2]
    if pad_h or pad_w:
        boxed = torch.zeros((video.shape[0], out_h, out_w, video.shape[3]), dtype=video.dtype)
        boxed[:, pad_h // 2 : pad_h // 2 + video.shape[1], pad_w // 2 : pad_w // 2 + video.shape[2]] = video
        video, top, left = boxed, top - pad_h // 2, left - pad_w // 2
    return video, scale, (top, left)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, **kwargs) -> None:
    """Write uint8 frames ``[T, H, W, 3]`` to an mp4 file (atomically: tmp file + rename);
    ``kwargs`` go to ``encode_mp4`` (``audio=``, ``audio_rate=`` add a sound track)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_mp4(frames, fps, **kwargs))


def write_contact_sheet(
    path: str | os.PathLike, videos: np.ndarray, max_frames: int = 8, gap: int = 2
) -> None:
    """Save a PNG grid: one row per video, ``max_frames`` evenly spaced frames as columns.

    ``videos``: uint8 ``[N, T, H, W, 3]`` or a single ``[T, H, W, 3]``. Tiles are separated
    by ``gap`` white pixels so adjacent frames stay distinguishable.
    """
    videos = np.asarray(videos)
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3], got {videos.dtype} {videos.shape}")
    n, t, h, w, _ = videos.shape
    cols = np.unique(np.linspace(0, t - 1, min(max_frames, t)).round().astype(int))
    sheet = np.full(
        (n * h + (n - 1) * gap, len(cols) * w + (len(cols) - 1) * gap, 3), 255, np.uint8
    )
    for row in range(n):
        for col, frame_idx in enumerate(cols):
            y, x = row * (h + gap), col * (w + gap)
            sheet[y : y + h, x : x + w] = videos[row, frame_idx]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
