"""Parallelism from outside the model (torchtitan's ``parallelize``): a pure model in, a
wrapped model out, and the optimizer-step interface the Trainer drives.

:func:`parallelize` applies, in this fixed order, and never sees a Trainer::

    activation checkpointing (full / every k-th block / attention-only / selective)
        ->  per-block torch.compile (auto: on CUDA)  ->  context parallelism (once, for every
        backend)  ->  DDP | FSDP2 wrapping

:func:`make_step_engine` gives the :class:`~worldline.train.parallel.base.StepEngine` of the
backend: gradient sync during accumulation, backward, clip + guarded update. DeepSpeed's engine
takes the model and optimizer there (it wraps both).

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

import logging
from typing import Any, Optional

import torch
from torch import nn

from worldline.train.parallel.base import (
    StepEngine,
    apply_activation_checkpointing,
    block_modules,
    compile_blocks,
)
from worldline.train.parallel.compile import configure_recompile_limit, resolve_compile_blocks
from worldline.train.parallel.mesh import ParallelDims, cp_group
from worldline.train.precision import PrecisionPolicy

log = logging.getLogger(__name__)

__all__ = ["ParallelDims", "StepEngine", "block_modules", "make_step_engine", "parallelize",
           "deepspeed_stage"]


def deepspeed_stage(backend: str) -> Optional[int]:
    """The ZeRO stage of a ``deepspeed_zero<N>`` backend name, else None."""
    return int(backend[-1]) if str(backend).startswith("deepspeed_zero") else None


def parallelize(module: nn.Module, mesh: Optional[Any], dist_cfg: Any,
                precision: PrecisionPolicy, device: torch.device,
                num_shapes: int = 1) -> nn.Module:
    """AC -> compile -> CP -> wrap ``module`` for ``dist_cfg.backend``; returns the model
    forward/backward run on (``module`` itself when nothing wraps it). ``num_shapes``: the
    distinct clip shapes (data buckets) training feeds, which size dynamo's recompile limit
    when blocks are compiled (``dist.compile_blocks``, resolved by
    :func:`~worldline.train.parallel.compile.resolve_compile_blocks`)."""
    backend = str(dist_cfg.backend)
    world = 1 if mesh is None else mesh.size()
    if backend == "single" and world > 1 and dist_cfg.cp != world:
        raise RuntimeError(f"dist.backend=single launched on {world} ranks: choose dist=ddp, "
                           "fsdp or deepspeed_zero*")
    n_ac = apply_activation_checkpointing(module, dist_cfg.activation_checkpointing,
                                          dist_cfg.ac_every)
    if n_ac:
        log.info("activation checkpointing (%s) on %d modules", dist_cfg.activation_checkpointing,
                 n_ac)
    on, why = resolve_compile_blocks(dist_cfg.compile_blocks, device, backend)
    if on:
        limit = configure_recompile_limit(num_shapes)
        log.info("compile_blocks=true (%s): compiled %d blocks, dynamo recompile limit %d for "
                 "%d bucket shape(s)", why, compile_blocks(module), limit, num_shapes)
    else:
        log.info("compile_blocks=false (%s)", why)
    group = cp_group(mesh)
    if group is not None:
        from worldline.train.parallel.context import apply_context_parallel

        apply_context_parallel(module, group)
    if backend == "ddp":
        from worldline.train.parallel.ddp import wrap_ddp

        return wrap_ddp(module, mesh, dist_cfg, device)
    if backend == "fsdp":
        from worldline.train.parallel.fsdp import wrap_fsdp

        return wrap_fsdp(module, mesh, dist_cfg, precision)
    if backend == "single" or deepspeed_stage(backend) is not None:
        return module  # DeepSpeed wraps model + optimizer in make_step_engine
    raise ValueError(f"unknown dist.backend {backend!r}")


def make_step_engine(model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer,
                     dist_cfg: Any, dims: ParallelDims, *, micro_batch: int, grad_accum: int,
                     grad_clip: float, precision: PrecisionPolicy) -> StepEngine:
    """The backend's :class:`StepEngine` over the parallelized ``model`` (``module`` inside)."""
    stage = deepspeed_stage(dist_cfg.backend)
    if stage is not None:
        from worldline.train.parallel.deepspeed import DeepSpeedStep, ds_config

        conf = ds_config(dist_cfg, stage, dims.dp_world, micro_batch, grad_accum, grad_clip,
                         precision)
        return DeepSpeedStep(model, optimizer, conf, stage, dims.rank)
    if dist_cfg.backend == "fsdp":
        from worldline.train.parallel.fsdp import FSDPStep

        return FSDPStep(model, module, optimizer, grad_accum, grad_clip)
    from worldline.train.parallel.ddp import DDPStep

    return DDPStep(model, module, optimizer, grad_accum, grad_clip)
