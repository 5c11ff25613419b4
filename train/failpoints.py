"""Fault injection points ("failpoints") for the fault suite in ``tests/faults/``.

Faults are armed through one environment variable, so a real ``worldline-train`` process under
``torchrun`` can be made to fail at a chosen step and rank without any test-only code path in
the config schema::

    WORLDLINE_FAILPOINTS="nan_loss:steps=3,4;stall:steps=5,rank=1,secs=60"

Each entry is ``name[:key=value,...]``; ``steps`` (comma list of 1-based optimizer steps) and
``rank`` restrict where it fires; other keys are arguments. Points:

=================  ========================================================================
``nan_loss``       the loss of the step is multiplied by NaN (``value=inf`` for +inf)
``inf_grad``       one parameter's gradient becomes +inf during backward (before the
                   data-parallel all-reduce, as a real overflow would)
``stall``          the rank sleeps ``secs`` at the start of the step
``die``            the rank SIGKILLs itself at the start of the step
``save_pause``     every save sleeps ``secs`` after the shards are written, before the rename
                   (lets a test SIGKILL a run inside a checkpoint save)
``save_error``     the save of a step raises ``OSError(ENOSPC)`` while writing the shards
=================  ========================================================================

Unset (the normal case) every check is one dict lookup.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from functools import lru_cache
from typing import Any, Optional

log = logging.getLogger(__name__)

ENV = "WORLDLINE_FAILPOINTS"


@lru_cache(maxsize=4)
def _parse(spec: str) -> dict[str, dict[str, str]]:
    points: dict[str, dict[str, str]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        name, _, args = entry.partition(":")
        kv: dict[str, str] = {}
        key = None
        # "steps=3,4,rank=1": a bare item continues the previous key's comma list.
        for item in filter(None, args.split(",")):
            if "=" in item:
                key, value = item.split("=", 1)
                kv[key] = value
            elif key is not None:
                kv[key] += "," + item
            else:
                raise ValueError(f"{ENV}: cannot parse {entry!r}")
        points[name.strip()] = kv
    return points


def armed(name: str, step: Optional[int] = None, rank: Optional[int] = None
          ) -> Optional[dict[str, str]]:
    """The arguments of failpoint ``name`` when it fires at ``step`` on ``rank``, else None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point = _parse(spec).get(name)
    if point is None:
        return None
    if "steps" in point and step is not None and step not in {
            int(s) for s in point["steps"].split(",")}:
        return None
    if "rank" in point and rank is not None and int(point["rank"]) != rank:
        return None
    return point


def corrupt_loss(loss, step: int, rank: int):
    """``nan_loss``: the loss times NaN (or inf), so backward carries it into every gradient."""
    point = armed("nan_loss", step, rank)
    if point is None:
        return loss
    log.warning("failpoint nan_loss: step %d rank %d", step, rank)
    return loss * float(point.get("value", "nan"))


class _FaultyObjective:
    """An objective whose loss ``nan_loss`` corrupts at armed steps; all else delegates."""

    def __init__(self, inner: Any, rank: int) -> None:
        self._inner, self._rank = inner, rank

    def loss(self, pipe: Any, batch: Any, rng: Any) -> Any:
        loss, parts = self._inner.loss(pipe, batch, rng)
        return corrupt_loss(loss, rng.step + 1, self._rank), parts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def arm_trainer(trainer: Any) -> None:
    """Install ``nan_loss`` and ``inf_grad`` on a Trainer (called only when the variable is
    set): its objective is wrapped and its first trainable parameter gets a hook."""
    step = lambda: trainer.state.step + 1  # noqa: E731 - the step being computed
    trainer.objective = _FaultyObjective(trainer.objective, trainer.rank)
    trainer.engine.params[0].register_hook(inf_grad_hook(step, trainer.rank))


def inf_grad_hook(step_fn, rank: int):
    """A tensor hook for one parameter: ``inf_grad`` makes its gradient +inf at armed steps.
    ``step_fn()`` returns the step being computed (1-based)."""

    def hook(grad):
        if armed("inf_grad", step_fn(), rank) is None:
            return grad
        log.warning("failpoint inf_grad: step %d rank %d", step_fn(), rank)
        return grad * float("inf")

    return hook


def at_step_start(step: int, rank: int) -> None:
    """``stall`` and ``die`` at the start of optimizer step ``step`` (1-based)."""
    point = armed("stall", step, rank)
    if point is not None:
        secs = float(point.get("secs", "3600"))
        log.warning("failpoint stall: rank %d sleeps %.0f s at step %d", rank, secs, step)
        time.sleep(secs)
    if armed("die", step, rank) is not None:
        log.warning("failpoint die: rank %d SIGKILLs itself at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def during_save(step: int, rank: int) -> None:
    """``save_error`` while the shards are being written."""
    if armed("save_error", step, rank) is not None:
        raise OSError(errno.ENOSPC, f"failpoint save_error: no space left writing step {step}")


def before_rename(step: int, rank: int) -> None:
    """``save_pause``: shards written, checkpoint not yet renamed into place."""
    point = armed("save_pause", step, rank)
    if point is not None:
        time.sleep(float(point.get("secs", "1")))
