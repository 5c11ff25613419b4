"""One GPU benchmark command (issue 16): every headline number of one H100/H200 in < 8 minutes.

    python -m worldline.scripts.bench_gpu --json bench_gpu.json      # on the GPU
    python -m worldline.scripts.bench_gpu --quick --json /tmp/q.json  # CPU smoke, < 60 s

Parts (each in its own try/except and time budget: a failure records an error string and the
rest still run; every field is always present in the JSON, a value or "skipped: ..." / an
error):

1. ``matmul``: the bf16 8192^3 matmul ceiling (TFLOP/s).
2. ``step``: a bare 1B DiT step (conf/model/1B.yaml dims, ~12,480 tokens = a 16x8x60x104
   latent) fwd + bwd + fused AdamW in {eager, compiled} x {full, frame-causal attention} x
   {fp32 params + bf16 autocast, bf16 params}, with MFU against the train/perf.py peak table.
3. ``wan``: the same dims through scripts/bench_wan (our WanDiT twin vs diffusers'
   WanTransformer3DModel); "skipped: diffusers missing" without diffusers.
4. ``trainer``: the real Trainer (``model=1B stage=pretrain dist=fsdp train.precision=bf16``,
   ~10k tokens/step, a few steps) under torchrun with one process, reading the MFU the run
   logged to its ``metrics.jsonl`` (train/tracking.py); "skipped: no module named hydra"
   where Hydra is not installed (the GPU image has none).
5. ``rollout``: KV-cached rollout at ``model=base`` and ``model=1B`` (480p-like latent,
   4 Euler steps, bf16) with streaming VAE decode (models/stream_decode.py): pixel fps with
   decode, without decode, and with the CUDA-graph fast path.

``--quick`` runs the same parts at tiny shapes on the CPU in fp32 (compiled entries are
recorded as skipped: inductor needs minutes on a 2-core CPU), the trainer at ``model=tiny``
(dist=single, synthetic data, 3 steps). It is a smoke test of this script, not a result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
STEP_MODES = [(c, a, p) for c in ("eager", "compiled") for a in ("full", "frame_causal")
              for p in ("autocast", "bf16_params")]
ROLLOUT_MODES = ("no_decode", "decode", "decode_compiled")
# Fallback dims (conf/model/*.yaml) for an image without PyYAML; the yaml files win.
_DIMS = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4, in_channels=4, text_dim=128,
                 ae=dict(latent_channels=4, base_channels=16, channel_mult=[1, 2, 4],
                         num_res_blocks=1)),
    "small": dict(hidden_size=384, depth=12, num_heads=6, in_channels=8, text_dim=256,
                  ae=dict(latent_channels=8, base_channels=32, channel_mult=[1, 2, 4, 4],
                          num_res_blocks=2)),
    "base": dict(hidden_size=768, depth=12, num_heads=12, in_channels=16, text_dim=512,
                 ae=dict(latent_channels=16, base_channels=64, channel_mult=[1, 2, 4, 4],
                         num_res_blocks=2)),
    "1B": dict(hidden_size=2048, depth=16, num_heads=16, in_channels=16, text_dim=1024,
               ae=dict(latent_channels=16, base_channels=96, channel_mult=[1, 2, 4, 4],
                       num_res_blocks=2)),
}


def model_dims(size: str) -> dict[str, Any]:
    """hidden/depth/heads/latent channels/text_dim and the autoencoder of conf/model/<size>."""
    try:
        import yaml

        cfg = yaml.safe_load((REPO / "conf" / "model" / f"{size}.yaml").read_text())
        d = cfg["dit"]
        a = cfg["autoencoder"]
        return dict({k: d[k] for k in ("hidden_size", "depth", "num_heads", "in_channels",
                                       "text_dim")},
                    ae={k: a[k] for k in ("latent_channels", "base_channels", "channel_mult",
                                          "num_res_blocks")})
    except (ImportError, OSError, KeyError):
        return _DIMS[size]


def _err(e: BaseException) -> str:
    """A one-line error record (the last frame is where it broke)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


PART_SECONDS: dict[str, float] = {}
# perf_counter() after which parts are skipped, not started: the whole command must fit its
# budget (8 minutes on one GPU) even when compiles run long; set by run_all.
DEADLINE = [float("inf")]


def guarded(fn: Callable[[], Any], name: str = "") -> Any:
    """fn() or its error string, so one failing part never stops the others (its wall time
    goes to PART_SECONDS[name])."""
    t0 = time.perf_counter()
    if t0 > DEADLINE[0]:
        return "skipped: the run's time budget was spent before this part"
    try:
        return fn()
    except ModuleNotFoundError as e:
        return f"skipped: {e.name} missing"
    except Exception as e:  # noqa: BLE001 - recorded, reported, and the run goes on
        return _err(e)
    finally:
        PART_SECONDS[name] = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device, budget_s: float, max_iters: int,
          warmup: int = 1) -> dict[str, float]:
    """Median seconds of fn over up to max_iters calls, stopping once budget_s is spent
    (warm-up excluded from the statistic but not from the budget)."""
    t_start = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(dev)
    times: list[float] = []
    while len(times) < max_iters and (not times or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "iters": len(times),
            "total_s": time.perf_counter() - t_start}


