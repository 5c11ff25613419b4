"""Audio as a control signal, data half: real mp4s (PyAV: x264 + AAC/FLAC), real decord, real
shards. The test audio marks every video frame: frame ``k`` starts with a 20 ms tone burst of
``400 + 120 k`` Hz and its pixels have value ``10 k``, so a loader batch tells which source
frames a clip holds (pixels) and which frames its audio window covers, and where (bursts).
Alignment is asserted to one AAC frame (1024 samples at the source rate)."""

from __future__ import annotations

import dataclasses
import io
import json
from fractions import Fraction

import numpy as np
import pytest

RATE = 16000  # loader audio rate


def _bursts(n: int, rate: int, fps: float, frames: int, start: float = 0.0) -> np.ndarray:
    """Mono ``[n]``: burst of ``400 + 120 k`` Hz at each video frame ``k``'s start (time
    ``k / fps``), for the part of the timeline the track covers (it begins at ``start``)."""
    x = np.zeros(n, np.float32)
    for k in range(frames):
        at = int(round((k / fps - start) * rate))
        length = int(0.02 * rate)
        if at < 0 or at >= n:
            continue
        seg = 0.6 * np.sin(2 * np.pi * (400 + 120 * k) * np.arange(length) / rate)
        x[at : at + length] = seg[: n - at]
    return x


def _mp4(frames: int = 24, fps: float = 16.0, rate: int = 16000, *, offset: float = 0.0, seconds: float | None = None,
         channels: int = 1, codec: str = "aac", fmt: str = "mp4") -> bytes:
    """Video of ``frames`` frames (pixel value ``10 k``) + an audio track of marker bursts
    starting ``offset`` s after the video and lasting ``seconds`` (default: the video)."""
    import av

    seconds = frames / fps - offset if seconds is None else seconds
    n = int(round(seconds * rate))
    mono = _bursts(n, rate, fps, frames, offset)
    layout = {1: "mono", 2: "stereo", 8: "7.1"}[channels]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        v = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        a = c.add_stream(codec, rate=rate)
        a.layout = layout
        if codec == "flac":
            a.format = "s16"
        for k in range(frames):
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * k % 256, np.uint8), format="rgb24")))
        c.mux(v.encode())
        step = 1024
        for i in range(0, n, step):
            chunk = np.repeat(mono[i : i + step, None], channels, 1)
            if codec == "flac":
                frame = av.AudioFrame.from_ndarray((chunk * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                                   layout=layout)
            else:  # planes one by one: PyAV 18's from_ndarray miscounts 8-channel planes
                frame = av.AudioFrame(format="fltp", layout=layout, samples=len(chunk))
                for ch in range(channels):
                    frame.planes[ch].update(np.ascontiguousarray(chunk[:, ch]).tobytes())
            frame.sample_rate, frame.pts, frame.time_base = rate, i + int(round(offset * rate)), Fraction(1, rate)
            c.mux(a.encode(frame))
        c.mux(a.encode())
    return buf.getvalue()


def _detect(pcm: np.ndarray, rate: int) -> list[tuple[int, int]]:
    """(onset sample, frame index) of every marker burst in a window."""
    env = np.convolve(np.abs(pcm), np.ones(16) / 16, "full")[: len(pcm)] > 0.08
    on = np.flatnonzero(env[1:] & ~env[:-1]) + 1
    if env[0]:
        on = np.concatenate([[0], on])
    out = []
    for p in on:
        seg = pcm[p : p + int(0.018 * rate)]
        if len(seg) < int(0.012 * rate):
            continue  # cut by the window's end
        spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 8 * rate))
        f = np.argmax(spec) * rate / (8 * rate)
        out.append((max(0, int(p) - 15), int(round((f - 400) / 120))))  # onset ~ where |x| rises
    return out


def _check_window(pcm, mask, start: float, fps: float, src_rate: int, rate: int = RATE) -> list[float]:
    """Every burst in the window sits where frame ``k`` starts (``k / fps - start``), to one
    AAC frame; returns the errors in ms."""
    tol = 1024 / src_rate
    # Bursts that start inside the window (one cut by its start is seen at sample 0: skipped).
    found = [(p, k) for p, k in _detect(pcm, rate) if k / fps - start >= -0.002]
    assert found, "no marker bursts in the audio window"
    errors = []
    for p, k in found:
        err = p / rate - (k / fps - start)
        assert abs(err) <= tol, (p, k, err)
        errors.append(1000 * err)
    expected = [k for k in range(64) if -0.002 <= k / fps - start < len(pcm) / rate - 0.015]
    assert [k for _, k in found] == expected
    assert mask.all()
    return errors


