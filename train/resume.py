"""Everything a training run checkpoints, saved and restored through one
:class:`~worldline.train.checkpoint.Checkpointer`: the step engine's model and optimizer (DCP,
or DeepSpeed's own format), EMA, frozen modules, auxiliary optimizers (the GAN's
discriminator), the data position, the LR schedule, the RNG streams and the TrainState.

Same layout (world size, CP): bitwise-exact resume. Another layout: DCP reshards the tensors,
every old rank's data position is merged, and the RNG streams are reseeded from (seed, step).
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from worldline.train import checkpoint as ckpt_lib
from worldline.train.guard import TrainingAborted
from worldline.train.parallel.base import StepEngine
from worldline.train.parallel.mesh import ParallelDims
from worldline.train.state import TrainState, capture_rng, restore_rng

log = logging.getLogger(__name__)

__all__ = ["Generators", "RunCheckpoint"]


class Generators:
    """One generator per micro-batch slot of the accumulation, seeded by its global index
    ``dp_rank * grad_accum + j``: the j-th micro-batch of a single process with accumulation
    k draws the same noise as rank j of k ranks without accumulation, just as it reads the
    same data (the loader's stream j == rank j's shards). That is what makes single-process
    and distributed losses comparable step by step. Noise, timesteps and CFG drops come from
    these only, so they are part of the checkpointed state."""

    def __init__(self, seed: int, dp_rank: int, grad_accum: int, device: torch.device) -> None:
        self.seed, self.dp_rank, self.grad_accum, self.device = seed, dp_rank, grad_accum, device
        self.slots = self._make(0)

    def _make(self, step: int) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(
            self.seed * 1_000_003 + self.dp_rank * self.grad_accum + j + 7919 * step)
            for j in range(self.grad_accum)]

    def reseed(self, step: int) -> None:
        """Fresh streams for ``step`` (a resume on another layout cannot split or merge the
        old ones)."""
        self.slots = self._make(step)

    def named(self) -> dict[str, torch.Generator]:
        return {("train" if j == 0 else f"train_{j}"): g for j, g in enumerate(self.slots)}


class RunCheckpoint:
    """Save/restore of one run (every rank calls every method).

    Args:
        checkpointer: the run's ``checkpoints/`` writer (complete-or-absent, ``latest``).
        engine: the step engine (model + optimizer).
        parts: extra state by checkpoint key: ``"ema"`` (an EMA), frozen modules (e.g.
            ``"autoencoder"``), auxiliary optimizers (objects whose ``state_dict()`` returns
            DCP tensors by key and whose ``load_state_dict`` takes them back).
        loader, scheduler, generators: the data position, LR schedule and RNG streams.
        dims: the parallel layout; meta: what meta.json records besides the step.
        on_error: ``train.on_save_error`` (``continue`` or ``exit``).
        report: called with metrics when a failed save is tolerated.
    """

    def __init__(self, checkpointer: ckpt_lib.Checkpointer, engine: StepEngine, *,
                 parts: Mapping[str, Any], loader: Any, scheduler: Any, generators: Generators,
                 dims: ParallelDims, meta: dict[str, Any], on_error: str = "exit",
                 report: Optional[Callable[[dict[str, Any], int], None]] = None) -> None:
        self.checkpointer, self.engine = checkpointer, engine
        self.parts = dict(parts)
        self.loader, self.scheduler, self.generators = loader, scheduler, generators
        self.dims, self.meta, self.on_error, self.report = dims, meta, on_error, report

    # ------------------------------------------------------------------ saving
    def _modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.parts.items() if isinstance(v, nn.Module)}

    def _tensors(self) -> dict[str, Any]:
        """The DCP state dict: model, optimizer, EMA, frozen modules, auxiliary optimizers."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.engine.model, self.engine.optimizer)
        tensors: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        for key, part in self.parts.items():
            sd = part.state_dict()
            if isinstance(part, nn.Module) or key == "ema":
                tensors[key] = sd
            else:  # an auxiliary optimizer contributes several keys
                tensors.update(sd)
        return tensors

    def sync_buffers(self) -> None:
        """Give every rank rank 0's floating buffers (running statistics such as the
        autoencoder's latent mean/std are updated from each rank's local batch; DDP already
        broadcasts them every forward). Done at save time so a checkpoint holds one value
        whichever rank's copy the writer picks, and a resumed run starts where it left off."""
        if self.dims.world_size == 1:
            return
        for b in self.engine.module.buffers():
            if b.is_floating_point():
                dist.broadcast(b.data, src=0)

    def save(self, state: TrainState) -> Optional[Path]:
        """Checkpoint ``state.step``; None when the write failed and on_error=continue."""
        self.sync_buffers()
        state.data = self.loader.state_dict()
        state.scheduler = self.scheduler.state_dict()
        meta = {**self.meta, "step": state.step, "world_size": self.dims.world_size,
                "dp_world": self.dims.dp_world, "cp": self.dims.cp,
                "format": "dcp" if self.engine.uses_dcp else "deepspeed",
                "torch": torch.__version__, "host": platform.node(), "time": time.time()}
        rng = capture_rng(self.generators.named())
        try:
            if not self.engine.uses_dcp:  # DeepSpeed: the engine writes in the step dir
                extra = {k: v.state_dict() for k, v in self.parts.items()}  # ZeRO-3 EMA: collective
                return self.checkpointer.save(
                    state.step, None, state, rng, meta,
                    writer=lambda partial: self.engine.save_checkpoint(partial, extra))
            return self.checkpointer.save(state.step, self._tensors(), state, rng, meta)
        except ckpt_lib.CheckpointWriteError as e:
            return self._on_error(e, state.step)

    def _on_error(self, err: Exception, step: int) -> None:
        """A failed save (every rank gets the same error): report it, keep the previous
        checkpoint as ``latest``, then continue or stop as ``train.on_save_error`` says."""
        kept = self.checkpointer.latest()
        kept_msg = f"{kept} is still the latest checkpoint" if kept else "no checkpoint yet"
        if self.on_error == "continue":
            log.error("%s; %s; training continues (train.on_save_error=continue)", err, kept_msg)
            if self.report is not None:
                self.report({"checkpoint_write_failed": 1}, step)
            return None
        raise TrainingAborted(f"{err}; {kept_msg}; stopping (train.on_save_error=exit), "
                              f"resume=auto continues from it") from err

    # ------------------------------------------------------------------ resuming
    def resolve(self, resume: Optional[str], run_dir: Path) -> Optional[Path]:
        """The checkpoint ``resume`` names (None: a fresh run, which must not overwrite one;
        ``auto``: the newest, if any)."""
        if resume is None:
            if self.checkpointer.latest() is not None:
                raise FileExistsError(
                    f"{run_dir} already holds checkpoints; pass resume=auto to continue it "
                    f"or choose another run.name")
            return None
        if resume == "auto":
            return self.checkpointer.latest()
        return ckpt_lib.resolve_checkpoint(resume)

    def load(self, path: Path, rank: int) -> TrainState:
        """Restore everything from ``path``; returns its TrainState."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        meta = ckpt_lib.read_meta(path)
        old_world, old_cp = meta.get("world_size", 1), meta.get("cp", 1)
        same_layout = old_world == self.dims.world_size and old_cp == self.dims.cp
        if not self.engine.uses_dcp:
            extra = self.engine.load_checkpoint(path, same_layout)
            for key, part in self.parts.items():
                if key in extra:
                    part.load_state_dict(extra[key])
        else:
            if meta.get("format", "dcp") != "dcp":
                raise ValueError(f"{path} is a {meta.get('backend')} checkpoint; resume it with "
                                 f"that backend, or export it (worldline-export) and init_from")
            # DCP stores tensors by name: N ranks' shards load on M ranks (resharding).
            tensors = self._tensors()
            ckpt_lib.load_tensors(path, tensors)
            set_state_dict(self.engine.model, self.engine.optimizer,
                           model_state_dict=tensors["model"],
                           optim_state_dict=tensors["optim"])
            for key, part in self.parts.items():
                if isinstance(part, nn.Module):
                    part.load_state_dict(tensors[key])
                elif key != "ema":
                    part.load_state_dict(tensors)
        state = ckpt_lib.load_train_state(path, rank)
        self.scheduler.load_state_dict(state.scheduler)
        if same_layout:
            self.loader.load_state_dict(state.data)
            rng = ckpt_lib.load_rng(path, rank)
        else:
            # World size changed: merge every old data-parallel rank's loader state (the loader
            # deals the remaining work of the open epochs to the new ranks, each sample once).
            # RNG streams cannot be split or merged: each new rank reseeds from (seed, step).
            self.loader.load_state_dict(ckpt_lib.load_data_states(path, old_world, old_cp))
            state.data = {}
            rng = None
            self.generators.reseed(state.step)
            log.info("resharded resume: %d ranks (cp %d) -> %d ranks (cp %d)", old_world, old_cp,
                     self.dims.world_size, self.dims.cp)
        if rng is not None:
            restore_rng(rng, self.generators.named())
        log.info("resumed from %s at step %d", path, state.step)
        return state