# --- 1. matmul ceiling --------------------------------------------------------------------
def bench_matmul(dev: torch.device, quick: bool) -> dict[str, Any]:
    n = 512 if quick else 8192
    dtype = torch.float32 if quick else torch.bfloat16
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    r = timed(lambda: a @ b, dev, budget_s=2.0 if quick else 10.0, max_iters=50, warmup=3)
    return {"n": n, "dtype": str(dtype).split(".")[-1], "tflops": 2 * n**3 / r["median_s"] / 1e12,
            **r}


# --- 2. bare DiT step -----------------------------------------------------------------------
def _peak(dev: torch.device, quick: bool) -> tuple[float, str]:
    """The train/perf.py peak (989 TFLOP/s on H100/H200); on CPU a matmul probe."""
    from worldline.train.perf import peak_flops

    return peak_flops(dev, torch.float32 if quick else torch.bfloat16)


def bench_step(dev: torch.device, quick: bool, compiled: bool, attention: str, precision: str,
               peak: float) -> dict[str, Any]:
    """fwd + bwd + (fused) AdamW of one DiT step; MFU = model FLOPs / time / peak."""
    if compiled and quick:
        return "skipped: --quick does not compile (inductor takes minutes on a small CPU)"
    from worldline.models.dit import DiTArgs, VideoDiT

    d = model_dims("tiny" if quick else "1B")
    latent = (d["in_channels"], 3, 8, 8) if quick else (d["in_channels"], 8, 60, 104)
    text_len = 8 if quick else 64
    torch.manual_seed(0)
    args = DiTArgs(**{k: d[k] for k in ("hidden_size", "depth", "num_heads", "in_channels",
                                        "text_dim")},
                   num_action_slots=0, camera_dim=0, frame_causal=attention == "frame_causal")
    with torch.device(dev):
        dit = VideoDiT(args)
    bf16_params = precision == "bf16_params" and not quick
    if bf16_params:
        dit = dit.to(torch.bfloat16)
    flops = dit.flops_per_sample(latent, text_len)
    if compiled:  # per block, as the Trainer's train.compile does: one graph serves all blocks
        for i, blk in enumerate(dit.blocks):
            dit.blocks[i] = torch.compile(blk)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=dev.type == "cuda")
    pdt = torch.bfloat16 if bf16_params else torch.float32
    x = torch.randn(1, *latent, device=dev, dtype=pdt)
    t = torch.rand(1, device=dev, dtype=pdt)
    text = torch.randn(1, text_len, d["text_dim"], device=dev, dtype=pdt)
    use_autocast = precision == "autocast" and not quick

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = dit(x, t, text)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    r = timed(step, dev, budget_s=1.0 if quick else 10.0, max_iters=1 if quick else 10,
              warmup=0 if quick else 2)
    _, t_, h, w = latent
    return {"tokens": t_ * h * w // 4, "params": sum(p.numel() for p in dit.parameters()),
            "dtype": "float32 (quick)" if quick else precision, "flops_per_step": flops,
            "tflops": flops / r["median_s"] / 1e12, "mfu": flops / r["median_s"] / peak, **r}


# --- 3. Wan twin ----------------------------------------------------------------------------
def bench_wan(dev: torch.device, quick: bool) -> dict[str, Any]:
    import diffusers  # noqa: F401 - checked first so a missing package reads as a skip

    from worldline.scripts import bench_wan as bw

    d = model_dims("tiny" if quick else "1B")
    latent = (d["in_channels"], 3, 8, 8) if quick else (d["in_channels"], 8, 60, 104)
    return bw.bench(d["hidden_size"], d["depth"], d["num_heads"], latent, 1, 8 if quick else 64,
                    d["text_dim"], 1 if quick else 5, "fp32" if quick else "bf16", dev.type)


# --- 4. the real Trainer --------------------------------------------------------------------
def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of the run's metrics.jsonl (train/tracking.py writes one per log step)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            pass
    return rows


