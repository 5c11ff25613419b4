"""``worldline-play`` without a browser: the WebSocket protocol against the real aiohttp app
on a tiny trained action-conditioned model (malformed and oversized messages, path
traversal, a client vanishing mid-frame, two sessions, max sessions), and the headless CLI
whose recording ``worldline-sample`` replays to the same frames (~60 s on 2 cores)."""
from __future__ import annotations

import asyncio
import json

from pathlib import Path

import pytest

from _play import replay_matches
from _runs import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_parts(play_model):
    from worldline.train.pipeline import WorldPipeline
    from worldline.train.play.contexts import ContextLibrary
    from worldline.train.play.server import PlayConfig
    from worldline.train.play.session import PlaySettings

    pipe = WorldPipeline.from_pretrained(play_model["pipeline"])
    lib = ContextLibrary([play_model["shards"]], (32, 32), limit=4)
    cfg = PlayConfig(settings=PlaySettings(num_steps=1, window=4), max_sessions=2,
                     max_message_bytes=64 << 10)
    return pipe, lib, cfg


def _run(app_parts, body):
    """Run ``body(client)`` against a fresh app on a real local socket."""
    from aiohttp.test_utils import TestClient, TestServer

    from worldline.train.play.server import make_app

    pipe, lib, cfg = app_parts

    async def main():
        app = make_app(pipe, cfg, lib, lib.get(lib.ids()[0]))
        async with TestClient(TestServer(app)) as client:
            return await asyncio.wait_for(body(client), 120)

    return asyncio.run(main())


async def _next(ws, kind: str, limit: int = 400):
    """The next JSON message of ``kind`` (binary frames and other messages skipped)."""
    for _ in range(limit):
        msg = await ws.receive()
        if msg.type.name == "TEXT":
            data = json.loads(msg.data)
            if data["type"] == kind:
                return data
        elif msg.type.name in ("CLOSE", "CLOSED", "CLOSING"):
            return None
    raise AssertionError(f"no {kind} message")


async def _frame(ws):
    """The next frame message and its JPEGs."""
    meta = await _next(ws, "frame")
    jpegs = [(await ws.receive()).data for _ in range(meta["count"])]
    return meta, jpegs


def test_protocol_rejects_bad_messages_and_keeps_going(app_parts) -> None:
    async def body(client):
        ws = await client.ws_connect("/ws")
        hello = await _next(ws, "hello")
        assert hello["space"]["slots"] == 3 and hello["space"]["keys"]["w"] == [0, 1]
        meta, jpegs = await _frame(ws)
        assert meta["reset"] and meta["count"] == 1 and jpegs[0][:2] == b"\xff\xd8"  # JPEG
        errors = []
        for bad in ["not json", json.dumps([1]), json.dumps({"type": "launch"}),
                    json.dumps({"type": "controls", "actions": [9, 0, 0]}),
                    json.dumps({"type": "controls", "actions": [0, 0]}),
                    json.dumps({"type": "controls", "actions": [0, 0, 0], "x": 1}),
                    json.dumps({"type": "settings", "num_steps": 10 ** 6}),
                    json.dumps({"type": "reset", "context": "../../../../etc/passwd"}),
                    json.dumps({"type": "reset", "image": "data:image/png;base64,AAAA"}),
                    json.dumps({"type": "pause", "paused": 1})]:
            await ws.send_str(bad)
            errors.append((await _next(ws, "error"))["message"])
        assert "unknown context" in errors[7] and "not JSON" in errors[0]
        await ws.send_bytes(b"\x00" * 10)
        assert "only JSON" in (await _next(ws, "error"))["message"]
        # The session survived all of it: keys still reach the model.
        await ws.send_str(json.dumps({"type": "controls", "actions": [2, 0, 0], "seq": 7}))
        for _ in range(20):
            meta, _ = await _frame(ws)
            if meta["seq"] == 7:
                break
        assert meta["actions"] == [2, 0, 0] and meta["compute_ms"] > 0
        # Oversized: aiohttp closes the socket (message too big) - the server lives on.
        await ws.send_str(json.dumps({"type": "ping", "pad": "x" * (80 << 10)}))
        closed = await ws.receive()
        assert closed.type.name in ("CLOSE", "CLOSED", "ERROR")
        info = await (await client.get("/api/info")).json()
        for _ in range(100):  # the session's slot is freed
            if info["sessions"] == 0:
                break
            await asyncio.sleep(0.1)
            info = await (await client.get("/api/info")).json()
        assert info["sessions"] == 0 and info["stats"]["rejected"] >= 10
        for path in ("/../setup.cfg", "/static/../../setup.cfg", "/download/x/session.mp4"):
            assert (await client.get(path)).status == 404
        assert "image-rendering: pixelated" in await (await client.get("/")).text()

    _run(app_parts, body)