def test_window_alignment_and_rates():
    from worldline.data.audio import decode_audio_window, probe_audio, window_samples

    mp4 = _mp4()
    info = probe_audio(mp4)
    assert info["sample_rate"] == 16000 and info["channels"] == 1 and info["codec"] == "aac"
    assert abs(info["duration"] - 1.5) < 1e-3 and info["offset"] == 0.0
    errors = []
    for start, dur, rate in [(0.0, 0.5, 16000), (0.6875, 0.5, 16000), (0.3, 0.7, 48000), (1.0, 0.5, 8000)]:
        pcm, mask = decode_audio_window(mp4, start, dur, rate)
        assert pcm.dtype == np.float32 and mask.dtype == bool and len(pcm) == window_samples(dur, rate)
        errors += _check_window(pcm, mask, start, 16.0, 16000, rate)
    assert max(abs(e) for e in errors) < 2.0, errors  # measured: sample-exact (< 1 ms)
    # Past the end of the track: zeros, mask False.
    pcm, mask = decode_audio_window(mp4, 1.25, 0.5, RATE)
    assert mask[: int(0.24 * RATE)].all() and not mask[int(0.26 * RATE):].any() and not pcm[~mask].any()


def test_offset_truncated_and_no_audio():
    from worldline.data.audio import decode_audio_window, probe_audio
    from worldline.data.video import encode_mp4

    late = _mp4(offset=0.25)
    info = probe_audio(late)
    # AAC written from a non-zero pts: the muxer's empty edit starts the track one AAC frame early.
    assert 0.25 - 1024 / 16000 - 1e-3 <= info["offset"] <= 0.25
    pcm, mask = decode_audio_window(late, 0.0, 1.0, RATE)
    assert not mask[: int((0.25 - 1024 / 16000) * RATE) - 1].any() and mask[int(0.25 * RATE):].all()
    assert not pcm[~mask].any()
    _check_window(pcm[int(0.25 * RATE):], mask[int(0.25 * RATE):], 0.25, 16.0, 16000)

    short = _mp4(seconds=0.75)  # audio stops halfway through the video
    pcm, mask = decode_audio_window(short, 0.5, 0.5, RATE)
    assert mask[: int(0.25 * RATE) - 1].all() and not mask[int(0.25 * RATE) + 1:].any()

    silent = encode_mp4(np.zeros((8, 32, 32, 3), np.uint8), 8.0)
    assert probe_audio(silent) is None
    pcm, mask = decode_audio_window(silent, 0.0, 0.5, RATE)
    assert pcm.shape == (8000,) and not pcm.any() and not mask.any()


@pytest.mark.parametrize("kind", ["8ch", "192k", "8k"])
def test_hostile_audio_formats(kind):
    from worldline.data.audio import decode_audio_window, probe_audio

    mp4 = {"8ch": lambda: _mp4(rate=48000, channels=8), "192k": lambda: _mp4(rate=192000, codec="flac"),
           "8k": lambda: _mp4(rate=8000)}[kind]()
    src_rate = probe_audio(mp4)["sample_rate"]
    pcm, mask = decode_audio_window(mp4, 0.5, 0.5, RATE)
    assert pcm.shape == (8000,) and np.isfinite(pcm).all() and mask.all()
    _check_window(pcm, mask, 0.5, 16.0, src_rate)


def _write(tmp_path, samples: dict[str, bytes], per_shard: int = 2) -> str:
    from worldline.data.shards import write_shards

    items = [{"__key__": k, "mp4": v, "json": {"caption": k}} for k, v in samples.items()]
    write_shards(items, tmp_path, samples_per_shard=per_shard)
    return str(tmp_path)


def _frame_index(video) -> np.ndarray:
    """Source frame index of each clip frame, from its pixel value ``10 k``."""
    return np.round(video.float().mean(dim=(0, 2, 3)).numpy() / 10).astype(int)


@pytest.mark.parametrize("position,stride,fps", [("start", 1, None), ("center", 1, None), ("random", 1, None),
                                                  ("random", 2, None), ("random", 1, 8.0), ("center", 1, 6.0)])
