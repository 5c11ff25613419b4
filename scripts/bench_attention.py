"""Attention kernels on CPU: fwd+bwd of the explicit (query-chunked) matmul path of
`worldline.models.attention` against PyTorch's SDPA (its CPU flash kernel), per precision and
shape. The dispatch thresholds in models/attention.py come from this table.

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

from worldline.models.attention import _matmul_attention

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


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two small shapes, few repeats")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = [(1, 2, 32, 32, 16), (1, 2, 32, 8, 16)] if a.quick else SHAPES
    warmup, repeats = (2, 2) if a.quick else (10, 15)
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
          f"{platform.machine()}, {a.threads} threads, torch {torch.__version__}")
    rows = []
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
