"""Audio as a control signal: PyAV decoding of the audio window that goes with a video clip.

Clocks. ``start`` of a window is on the *video's clock*: seconds from the video stream's
start, i.e. what decord's ``get_frame_timestamp`` reports for a frame (decord subtracts the
video stream's ``start_time``; so does ``video.decode_clip(..., return_timing=True)``). Both
streams of one container share the container's clock, so a window at video time ``s`` is
audio media time ``video.start_time + s``. An audio stream starting later than the video
(``offset > 0``) leaves the first ``offset`` seconds uncovered (zeros, mask False).

Encoder delay. FFmpeg's mp4/mov demuxer applies the edit list and the AAC decoder drops the
priming samples it flags, so a decoded frame's ``pts`` is the media time of its first sample;
frames are placed by ``pts`` (not by counting samples), which also keeps gaps and a late
start in place. An AAC track written with a non-zero first pts (the muxer then writes an
empty edit of ``first_pts - 1024`` samples) decodes its 1024 priming samples as near-silence
just before the real start: its coverage begins one AAC frame early.

Cost. A window is decoded from a seek point ``_PREROLL`` seconds before it (AAC needs one
frame of context), never from 0, so a window late in a long or 192 kHz file costs what a
window at its start does. Each decoded frame is turned into packed float32 (PyAV 18 segfaults
resampling 8-channel audio to a planar layout), averaged to mono, then resampled to ``rate``
with ``av.AudioResampler`` (swresample keeps the first output sample at the first input
sample's time, so alignment survives the rate change).

Tiny CPU example::

    mp4 = encode_mp4(frames, fps=8.0, audio=np.zeros(16000, np.float32), audio_rate=16000)
    probe_audio(mp4)      # {'sample_rate': 16000, 'channels': 1, 'duration': 1.0, 'offset': 0.0, 'codec': 'aac'}
    pcm, mask = decode_audio_window(mp4, start=0.25, duration=0.5, rate=16000)   # [8000], [8000]
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from fractions import Fraction

import numpy as np

__all__ = ["AudioDecodeError", "probe_audio", "decode_audio_window", "load_audio_file", "window_samples"]

# Seconds decoded before a window after a seek: AAC overlaps frames (2048-sample MDCT), so the
# first frame decoded after a seek is wrong; 0.2 s covers several frames at any AAC rate.
_PREROLL = 0.2
# Source-rate context kept on both sides of the window so the resampling filter sees real
# neighbours at the edges (swresample's default filter is 32 taps at the lower rate).
_PAD = 0.02


class AudioDecodeError(ValueError):
    """An audio stream exists but cannot be decoded; the loader counts it as ``bad_audio``."""


def window_samples(duration: float, rate: int) -> int:
    """Samples in a ``duration``-second window at ``rate`` Hz: ``round(duration * rate)``."""
    return int(round(duration * rate))


def _seconds(value, time_base) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _video_start(container) -> float:
    """Start time (s) of the first video stream: the origin of the video clock (0 if none)."""
    if not container.streams.video:
        return 0.0
    v = container.streams.video[0]
    return _seconds(v.start_time, v.time_base) or 0.0


def probe_audio(data: bytes) -> dict | None:
    """Facts of the first audio stream of in-memory file bytes, from the headers (nothing is
    decoded): ``sample_rate`` (Hz), ``channels``, ``duration`` (s), ``offset`` (audio start
    minus video start, s) and ``codec``; None if there is no audio stream. Raises
    ``AudioDecodeError`` if the container cannot be opened."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                return None
            a = container.streams.audio[0]
            cc = a.codec_context
            a_start = _seconds(a.start_time, a.time_base) or 0.0
            duration = _seconds(a.duration, a.time_base)
            if duration is None and container.duration is not None:
                duration = container.duration / 1_000_000 - a_start  # av.time_base is 1/1e6
            return {"sample_rate": int(cc.sample_rate or a.rate or 0), "channels": int(cc.channels or 0),
                    "duration": float(duration) if duration is not None else None,
                    "offset": a_start - _video_start(container), "codec": cc.name}
    except av.FFmpegError as exc:
        raise AudioDecodeError(f"{type(exc).__name__}: {exc}") from None


