"""``worldline-play``: play a trained world model in the browser, or headless from a script.

    worldline-play runs/control --shards runs/_datasets/synthetic-xxx   # prints the URL
    worldline-play runs/control --script actions.json --out session.mp4  # no browser, no server
    worldline-play runs/audio --audio song.wav ...   # an audio-conditioned model plays along

RUN is a run dir, checkpoint, export or pipeline folder (WorldPipeline.from_pretrained).
Context clips come only from the ``--shards`` folders (or an image uploaded in the page, or
``--first-image`` headless); without them the session starts from a first frame the model
generates from ``--prompt``. The server binds 127.0.0.1 unless ``--host`` says otherwise.

Headless mode reads ``worldline-sample``'s ``sample.actions`` format (one row per pixel frame,
row 0 for the context frame; a recording's actions.json works as is), rolls out
(rows - 1) / temporal_downsample latent frames exactly as the live server would (the same
code, no event loop), writes the mp4 (and the actions JSON + first frame next to it) and
prints end-to-end fps and per-frame latency (controls read → JPEG ready).

``--audio FILE`` (models trained with ``audio`` in ``stage.conditions``; exit 2 otherwise or
when the file holds no readable audio): the model hears the file in frame time, from sample 0
at every reset, silence after its end (train/play/session.py); the recording's mp4 carries it
and its replay command passes ``sample.audio=FILE``. The page plays the same file from
``GET /audio`` restarted at each reset, synchronised only approximately (by wall clock).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["main", "build_parser", "run_headless"]

log = logging.getLogger("worldline.play")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldline-play", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run dir | checkpoint | export | pipeline folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0: any free port")
    p.add_argument("--shards", action="append", default=[], metavar="DIR",
                   help="folder of WebDataset .tar shards to take context clips from "
                        "(repeatable; no other file is ever read for the page)")
    p.add_argument("--context", help="context id to start from (default: the first clip)")
    p.add_argument("--first-image", help="headless: start from this image file")
    p.add_argument("--prompt", help="text prompt (default: the context clip's caption)")
    p.add_argument("--max-sessions", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="sampling steps per latent frame")
    p.add_argument("--cfg", type=float, default=1.0, help="text guidance scale")
    p.add_argument("--action-cfg", type=float, default=1.0, help="action guidance scale")
    p.add_argument("--window", type=int, default=8, help="past latent frames in the KV cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: a play step's ops are small, and "
                        "on the shared 2-core VM 2 threads ran 26x slower; BENCHMARKS.md)")
    p.add_argument("--action-names", help="comma-separated names of the discrete actions")
    p.add_argument("--audio", metavar="FILE",
                   help="play along to this audio file (models trained with audio)")
    p.add_argument("--script", help="headless: actions JSON (sample.actions format)")
    p.add_argument("--out", help="headless: the mp4 to write")
    p.add_argument("--stats-json", help="headless: also write the timings here")
    return p


def _load(args: argparse.Namespace):
    import torch

    from worldline.train.pipeline import WorldPipeline
    from worldline.train.play.controls import ActionSpace

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cpu":  # as worldline-sample will for the replay (its command names the threads)
        from worldline.train.dist import cpu_setup

        cpu_setup(max(1, args.threads))
    pipe = WorldPipeline.from_pretrained(args.run, device=dev)
    if pipe.world_model is None:
        raise SystemExit(f"worldline-play: {args.run} is an autoencoder; play needs a world model")
    if not pipe.transformer.args.frame_causal:
        raise SystemExit("worldline-play: needs a block-causal model (model.dit.frame_causal)")
    names = args.action_names.split(",") if args.action_names else None
    return pipe, ActionSpace.of(pipe, names)


def _soundtrack(pipe, path: str):
    """--audio: the file at the model's audio rate (ValueError: no audio model, bad file)."""
    from worldline.train.play.session import Soundtrack

    return Soundtrack.load(path, pipe)


def _start(pipe, args: argparse.Namespace):
    """The context library (if --shards) and the context to start from."""
    from worldline.train.play.contexts import Context, ContextLibrary, image_from_bytes

    size = tuple(pipe.settings.sample_size[1:])
    lib = ContextLibrary(args.shards, size) if args.shards else None
    if args.first_image:
        return lib, Context("first-image", image_from_bytes(Path(args.first_image).read_bytes(),
                                                           size), "")
    if lib is not None and lib.ids():
        return lib, lib.get(args.context or lib.ids()[0])
    # No context given: the model's own first frame, as pipe.rollout does without one.
    import torch

    from worldline.train.media import to_uint8_frames

    first = pipe.generate([args.prompt or ""], num_frames=1, seed=args.seed,
                          num_steps=args.steps)
    frame = torch.from_numpy(to_uint8_frames(first)[0, 0]).permute(2, 0, 1).contiguous()
    return lib, Context("generated", frame, args.prompt or "")


