"""``dist=single`` and ``dist=ddp``.

DDP keeps a full replica per rank and all-reduces (averages) gradients in buckets during
backward. Under gradient accumulation the non-final micro-batches run inside ``no_sync()``,
so the all-reduce happens once per optimizer step.

    torchrun --nproc_per_node=2 -m worldline.train.main dist=ddp experiment=smoke stage=autoencoder
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from worldline.train.parallel.base import Backend


class SingleBackend(Backend):
    """One process: no wrapping (context parallelism, if asked, still applies)."""

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.trainer.world_size > 1 and self.dist.cp != self.trainer.world_size:
            raise RuntimeError(f"dist.backend=single launched on {self.trainer.world_size} "
                               "ranks: choose dist=ddp, fsdp or deepspeed_zero*")
        if self.dist.cp > 1:
            from worldline.train.parallel.context import apply_context_parallel

            apply_context_parallel(module, self.trainer.mesh["cp"].get_group())
            self.collective_forward = True
        return module


class DDPBackend(Backend):
    def wrap(self, module: nn.Module) -> nn.Module:
        t = self.trainer
        if self.dist.cp > 1:
            from worldline.train.parallel.context import apply_context_parallel

            apply_context_parallel(module, t.mesh["cp"].get_group())
            self.collective_forward = True
        if t.world_size == 1:
            return module
        ids = [t.device.index] if t.device.type == "cuda" else None
        # Gradients are averaged over all ranks (dp x cp): see context.py for why that is
        # right for CP ranks too.
        return DDP(module, device_ids=ids, bucket_cap_mb=self.dist.bucket_mb,
                   find_unused_parameters=self.dist.find_unused_parameters)

    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, last: bool) -> Iterator[None]:
        if last or not isinstance(model, DDP):
            yield
        else:
            with model.no_sync():
                yield
