"""Eager vs per-block compiled training step, and saved-activation bytes per AC mode, on the
tiny DiT (model=tiny's DiT sizes without text/actions; fp32) — one process, side by side.

    python -m worldline.scripts.bench_compile_ac [--steps 5] [--skip-compile]

Compile time (first step per shape) is reported separately from the steady-state step time.
Saved bytes: what autograd keeps for backward (``saved_tensors_hooks``, deduplicated by
storage); tensors a checkpointed region holds as its *inputs* are not packed and not counted
(one [B, N, D] per checkpointed module). Selective AC is not measured this way (see main).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from worldline.models.dit import DiTArgs, VideoDiT
from worldline.train.parallel.base import apply_activation_checkpointing, compile_blocks
from worldline.train.parallel.compile import compile_metrics, configure_recompile_limit


def tiny_dit(seed: int = 0) -> VideoDiT:
    """model=tiny's DiT sizes (hidden 128, depth 4, 4 heads), no text/action/camera inputs,
    parameters perturbed off the adaLN-zero init so every block does work."""
    torch.manual_seed(seed)
    m = VideoDiT(DiTArgs(in_channels=4, hidden_size=128, depth=4, num_heads=4, text_dim=0,
                         num_action_slots=0, camera_dim=0))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes autograd saves for backward during one forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(s: torch.Tensor) -> torch.Tensor:
        if s.device.type != "meta" and s.untyped_storage().nbytes():
            seen[s.untyped_storage().data_ptr()] = s.untyped_storage().nbytes()
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        out = model(x, t)
    out.square().mean().backward()
    return sum(seen.values())


def step_time(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, steps: int) -> float:
    """Median seconds of forward + backward + SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(x, t).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-compile", action="store_true")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(1)
    # model=tiny's latent clip: 17 frames at 64x64 -> [4, 5, 8, 8]; batch 4.
    x, t = torch.randn(4, 4, 5, 8, 8, generator=g), torch.rand(4, generator=g)
    base = tiny_dit()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, x {list(x.shape)}")
    # "selective" is left out: its saved matmul outputs live in the checkpoint's own storage,
    # invisible to an outer saved_tensors_hooks, so it would read as "full".
    for mode in ("none", "full", "attention"):
        m = copy.deepcopy(base)
        n = apply_activation_checkpointing(m, mode, 1)
        print(f"AC {mode:9s} ({n} modules): saved {saved_bytes(m, x, t) / 2**20:.2f} MiB")
    if a.skip_compile:
        return
    eager, comp = copy.deepcopy(base), copy.deepcopy(base)
    configure_recompile_limit(1)
    compile_blocks(comp)
    t0 = time.perf_counter()
    step_time(comp, x, t, 1)
    print(f"compile (first step): {time.perf_counter() - t0:.1f} s, {compile_metrics()}")
    te, tc = step_time(eager, x, t, a.steps), step_time(comp, x, t, a.steps)
    print(f"step eager {te * 1e3:.1f} ms | compiled {tc * 1e3:.1f} ms | speedup {te / tc:.2f}x")


if __name__ == "__main__":
    main()