def _settings(args: argparse.Namespace, pipe):
    from worldline.train.play.session import PlaySettings

    # The recording's frame rate is the model's (worldline-sample's), so muxed audio lines up.
    return PlaySettings(num_steps=args.steps, cfg_scale=args.cfg,
                        action_cfg_scale=args.action_cfg, window=args.window, seed=args.seed,
                        fps=pipe.settings.fps or 8.0)


def run_headless(pipe, space, context, settings, script: Path, out: Path,
                 prompt: Optional[str] = None, audio=None) -> dict:
    """Roll ``script``'s controls through a :class:`PlaySession` (the server's code path) and
    write ``out`` (+ ``out``.actions.json, ``out``.first.png); ``audio``: a Soundtrack the
    model hears. Returns timings."""
    from worldline.train.play.session import PlaySession
    from worldline.train.sampling import load_controls

    ctl = load_controls(script)
    tf = pipe.transformer.args.temporal_downsample
    rows_a, rows_c = ctl.get("actions"), ctl.get("camera")
    total = next(r.shape[0] for r in (rows_a, rows_c) if r is not None)
    n = (total - 1) // tf
    if n < 1:
        raise SystemExit(f"worldline-play: {script} has {total} rows; at least 1 + {tf} needed")

    def rows(lo: int, hi: int, seq: int):
        dev = pipe.device
        a = None if rows_a is None or not space.slots else rows_a[None, lo:hi].to(dev)
        c = None if rows_c is None or not space.camera_dim else rows_c[None, lo:hi].to(dev)
        return a, c, seq

    t_start = time.perf_counter()
    session = PlaySession(pipe, context, settings, prompt, space, audio)
    session.start(context, rows=rows(0, 1, 0), record=n)  # row 0 conditions the context
    lat = []
    t_loop = time.perf_counter()
    for i in range(n):
        frame = session.advance(rows(1 + i * tf, 1 + (i + 1) * tf, i + 1))
        lat.append(frame.compute_ms)
    loop_s = time.perf_counter() - t_loop
    files = session.advance().recording["files"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(files["session.mp4"])
    out.with_suffix(".actions.json").write_bytes(files["actions.json"])
    out.with_suffix(".first.png").write_bytes(files["first.png"])
    return {"latent_frames": n, "pixel_frames": n * tf, "loop_s": loop_s,
            "latent_fps": n / loop_s, "fps": n * tf / loop_s,
            "latency_ms_mean": statistics.fmean(lat), "latency_ms_p50": statistics.median(lat),
            "latency_ms_max": max(lat), "total_s": time.perf_counter() - t_start,
            "num_steps": settings.num_steps, "device": str(pipe.device)}


def serve(pipe, space, lib, context, args: argparse.Namespace, audio=None) -> None:
    """Run the web server until interrupted."""
    from aiohttp import web

    from worldline.train.play.server import PlayConfig, make_app

    cfg = PlayConfig(settings=_settings(args, pipe), max_sessions=args.max_sessions,
                     prompt=args.prompt, audio=audio)
    app = make_app(pipe, cfg, lib, context, space)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"worldline-play: WARNING: binding {args.host}: anyone who can reach this "
              "address can drive the model (there is no authentication)", file=sys.stderr,
              flush=True)

    runner = web.AppRunner(app)
    import asyncio

    async def run() -> None:
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the real one when --port 0
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"worldline-play: serving {pipe.source} at http://{host}:{port}/", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    """``worldline-play`` entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if bool(args.script) != bool(args.out):
        print("worldline-play: error: --script and --out go together (headless mode)",
              file=sys.stderr)
        return 2
    try:
        pipe, space = _load(args)
        audio = _soundtrack(pipe, args.audio) if args.audio else None
        lib, context = _start(pipe, args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"worldline-play: error: {e}", file=sys.stderr)
        return 2
    if args.script:
        stats = run_headless(pipe, space, context, _settings(args, pipe), Path(args.script),
                             Path(args.out), args.prompt, audio)
        print(f"worldline-play: wrote {args.out}: {stats['latent_frames']} latent frames "
              f"({stats['pixel_frames']} pixel frames), {stats['fps']:.1f} fps end to end, "
              f"key-to-frame latency {stats['latency_ms_mean']:.1f} ms mean / "
              f"{stats['latency_ms_max']:.1f} ms max ({stats['device']}, "
              f"{stats['num_steps']} steps)", flush=True)
        if args.stats_json:
            Path(args.stats_json).write_text(json.dumps(stats, indent=1))
        return 0
    serve(pipe, space, lib, context, args, audio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
