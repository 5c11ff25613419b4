"""``train.profile=N``: a torch.profiler window of N training steps, as a loop hook.

The window opens after a short warm-up (the first steps pay one-off costs: allocator growth,
lazy inits, compilation) and closes after N steps; it writes into ``<run dir>/profile/``:

- ``trace.json.gz`` (``trace_rank<r>.json.gz`` with several ranks): a Chrome trace, open it
  in https://ui.perfetto.dev or chrome://tracing;
- ``profile.txt`` (``profile_rank<r>.txt``): the key-averages table sorted by self time.

CPU activity always, CUDA activity when training on a GPU; shapes and stacks are not recorded
(both inflate the trace and the profiler's own overhead). Only the profiled steps pay the
profiler's cost; with ``train.profile=0`` (default) the hook is not installed at all.

    worldline-train experiment=smoke run.name=prof train.profile=5
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from worldline.train.hooks import Hook, TrainerView

log = logging.getLogger(__name__)

__all__ = ["ProfilerHook", "WARMUP_STEPS"]

#: Steps run before the window opens (clamped so a short run still gets its window).
WARMUP_STEPS = 2


class ProfilerHook(Hook):
    """Profile steps ``warmup+1 .. warmup+steps`` of the run (counted from its first step,
    so a resumed run profiles too)."""

    def __init__(self, steps: int, warmup: int = WARMUP_STEPS) -> None:
        self.steps, self.warmup = steps, warmup
        self.prof: Optional[torch.profiler.profile] = None
        self._first: Optional[int] = None
        self._last = 0
        self.out_dir: Optional[Path] = None

    def before_step(self, trainer: TrainerView, step: int) -> None:
        if self._first is None:
            # Leave room for the window in a short run: fewer warm-up steps, never fewer
            # profiled ones than the run has.
            left = trainer.max_steps - step + 1
            warm = max(0, min(self.warmup, left - self.steps))
            self._first = step + warm
            self._last = self._first + self.steps - 1
        if step == self._first and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if trainer.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=False,
                                               with_stack=False)
            self.prof.__enter__()
            log.info("profiling steps %d..%d", self._first, self._last)

    def after_step(self, trainer: TrainerView, step: int) -> None:
        if self.prof is not None and (step >= self._last or step >= trainer.max_steps):
            self._finish(trainer)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.prof is not None:  # stopped early (signal, early stopping) inside the window
            self._finish(trainer)

    def _finish(self, trainer: TrainerView) -> None:
        prof, self.prof = self.prof, None
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)  # the window's kernels land in the trace
        prof.__exit__(None, None, None)
        write_profile(prof, trainer.run_dir / "profile", trainer.rank, trainer.world_size,
                      cuda=trainer.device.type == "cuda")
        self.out_dir = trainer.run_dir / "profile"


def write_profile(prof: Any, out_dir: Path, rank: int = 0, world_size: int = 1,
                  cuda: bool = False) -> Path:
    """Write ``prof``'s Chrome trace and key-averages table into ``out_dir``; returns the
    trace path. Rank-suffixed names when ``world_size > 1`` (ranks share the run dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sfx = f"_rank{rank}" if world_size > 1 else ""
    trace = out_dir / f"trace{sfx}.json.gz"
    prof.export_chrome_trace(str(trace))
    # On a GPU the kernels' own time is what to attack first; on a CPU the ops' self time.
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60)
    (out_dir / f"profile{sfx}.txt").write_text(table + "\n")
    log.info("profile → %s", out_dir)
    return trace
