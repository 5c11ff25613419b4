"""The learning-rate schedule: linear warmup to ``optim.lr``, then cosine (or constant) to
``optim.min_lr_ratio * lr`` at the run's last step.

The schedule is a pure function of the step and the run's horizon (``train.steps``), so a
resume needs only the step. A resume that changes the horizon (raising ``train.steps`` to
train longer) would otherwise jump back up the cosine (0.088 → 0.163 loss in the issue's
run); instead the checkpoint records the horizon it was planned for, and a resume with
another one continues from the learning rate it stopped at, decaying from there to the floor
at the new last step (a "segment"). Segments accumulate over several extensions and ride in
the scheduler's state, so later resumes replay them exactly.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with the warmup-cosine multiplier and horizon-aware resume.

    Args:
        optimizer: the optimizer whose groups' ``lr`` it scales.
        optim: ``cfg.optim`` (``warmup_steps``, ``min_lr_ratio``, ``schedule``).
        steps: the run's last step (``train.steps`` or its epoch equivalent).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: Any, steps: int) -> None:
        self.warmup = int(optim.warmup_steps)
        self.floor = float(optim.min_lr_ratio)
        self.kind = str(optim.schedule)
        self.horizon = int(steps)
        # [start_step, factor_at_start, end_step]: a decay re-planned at a resume.
        self.segments: list[list[float]] = []
        # A plain function (not a bound method): LambdaLR then saves no copy of it.
        super().__init__(optimizer, lambda step: self.factor(step))

    def _cosine(self, start: float, top: float, end: float, step: int) -> float:
        progress = min(1.0, max(0.0, (step - start) / max(1.0, end - start)))
        return self.floor + (top - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        """The multiplier of ``optim.lr`` for the optimizer step after ``step`` steps."""
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        for start, top, end in reversed(self.segments):
            if step >= start:
                return self._cosine(start, top, end, step)
        return self._cosine(self.warmup, 1.0, self.horizon, step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (the state holds ``horizon`` and ``segments``: LambdaLR saves
        plain attributes); this run's config (warmup, floor, kind, horizon) wins, and a
        different horizon continues from the saved learning rate without a jump."""
        config = (self.warmup, self.floor, self.kind, self.horizon)
        super().load_state_dict(state_dict)
        self.warmup, self.floor, self.kind, _ = config
        saved = state_dict.get("horizon")  # None: a checkpoint from before horizons
        self.segments = [list(s) for s in state_dict.get("segments", [])]
        self.horizon = int(saved) if saved is not None else config[3]
        step = int(self.last_epoch)
        if saved is not None and int(saved) != config[3] and self.kind == "cosine" \
                and step >= self.warmup:
            self.segments.append([step, self.factor(step), config[3]])
        self.horizon = config[3]
