"""Non-finite loss/gradient guard: a step whose gradients hold NaN/inf changes nothing.

Why the update is masked on the device rather than branched on in Python: deciding in Python
needs ``bool(tensor)``, a host sync every step (on a GPU it stalls the CPU until the step's
kernels finish, and the next step can no longer be queued ahead). Instead:

- the finiteness flag is one device op on the **global** gradient norm that clipping computes
  anyway (after DDP's all-reduce / FSDP's sharded norm, so every rank gets the same flag and
  the ranks' replicas never diverge). A non-finite loss reaches the gradients through
  backward, so the norm covers the loss too;
- the optimizer is PyTorch's fused AdamW, whose kernel takes that flag as ``found_inf`` (the
  mechanism ``torch.amp.GradScaler`` uses to skip steps without a sync): flagged, it leaves
  parameters, moments and the step count untouched;
- the EMA lerps with weight ``(1 - decay) * ok``, i.e. 0 on a skipped step;
- skip counters (total, current streak, longest streak) stay on the device; they are read at
  log and checkpoint steps only, where the loop syncs anyway. ``train.sync_nonfinite_check``
  reads them after every step instead (exact abort step, one sync per step).

``train.max_nonfinite_skips`` consecutive skips abort the run with :class:`TrainingAborted`;
since skipped steps never touch the weights, every checkpoint on disk stays a good one.

Optimizers without ``found_inf`` support (the DeepSpeed engine steps inside its own backward
and runs its own overflow check) fall back to a host-side check of the flag.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """The run cannot continue safely; the message says why and what is kept on disk."""


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2's clipped norm is a replicated DTensor: its local value is the global norm.
    return t.to_local() if hasattr(t, "to_local") else t


class NonFiniteGuard:
    """Per-trainer skip logic; see the module docstring.

    Args:
        device: where the counters live (the training device).
        max_skips: consecutive skipped steps that abort the run.
        sync_every_step: read the counters after every step (else at check steps only).
    """

    def __init__(self, device: torch.device, max_skips: int, sync_every_step: bool) -> None:
        self.max_skips = max_skips
        self.sync_every_step = sync_every_step
        z = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
        self.total, self.streak, self.worst = z(), z(), z()
        self._seen_total = 0  # total already reported (host copy)
        self._bad: Optional[torch.Tensor] = None

    def flag(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Record whether this step is finite; returns ``ok`` (0-dim bool, on the device)."""
        bad = ~torch.isfinite(_local(grad_norm).detach()).reshape(())
        bad = bad.to(self.total.device)
        self._bad = bad
        b = bad.long()
        self.total += b
        # streak = (streak + 1) if bad else 0, with no branch.
        self.streak.add_(1).mul_(b)
        torch.maximum(self.worst, self.streak, out=self.worst)
        return ~bad

    def step(self, optimizer: torch.optim.Optimizer, step_fn) -> None:
        """Run ``step_fn()`` (the optimizer step) so that a flagged step changes nothing."""
        bad = self._bad
        if bad is None:
            step_fn()
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad.float()  # read by the fused kernel on the device
            try:
                step_fn()
            finally:
                del optimizer.found_inf
        elif not bool(bad):  # host sync: only optimizers that cannot mask on the device
            step_fn()

    def check(self, step: int, latest_checkpoint: Optional[str] = None) -> int:
        """Host-side read of the counters (at log/checkpoint steps). Logs new skips and raises
        :class:`TrainingAborted` after ``max_skips`` in a row. Returns new skips since the
        last check."""
        total, worst, streak = (int(v) for v in torch.stack(
            [self.total, self.worst, self.streak]).tolist())
        new = total - self._seen_total
        self._seen_total = total
        self.worst.copy_(self.streak)
        if new:
            log.warning("non-finite loss/gradients: skipped %d step(s) up to step %d (%d in this "
                        "process); parameters, optimizer and EMA left unchanged", new, step,
                        total)
        if worst >= self.max_skips:
            keep = f"; the last good checkpoint is {latest_checkpoint}" if latest_checkpoint \
                else "; no checkpoint was written yet"
            raise TrainingAborted(
                f"{worst} consecutive optimizer steps had non-finite loss or gradients "
                f"(train.max_nonfinite_skips={self.max_skips}, stopped at step {step}, current "
                f"streak {streak}): aborting. Skipped steps did not change parameters, "
                f"optimizer or EMA{keep}")
        return new