def bench_trainer(quick: bool, budget_s: float) -> dict[str, Any]:
    """An autoencoder run (1 step: the latent stage needs one) then the pretrain run; the
    MFU is the one the Trainer itself logged (its own FLOP count and peak)."""
    import hydra  # noqa: F401 - the Trainer's CLI is Hydra; without it this part is skipped

    root = Path(tempfile.mkdtemp(prefix="bench_gpu_trainer_"))
    if quick:
        size, dist, steps = "tiny", "single", 2
        # The smoke recipe, fewer clips and 1-step end-of-run samples: seconds, not minutes.
        data = ["experiment=smoke", "data.synthetic.num_clips=8", "sample.num_steps=1"]
        launch = [sys.executable, "-m", "worldline.train.main"]
    else:
        # 33 frames at 288x512 -> 9 x 18 x 32 latent, /4 patches = 5,184 tokens, batch 2.
        size, dist, steps = "1B", "fsdp", 6
        data = ["experiment=smoke", "data.num_frames=33", "data.resolution=[288,512]",
                "data.batch_size=2", "data.synthetic.num_frames=33",
                "data.synthetic.height=288", "data.synthetic.width=512",
                "data.synthetic.num_clips=16", "train.precision=bf16"]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=1", "-m", "worldline.train.main"]
    common = [*data, f"run.root={root}", f"data.root={root / 'data'}", "logger=none",
              f"model={size}", f"dist={dist}", "train.log_every=1",
              *(["run.threads=1"] if quick else [])]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, extra in (("ae", ["stage=autoencoder", "train.steps=1", "train.ckpt_every=1"]),
                        ("pre", ["stage=pretrain", f"train.steps={steps}", "train.ckpt_every=1000",
                                 f"stage.autoencoder_from={root / 'ae'}"])):
        left = budget_s - (time.perf_counter() - t0)
        r = subprocess.run([*launch, *common, f"run.name={name}", *extra], capture_output=True,
                           text=True, timeout=max(left, 1), env=env)
        if r.returncode:
            return f"error: {name} run exited {r.returncode}: {r.stderr.strip()[-300:]}"
    rows = [r for r in _read_metrics(root / "pre") if "mfu" in r]
    last = rows[-1]
    return {"model": size, "dist": dist, "steps": len(rows), "run_dir": str(root / "pre"),
            "mfu": last["mfu"], "tokens_per_s": last["tokens_per_s"],
            "samples_per_s": last["samples_per_s"], "peak_mem_gb": last.get("peak_mem_gb"),
            "wall_s": time.perf_counter() - t0}


# --- 5. rollout with streaming decode --------------------------------------------------------
def bench_rollout(dev: torch.device, size: str, quick: bool, mode: str) -> dict[str, Any]:
    """Pixel fps of a KV-cached rollout (4 Euler steps), end to end with or without decode."""
    if mode == "decode_compiled" and dev.type != "cuda":
        return "skipped: CUDA-graph fast path is CUDA only"
    from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
    from worldline.models.dit import DiTArgs, VideoDiT
    from worldline.models.stream_decode import rollout_decoded

    d = model_dims(size)
    # 480p-like: 480x832 pixels -> 60x104 latent (spatial 8); quick: 64x64 -> 8x8.
    h, w = (8, 8) if quick else (60, 104)
    # GPU: context = window, so every frame's cache has the same length from the start and
    # the CUDA-graph path compiles three graphs (prefill, denoise step, commit), not one per
    # cache length.
    ctx_n, new, window = (2, 3, 4) if quick else (8, 8, 8)
    dtype = torch.float32 if quick else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        dit = VideoDiT(DiTArgs(**{k: d[k] for k in ("hidden_size", "depth", "num_heads",
                                                    "in_channels", "text_dim")},
                               num_action_slots=0, camera_dim=0, frame_causal=True,
                               mask_channel=True)).to(dtype).eval()
        ae = VideoAutoencoder(AutoencoderArgs(**d["ae"], temporal_downsample=4,
                                              spatial_downsample=8, patch_size=2)).eval()
    c = d["in_channels"]
    g = torch.Generator(device="cpu").manual_seed(1)
    ctx = torch.randn(1, c, ctx_n, h, w, generator=g).to(dev, dtype)
    noise = torch.randn(1, c, new, h, w, generator=g).to(dev, dtype)
    text = torch.randn(1, 16, d["text_dim"], generator=g).to(dev, dtype)

    compile_mode = "reduce-overhead" if mode == "decode_compiled" else None

    def run():
        return rollout_decoded(dit, ae, ctx, new, decode=mode != "no_decode", noise=noise,
                               decode_dtype=None if quick else torch.bfloat16, text=text,
                               num_steps=4, window=window, compile_mode=compile_mode)

    warm = run()  # warm-up (and the compile, for the fast path); --quick keeps this one
    res = warm if quick else min((run() for _ in range(2)), key=lambda r: r.seconds)
    return {"size": size, "latent_hw": [h, w], "context": ctx_n, "new_frames": new,
            "window": window, "num_steps": 4, "dtype": str(dtype).split(".")[-1],
            "pixel_frames": res.pixel_frames, "seconds": res.seconds,
            "pixel_fps": res.pixel_fps, "latent_fps": res.latent_fps,
            "first_run_s": warm.seconds, "compiled": res.extras["compiled"]}


