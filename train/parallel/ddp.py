"""``dist=single`` and ``dist=ddp``.

DDP keeps a full replica per rank and all-reduces (averages) gradients in buckets during
backward. Under gradient accumulation the non-final micro-batches run inside ``no_sync()``,
so the all-reduce happens once per optimizer step.

    torchrun --nproc_per_node=2 -m worldline.train.main dist=ddp experiment=smoke stage=autoencoder
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from worldline.train.parallel.base import StepEngine


def wrap_ddp(module: nn.Module, mesh: Optional[Any], dist_cfg: Any,
             device: torch.device) -> nn.Module:
    """DDP over every rank (dp x cp: see context.py for why averaging over CP ranks is right);
    the module itself on one process."""
    if mesh is None:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, bucket_cap_mb=dist_cfg.bucket_mb,
               find_unused_parameters=dist_cfg.find_unused_parameters)


class DDPStep(StepEngine):
    """Plain torch step; non-final micro-batches skip DDP's gradient all-reduce."""

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if last or not isinstance(self.model, DDP):
            yield
        else:
            with self.model.no_sync():
                yield