def test_loader_audio_matches_clip_frames(tmp_path, position, stride, fps):
    from worldline.data.loader import ShardLoader

    root = _write(tmp_path, {f"s{i}": _mp4() for i in range(4)})
    loader = ShardLoader(root, batch_size=2, num_frames=5, frame_stride=stride, fps=fps, resolution=(32, 32),
                         position=position, audio_rate=RATE, shuffle_shards=False, seed=1)
    rate_eff = fps if fps else 16.0 / stride
    n = int(round(5 * RATE / rate_eff))
    errors = []
    for _, batch in zip(range(3), loader):
        assert batch["audio"].shape == (2, n) and batch["audio"].dtype.is_floating_point
        assert batch["audio_mask"].dtype == __import__("torch").bool
        for b in range(2):
            idx = _frame_index(batch["video"][b])
            pcm = batch["audio"][b].numpy()
            found = _detect(pcm, RATE)
            # Window start on the video clock, from the first burst: frame k at k / 16 s.
            p, k = found[1]  # found[0] may be a burst cut by the window's start
            start = k / 16.0 - p / RATE
            tol = 1024 / 16000
            if fps is None:
                assert abs(start - idx[0] / 16.0) <= tol, (start, idx)
            else:  # t0 lies in the first frame's display interval
                assert idx[0] / 16.0 - tol <= start < (idx[0] + 1) / 16.0 + tol, (start, idx)
            # A strided window's last stride interval may run past the 1.5 s video (and track).
            mask = batch["audio_mask"][b].numpy()
            end = min(n, int(round((1.5 - start) * RATE)))
            assert mask[: end - 32].all() and not mask[end + 32 :].any()  # 2 ms: onset estimate
            errors += _check_window(pcm[:end], mask[:end], start, 16.0, 16000)
    assert loader.stats["skipped"] == 0
    assert max(abs(e) for e in errors) < 1024 / 16  # ms; measured: within ~1 ms
    print(f"{position}/{stride}/{fps}: max |error| {max(abs(e) for e in errors):.2f} ms")


def test_loader_no_audio_hostile_and_signature(tmp_path):
    import torch

    from worldline.data.loader import ShardLoader
    from worldline.data.video import encode_mp4

    bad = bytearray(_mp4(seconds=0.75))
    import av

    with av.open(io.BytesIO(bytes(bad))) as c:  # garble every audio packet in place
        spans = [(p.pos, p.size) for p in c.demux(c.streams.audio[0]) if p.size and p.pos is not None]
    for pos, size in spans:
        bad[pos : pos + size] = b"\xff" * size
    samples = {"bad": bytes(bad), "a_silent": encode_mp4(np.zeros((24, 32, 32, 3), np.uint8), 16.0), "b_short": _mp4(seconds=0.75),
               "c_8ch": _mp4(rate=48000, channels=8), "d_192k": _mp4(rate=192000, codec="flac"),
               "e_8k": _mp4(rate=8000)}
    root = _write(tmp_path, samples, per_shard=6)
    loader = ShardLoader(root, batch_size=5, num_frames=16, resolution=(32, 32), audio_rate=RATE,
                         shuffle_shards=False, max_skip_fraction=0.9)
    batch = next(iter(loader))
    assert sorted(batch["key"]) == ["a_silent", "b_short", "c_8ch", "d_192k", "e_8k"]
    assert loader.stats["skipped_reasons"] == {"bad_audio": 1}
    audio, mask = batch["audio"], batch["audio_mask"]
    assert audio.shape == (5, RATE) and torch.isfinite(audio).all()
    row = {k: i for i, k in enumerate(batch["key"])}
    assert not mask[row["a_silent"]].any() and not audio[row["a_silent"]].any()
    short = mask[row["b_short"]]
    assert short[: int(0.75 * RATE) - 1].all() and not short[int(0.75 * RATE) + 1:].any()
    for key in ("c_8ch", "d_192k", "e_8k"):
        assert mask[row[key]].all() and len(_detect(audio[row[key]].numpy(), RATE)) == 16
    plain = ShardLoader(root, batch_size=5, num_frames=16, resolution=(32, 32))
    # A resume with another audio setting is detected (not taken as an exact continuation).
    assert plain._sampling_digest != loader._sampling_digest
    assert loader.state_dict()["sampling_digest"] == loader._sampling_digest