# --- driver ---------------------------------------------------------------------------------
def machine(dev: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "device": str(dev), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    return info


def run_all(quick: bool, rollout_sizes: list[str], trainer_budget_s: float,
            budget_s: float = float("inf"), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every part, in order (cheap and headline first), each guarded; parts that would start
    after ``budget_s`` are recorded as skipped."""
    dev = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    DEADLINE[0] = time.perf_counter() + budget_s
    threads = torch.get_num_threads()
    if quick:
        # One intra-op thread: on a small shared CPU every small op of a 2-thread region
        # waits for a busy core (BENCHMARKS.md, worldline-play: 3x+ slower with 2 threads).
        torch.set_num_threads(1)
    try:
        return _run_parts(dev, quick, rollout_sizes, trainer_budget_s, log)
    finally:  # a caller in the same process (a test) keeps its own setting
        torch.set_num_threads(threads)


def _run_parts(dev: torch.device, quick: bool, rollout_sizes: list[str],
               trainer_budget_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"quick": quick, "machine": machine(dev)}
    log(f"# bench_gpu {'--quick (CPU smoke, not a GPU result)' if quick else ''}")
    log(f"machine: {out['machine']}")
    t0 = time.perf_counter()
    out["matmul"] = guarded(lambda: bench_matmul(dev, quick), "matmul")
    peak = guarded(lambda: _peak(dev, quick), "peak")
    out["peak"] = {"flops": peak[0], "source": peak[1]} if isinstance(peak, tuple) else peak
    pk = peak[0] if isinstance(peak, tuple) else 989e12
    out["step"] = {f"{c}/{a}/{p}": guarded(lambda c=c, a=a, p=p: bench_step(
        dev, quick, c == "compiled", a, p, pk), f"step/{c}/{a}/{p}") for c, a, p in STEP_MODES}
    out["wan"] = guarded(lambda: bench_wan(dev, quick), "wan")
    out["trainer"] = guarded(lambda: bench_trainer(quick, trainer_budget_s), "trainer")
    out["rollout"] = {f"{s}/{m}": guarded(lambda s=s, m=m: bench_rollout(dev, s, quick, m),
                                          f"rollout/{s}/{m}")
                      for s in rollout_sizes for m in ROLLOUT_MODES}
    out["part_seconds"] = dict(PART_SECONDS)
    out["total_s"] = time.perf_counter() - t0
    for line in table(out):
        log(line)
    return out


def _fmt(v: Any, key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    if isinstance(v, dict):
        return format(v[key] * scale, spec)
    return str(v)[:70]


def table(out: dict[str, Any]) -> list[str]:
    """The markdown table the run prints (the JSON holds the rest)."""
    rows = ["| measurement | value | note |", "|---|---|---|"]
    mm = out["matmul"]
    shape = f"{mm['n']}^3 {mm['dtype']}" if isinstance(mm, dict) else ""
    rows.append(f"| matmul ceiling TFLOP/s | {_fmt(mm, 'tflops')} | {shape} |")
    for k, v in out["step"].items():
        note = (f"{v['tokens']} tok, {_fmt(v, 'median_s', 1e3, '.1f')} ms"
                if isinstance(v, dict) else "")
        rows.append(f"| step {k} MFU % | {_fmt(v, 'mfu', 100, '.1f')} | {note} |")
    w = out["wan"]
    rows.append(f"| WanDiT / diffusers Wan step time | {_fmt(w, 'time_ratio')} | |")
    tr = out["trainer"]
    rows.append(f"| Trainer logged MFU % | {_fmt(tr, 'mfu', 100, '.1f')} | "
                f"{_fmt(tr, 'tokens_per_s', 1, '.0f') if isinstance(tr, dict) else ''} tok/s |")
    for k, v in out["rollout"].items():
        rows.append(f"| rollout {k} pixel fps | {_fmt(v, 'pixel_fps')} | "
                    f"{_fmt(v, 'seconds', 1, '.2f') + ' s' if isinstance(v, dict) else ''} |")
    rows.append(f"| total | {out['total_s']:.1f} s | |")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (< 60 s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--rollout-sizes", nargs="+", default=None,
                   help="model sizes of the rollout part (default: tiny with --quick, else "
                        "base 1B)")
    p.add_argument("--trainer-budget-s", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no part after this many seconds (default 420 on GPU: the "
                        "last part then has ~1 minute before the 8-minute mark)")
    a = p.parse_args(argv)
    sizes = a.rollout_sizes or (["tiny"] if a.quick else ["base", "1B"])
    out = run_all(a.quick, sizes, a.trainer_budget_s or (120.0 if a.quick else 150.0),
                  a.budget_s or (float("inf") if a.quick else 420.0))
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
