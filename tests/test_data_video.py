"""Codec round trips with real PyAV encodes and decord decodes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worldline.data.probe import ProbeError, VideoLimits, probe_video
from worldline.data.video import (
    ClipTooShortError,
    clip_indices,
    decode_clip,
    encode_mp4,
    resample_indices,
    resize_crop,
    write_contact_sheet,
    write_mp4,
)


def _writable_codecs() -> list[str]:
    """The encoders among h264, mpeg4, vp9 and hevc that this PyAV/FFmpeg build can write."""
    import av

    found = []
    for name in ("libx264", "mpeg4", "libvpx-vp9", "libx265"):
        try:
            av.codec.Codec(name, "w")
            found.append(name)
        except Exception:  # not compiled into this FFmpeg
            pass
    return found


CODECS = _writable_codecs()
# Codecs whose encoder accepts 4:4:4 (truly odd sizes without padding); mpeg4 is 4:2:0 only.
YUV444 = {"libx264", "libvpx-vp9", "libx265"}


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


def test_some_codec_is_available():
    assert "libx264" in CODECS, CODECS  # the default; the others are optional extras


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("h,w", [(130, 250), (45, 63), (31, 17)])
def test_codecs_and_odd_sizes_round_trip(codec, h, w):
    frames = smooth_video(10, h, w)
    pix_fmt = "yuv444p" if (h % 2 or w % 2) and codec in YUV444 else "yuv420p"
    mp4 = encode_mp4(frames, fps=10.0, codec=codec, pix_fmt=pix_fmt)
    decoded, idx = decode_clip(mp4, num_frames=4, stride=3, position="center")
    exact = pix_fmt == "yuv444p" or (h % 2 == 0 and w % 2 == 0)
    assert decoded.shape == (4, h, w, 3) if exact else (4, h + h % 2, w + w % 2, 3)
    assert idx.tolist() == [0, 3, 6, 9]
    assert mae(decoded[:, :h, :w], frames[idx]) < 8, codec
    info = probe_video(mp4)  # header facts agree with what decord decodes
    assert (info.num_frames, round(info.fps, 3)) == (10, 10.0)
    assert (info.height, info.width) == decoded.shape[1:3]


def test_variable_frame_rate_is_sampled_by_time():
    times = np.cumsum([0.0] + [0.05, 0.2, 0.1] * 5)[:15]  # VFR: 50, 200, 100 ms gaps
    frames = smooth_video(15, 32, 32)
    mp4 = encode_mp4(frames, fps=10.0, timestamps=times)
    info = probe_video(mp4)
    assert info.vfr and info.num_frames == 15
    np.testing.assert_allclose(info.span, times[-1] - times[0], atol=1e-3)
    # 4 fps -> t = 0, .25, .5, .75, 1.0, 1.25: the frame on screen at each time.
    decoded, idx = decode_clip(mp4, num_frames=6, fps=4.0)
    expected = np.searchsorted(times, np.arange(6) / 4 + 1e-6, side="right") - 1
    assert idx.tolist() == expected.tolist() == [0, 2, 4, 7, 8, 10]
    assert mae(decoded, frames[idx]) < 6
    # A target rate above the source's repeats frames instead of inventing them.
    _, fast = decode_clip(mp4, num_frames=8, fps=40.0, position="start")
    assert fast.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ClipTooShortError, match=r"lasts 1\.\d+ s \(15 frames\), needs 2.500 s"):
        decode_clip(mp4, num_frames=6, fps=2.0)


def test_resample_positions_and_constant_rate():
    ts = np.arange(20) / 10.0  # 10 fps, 1.9 s
    assert resample_indices(ts, 5, 5.0, "start").tolist() == [0, 2, 4, 6, 8]
    assert resample_indices(ts, 5, 5.0, "center").tolist() == [5, 7, 9, 11, 13]
    assert resample_indices(ts, 5, 5.0, "center", end=2.0).tolist() == [6, 8, 10, 12, 14]
    assert resample_indices(ts, 20, 10.0).tolist() == list(range(20))  # same rate: every frame
    # The last frame shows until ``end``: every start whose window ends by then is reachable.
    starts = {int(resample_indices(ts, 5, 5.0, "random", np.random.default_rng(s), end=2.0)[0]) for s in range(80)}
    assert starts == set(range(12))


def test_resize_crop_random_and_uint8():
    frames = np.arange(2 * 40 * 60 * 3, dtype=np.int64).reshape(2, 40, 60, 3).astype(np.uint8)
    out, scale, (top, left) = resize_crop(frames, (40, 40), "random", np.random.default_rng(1))
    assert out.shape == (2, 40, 40, 3) and out.dtype.is_floating_point is False and scale == 1.0
    np.testing.assert_array_equal(out.numpy(), frames[:, :, left : left + 40])
    lefts = {resize_crop(frames, (40, 40), "random", np.random.default_rng(s))[2][1] for s in range(80)}
    assert lefts == set(range(21))
    small, scale, _ = resize_crop(frames, (20, 20), "center")  # downscale 2x, then crop
    assert small.shape == (2, 20, 20, 3) and scale == 0.5 and str(small.dtype) == "torch.uint8"


@pytest.mark.parametrize("max_crop", [0.0, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(128, 64), (90, 160), (64, 64), (48, 200)])
def test_resize_crop_bound(max_crop, shape):
    """No axis loses more than ``max_crop`` of its resized extent; what does not fit is padded
    black, centred; the content that remains is a uniform rescale (same scale on both axes)."""
    h, w = shape
    frames = np.full((1, h, w, 3), 200, np.uint8)
    out, scale, (top, left) = resize_crop(frames, (64, 64), "random", np.random.default_rng(3), max_crop)
    assert out.shape == (1, 64, 64, 3)
    content = out[0, :, :, 0].numpy() > 100
    rows, cols = int(content.any(1).sum()), int(content.any(0).sum())
    new_h, new_w = round(h * scale), round(w * scale)
    for kept, extent in ((rows, new_h), (cols, new_w)):
        assert kept >= extent * (1 - max_crop) - 1.5  # cropped within the bound (+rounding)
    assert rows == 64 or cols == 64  # one axis is always filled
    if max_crop == 1.0:
        assert content.all()  # classic cover + crop: no bars
    if rows < 64:
        assert top < 0 and not content[: (64 - rows) // 2].any()
    with pytest.raises(ValueError, match="max_crop"):
        resize_crop(frames, (64, 64), max_crop=1.5)


def test_probe_rejects_without_decoding():
    mp4 = encode_mp4(smooth_video(6, 32, 32), fps=8.0)
    with pytest.raises(ProbeError) as info:
        probe_video(mp4[: len(mp4) // 2])
    assert info.value.reason == "truncated_video"
    with pytest.raises(ProbeError) as info:
        probe_video(mp4, VideoLimits(max_side=16))
    assert info.value.reason == "absurd_dimensions"
    for junk, reason in ((b"", "empty_video"), (b"\x00\x00\x00\x08junk" * 40, "not_video")):
        with pytest.raises(ProbeError) as info:
            probe_video(junk)
        assert info.value.reason == reason


def test_encoders_leave_the_scheduling_policy_alone():
    """libsvtav1 switches the thread that opens it to SCHED_FIFO 99 when run as root; every
    later child (trainers, daemons) would inherit it. encode_mp4 restores the policy."""
    import os

    import av

    if "libsvtav1" not in av.codecs_available or not hasattr(os, "sched_getscheduler"):
        pytest.skip("needs FFmpeg's libsvtav1 encoder on Linux")
    before = (os.sched_getscheduler(0), os.sched_getparam(0))
    frames = np.zeros((5, 64, 64, 3), np.uint8)
    try:
        encode_mp4(frames, 8.0, codec="libsvtav1")
    except (av.FFmpegError, ValueError):
        pass  # the option set may not suit SVT-AV1; opening it is what changes the policy
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before