def test_two_sessions_max_sessions_and_disconnect_mid_frame(app_parts) -> None:
    async def body(client):
        a = await client.ws_connect("/ws")
        b = await client.ws_connect("/ws")
        await _next(a, "hello"), await _next(b, "hello")
        await a.send_str(json.dumps({"type": "controls", "actions": [1, 1, 1], "seq": 1}))
        await b.send_str(json.dumps({"type": "controls", "actions": [4, 4, 4], "seq": 1}))
        got = {}
        for name, ws in (("a", a), ("b", b)):
            for _ in range(20):
                meta, _ = await _frame(ws)
                if meta["seq"] == 1 and not meta["reset"]:
                    break
            got[name] = meta["actions"]
        assert got == {"a": [1, 1, 1], "b": [4, 4, 4]}  # each its own session
        c = await client.ws_connect("/ws")  # third: over --max-sessions
        busy = await _next(c, "busy")
        assert "busy" in busy["message"] and "--max-sessions" in busy["message"]
        # A client that vanishes while its frame is being computed.
        await a.send_str(json.dumps({"type": "record", "frames": 3}))
        await a.close()
        await b.close()
        for _ in range(200):
            info = await (await client.get("/api/info")).json()
            if info["sessions"] == 0:
                break
            await asyncio.sleep(0.05)
        assert info["sessions"] == 0
        d = await client.ws_connect("/ws")  # the server still serves
        await _next(d, "hello")
        meta, jpegs = await _frame(d)
        assert meta["count"] == 1 and jpegs
        await d.close()

    _run(app_parts, body)


def test_headless_recording_replays_with_worldline_sample(play_model, tmp_path: Path) -> None:
    import decord

    rows = [[0, 0, 0]] + [[1, 0, 0]] * 4 + [[4, 2, 3]] * 4
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"actions": rows}))
    out = tmp_path / "session.mp4"
    r = cli("worldline-play", str(play_model["pipeline"]), "--shards", str(play_model["shards"]),
            "--script", str(script), "--out", str(out), "--steps", "2", "--window", "4",
            "--stats-json", str(tmp_path / "stats.json"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fps end to end" in r.stdout and "key-to-frame latency" in r.stdout
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["latent_frames"] == 2 and stats["pixel_frames"] == 8
    doc = json.loads(out.with_suffix(".actions.json").read_text())
    assert doc["actions"] == rows and doc["replay"]["exact"]
    # Replay: the JSON's own command, in the folder holding actions.json + first.png.
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "actions.json").write_bytes(out.with_suffix(".actions.json").read_bytes())
    (replay / "first.png").write_bytes(out.with_suffix(".first.png").read_bytes())
    replay_matches(doc, replay, out, play_model)
    assert len(decord.VideoReader(str(out))) == 9
    # Headless from the trained run dir too, and --script needs --out.
    assert cli("worldline-play", str(play_model["run"]), "--script", str(script),
               timeout=60).returncode == 2

