"""WanDiT vs diffusers WanTransformer3DModel: fwd+bwd step time and peak memory, side by side.

Both models hold the same weights (WanDiT loads the diffusers model's state dict strictly), run
the same inputs, and are measured alternately in one process (shared machines are noisy:
compare the ratios, not absolute numbers). Peak memory is ``torch.cuda.max_memory_allocated``
on CUDA; on CPU it is the peak resident-set growth during the step, sampled every 0.5 ms by a
thread, with glibc's mmap threshold pinned at 64 KiB so freed tensors return to the OS (else the
heap keeps them and later steps would read as free). The last line is a markdown table row.

    python -m worldline.scripts.bench_wan                              # dim 256, 4 layers, CPU
    python -m worldline.scripts.bench_wan --device cuda --dim 1536 --layers 8 --precision bf16
    python -m worldline.scripts.bench_wan --quick                      # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import threading
import time

import torch


def _pin_mmap_threshold() -> bool:
    """Large allocations via mmap (freed memory leaves RSS at once); Linux/glibc only."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except OSError:
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak RSS above the value at entry, sampled by a thread while the block runs."""

    def __enter__(self) -> "_PeakRSS":
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.bytes = self.peak - self.base


def measure(step, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes) of one call of ``step``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
    return dt, mem.bytes


def bench(dim: int, layers: int, heads: int, latent: tuple[int, int, int, int], batch: int,
          text_len: int, text_dim: int, repeats: int, precision: str, device: str) -> dict:
    """Median step time and peak memory of both models (alternating), plus their ratios."""
    from diffusers import WanTransformer3DModel

    from worldline.models.wan_dit import WanDiT
    from worldline.models.wan_io import dit_args_from_diffusers_config

    dev = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    c, t, h, w = latent
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
               in_channels=c, out_channels=c, text_dim=text_dim, freq_dim=256, ffn_dim=4 * dim,
               num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**cfg).to(dev)
    ours = WanDiT(dit_args_from_diffusers_config(cfg)).to(dev)
    ours.load_state_dict(wan.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c, t, h, w, generator=g).to(dev)
    tt = torch.rand(batch, generator=g).to(dev)
    text = torch.randn(batch, text_len, text_dim, generator=g).to(dev)

    def autocast():
        return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        with autocast():
            out = ours(x, tt, text)
        out.float().pow(2).mean().backward()

    def step_wan():
        wan.zero_grad(set_to_none=True)
        with autocast():
            out = wan(x, tt * 1000, text, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    with torch.no_grad(), autocast():
        diff = (ours(x, tt, text).float() - wan(x, tt * 1000, text, return_dict=False)[0].float())
    res: dict[str, list] = {"ours_s": [], "wan_s": [], "ours_b": [], "wan_b": []}
    for _ in range(2):  # warm-up (kernel selection, allocator)
        step_ours()
        step_wan()
    for i in range(repeats):  # alternate, and alternate who goes first
        pair = [("ours", step_ours), ("wan", step_wan)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            s, b = measure(fn, dev)
            res[f"{name}_s"].append(s)
            res[f"{name}_b"].append(b)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"device": str(dev), "precision": precision, "dim": dim, "layers": layers,
            "heads": heads, "latent": list(latent), "batch": batch, "text_len": text_len,
            "tokens": t * h * w // 4 * batch, "repeats": repeats,
            "params": sum(p.numel() for p in ours.parameters()),
            "max_abs_diff": diff.abs().max().item(),
            "ours_s": med["ours_s"], "wan_s": med["wan_s"],
            "time_ratio": med["ours_s"] / med["wan_s"],
            "ours_peak_mib": med["ours_b"] / 2**20, "wan_peak_mib": med["wan_b"] / 2**20,
            "mem_ratio": med["ours_b"] / max(med["wan_b"], 1)}


def markdown_row(r: dict) -> str:
    """| device | prec | dim x layers (heads) | latent | tokens | ours ms | diffusers ms | ratio
    | ours MiB | diffusers MiB | ratio | max abs diff |"""
    return (f"| {r['device']} | {r['precision']} | {r['dim']}x{r['layers']} ({r['heads']}h) | "
            f"{'x'.join(map(str, r['latent']))} b{r['batch']} | {r['tokens']} | "
            f"{r['ours_s'] * 1e3:.0f} | {r['wan_s'] * 1e3:.0f} | {r['time_ratio']:.2f} | "
            f"{r['ours_peak_mib']:.0f} | {r['wan_peak_mib']:.0f} | {r['mem_ratio']:.2f} | "
            f"{r['max_abs_diff']:.1e} |")


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the result dict (also printed as JSON and a markdown row)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--latent", default="16,5,16,16", help="C,t,h,w")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--text-dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    a = ap.parse_args(argv)
    if a.quick:
        a.dim, a.layers, a.heads, a.latent, a.repeats, a.text_len = 64, 2, 2, "4,2,8,8", 2, 8
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        _pin_mmap_threshold()
        torch.set_flush_denormal(True)
    latent = tuple(int(v) for v in a.latent.split(","))
    r = bench(a.dim, a.layers, a.heads, latent, a.batch, a.text_len, a.text_dim, a.repeats,
              a.precision, device)
    print(json.dumps(r, indent=1))
    print("| device | precision | dim x layers | latent | tokens | WanDiT ms | diffusers ms | "
          "time ratio | WanDiT peak MiB | diffusers peak MiB | mem ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(markdown_row(r))
    return r


if __name__ == "__main__":
    main()
