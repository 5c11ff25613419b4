"""Codec I/O: uint8 frames <-> in-memory mp4 bytes, plus preview writers.

Encoding uses PyAV (libx264 by default), decoding uses decord, because decord is what the
loader workers use (frame-accurate ``get_batch`` on a random-access reader).

Odd frame sizes: H.264 in yuv420p subsamples chroma 2x2, so x264 rejects odd widths/heights
and the bitstream cannot crop by a single pixel. With the default ``pix_fmt="yuv420p"`` we
therefore pad the right column / bottom row by edge replication up to the next even size, so
an ``[T, 45, 63, 3]`` clip decodes as ``[T, 46, 64, 3]`` whose top-left ``45x63`` is the clip.
The loader's resize + centre crop absorbs the extra pixel. Pass ``pix_fmt="yuv444p"`` to keep
odd sizes exactly (valid H.264, but some browsers and players cannot show 4:4:4).

Tiny CPU example::

    frames = np.zeros((8, 64, 64, 3), np.uint8)
    mp4 = encode_mp4(frames, fps=8.0)
    clip, idx = decode_clip(mp4, num_frames=4, stride=2)   # [4, 64, 64, 3], [0, 2, 4, 6]
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

POSITIONS = ("start", "center", "random")


class ClipTooShortError(ValueError):
    """The video has fewer frames than the requested strided window."""

# x264/x265 understand CRF and presets; other encoders (mpeg4, ...) get PyAV's defaults.
_CRF_CODECS = {"libx264", "libx265"}


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("cannot encode a video with 0 frames")
    return frames


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
    crf: int = 18,
    *,
    pix_fmt: str = "yuv420p",
    preset: str = "veryfast",
) -> bytes:
    """Encode uint8 frames ``[T, H, W, 3]`` (RGB) into mp4 bytes, entirely in memory.

    With a 4:2:0 ``pix_fmt`` odd sizes are padded to even by edge replication (see module
    docstring). ``threads=1``: clips are small, and data generation parallelises over clips.
    """
    frames = _check_frames(frames)
    if pix_fmt.startswith(("yuv420", "nv12")):
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    _, height, width, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        # limit_denominator keeps NTSC rates (29.97 -> 30000/1001) exact and others small.
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec in _CRF_CODECS:
            stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())  # flush delayed (B-)frames
    return buf.getvalue()


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


def decode_clip(
    mp4: bytes,
    num_frames: int,
    stride: int = 1,
    position: str = "start",
    rng: np.random.Generator | None = None,
    *,
    num_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``num_frames`` frames, ``stride`` apart, from mp4 bytes with decord.

    Returns ``(frames uint8 [T, H, W, 3], indices int64 [T])``. Raises ``ValueError`` if the
    video is shorter than the window and ``RuntimeError`` (decord's) if it cannot be decoded.
    ``ClipTooShortError`` is a ``ValueError``, so callers may catch either.
    ``num_threads=1`` by default because loader workers already parallelise across clips.
    """
    import decord  # lazy: decord is heavy and only needed where clips are decoded

    if len(mp4) == 0:
        raise ValueError("empty mp4 (0 bytes)")
    reader = decord.VideoReader(io.BytesIO(mp4), num_threads=num_threads)
    indices = clip_indices(len(reader), num_frames, stride, position, rng)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return frames, indices


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, **kwargs) -> None:
    """Write uint8 frames ``[T, H, W, 3]`` to an mp4 file (atomically: tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(encode_mp4(frames, fps, **kwargs))
    os.replace(tmp, path)


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
