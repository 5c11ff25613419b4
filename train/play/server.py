"""The ``worldline-play`` web server (aiohttp): the page, one WebSocket per session, downloads.

Protocol (``/ws``): the page sends JSON text messages (train/play/controls.py validates them:
``controls``, ``reset``, ``pause``, ``settings``, ``record``, ``stop_record``, ``ping``); the
server sends JSON ``hello`` / ``error`` / ``busy`` / ``frame`` / ``recording`` messages, and
after each ``frame`` message its ``count`` JPEGs as binary messages (the pixel frames of one
latent frame). A message that fails validation gets an ``error`` reply; the session goes on.

Why it stays responsive: all model compute (one ``PlaySession.advance`` at a time, for every
session) runs on a single worker thread, never on the event loop; sessions take turns frame by
frame. Backpressure: each session keeps at most one finished frame waiting to be sent; when
the client is slower than the model, an unsent frame is replaced by the newer one and counted
as dropped, so nothing queues without bound.

Audio (``--audio FILE``): every session's model hears the file (train/play/session.py), and
``GET /audio`` serves the file's bytes for the page to play along (404 without ``--audio``;
``/api/info`` says ``audio``). The page restarts it at each reset; it follows the frames only
by wall clock, while the model hears it in frame time, so they drift when steps are slow.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from aiohttp import WSMsgType, web

from worldline.train.play.contexts import Context, ContextLibrary, image_from_base64
from worldline.train.play.controls import ActionSpace, MessageError, parse_message
from worldline.train.play.session import Frame, PlaySession, PlaySettings, Soundtrack

log = logging.getLogger(__name__)

__all__ = ["PlayConfig", "make_app", "STATIC"]

PLAY: web.AppKey = web.AppKey("play", object)
STATIC = {"/": ("index.html", "text/html"), "/play.js": ("play.js", "text/javascript")}
# GET /audio's content type by the --audio file's extension (anything else: octet-stream).
AUDIO_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
               ".oga": "audio/ogg", ".opus": "audio/ogg", ".flac": "audio/flac",
               ".m4a": "audio/mp4", ".aac": "audio/aac", ".mp4": "video/mp4",
               ".webm": "audio/webm"}


@dataclass
class PlayConfig:
    """What ``worldline-play`` was started with."""

    settings: PlaySettings = field(default_factory=PlaySettings)
    max_sessions: int = 2
    max_message_bytes: int = 2 << 20  # an uploaded first image fits; nothing much larger
    prompt: Optional[str] = None
    max_recordings: int = 8  # finished recordings kept in memory for download
    audio: Optional[Soundtrack] = None  # --audio: the sessions hear it, GET /audio serves it


class PlayServer:
    """State shared by the sessions: the pipeline, contexts, worker thread, downloads."""

    def __init__(self, pipe: Any, contexts: Optional[ContextLibrary], default: Context,
                 cfg: PlayConfig, space: ActionSpace) -> None:
        self.pipe, self.contexts, self.default, self.cfg, self.space = (
            pipe, contexts, default, cfg, space)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worldline-play")
        self.sessions: set[int] = set()
        self.downloads: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self.stats = {"frames_sent": 0, "frames_dropped": 0, "rejected": 0}

    async def compute(self, fn, *args):
        """Run ``fn`` on the model's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def store(self, files: dict[str, bytes]) -> str:
        """Keep a finished recording for download under a random token (oldest evicted)."""
        token = secrets.token_urlsafe(16)
        self.downloads[token] = files
        while len(self.downloads) > self.cfg.max_recordings:
            self.downloads.popitem(last=False)
        return token


def _context(server: PlayServer, msg: dict[str, Any]) -> Context:
    size = tuple(server.default.frame.shape[1:])
    if "image" in msg:
        return Context("upload", image_from_base64(msg["image"], size), "")
    if server.contexts is None:
        raise KeyError("no context folders were given (--shards)")
    return server.contexts.get(msg["context"])


async def _send_frame(ws: web.WebSocketResponse, frame: Frame, server: PlayServer,
                      dropped: int, steps_ms: float) -> None:
    meta = {"type": "frame", "index": frame.index, "count": len(frame.jpegs),
            "seq": frame.seq, "actions": frame.actions, "compute_ms": round(frame.compute_ms, 2),
            "reset": frame.reset, "dropped": dropped, "errors": frame.errors,
            "recording": frame.recording, "step_ms": round(steps_ms, 2)}
    await ws.send_str(json.dumps(meta))
    for jpg in frame.jpegs:
        await ws.send_bytes(jpg)
    server.stats["frames_sent"] += 1


