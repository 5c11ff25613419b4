"""Throughput and model-FLOPs-utilisation (MFU) bookkeeping.

MFU = achieved model FLOP/s ÷ peak FLOP/s. Peaks are dense bf16 tensor-core numbers for known
GPUs; on a CPU (or an unknown GPU) the peak is *measured* once with a matmul probe, so the CPU
MFU reads as "fraction of what this machine's matmul reaches".

A measured peak can be wrong: a probe that runs while the CPU is busy (another job, a W&B
service starting, data workers) reads low, and every MFU after it reads high (a real run
logged 209-219 %). So the Trainer probes at the start of ``train()`` (before the resume, the
tracker and the loader's workers), the probe keeps the best of several bursts, and
:class:`PeakFlops` judges each MFU it divides out: ``mfu_reliable`` is logged next to ``mfu``,
0 when the MFU exceeds 1.0 (impossible against a true peak) or the probe read far below what
any machine of this kind reaches (:func:`plausible_floor`), with one warning per run. Nothing
is capped: the logged MFU is the honest quotient; the flag says whether to believe it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

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
                        seconds: float = 0.2, trials: int = 5) -> float:
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


def plausible_floor(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s below which a *measured* peak is implausible for ``device``: any x86/ARM core
    this code runs on does >= 1 GFLOP/s per thread in an fp32/bf16 matmul (an AVX2 core
    reaches tens), so a lower reading means the probe was starved, not that the machine is
    slow. GPUs: 1 TFLOP/s (below any datacenter part in any dtype)."""
    if device.type == "cuda":
        return 1e12
    return 1e9 * torch.get_num_threads()


@dataclass
class PeakFlops:
    """The peak an MFU is divided by, where it came from, and whether to trust the quotient.

    ``floor``: :func:`plausible_floor` for a probed peak (0 for a datasheet number)."""

    value: float
    source: str
    floor: float = 0.0
    _warned: bool = False

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype = torch.float32,
                measured: Optional[float] = None) -> "PeakFlops":
        """Datasheet peak for a known GPU, else the matmul probe; ``measured`` stands in for
        the probe's reading (tests inject a starved probe this way)."""
        if measured is None:
            value, src = peak_flops(device, dtype)
        else:
            value, src = float(measured), f"given:{device.type}"
        floor = 0.0 if src.startswith("table:") else plausible_floor(device, dtype)
        if value < floor:
            log.warning("peak probe read %.3g FLOP/s, below the plausible %.3g for this %s "
                        "(busy machine while probing?): mfu is logged with mfu_reliable=0",
                        value, floor, device.type)
        return cls(value, src, floor)

    def mfu(self, flops_per_s: float) -> float:
        """Achieved FLOP/s ÷ peak, uncapped."""
        return flops_per_s / self.value

    def reliable(self, mfu: float) -> int:
        """1 when ``mfu`` can be believed, 0 when it exceeds 1.0 or the peak is implausibly
        low (see the module docstring). Warns once per run on the first unreliable reading."""
        ok = self.value >= self.floor and mfu <= 1.0
        if not ok and not self._warned:
            self._warned = True
            log.warning("mfu %.1f%% is not reliable (peak %.3g FLOP/s from %s, plausible floor "
                        "%.3g): the peak probe likely ran on a busy machine; logged as is with "
                        "mfu_reliable=0", 100 * mfu, self.value, self.source, self.floor)
        return int(ok)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
