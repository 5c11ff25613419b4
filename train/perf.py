"""Throughput and model-FLOPs-utilisation (MFU) bookkeeping.

MFU = achieved model FLOP/s ÷ peak FLOP/s. Peaks are dense bf16 tensor-core numbers for known
GPUs; on a CPU (or an unknown GPU) the peak is *measured* once with a matmul probe, so the CPU
MFU reads as "fraction of what this machine's matmul reaches".
"""
from __future__ import annotations

import time

import torch

# Dense (non-sparse) bf16 peak FLOP/s per device, from the vendors' datasheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is 756e12
    "A100": 312e12,
}


def _probe_size(device: torch.device, dtype: torch.dtype, n_max: int, budget: float) -> int:
    """The largest power-of-two n <= n_max whose n×n matmul takes under ``budget`` seconds.
    A fixed 2048 cost ~60 s per matmul for bf16 on a CPU without bf16 units (4 minutes of
    probing before the first step); matmul efficiency is flat well below 2048."""
    n = 256
    while n < n_max:
        a = torch.randn(n, n, device=device, dtype=dtype)
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        if (time.perf_counter() - t0) * 8 > budget:  # the next size costs ~8x
            break
        n *= 2
    return n


def _probe_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048,
                        seconds: float = 0.25, trials: int = 3) -> float:
    """Best of ``trials`` timed bursts of n×n matmuls (n at most ``n``, smaller when one
    would outlast a burst): the best burst is the one least disturbed by other processes on
    a shared host, i.e. closest to the machine's peak."""
    n = _probe_size(device, dtype, n, seconds)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from) for ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in PEAK_BF16_FLOPS.items():
            if key in name:
                return val, f"table:{key}"
    return _probe_matmul_flops(device, dtype), f"probe:{device.type}"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