def test_synthetic_world_sounds():
    from worldline.data.audio import decode_audio_window
    from worldline.data.synthetic import SyntheticWorldConfig, clip_to_sample, render_audio, render_clip, sprite_moving

    cfg = SyntheticWorldConfig(num_frames=17, height=32, width=32, seed=3)
    loud = dataclasses.replace(cfg, audio=True)
    quiet_sample = clip_to_sample(cfg, 2)
    clip = render_clip(loud, 2)
    sample = clip_to_sample(loud, 2, clip)
    assert np.array_equal(clip["frames"], render_clip(cfg, 2)["frames"])
    assert "tone_hz" not in json.dumps(quiet_sample["json"])
    tones = [s["tone_hz"] for s in sample["json"]["sprites"]]
    assert len(set(tones)) == len(tones) and clip["audio"].shape == (17 * 2000,)
    moving = sprite_moving(np.stack([s["positions"] for s in clip["sprites"]]))
    assert moving.any() and not moving.all()
    pcm, mask = decode_audio_window(sample["mp4"], 0.0, 17 / 8, RATE)
    assert mask.all()
    per = RATE // 8
    for s, f in enumerate(tones):
        for t in range(17):
            seg = pcm[t * per + 160 : (t + 1) * per - 160]
            energy = abs(np.dot(seg, np.exp(-2j * np.pi * f * np.arange(len(seg)) / RATE))) / len(seg)
            assert (energy > 0.05) == moving[t, s], (s, t, energy)
    swapped = render_audio(loud, moving[:, ::-1], tones)
    assert swapped.shape == clip["audio"].shape and not np.allclose(swapped, clip["audio"])


def test_ingest_keeps_audio_of_reencoded_mkv(tmp_path):
    from worldline.data.audio import decode_audio_window
    from worldline.data.ingest import make_shards
    from worldline.data.samples import iter_tar_samples

    src = tmp_path / "src"
    src.mkdir()
    (src / "clip.mkv").write_bytes(_mp4(rate=44100, channels=2, codec="flac", fmt="matroska"))
    (src / "mute.mp4").write_bytes(__import__("worldline.data.video", fromlist=["x"]).encode_mp4(
        np.zeros((8, 32, 32, 3), np.uint8), 8.0))
    manifest = make_shards(src, tmp_path / "out", max_count=4, processes=0)
    entries = {e["key"]: e for e in manifest["samples"]}
    assert entries["mute"]["audio"] is None
    audio = entries["clip"]["audio"]
    assert audio["codec"] == "aac" and audio["channels"] == 2 and audio["sample_rate"] == 44100
    assert abs(audio["duration"] - 1.5) < 0.03 and abs(audio["offset"]) < 1e-3
    raw = {r.key: r for r in iter_tar_samples(str(tmp_path / "out" / manifest["shards"][0]))}
    assert json.loads(raw["clip"].members["json"])["meta"]["audio"] == audio
    pcm, mask = decode_audio_window(raw["clip"].members["mp4"], 0.25, 0.5, RATE)
    _check_window(pcm, mask, 0.25, 16.0, 44100)


def test_latent_cache_keeps_audio(tmp_path):
    import torch

    from worldline.data.latents import encode_latent_shards
    from worldline.data.loader import ShardLoader

    root = _write(tmp_path / "px", {f"s{i}": _mp4() for i in range(2)})
    encode = lambda v: torch.nn.functional.avg_pool3d(v.float() / 127.5 - 1, (4, 8, 8))  # noqa: E731
    manifest = encode_latent_shards(root, tmp_path / "lat", encode, num_frames=8, resolution=(32, 32),
                                    batch_size=2, position="center", audio_rate=RATE)
    assert manifest["clip"]["audio_rate"] == RATE
    batch = next(iter(ShardLoader(tmp_path / "lat", batch_size=2, input="latent")))
    assert batch["audio"].shape == (2, RATE // 2) and batch["audio_mask"].all()
    for b in range(2):  # center of 24 frames: frames 8..15, i.e. from 0.5 s
        _check_window(batch["audio"][b].numpy(), batch["audio_mask"][b].numpy(), 0.5, 16.0, 16000)


def test_load_audio_file_wav(tmp_path):
    import av

    from worldline.data.audio import load_audio_file

    rate, x = 22050, _bursts(22050, 22050, 16.0, 16)
    with av.open(str(tmp_path / "a.wav"), "w") as c:  # stereo s16 wav, both channels the same
        s = c.add_stream("pcm_s16le", rate=rate)
        s.layout = "stereo"
        frame = av.AudioFrame.from_ndarray((np.repeat(x[:, None], 2, 1) * 32767).astype(np.int16).reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        c.mux(s.encode(frame))
        c.mux(s.encode())
    pcm = load_audio_file(tmp_path / "a.wav", RATE)
    assert pcm.dtype == np.float32 and abs(len(pcm) - RATE) <= 1
    _check_window(pcm, np.ones(len(pcm), bool), 0.0, 16.0, rate)
