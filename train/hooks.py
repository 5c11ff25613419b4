"""Periodic work around the training loop, one hook each: fault points, the watchdog, the
freeze policy, validation with early stopping, samples, preemption.

The loop calls, in list order: ``on_train_start`` (before the resume), ``before_step(step)``
as optimizer step ``step`` (1-based) is about to run, ``after_step(step)`` once it ran and any
periodic checkpoint is written, and ``on_train_end``. A hook talks to the loop through the
Trainer's small public surface (``pipeline``, ``state``, ``tracker``, ``stop_after``,
``save_checkpoint``, ...), never through its internals.
"""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Optional, Protocol

import torch

from worldline.train import failpoints
from worldline.train.dist import all_reduce_scalars

log = logging.getLogger(__name__)


class TrainerView(Protocol):
    """What a hook may use of the Trainer (worldline.train.trainer.Trainer implements it)."""

    rank: int
    world_size: int
    device: torch.device
    pipeline: Any
    tracker: Any
    run_dir: Path
    state: Any
    max_steps: int
    ema: Any
    module: torch.nn.Module
    stopped_by: Optional[str]

    def stop_after(self, step: int) -> None: ...

    def checkpoint_due(self, step: int) -> bool: ...

    def save_checkpoint(self) -> Optional[Path]: ...

    def eval_mode(self) -> ContextManager[None]: ...


__all__ = ["Hook", "FaultPointHook", "WatchdogHook", "FreezePolicyHook", "ValidationHook",
           "SamplingHook", "PreemptionHook"]


class Hook:
    """No-op base: override what you need."""

    def on_train_start(self, trainer: TrainerView) -> None:
        """Before the resume (so a signal arriving during a slow resume is not lost)."""

    def before_step(self, trainer: TrainerView, step: int) -> None:
        """Optimizer step ``step`` (1-based) is about to run."""

    def after_step(self, trainer: TrainerView, step: int) -> None:
        """Step ``step`` ran (and its periodic checkpoint, if any, is written)."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """The loop ended (finished or stopped)."""


class FaultPointHook(Hook):
    """``WORLDLINE_FAILPOINTS`` injection at step starts (train/failpoints.py, tests/faults/)."""

    def before_step(self, trainer: TrainerView, step: int) -> None:
        failpoints.at_step_start(step, trainer.rank)


class WatchdogHook(Hook):
    """Heartbeat line + stall detection (train/watchdog.py); ``dist.heartbeat_s=0``: off."""

    def __init__(self, dist_cfg: Any) -> None:
        self.dist_cfg = dist_cfg
        self.dog: Any = None

    def before_step(self, trainer: TrainerView, step: int) -> None:
        if self.dog is None:  # after the resume: the first beat is for the step it resumed at
            from worldline.train.watchdog import Watchdog

            self.dog = Watchdog.start_for(trainer.rank, trainer.world_size, self.dist_cfg, step)
        self.dog.beat(step)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.dog is not None:
            self.dog.stop()


class FreezePolicyHook(Hook):
    """New modules + chosen blocks train first, everything after N steps (train/stages.py)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def before_step(self, trainer: TrainerView, step: int) -> None:
        self.policy.apply(step - 1)


class ValidationHook(Hook):
    """Validation loss of the live weights every ``stage.validation.every`` steps, logged as
    ``val/*``; early stopping after ``patience`` validations without improvement."""

    def __init__(self, objective: Any, loaders: Any, vcfg: Any) -> None:
        self.objective, self.loaders, self.v = objective, loaders, vcfg
        self.best: Optional[tuple[int, float]] = None
        self.bad = 0
        self.history_read = False

    def before_step(self, trainer: TrainerView, step: int) -> None:
        done = step - 1
        if self.v.every and done > 0 and done % self.v.every == 0:
            self.validate(trainer, done)

    def after_step(self, trainer: TrainerView, step: int) -> None:
        # The weights a run ends with are validated too (the periodic check runs before the
        # next step, which the last step never has); not on a stop signal, which must be fast.
        if self.v.every and step == trainer.max_steps and trainer.stopped_by is None:
            self.validate(trainer, step, final=True)

    @torch.no_grad()
    def validate(self, trainer: TrainerView, step: int, final: bool = False) -> None:
        """Log ``val/*`` at ``step``; on the periodic schedule also track it for early
        stopping (a ``final`` validation off the schedule is logged only, so patience counts
        as in a longer run that continued past it)."""
        v = self.v
        with trainer.eval_mode():
            rep = self.objective.evaluate(trainer.pipeline, self.loaders.validation(),
                                          v.num_batches, list(v.timesteps))
        rep = all_reduce_scalars(rep, trainer.device)
        val = rep["val_loss"]
        trainer.tracker.log({f"val/{k}": x for k, x in rep.items()}, step)
        log.info("step %d: validation loss %.5f", step, val)
        if not self.history_read:
            # A resumed run replays the validations before the checkpoint (metrics.jsonl keeps
            # only rows up to it), so patience counts as in an uninterrupted run.
            from worldline.train.tracking import read_metrics

            self.history_read = True
            for row in read_metrics(trainer.run_dir):
                if "val/val_loss" in row and row["step"] < step and row["step"] % v.every == 0:
                    self._track(row["step"], row["val/val_loss"])
        if step % v.every:
            return
        self._track(step, val)
        if v.patience and self.bad >= v.patience and not final:
            # End at the step now being taken: it still checkpoints and samples as the last.
            trainer.stop_after(step + 1)
            info = {"stopped_at_step": step + 1, "best_step": self.best[0],
                    "best_val_loss": self.best[1], "patience": v.patience}
            if trainer.rank == 0:
                trainer.run_dir.mkdir(parents=True, exist_ok=True)
                (trainer.run_dir / "early_stopping.json").write_text(json.dumps(info, indent=1))
            log.info("early stopping: no improvement in %d validations (best %.5f at step %d)",
                     v.patience, self.best[1], self.best[0])

    def _track(self, step: int, val: float) -> None:
        if self.best is None or val < self.best[1] - self.v.min_delta:
            self.best, self.bad = (step, val), 0
        else:
            self.bad += 1