async def _producer(ws: web.WebSocketResponse, session: PlaySession, server: PlayServer,
                    state: dict[str, Any]) -> None:
    """Advance the session on the worker while the socket is open; hand each frame to the
    sender through a one-slot mailbox (a newer frame replaces an unsent one: dropped)."""
    slot: dict[str, Any] = {"frame": session.first, "dropped": 0}
    ready = asyncio.Event()
    ready.set()

    async def sender() -> None:
        while not ws.closed:
            await ready.wait()
            ready.clear()
            frame, slot["frame"] = slot["frame"], None
            if frame is None:
                continue
            await _send_frame(ws, frame, server, slot["dropped"], state["step_ms"])

    send_task = asyncio.create_task(sender())
    try:
        while not ws.closed:
            if state["paused"] and not session.pending:
                await state["wake"].wait()
                state["wake"].clear()
                continue
            t0 = time.perf_counter()
            frame = await server.compute(session.advance)
            state["step_ms"] = 1000 * (time.perf_counter() - t0)
            if frame.recording and "files" in frame.recording:
                token = server.store(frame.recording.pop("files"))
                frame.recording["files"] = [f"/download/{token}/{n}" for n in
                                            server.downloads[token]]
            old = slot["frame"]
            if old is not None:  # the client has not taken the last one yet: drop it,
                slot["dropped"] += 1  # but keep what must not get lost with it
                server.stats["frames_dropped"] += 1
                frame.reset = frame.reset or old.reset
                if old.recording and "files" in old.recording:
                    frame.recording = old.recording
            slot["frame"] = frame
            ready.set()
            await asyncio.sleep(0)  # let the reader and sender run between frames
    finally:
        send_task.cancel()


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    """One session per connection, or ``busy`` when ``max_sessions`` are running."""
    server: PlayServer = request.app[PLAY]
    ws = web.WebSocketResponse(max_msg_size=server.cfg.max_message_bytes, heartbeat=30)
    await ws.prepare(request)
    if len(server.sessions) >= server.cfg.max_sessions:
        await ws.send_str(json.dumps({"type": "busy", "message": (
            f"busy: {len(server.sessions)} of {server.cfg.max_sessions} sessions are in use; "
            "close another tab or start worldline-play with a larger --max-sessions")}))
        await ws.close()
        return ws
    sid = id(ws)
    server.sessions.add(sid)
    producer = None
    try:
        settings = PlaySettings(**vars(server.cfg.settings))  # per-session copy
        session = await server.compute(PlaySession, server.pipe, server.default, settings,
                                       server.cfg.prompt, server.space, server.cfg.audio)
        await ws.send_str(json.dumps({"type": "hello", "space": server.space.to_json(),
                                      "settings": vars(settings),
                                      "contexts": server.contexts.ids() if server.contexts
                                      else [], "context": server.default.id}))
        state = {"paused": False, "wake": asyncio.Event(), "step_ms": 0.0}
        producer = asyncio.create_task(_producer(ws, session, server, state))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                await ws.send_str(json.dumps({"type": "error", "message":
                                              "only JSON text messages are accepted"}))
                continue
            try:
                cmd = parse_message(msg.data, server.space, server.cfg.max_message_bytes)
                kind = cmd["type"]
                if kind == "controls":
                    session.set_controls(cmd["actions"], cmd["camera"], cmd.get("seq", 0))
                    await ws.send_str(json.dumps({"type": "ack", "seq": cmd.get("seq", 0),
                                                  "actions": cmd["actions"]}))
                elif kind == "pause":
                    state["paused"] = cmd["paused"]
                elif kind == "ping":
                    await ws.send_str(json.dumps({"type": "pong", "t": cmd.get("t"),
                                                  "stats": server.stats}))
                else:
                    if kind == "reset":
                        cmd["context_obj"] = _context(server, cmd)
                    session.pending.append(cmd)
                state["wake"].set()
            except (MessageError, KeyError, ValueError) as e:
                server.stats["rejected"] += 1
                await ws.send_str(json.dumps({"type": "error", "message": str(e)[:300]}))
    finally:
        if producer is not None:
            producer.cancel()
            try:  # let a step already on the worker finish before the slot is freed
                await producer
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - socket is gone
                pass
        server.sessions.discard(sid)
    return ws


async def static_handler(request: web.Request) -> web.Response:
    """The page and its script, from the package (fixed names: nothing else is served)."""
    name, ctype = STATIC[request.path]
    text = resources.files("worldline.train.play").joinpath("static", name).read_text()
    return web.Response(text=text, content_type=ctype)


async def info_handler(request: web.Request) -> web.Response:
    server: PlayServer = request.app[PLAY]
    return web.json_response({"sessions": len(server.sessions),
                              "max_sessions": server.cfg.max_sessions, "stats": server.stats,
                              "space": server.space.to_json(),
                              "source": str(server.pipe.source),
                              "audio": server.cfg.audio is not None})


async def audio_handler(request: web.Request) -> web.StreamResponse:
    """The --audio file's bytes (only that one path, fixed at start; 404 without --audio).
    A FileResponse answers Range requests, which browsers use to seek an <audio> to 0."""
    audio = request.app[PLAY].cfg.audio
    if audio is None:
        raise web.HTTPNotFound()
    ctype = AUDIO_TYPES.get(audio.path.suffix.lower(), "application/octet-stream")
    return web.FileResponse(audio.path, headers={"Content-Type": ctype})


async def download_handler(request: web.Request) -> web.Response:
    """A finished recording's file, by its random token (kept in memory, not on disk)."""
    server: PlayServer = request.app[PLAY]
    files = server.downloads.get(request.match_info["token"])
    name = request.match_info["name"]
    if files is None or name not in files:
        raise web.HTTPNotFound()
    ctype = {"mp4": "video/mp4", "json": "application/json", "png": "image/png"}
    return web.Response(body=files[name], content_type=ctype[name.rsplit(".", 1)[1]],
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


def make_app(pipe: Any, cfg: PlayConfig, contexts: Optional[ContextLibrary],
             default: Context, space: Optional[ActionSpace] = None) -> web.Application:
    """The aiohttp application (``web.run_app(make_app(...))``)."""
    app = web.Application(client_max_size=cfg.max_message_bytes)
    server = PlayServer(pipe, contexts, default, cfg, space or ActionSpace.of(pipe))
    app[PLAY] = server
    for path in STATIC:
        app.router.add_get(path, static_handler)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/api/info", info_handler)
    app.router.add_get("/audio", audio_handler)
    app.router.add_get("/download/{token}/{name}", download_handler)

    async def shutdown(_app: web.Application) -> None:
        server.worker.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(shutdown)
    return app