def packed_samples(frame, packer) -> np.ndarray:
    """A decoded frame of any sample format/layout -> float32 ``[n, C]``. ``packer`` is an
    ``av.AudioResampler(format="flt")`` kept per stream (format conversion only)."""
    channels = len(frame.layout.channels) or 1
    out = [f.to_ndarray() for f in packer.resample(frame)]  # packed float32: [1, n * C]
    if not out:
        return np.zeros((0, channels), np.float32)
    return np.concatenate(out, axis=1).reshape(-1, channels)


def _mono(frame, packer) -> np.ndarray:
    """A decoded frame of any sample format/layout -> float32 mono (mean of channels)."""
    return packed_samples(frame, packer).mean(axis=1, dtype=np.float32)


def _resample(x: np.ndarray, src_rate: int, rate: int) -> np.ndarray:
    """Mono float32 at ``src_rate`` -> ``rate`` (``av.AudioResampler``, flushed)."""
    if src_rate == rate or len(x) == 0:
        return x
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None]), format="fltp", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = src_rate, 0, Fraction(1, src_rate)
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray()[0] for f in out]).astype(np.float32, copy=False)


def _decode_span(container, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Mono float32 at the stream's own rate covering media time ``[t0, t1)`` of the first
    audio stream, with a bool coverage mask (samples the stream actually holds) and the rate.
    Sample ``k`` is at media time ``t0 + k / src_rate``."""
    import av

    stream = container.streams.audio[0]
    stream.thread_type = "NONE"  # decode is tiny per clip; loader workers parallelise clips
    src_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
    if src_rate <= 0:
        raise AudioDecodeError(f"audio stream declares sample rate {src_rate}")
    a_start = _seconds(stream.start_time, stream.time_base) or 0.0
    if t0 - _PREROLL > a_start and stream.time_base is not None:
        # Seek on the audio stream to a frame at or before the pre-roll point (every AAC/
        # FLAC/PCM packet is a keyframe), instead of decoding from the start of the file.
        container.seek(int((t0 - _PREROLL) / stream.time_base), stream=stream, backward=True)
    packer = av.AudioResampler(format="flt")  # same layout and rate: format conversion only
    pieces: list[tuple[int, np.ndarray]] = []
    next_time = None
    for frame in container.decode(stream):
        ft = _seconds(frame.pts, frame.time_base)
        ft = ft if ft is not None else next_time if next_time is not None else a_start
        rate = frame.sample_rate or src_rate
        next_time = ft + frame.samples / rate
        if ft >= t1:
            break
        if next_time <= t0:
            continue
        x = _mono(frame, packer)
        if rate != src_rate:  # a mid-stream rate change: bring the frame to the stream's rate
            x = _resample(x, rate, src_rate)
        pieces.append((int(round((ft - t0) * src_rate)), x))
    a_duration = _seconds(stream.duration, stream.time_base)
    if a_duration is not None and a_duration > 0:
        # The track's declared end (mp4: the edit list) drops the encoder's padding of the
        # last AAC frame, which would otherwise count as covered silence.
        end = int(math.ceil((a_start + a_duration - t0) * src_rate - 1e-6))
        pieces = [(at, x[: max(0, end - at)]) for at, x in pieces]
    if math.isfinite(t1):
        length = max(0, int(math.ceil((t1 - t0) * src_rate - 1e-9)))
    else:
        length = max((at + len(x) for at, x in pieces), default=0)
    pcm, covered = np.zeros(length, np.float32), np.zeros(length, bool)
    for at, x in pieces:  # placed by pts: gaps stay silent (uncovered), overlaps overwrite
        lo, hi = max(at, 0), min(at + len(x), length)
        if lo < hi:
            pcm[lo:hi] = x[lo - at : hi - at]
            covered[lo:hi] = True
    return pcm, covered, src_rate


def _window(container, start: float, duration: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """``decode_audio_window`` on an open container (see there)."""
    n = window_samples(duration, rate)
    if not container.streams.audio or n == 0:
        return np.zeros(n, np.float32), np.zeros(n, bool)
    t0 = _video_start(container) + start
    pad = round(_PAD * rate) / rate  # a whole number of output samples
    src, covered, src_rate = _decode_span(container, t0 - pad, t0 + duration + pad)
    out = _resample(src, src_rate, rate)
    first = int(round(pad * rate))
    pcm = np.zeros(n, np.float32)
    got = out[first : first + n]
    pcm[: len(got)] = got
    # Output sample j (time t0 + j / rate) is covered if the source sample under it is.
    k = np.floor((pad + np.arange(n) / rate) * src_rate + 1e-6).astype(np.int64)
    mask = np.zeros(n, bool)
    inside = k < len(covered)
    mask[inside] = covered[k[inside]]
    pcm[~mask] = 0.0  # uncovered: exact zeros, not resampler ringing from the edges
    np.nan_to_num(pcm, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return pcm, mask


def decode_audio_window(data: bytes, start: float, duration: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """The audio under video time ``[start, start + duration)`` of in-memory file bytes.

    Returns ``(pcm float32 [N], mask bool [N])`` with ``N = round(duration * rate)``: mono
    (channel mean) at ``rate`` Hz; ``mask`` marks samples the audio stream covers (outside it,
    e.g. a late start, an early end or a truncated track, ``pcm`` is 0). No audio stream:
    zeros and an all-False mask. ``start`` is on the video's clock (module docstring).
    Raises ``AudioDecodeError`` if the stream cannot be decoded.
    """
    import av

    if rate <= 0 or duration < 0:
        raise ValueError(f"need rate > 0 and duration >= 0, got {rate}, {duration}")
    try:
        with av.open(io.BytesIO(data)) as container:
            return _window(container, float(start), float(duration), int(rate))
    except AudioDecodeError:
        raise
    except (av.FFmpegError, ValueError, MemoryError) as exc:
        raise AudioDecodeError(f"{type(exc).__name__}: {exc}") from None


def load_audio_file(path: str | os.PathLike, rate: int) -> np.ndarray:
    """A whole audio file (wav, flac, mp3, m4a, ... or a video's audio track) as float32 mono
    ``[N]`` at ``rate`` Hz, from its first sample (its own start time is the origin).
    Raises ``AudioDecodeError`` if the file has no audio stream or cannot be decoded."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{os.fspath(path)}: no audio stream")
            a = container.streams.audio[0]
            start = _seconds(a.start_time, a.time_base) or 0.0
            src, covered, src_rate = _decode_span(container, start, math.inf)
    except AudioDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise AudioDecodeError(f"{os.fspath(path)}: {type(exc).__name__}: {exc}") from None
    return _resample(src, src_rate, rate)


def read_audio_control(path: str | os.PathLike, rate: int, flag: str) -> np.ndarray:
    """A user-given audio control file (``sample.audio``, ``worldline-play --audio``) as float32
    mono ``[N]`` at ``rate``; a one-line ``ValueError`` starting with ``flag`` when there is no
    such file, it holds no decodable audio, or no samples."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag}: no file at {path}")
    try:
        wave = load_audio_file(p, rate)
    except Exception as exc:  # noqa: BLE001 - PyAV's errors: not audio, no stream, corrupt
        raise ValueError(f"{flag}: {path}: cannot read audio "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if wave.size == 0:
        raise ValueError(f"{flag}: {path}: no audio samples")
    return np.ascontiguousarray(wave, dtype=np.float32)