class SamplingHook(Hook):
    """Samples every ``train.sample_every`` steps and at the end → ``samples/step_<N>/``
    (mp4s + contact sheet) and W&B. With several ranks every rank runs the model (sharded
    parameters and DDP buffer syncs need all of them); only rank 0's files land."""

    def __init__(self, objective: Any, loaders: Any, sample_cfg: Any, every: int,
                 num_clips: Optional[int] = None) -> None:
        """``num_clips``: probe clips to condition on (None: the whole first batch)."""
        self.objective, self.loaders, self.s, self.every = objective, loaders, sample_cfg, every
        self.num_clips = num_clips

    def after_step(self, trainer: TrainerView, step: int) -> None:
        if (self.every and step % self.every == 0) or step == trainer.max_steps:
            with trainer.eval_mode():
                self.sample(trainer, step)

    @torch.no_grad()
    def sample(self, trainer: TrainerView, step: int) -> None:
        from worldline.train.media import save_samples

        batch = head(next(iter(self.loaders.probe())), self.num_clips, trainer.device)
        use_ema = trainer.ema is not None and self.s.use_ema
        with trainer.ema.applied_to(trainer.module) if use_ema else nullcontext():
            groups, metrics, captions = self.objective.sample(trainer.pipeline, batch, self.s)
        out = trainer.run_dir / "samples" / f"step_{step}"
        scratch = trainer.rank != 0
        if scratch:
            out = trainer.run_dir / f".sample_scratch_rank{trainer.rank}"
        files = save_samples(out, groups, fps=8.0, captions=captions)
        if scratch:
            shutil.rmtree(out, ignore_errors=True)
            return
        if metrics:
            trainer.tracker.log(metrics, step)
        trainer.tracker.log_media(step, files["videos"], files["images"])
        log.info("step %d: samples → %s%s", step, out,
                 "".join(f" {k} {v:.3f}" for k, v in metrics.items()))


class PreemptionHook(Hook):
    """SLURM/torchrun stop signals → one decision on all ranks → checkpoint → leave
    (train/preempt.py). The entry point reports such a run as stopped, not finished."""

    def __init__(self, preempt_cfg: Any) -> None:
        self.cfg = preempt_cfg
        self.handler: Any = None

    def on_train_start(self, trainer: TrainerView) -> None:
        from worldline.train.preempt import PreemptionHandler

        self.handler = PreemptionHandler(list(self.cfg.signals), self.cfg.check_every,
                                         self.cfg.enabled)

    def after_step(self, trainer: TrainerView, step: int) -> None:
        if step == trainer.max_steps or not self.handler.should_stop(step):
            return
        trainer.stopped_by = self.handler.signal_name
        if not trainer.checkpoint_due(step):  # unless it was just saved
            trainer.save_checkpoint()
        log.warning("stopping at step %d/%d on %s (checkpointed)", step, trainer.max_steps,
                    trainer.stopped_by)
        trainer.stop_after(step)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.handler is not None:
            self.handler.restore()

    def chain(self) -> None:
        """Hand the signal on to the previously installed handler (train/preempt.py)."""
        if self.handler is not None:
            self.handler.chain()


def head(batch: Any, n: Optional[int], device: torch.device) -> Any:
    """The first ``n`` samples of a Batch (all when None), tensors on ``device``."""
    return (batch if n is None else batch.select(n)).to(device)
