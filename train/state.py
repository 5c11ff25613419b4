"""TrainState: everything besides tensors of weights that a run needs to continue exactly.

Saved with every checkpoint (lingua style) as human-readable JSON, next to per-rank RNG files.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class TrainState:
    """Progress of a run. ``step`` counts optimizer steps; checkpoints are taken between steps,
    so the accumulation micro-step is always 0 at save time and is not stored."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    # This rank's data-loader position (JSON): restores the exact next batch. Saved per rank
    # (ranks/rank_<r>.json in the checkpoint), since every rank streams its own shards.
    data: dict[str, Any] = field(default_factory=dict)
    # LR scheduler state_dict (JSON-able for LambdaLR).
    scheduler: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """RNG states of python, numpy, torch and the named generators, as tensors and plain values
    so the file loads with ``torch.load(weights_only=True)``."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_rng`."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
