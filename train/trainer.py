"""The training loop, composed of parts it is given (torchtitan-style small methods).

The loop knows nothing about video, flow or DeepSpeed: the objective computes a loss, the step
engine (train/parallel/) runs backward and the update, the run checkpoint (train/resume.py)
saves and restores, the tracker logs, and periodic work is hooks (train/hooks.py). A new
objective is a new objective object; nothing subclasses the Trainer.
:func:`worldline.train.build.build_trainer` assembles one from a config.

Example (tiny CPU run, a few minutes)::

    worldline-train stage=autoencoder run.name=ae train.steps=200
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from worldline.train.dist import all_reduce_scalars
from worldline.train.guard import NonFiniteGuard
from worldline.train.hooks import Hook
from worldline.train.objectives import MicroBatchRNG
from worldline.train.parallel import ParallelDims, StepEngine
from worldline.train.parallel.compile import compile_metrics
from worldline.train.perf import PeakFlops, peak_memory_bytes
from worldline.train.pipeline import WorldPipeline
from worldline.train.precision import PrecisionPolicy
from worldline.train.resume import Generators, RunCheckpoint
from worldline.train.state import TrainState

log = logging.getLogger(__name__)

__all__ = ["LoopSettings", "Trainer"]


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own knobs (``train.*``)."""

    steps: int
    grad_accum: int = 1
    log_every: int = 10
    ckpt_every: int = 100
    sync_nonfinite_check: bool = False
    progress_bar: bool = False
    seed: int = 0
    name: str = "run"


