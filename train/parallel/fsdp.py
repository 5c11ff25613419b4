"""``dist=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every block (DiT / text-encoder blocks, autoencoder stages; see ``block_modules``) becomes
its own FSDP unit, then the root takes the remaining parameters. Parameters are DTensors
sharded on dim 0 across the data-parallel ranks; the optimizer, EMA and DCP checkpoints all
work on those local shards. Applied to a model still on the meta device, each rank then
materialises only its shards (train/materialize.py).

- ``train.precision=bf16``: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).
- ``dist.reshard_after_forward``: free gathered params after forward (less memory, one more
  all-gather in backward) or keep them until backward.
- ``dist.cpu_offload``: CPUOffloadPolicy (params, grads and optimizer step on the CPU).
- ``dist.replicate=R``: HSDP on a (replicate=R, shard=world/R) mesh: shard inside a node,
  replicate across nodes.
- ``dist.cp>1``: the shard dimension is the flattened (dp, cp) mesh (torchtitan's
  dp_shard_cp), so CP ranks hold different shards and gradients average over dp x cp.
- Gradient accumulation: ``set_requires_gradient_sync(False)`` on non-final micro-batches
  (gradients accumulate unsharded locally, reduce-scatter once per step).
- Clipping: the true global norm (``get_total_norm`` over DTensor grads, ``full_tensor``),
  then ``clip_grads_with_norm_``.

    torchrun --nproc_per_node=2 -m worldline.train.main dist=fsdp experiment=smoke stage=autoencoder
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from worldline.train.parallel.base import StepEngine, block_modules
from worldline.train.parallel.mesh import fsdp_mesh
from worldline.train.precision import PrecisionPolicy

log = logging.getLogger(__name__)


def wrap_fsdp(module: nn.Module, mesh: Optional[Any], dist_cfg: Any,
              precision: PrecisionPolicy) -> nn.Module:
    """``fully_shard`` every trainable block, then the root (see the module docstring)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if mesh is None:
        # Nothing to shard over (e.g. resuming an FSDP run on one process with dist=fsdp).
        log.info("FSDP2 on one process: model left unwrapped")
        return module
    shard_mesh = fsdp_mesh(mesh)
    kwargs: dict[str, Any] = {"mesh": shard_mesh,
                              "reshard_after_forward": dist_cfg.reshard_after_forward}
    mp = precision.fsdp_mixed_precision()
    if mp is not None:
        kwargs["mp_policy"] = mp
    if dist_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = block_modules(module)
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, **kwargs)
    # The root keeps its params gathered after forward: backward needs them first.
    fully_shard(module, **{**kwargs, "reshard_after_forward": False})
    # Entry points other than forward (sampling / eval call encode/decode directly) must
    # gather the root's parameters too.
    for name in ("encode", "decode"):
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    log.info("FSDP2: %d block units + root on mesh %s", len(blocks), shard_mesh)
    return module


class FSDPStep(StepEngine):
    """Gradient sync only on the last micro-batch; clipping by the DTensor global norm."""

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        yield

    def grad_norm(self) -> torch.Tensor:
        params = self.params
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            # Partial per-shard norms -> the true global norm (a small all-reduce).
            norm = norm.full_tensor()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm, foreach=True)
        return norm
