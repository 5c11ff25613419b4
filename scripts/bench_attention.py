"""Attention kernels on CPU: fwd+bwd of the explicit (query-chunked) matmul path of
`worldline.models.attention` against PyTorch's SDPA (its CPU flash kernel), per precision and
shape. The dispatch thresholds in models/attention.py come from this table; the CPU
capability (``torch.backends.cpu.get_cpu_capability()``, bf16 hardware support) is printed
with it, since the bf16 choice depends on it.

Then, side by side at one moderate DiT shape, block-causal vs full attention: full SDPA,
block-causal through the dense mask (SDPA / the dispatcher), and FlexAttention (eager, and
compiled when --compiled-flex; forward only: torch 2.13 has no flex backward on CPU).

    python -m worldline.scripts.bench_attention            # ~2 min on 2 CPU cores
    python -m worldline.scripts.bench_attention --quick    # smoke run (seconds)

Each shape is timed in steady state: oneDNN builds its reduced-precision kernels on first
use of a shape, and the first tens of calls can be 2-3x slower, so every shape is warmed up
before the interleaved, timed repeats (medians), after one untimed pass over every shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from worldline.models import flex
from worldline.models.attention import _matmul_attention, attention, cpu_bf16_hardware
from worldline.models.layout import FrameCausal
from worldline.scripts.bench_model import median_time

# (batch, heads, queries, keys, head dim): DiT self-attention at growing token counts, and
# text cross-attention (32 keys).
SHAPES = [(1, 6, 320, 320, 64), (1, 6, 768, 768, 64), (1, 6, 1280, 1280, 64),
          (1, 6, 2048, 2048, 64), (1, 12, 320, 320, 64), (1, 16, 512, 512, 128),
          (1, 6, 320, 32, 64), (1, 12, 1024, 32, 64), (1, 6, 4096, 4096, 64)]


def crossover(shape: tuple[int, ...], dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """Median fwd+bwd seconds of SDPA and of the matmul path for one shape and dtype."""
    b, h, nq, nk, d = shape
    q = torch.randn(b, h, nq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, h, nk, d, dtype=dtype, requires_grad=True) for _ in range(2))
    kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
               "matmul": lambda: _matmul_attention(q, k, v, None)}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for fn in kernels.values():
        for _ in range(warmup):
            fn().sum().backward()
    for _ in range(repeats):  # interleaved: both kernels see the same machine load
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn().sum().backward()
            times[name].append(time.perf_counter() - t0)
    sdpa, mm = (statistics.median(times[n]) for n in kernels)
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "scores_per_head": nq * nk, "sdpa_ms": 1e3 * sdpa, "matmul_ms": 1e3 * mm,
            "matmul_over_sdpa": mm / sdpa}


def cpu_info() -> dict:
    """CPU capability as PyTorch dispatches kernels for it, and bf16 hardware support."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_hardware": cpu_bf16_hardware()}


def block_causal(frames: int, per_frame: int, heads: int, dh: int, warmup: int, repeats: int,
                 compiled_flex: bool) -> list[dict]:
    """Milliseconds per call, block-causal vs full attention at one shape, fp32 and bf16."""
    layout = FrameCausal(frames, 0, per_frame, 0)
    n = layout.num_queries
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(1, heads, n, dh, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        mask = layout.dense()

        def fwd_bwd(fn):
            return lambda: fn().sum().backward()

        def fwd(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        cases = {
            "full sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "full dispatch": lambda: attention(q, k, v),
            "causal dense sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "causal dense dispatch": lambda: attention(q, k, v, attn_mask=layout),
        }
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        flex_cases = {"causal flex eager": lambda: flex.block_causal_attention(
            qd, kd, vd, layout, compiled=False)}
        if compiled_flex:
            flex_cases["causal flex compiled"] = lambda: flex.block_causal_attention(
                qd, kd, vd, layout, compiled=True)
        for name, fn in {**cases, **flex_cases}.items():
            t0 = time.perf_counter()
            fwd(fn)()  # first call: builds (and for compiled flex, compiles) the kernel
            first = time.perf_counter() - t0
            r = {"case": name, "dtype": str(dtype).removeprefix("torch."), "tokens": n,
                 "frames": frames, "heads": heads, "head_dim": dh, "first_call_s": first,
                 "fwd_ms": 1e3 * median_time(fwd(fn), repeats, warmup),
                 "fwd_bwd_ms": (1e3 * median_time(fwd_bwd(fn), repeats, warmup)
                                if name in cases else None)}
            rows.append(r)
            fb = "      -" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:7.1f}"
            print(f"{r['dtype']:9s} N={n:5d} {name:22s} fwd {r['fwd_ms']:7.1f} ms  "
                  f"fwd+bwd {fb} ms  first call {first:5.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and with --json writes) the CPU info, the SDPA/matmul
    crossover rows and the block-causal vs full rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two small shapes, few repeats")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--compiled-flex", action="store_true",
                   help="also time torch.compile'd CPU flex (needs a C++ compiler; ~30 s build)")
    p.add_argument("--skip-crossover", action="store_true", help="block-causal table only")
    p.add_argument("--max-scores", type=int, default=None,
                   help="only shapes with at most this many scores per head (slow CPUs)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (medians)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = [(1, 2, 32, 32, 16), (1, 2, 32, 8, 16)] if a.quick else SHAPES
    if a.max_scores:
        shapes = [s for s in shapes if s[2] * s[3] <= a.max_scores]
    warmup, repeats = (2, 2) if a.quick else (max(3, a.repeats * 2 // 3), a.repeats)
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
          f"{platform.machine()}, {a.threads} threads, torch {torch.__version__}, "
          f"{cpu_info()}")
    rows: list[dict] = []
    if a.skip_crossover:
        shapes = []
    for dtype in (torch.bfloat16, torch.float32):  # untimed pass: the process's cold start
        for shape in shapes:
            crossover(shape, dtype, 3, 1)
    for dtype in (torch.bfloat16, torch.float32):
        for shape in shapes:
            r = crossover(shape, dtype, warmup, repeats)
            rows.append(r)
            print(f"{r['dtype']:9s} {str(tuple(shape)):26s} scores/head {r['scores_per_head']:>8d}"
                  f"  sdpa {r['sdpa_ms']:7.2f} ms  matmul {r['matmul_ms']:7.2f} ms"
                  f"  ratio {r['matmul_over_sdpa']:.2f}", flush=True)
    causal = (block_causal(2, 16, 2, 16, 1, 2, a.compiled_flex) if a.quick else
              block_causal(8, 128, 6, 64, 3, max(3, a.repeats // 2), a.compiled_flex))
    res = {**cpu_info(), "torch": torch.__version__, "crossover": rows, "block_causal": causal}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
