"""Parallelism backends: a pure model in, a wrapped model out (torchtitan's ``parallelize``).

Each backend module applies, in this fixed order,

    activation checkpointing (full, or every k-th block)  ->  per-block torch.compile  ->  wrapping

and gives the Trainer the few step hooks that differ between backends (``micro_step`` context
for gradient sync during accumulation, ``backward``, ``clip``, ``step``). The Trainer never forks
its loop per backend.

=====================  ==========================================================
``dist.backend``       module
=====================  ==========================================================
single, ddp            :mod:`worldline.train.parallel.ddp`
fsdp                   :mod:`worldline.train.parallel.fsdp` (FSDP2, HSDP, offload)
deepspeed_zero{1,2,3}  :mod:`worldline.train.parallel.deepspeed`
``dist.cp > 1``        :mod:`worldline.train.parallel.context` (Ulysses CP, composes
                       with ddp / fsdp on a (dp, cp) mesh)
=====================  ==========================================================
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from worldline.train.parallel.base import Backend, block_modules

if TYPE_CHECKING:  # pragma: no cover
    from worldline.train.trainer import Trainer

__all__ = ["Backend", "block_modules", "make_backend"]


def make_backend(trainer: "Trainer") -> Backend:
    """The backend object for ``trainer.cfg.dist.backend``."""
    name = trainer.cfg.dist.backend
    if name in ("single", "ddp"):
        from worldline.train.parallel.ddp import DDPBackend, SingleBackend

        return (SingleBackend if name == "single" else DDPBackend)(trainer)
    if name == "fsdp":
        from worldline.train.parallel.fsdp import FSDPBackend

        return FSDPBackend(trainer)
    if name.startswith("deepspeed_zero"):
        from worldline.train.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(trainer, stage=int(name[-1]))
    raise ValueError(f"unknown dist.backend {name!r}")
