"""Training data of a flow stage when it is more than one loader: a resolution/length schedule
(one ``ShardLoader`` per phase, switched at the phase's start step) and prior preservation
(a fixed fraction of batches from other, e.g. pretraining, shards).

It presents the ``ShardLoader`` interface the Trainer uses (``__iter__``, ``state_dict``,
``load_state_dict``, ``stats``), so checkpoints carry the phase, each loader's exact position
and the number of batches served, and a resumed run continues on the same batches.

Which batch comes from the prior data is a pure function of the batch count (batch ``n`` is a
prior batch when ``floor((n + 1) r) > floor(n r)``), so the mix is exactly ``r`` over any
window and needs no random state.

It only composes loaders, so it lives in data/ and knows nothing of the Trainer: the step
comes in as a callable.

Tiny CPU example::

    loader = StageLoader(lambda phase: ShardLoader(root, num_frames=[8, 16][phase]), [0, 1000],
                         step=lambda: trainer.step, prior=ShardLoader(prior_root), ratio=0.25)
    batch = next(iter(loader))      # a Batch; every 4th one comes from the prior data
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

from worldline.data.batch import Batch

__all__ = ["BatchSource", "StageLoader", "is_prior_batch"]


class BatchSource(Protocol):
    """What ``StageLoader`` needs of a loader (``ShardLoader`` has it, and so does
    ``StageLoader`` itself)."""

    @property
    def stats(self) -> dict:
        """Counters (batches, samples, skipped, ...)."""
        ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict:
        """JSON-safe position."""
        ...

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from one rank's state or the list of all old ranks' states."""
        ...


def is_prior_batch(n: int, ratio: float) -> bool:
    """Whether the ``n``-th batch served (0-based) is a prior-preservation batch."""
    return ratio > 0 and math.floor((n + 1) * ratio) > math.floor(n * ratio)


class StageLoader:
    """Phase-scheduled main loader plus an optional prior loader (see the module docstring).

    Args:
        make_phase: phase index -> a fresh ShardLoader for that phase's resolution/length.
        phase_starts: start step of each phase, increasing, the first 0.
        step: returns the trainer's current optimizer step (the phase is chosen per batch).
        prior: the prior-preservation loader, or None; ratio: its fraction of batches.
        on_phase: called with the new phase index whenever the main loader changes.
    """

    def __init__(self, make_phase: Callable[[int], BatchSource], phase_starts: list[int],
                 step: Callable[[], int], prior: BatchSource | None = None, ratio: float = 0.0,
                 on_phase: Callable[[int], None] | None = None) -> None:
        self.make_phase, self.phase_starts, self.step = make_phase, phase_starts, step
        self.prior, self.ratio, self.on_phase = prior, ratio, on_phase
        self.phase = -1
        self.main: BatchSource
        self.served = 0
        self._main_iter: Iterator[Batch] | None = None
        self._prior_iter: Iterator[Batch] | None = None
        self._set_phase(0)

    def phase_at(self, step: int) -> int:
        """The phase that trains at optimizer step ``step`` (the last one started by then)."""
        return max(i for i, s in enumerate(self.phase_starts) if s <= step)

    def _set_phase(self, phase: int) -> None:
        if phase == self.phase:
            return
        self.phase, self.main, self._main_iter = phase, self.make_phase(phase), None
        if self.on_phase is not None:
            self.on_phase(phase)

    @property
    def stats(self) -> dict:
        """The current phase loader's counters."""
        return self.main.stats

    @property
    def epoch(self) -> int:
        """The current phase loader's epoch (what the Trainer logs)."""
        return getattr(self.main, "epoch", 0)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            self._set_phase(self.phase_at(self.step()))
            if self.prior is not None and is_prior_batch(self.served, self.ratio):
                if self._prior_iter is None:
                    self._prior_iter = iter(self.prior)
                batch = next(self._prior_iter)
            else:
                if self._main_iter is None:
                    self._main_iter = iter(self.main)
                batch = next(self._main_iter)
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        """Phase, batches served and both loaders' positions (JSON-safe)."""
        main = self.main.state_dict()
        return {"phase": self.phase, "served": self.served, "main": main,
                "prior": None if self.prior is None else self.prior.state_dict(),
                "epoch": main.get("epoch", 0)}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """One rank's state, or every old rank's (a resharded resume: merged per loader)."""
        states = state if isinstance(state, list) else [state]
        first = states[0]
        self._set_phase(first["phase"])
        self.served = first["served"]
        mains = [s["main"] for s in states]
        self.main.load_state_dict(mains if isinstance(state, list) else mains[0])
        self._main_iter = None
        if self.prior is not None and first.get("prior") is not None:
            priors = [s["prior"] for s in states]
            self.prior.load_state_dict(priors if isinstance(state, list) else priors[0])
            self._prior_iter = None