class Trainer:
    """One stage of training on one process group (see the module docstring)."""

    def __init__(self, *, pipeline: WorldPipeline, objective: Any, engine: StepEngine,
                 scheduler: Any, loader: Any, checkpoint: RunCheckpoint,
                 tracker_factory: Callable[[TrainState, bool], Any], settings: LoopSettings,
                 dims: ParallelDims, device: torch.device, precision: PrecisionPolicy,
                 generators: Generators, guard: NonFiniteGuard, run_dir: Path,
                 ema: Any = None, hooks: Sequence[Hook] = (),
                 resume: Callable[["Trainer"], bool] = lambda t: False,
                 log_extras: Optional[dict[str, Any]] = None) -> None:
        self.pipeline, self.objective, self.engine = pipeline, objective, engine
        self.scheduler, self.loader, self.checkpoint = scheduler, loader, checkpoint
        self.settings, self.dims, self.device = settings, dims, device
        self.precision, self.generators, self.guard = precision, generators, guard
        self.run_dir, self.ema, self.hooks = Path(run_dir), ema, list(hooks)
        self.tracker_factory, self.resume, self.log_extras = tracker_factory, resume, \
            log_extras or {}
        self.state = TrainState()
        self.tracker: Any = None
        #: The last step of this run; hooks may end it earlier (early stopping, preemption).
        self.max_steps = settings.steps
        #: Name of the signal the run stopped on before its last step (None: not stopped).
        self.stopped_by: Optional[str] = None
        self._stop_at: Optional[int] = None
        self._data_iter: Optional[Iterator] = None
        self._data_wait = 0.0
        self._step_tokens = 0
        self._step_flops = 0.0
        self._step_samples = 0
        self._flops_seen = 0.0
        self._peak = PeakFlops(1.0, "unset")  # probed when the loop starts

    # ------------------------------------------------------------------ surface for hooks
    @property
    def rank(self) -> int:
        return self.dims.rank

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def module(self) -> torch.nn.Module:
        """The pure trained module (names, EMA, weight I/O)."""
        return self.engine.module

    @property
    def model(self) -> torch.nn.Module:
        """What forward/backward run on (the module, or its parallel wrapper)."""
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def stop_after(self, step: int) -> None:
        """End the run once step ``step`` ran (it still checkpoints and samples as the last)."""
        self.max_steps = min(self.max_steps, step)

    def checkpoint_due(self, step: int) -> bool:
        return step % self.settings.ckpt_every == 0 or step == self.max_steps

    def save_checkpoint(self) -> Optional[Path]:
        return self.checkpoint.save(self.state)

    def find_hook(self, cls: type) -> Optional[Hook]:
        return next((h for h in self.hooks if isinstance(h, cls)), None)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode for the block, then back to training."""
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            if was:
                self.model.train()

    # ------------------------------------------------------------------ the step
    def next_batch(self) -> Any:
        t0 = time.perf_counter()
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        batch = next(self._data_iter)
        self._data_wait += time.perf_counter() - t0
        # Tokens and FLOPs of the batch actually drawn (buckets vary its shape and size).
        self._step_samples += batch.num_samples
        self._step_tokens += self.objective.tokens(self.pipeline, batch)
        self._step_flops += self.objective.flops(self.pipeline, batch)
        # channels_last batches arrive as a strided view of decord's [B, T, H, W, 3]; the
        # transpose is paid once here (Batch.to), on the device when there is one.
        return batch.to(self.device, non_blocking=True)

    def forward_backward(self, batch: Any, micro: int, last: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; ``last``: the accumulation's final one (the
        only one whose backward synchronises gradients across ranks)."""
        rng = MicroBatchRNG(self.generators.slots[micro], self.state.step, micro,
                            self.dims.dp_rank, self.settings.seed)
        with self.engine.micro_step(last):
            with self.precision.autocast(self.device.type):
                loss, parts = self.objective.loss(self.pipeline, batch, rng)
            self.engine.backward(loss)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns device tensors."""
        self.engine.zero_grad()
        self._step_samples, self._step_tokens, self._step_flops = 0, 0, 0.0
        sums: dict[str, torch.Tensor] = {}
        accum = self.settings.grad_accum
        for i in range(accum):
            parts = self.forward_backward(self.next_batch(), i, last=i == accum - 1)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v / accum
        grad_norm, ok = self.engine.step(self.guard)  # clip + update, masked when not finite
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.state.step, ok)
        for aux in getattr(self.objective, "auxiliary", {}).values():
            sums.update(aux.after_step(self.state.step))
        # Counted on this rank, then scaled by the data-parallel world (ranks draw the same
        # bucket schedule only on average).
        self.state.samples_seen += self._step_samples * self.dims.dp_world
        self.state.tokens_seen += self._step_tokens * self.dims.dp_world
        self._flops_seen += self._step_flops * self.dims.dp_world
        sums["grad_norm"] = grad_norm
        sums["nonfinite_frac"] = (~ok).float()
        step, s = self.state.step, self.settings
        if s.sync_nonfinite_check or step % s.log_every == 0 or self.checkpoint_due(step):
            # Host read of the skip counters, only where the loop syncs anyway (and before
            # any save): aborts after train.max_nonfinite_skips in a row.
            latest = self.checkpoint.checkpointer.latest()
            self.state.skipped_steps += self.guard.check(step, str(latest) if latest else None)
        return sums

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainState:
        """Resume if asked, then run to the last step; checkpoint, log and run the hooks."""
        for h in self.hooks:  # first: stop signals are handled from here on
            h.on_train_start(self)
        # The CPU probe runs in the training precision (bf16 matmuls run ~4x fp32 on CPUs
        # with AMX), and before the resume, the tracker's service and the loader's workers
        # load the CPU (a probe on a busy CPU reads low; train/perf.py).
        self._peak = PeakFlops.measure(self.device, self.precision.peak_dtype)
        resumed = self.resume(self)
        self.tracker = self.tracker_factory(self.state, resumed)
        self.state.wandb_run_id = self.tracker.run_id
        log.info("%s: %.2fM trainable params, peak %.3g FLOP/s (%s)",
                 type(self.objective).__name__, sum(p.numel() for p in self.engine.params) / 1e6,
                 self._peak.value, self._peak.source)
        self.model.train()
        bar = self._progress_bar()
        acc: dict[str, torch.Tensor] = {}
        mark = (time.perf_counter(), self.state.samples_seen, self.state.tokens_seen,
                self._flops_seen)
        while self.state.step < self.max_steps:
            for h in self.hooks:
                h.before_step(self, self.state.step + 1)
            out = self.train_step()
            self.checkpoint.checkpointer.poll()  # a finished async save becomes visible
            for k, v in out.items():
                acc[k] = acc.get(k, 0) + v
            acc["_n"] = acc.get("_n", 0) + 1
            step = self.state.step
            if bar is not None:
                bar.update(1)
            if step % self.settings.log_every == 0 or step == self.max_steps:
                self._log(acc, mark, bar)
                acc, mark = {}, (time.perf_counter(), self.state.samples_seen,
                                 self.state.tokens_seen, self._flops_seen)
            if self.checkpoint_due(step):
                self.save_checkpoint()
            for h in self.hooks:
                h.after_step(self, step)
        for h in self.hooks:
            h.on_train_end(self)
        self.checkpoint.checkpointer.wait()  # an async save in flight lands before "done"
        if bar is not None:
            bar.close()
        if self.stopped_by is None:
            self.tracker.summary({"final_step": self.state.step})
        self.tracker.finish()
        return self.state

    def _log(self, acc: dict[str, Any], mark: tuple, bar: Any) -> None:
        """One log row: the only host sync of the loop (plus, with several ranks, two small
        all-reduces of the logged values)."""
        t0, samples0, tokens0, flops0 = mark
        dt = time.perf_counter() - t0
        n = acc.pop("_n")
        row = all_reduce_scalars({k: v / n for k, v in acc.items()}, self.device)
        worst = all_reduce_scalars(
            {"data_wait_frac": self._data_wait / dt,
             "peak_mem_gb": peak_memory_bytes(self.device) / 2**30}, self.device, "max")
        row.update(
            lr=self.scheduler.get_last_lr()[0],
            samples_per_s=(self.state.samples_seen - samples0) / dt,
            tokens_per_s=(self.state.tokens_seen - tokens0) / dt,
            mfu=self._peak.mfu((self._flops_seen - flops0) / dt / self.world_size),
            # The slowest rank's data wait and the largest per-rank peak memory.
            data_wait_frac=worst["data_wait_frac"], peak_mem_gb=worst["peak_mem_gb"],
            peak_mem_gb_rank0=peak_memory_bytes(self.device) / 2**30,
            epoch=self.loader.epoch,
            skipped_samples=int(self.loader.stats.get("skipped", 0)),
            **compile_metrics(), **self.log_extras)
        row["mfu_reliable"] = self._peak.reliable(row["mfu"])  # 0: peak probe implausible
        step = self.state.step
        self.tracker.log(row, step)
        self._data_wait = 0.0
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", mfu=f"{row['mfu']:.1%}")
        else:
            log.info("step %d | loss %.4f | %.1f samples/s | %.0f tok/s | mfu %.1f%%", step,
                     row["loss"], row["samples_per_s"], row["tokens_per_s"], 100 * row["mfu"])

    def _progress_bar(self) -> Any:
        if not self.settings.progress_bar or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.max_steps, initial=self.state.step, desc=self.settings.name,
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
