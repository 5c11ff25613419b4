"""Codec round trips with real PyAV encodes and decord decodes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worldline.data.video import (
    ClipTooShortError,
    clip_indices,
    decode_clip,
    encode_mp4,
    write_contact_sheet,
    write_mp4,
)


def smooth_video(t: int, h: int, w: int) -> np.ndarray:
    """Moving colour gradients: smooth content the codec reproduces closely. [T, H, W, 3]"""
    tt = np.arange(t)[:, None, None] / max(t, 1)
    y = np.linspace(0, 1, h)[None, :, None]
    x = np.linspace(0, 1, w)[None, None, :]
    r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + tt))
    g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.5 * tt))
    b = 0.3 + 0.5 * x * y + 0 * tt
    return (255 * np.stack(np.broadcast_arrays(r, g, b), -1)).round().astype(np.uint8)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("h,w", [(64, 64), (130, 250), (45, 63)])
def test_roundtrip_within_codec_tolerance(h, w):
    frames = smooth_video(12, h, w)
    decoded, indices = decode_clip(encode_mp4(frames, fps=8.0, crf=18), num_frames=12)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(indices, np.arange(12))
    # yuv420p needs even sizes: odd ones are edge-padded on the right/bottom, never cropped.
    assert decoded.shape == (12, h + h % 2, w + w % 2, 3)
    assert mae(decoded[:, :h, :w], frames) < 6


def test_yuv444_keeps_odd_size_exactly():
    frames = smooth_video(6, 45, 63)
    decoded, _ = decode_clip(encode_mp4(frames, fps=8.0, pix_fmt="yuv444p"), num_frames=6)
    assert decoded.shape == frames.shape
    assert mae(decoded, frames) < 6


def test_window_positions_and_stride():
    mp4 = encode_mp4(smooth_video(20, 32, 32), fps=10.0)
    _, start = decode_clip(mp4, num_frames=4, stride=3, position="start")
    _, center = decode_clip(mp4, num_frames=4, stride=3, position="center")
    assert start.tolist() == [0, 3, 6, 9]
    assert center.tolist() == [5, 8, 11, 14]  # span 10 centred in 20 frames
    picks = [decode_clip(mp4, 4, 3, "random", np.random.default_rng(7))[1] for _ in range(2)]
    np.testing.assert_array_equal(picks[0], picks[1])  # same seed, same window
    starts = {int(clip_indices(20, 4, 3, "random", np.random.default_rng(s))[0]) for s in range(50)}
    assert starts == set(range(11))  # every valid start is reachable, none beyond


def test_strided_frames_are_the_right_frames():
    frames = smooth_video(16, 32, 32)
    mp4 = encode_mp4(frames, fps=8.0)
    decoded, idx = decode_clip(mp4, num_frames=5, stride=3, position="center")
    assert mae(decoded, frames[idx]) < 6
    assert mae(decoded, frames[idx - 1]) > mae(decoded, frames[idx])


def test_too_short_names_lengths():
    mp4 = encode_mp4(smooth_video(5, 16, 16), fps=8.0)
    with pytest.raises(ValueError, match=r"has 5 frames, needs 7") as info:
        decode_clip(mp4, num_frames=4, stride=2)
    assert isinstance(info.value, ClipTooShortError)


@pytest.mark.parametrize("payload", [b"", b"not an mp4 at all" * 20])
def test_corrupt_bytes_raise(payload):
    with pytest.raises((ValueError, RuntimeError)):
        decode_clip(payload, num_frames=2)


def test_write_mp4_and_contact_sheet(tmp_path):
    videos = np.stack([smooth_video(10, 24, 40), smooth_video(10, 24, 40)[:, ::-1]])
    write_mp4(tmp_path / "out" / "clip.mp4", videos[0], fps=8.0)
    decoded, _ = decode_clip((tmp_path / "out" / "clip.mp4").read_bytes(), num_frames=10)
    assert mae(decoded, videos[0]) < 6

    write_contact_sheet(tmp_path / "sheet.png", videos, max_frames=4, gap=2)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (2 * 24 + 2, 4 * 40 + 3 * 2, 3)
    np.testing.assert_array_equal(sheet[:24, :40], videos[0, 0])  # PNG is lossless
    np.testing.assert_array_equal(sheet[26:, -40:], videos[1, -1])
    write_contact_sheet(tmp_path / "single.png", videos[0], max_frames=20)  # [T, H, W, 3]
    assert Image.open(tmp_path / "single.png").size == (10 * 40 + 9 * 2, 24)
