"""``worldline-play --audio``: an audio-conditioned play model (tests/_play.py, audio=True) hears
a wav in frame time - the file changes the frames, a reset restarts it, after its end the model
hears invalid silence - the headless recording's mp4 carries the audio for as long as the video
and its replay command (``sample.audio=``) reproduces the frames through ``worldline-sample``;
the page's ``GET /audio`` serves the file only when one was given; a model without audio or an
unreadable file is refused with exit 2 (~60 s on 2 cores, most of it the model fixture)."""
from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from _play import replay_matches
from _runs import cli

pytestmark = pytest.mark.slow

RATE = 16000


def _wav(path: Path, pcm: np.ndarray) -> Path:
    """16-bit mono PCM wav at 16 kHz (the standard library's writer: no codec involved)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _tone(seconds: float, hz: float, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def parts(play_audio_model, tmp_path_factory):
    from worldline.train.pipeline import WorldPipeline
    from worldline.train.play.contexts import ContextLibrary

    # As worldline-play runs: 1 thread, no denormals (2 threads ran a step ~30x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)

    pipe = WorldPipeline.from_pretrained(play_audio_model["pipeline"])
    lib = ContextLibrary([play_audio_model["shards"]], (32, 32), limit=2)
    d = tmp_path_factory.mktemp("sounds")
    # Two sounds as long as a 9-frame clip at 8 fps (1.125 s) and more; a short one (0.3 s).
    sounds = {"low": _wav(d / "low.wav", _tone(1.5, 220)),
              "high": _wav(d / "high.wav", _tone(1.5, 3000, 0.9)),
              "short": _wav(d / "short.wav", _tone(0.3, 220))}
    yield pipe, lib, sounds
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def _session(pipe, lib, audio):
    from worldline.train.play.session import PlaySession, PlaySettings

    return PlaySession(pipe, lib.get(lib.ids()[0]), PlaySettings(num_steps=1, window=4),
                       audio=audio)


def test_the_session_hears_the_file_in_frame_time(parts) -> None:
    from worldline.train.play.session import Soundtrack

    pipe, lib, sounds = parts
    assert pipe.settings.fps == 8.0 and "audio" in pipe.conditions
    tracks = {k: Soundtrack.load(p, pipe) for k, p in sounds.items()}
    rows = (torch.zeros(1, 4, 3, dtype=torch.long), None, 1)
    runs = {}
    for name in ("low", "high"):
        s = _session(pipe, lib, tracks[name])
        runs[name] = [s.advance(rows).frames for _ in range(2)]
        s.start(s.context)  # a reset restarts the audio at sample 0 (and the noise seed)
        again = s.advance(rows).frames
        np.testing.assert_array_equal(again, runs[name][0])
    # The model hears it: a different sound, different frames (same keys, same noise).
    diff = np.abs(runs["low"][1].astype(int) - runs["high"][1].astype(int)).mean()
    assert diff > 1.0, diff
    # Segmentation: pixel frame k hears samples [2000 k, 2000 (k + 1)) (16000 / 8 fps), the
    # whole-clip cut of pipe.rollout; past the end of the file, invalid silence.
    # 0.3 s = 4800 samples: pixel frames 0, 1 and 800 samples of frame 2 (under half: invalid).
    s = _session(pipe, lib, tracks["short"])
    feats, valid = s.audio_rows(1, 4)
    ref, ref_valid = pipe.audio_features(torch.from_numpy(tracks["short"].wave), 5)
    assert ref_valid[0].tolist() == [True, True, False, False, False]
    assert valid[0].tolist() == [True, False, False, False]
    torch.testing.assert_close(feats[:, :2], ref[:, 1:3], rtol=0, atol=1e-6)
    assert (feats[:, 2:] == 0).all()  # no samples at all: zeros (the DiT uses null audio)


def test_headless_audio_recording_carries_the_sound_and_replays(parts, play_audio_model,
                                                                tmp_path: Path) -> None:
    import decord

    from worldline.data.audio import probe_audio

    _, _, sounds = parts
    rows = [[0, 0, 0]] + [[1, 0, 0]] * 4 + [[4, 2, 3]] * 4
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"actions": rows}))
    out = tmp_path / "session.mp4"
    r = cli("worldline-play", str(play_audio_model["pipeline"]), "--shards",
            str(play_audio_model["shards"]), "--script", str(script), "--out", str(out),
            "--steps", "2", "--window", "4", "--audio", str(sounds["low"]), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(decord.VideoReader(str(out))) == 9
    info = probe_audio(out.read_bytes())
    assert info is not None and info["sample_rate"] == RATE
    assert abs(info["duration"] - 9 / 8) < 0.07, info  # within one AAC frame of the video
    doc = json.loads(out.with_suffix(".actions.json").read_text())
    assert f"sample.audio={sounds['low'].resolve()}" in doc["replay"]["args"]
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "actions.json").write_bytes(out.with_suffix(".actions.json").read_bytes())
    (replay / "first.png").write_bytes(out.with_suffix(".first.png").read_bytes())
    replay_matches(doc, replay, out, play_audio_model)


def test_audio_is_refused_for_a_model_without_it_or_an_unreadable_file(
        parts, play_model, tmp_path: Path, capsys) -> None:
    from worldline.scripts.play import main

    _, _, sounds = parts
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all" * 64)
    from worldline.train.pipeline import WorldPipeline
    from worldline.train.play.session import Soundtrack

    # A model without audio ignores a soundtrack handed to its session.
    silent = WorldPipeline.from_pretrained(play_model["pipeline"])
    lib = parts[1]
    wave = np.zeros(RATE, np.float32)
    assert _session(silent, lib, Soundtrack(sounds["low"], wave)).audio is None
    threads = torch.get_num_threads()
    try:
        for run, audio, why in ((play_model["pipeline"], sounds["low"], "not trained with audio"),
                                (parts[0].source, junk, "cannot read audio"),
                                (parts[0].source, tmp_path / "missing.wav", "no file at")):
            assert main([str(run), "--audio", str(audio), "--device", "cpu"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("worldline-play: error: --audio") and why in err[-1], err
    finally:
        torch.set_num_threads(threads)


def test_the_server_serves_audio_only_when_given(parts) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from worldline.train.play.server import PlayConfig, make_app
    from worldline.train.play.session import PlaySettings, Soundtrack

    pipe, lib, sounds = parts

    async def main():
        got = {}
        for name, audio in (("with", Soundtrack.load(sounds["low"], pipe)), ("without", None)):
            cfg = PlayConfig(settings=PlaySettings(num_steps=1, window=4), audio=audio)
            app = make_app(pipe, cfg, lib, lib.get(lib.ids()[0]))
            async with TestClient(TestServer(app)) as client:
                info = await (await client.get("/api/info")).json()
                res = await client.get("/audio")
                got[name] = (info["audio"], res.status, res.headers.get("Content-Type"),
                             await res.read())
                if audio is not None:  # a session hears it and streams frames
                    ws = await client.ws_connect("/ws")
                    metas = []
                    while len(metas) < 2:
                        msg = await ws.receive()
                        if msg.type.name == "TEXT" and json.loads(msg.data)["type"] == "frame":
                            metas.append(json.loads(msg.data))
                    assert metas[0]["reset"] and metas[1]["index"] == 1
                    await ws.close()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 120))
    assert got["with"][:3] == (True, 200, "audio/wav")
    assert got["with"][3] == sounds["low"].read_bytes()
    assert got["without"][:2] == (False, 404)
