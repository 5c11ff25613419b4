"""``dist=deepspeed_zero{1,2,3}``: DeepSpeed's engine owns backward, clipping and the step.

The ds_config is generated from the Hydra config (:func:`ds_config`): micro batch
(``data.batch_size``), ``gradient_accumulation_steps`` (``train.grad_accum``), global batch,
``gradient_clipping`` (``train.grad_clip``), bf16 (``train.precision``), ZeRO stage and CPU
offload of optimizer states (``dist.offload_optimizer``) / parameters (``dist.offload_params``,
ZeRO-3). ``dist.ds_config=<file.json>`` is merged over it (the user's keys win).

The optimizer is the Trainer's own AdamW (same param groups, same LambdaLR schedule acting on
its param groups), handed to ``deepspeed.initialize`` as a client optimizer.

Step protocol (the Trainer's :class:`~worldline.train.parallel.base.StepEngine`): each
micro-batch sets the engine's accumulation boundary explicitly
(``set_gradient_accumulation_boundary(last)``, so ZeRO reduces gradients on the last one only)
and calls ``engine.backward(loss)``, which scales by 1/accumulation; ``step`` is one
``engine.step()`` per optimizer step, which clips by the global norm
(``engine.get_global_grad_norm()`` is logged) and updates.

Checkpoints: ``engine.save_checkpoint(<step dir>, tag="ds")`` inside the atomic step dir (so
still complete-or-absent, with our ``latest``), plus ``extra.pt`` (EMA, frozen modules) from
rank 0. Same world size: exact resume. Another world size: the checkpoint is converted once to
DeepSpeed's universal format, which restores weights and optimizer state on any world size
(``load_resharded``); export via ``worldline-export``.

    torchrun --nproc_per_node=2 -m worldline.train.main dist=deepspeed_zero2 experiment=smoke stage=autoencoder
    deepspeed --num_gpus 8 --no_local_rank --module worldline.train.main dist=deepspeed_zero3 ...
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from worldline.train.checkpoint import DS_TAG, verify_deepspeed_files
from worldline.train.ema import EMA
from worldline.train.guard import NonFiniteGuard
from worldline.train.parallel.base import StepEngine
from worldline.train.precision import PrecisionPolicy

log = logging.getLogger(__name__)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(dist_cfg: Any, stage: int, dp_world: int, micro_batch: int, grad_accum: int,
              grad_clip: float, precision: PrecisionPolicy) -> dict[str, Any]:
    """The DeepSpeed config for ``dist.*`` and the run's batch/clip/precision (see the module
    docstring)."""
    d = dist_cfg
    # DeepSpeed's default 5e8-element buckets cost ~2 GB per rank before the first step and
    # made ZeRO-2 ~10x slower than ZeRO-3 on the CPU smoke run; 5e7 keeps buckets large on
    # GPU-sized models without that fixed cost (ds_config can override).
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": int(5e7),
                            "allgather_bucket_size": int(5e7)}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        # Gather full weights on save only when asked (export uses zero_to_fp32 instead).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    conf = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp_world,
        "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
        **precision.deepspeed_config(),
        "zero_optimization": zero,
        # Our AdamW (torch) as a client optimizer, also with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if d.ds_config:
        conf = _merge(conf, json.loads(Path(d.ds_config).read_text()))
    return conf


class DeepSpeedEMA(EMA):
    """EMA of DeepSpeed-managed parameters, on the same placement as the parameters.

    ZeRO-1/2 keep full parameters on every rank, so the plain EMA applies. ZeRO-3 partitions
    every parameter: rank r holds ``p.ds_tensor``, its flat (padded) slice. The shadow is an
    fp32 copy of exactly that slice, updated from it with no communication, so the EMA costs
    1/N of a full copy per rank. Full tensors are assembled (all-gather over the parameter's
    partition group) only for a checkpoint, and sampling swaps the shadow slices into
    ``ds_tensor`` so ZeRO-3's own gathers see the averaged weights."""

    def __init__(self, model: nn.Module, decay: float, stage: int) -> None:
        self.stage = stage
        if stage != 3:
            super().__init__(model, decay)
            return
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self._params = [params[n] for n in self.names]
        self._shadow = [p.ds_tensor.detach().float().clone() for p in self._params]
        self.shadow = dict(zip(self.names, self._shadow))  # local slices, by name

    @torch.no_grad()
    def update(self, step: int, ok: Optional[torch.Tensor] = None) -> None:
        if self.stage != 3:
            return super().update(step, ok)
        lerp = self.blend_weight(step)
        if lerp is None:
            return
        w: Any = lerp
        if ok is not None:  # weight 0 on a step the non-finite guard skipped (train/guard.py)
            w = [ok.to(device=self._shadow[0].device, dtype=torch.float32) * lerp] * len(
                self._shadow)
        torch._foreach_lerp_(self._shadow, [p.ds_tensor.detach().float() for p in self._params],
                             w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors by name. Under ZeRO-3 a collective: every rank must call it."""
        if self.stage != 3:
            return super().state_dict()
        import torch.distributed as dist

        out = {}
        for n, p, part in zip(self.names, self._params, self._shadow):
            group = p.ds_process_group
            flat = part.new_empty(part.numel() * dist.get_world_size(group))
            dist.all_gather_into_tensor(flat, part.contiguous(), group=group)
            out[n] = flat[: p.ds_numel].view(p.ds_shape).clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """From full tensors by name (any world size wrote them)."""
        if self.stage != 3:
            for n, v in full.items():
                self.shadow[n].copy_(v)
            return
        import torch.distributed as dist

        for n, p, part in zip(self.names, self._params, self._shadow):
            if n not in full:
                continue
            lo = dist.get_rank(p.ds_process_group) * part.numel()
            flat = full[n].reshape(-1).to(part)
            part.zero_()
            piece = flat[lo : lo + part.numel()]
            part[: piece.numel()].copy_(piece)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        if self.stage != 3:
            with super().applied_to(model) as m:
                yield m
            return
        # Between steps every parameter is released (only ds_tensor is live), so swapping
        # the slices is the whole job: the next forward gathers the averaged weights.
        backup = [p.ds_tensor.detach().clone() for p in self._params]
        for p, s in zip(self._params, self._shadow):
            p.ds_tensor.copy_(s.to(p.ds_tensor.dtype))
        try:
            yield model
        finally:
            for p, b in zip(self._params, backup):
                p.ds_tensor.copy_(b)


def ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one rank (e.g. 1 -> N resharding tests)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0,
                            world_size=1)


class DeepSpeedStep(StepEngine):
    """DeepSpeed's engine behind the Trainer's step interface (see the module docstring)."""

    uses_dcp = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, conf: dict[str, Any],
                 stage: int, rank: int) -> None:
        import deepspeed

        ensure_process_group()
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf,
                                               dist_init_required=False)
        log.info("DeepSpeed ZeRO-%d engine: %s", stage, json.dumps(conf))
        super().__init__(engine, model, optimizer, conf["gradient_accumulation_steps"],
                         conf["gradient_clipping"])
        self.engine, self.stage, self.rank = engine, stage, rank

    def make_ema(self, decay: float) -> EMA:
        return DeepSpeedEMA(self.module, decay, self.stage)

    # ------------------------------------------------------------------ step
    def zero_grad(self) -> None:
        # The engine zeroes its gradients (and ZeRO's partitioned buffers) after each update;
        # the wrapped optimizer's own zero_grad would not reach ZeRO's buffers.
        pass

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def step(self, guard: NonFiniteGuard) -> tuple[torch.Tensor, torch.Tensor]:
        self.engine.step()  # clips by the global norm, then updates
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float(norm) if norm is not None else float("nan"))
        return norm, guard.flag(norm)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, partial: Path, extra: dict[str, Any]) -> None:
        """Every rank: the engine's sharded checkpoint; rank 0: ``extra`` (EMA, frozen
        modules) as extra.pt."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO,
                                                    UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        # The marker ds_to_universal requires, so a resume on another world size can convert
        # this checkpoint and keep the optimizer state (load_resharded).
        info = {UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.engine.save_checkpoint(str(partial), tag=DS_TAG, save_latest=False,
                                    client_state=info)
        if self.rank == 0:
            torch.save(extra, partial / "extra.pt")

    def load_checkpoint(self, path: Path, same_layout: bool) -> dict[str, Any]:
        """Restore the engine (weights + optimizer); returns extra.pt's tensors."""
        # DeepSpeed's loaders unpickle without weights_only: scan the files first.
        verify_deepspeed_files(path)
        if same_layout:
            self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        else:
            self.load_resharded(path)
        return torch.load(path / "extra.pt", weights_only=True)

    def load_resharded(self, path: Path) -> None:
        """Another world size: DeepSpeed's universal checkpoint keeps the optimizer state.

        Rank 0 converts ``<step>/ds`` once into ``<step>/ds_universal`` (DeepSpeed's
        ``ds_to_universal``, in a subprocess: it runs its own process pools), written under a
        temporary name and renamed, so a crash mid-conversion leaves nothing half-valid.
        Checkpoints written before the universal marker was saved, or a failed conversion,
        fall back to the consolidated fp32 weights with a fresh optimizer (logged)."""
        import subprocess
        import sys

        import torch.distributed as dist

        uni = path / f"{DS_TAG}_universal"
        ok = torch.tensor([1])
        if self.rank == 0 and not uni.is_dir():
            tmp = path / f".{uni.name}.partial"
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(path / DS_TAG), "--output_folder", str(tmp),
                   "--num_extract_workers", "1", "--num_merge_workers", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                verify_deepspeed_files(tmp)
                os.replace(tmp, uni)
            else:
                ok[0] = 0
                log.warning("ds_to_universal failed on %s (exit %d): %s", path, r.returncode,
                            r.stderr.strip().splitlines()[-1:] or "")
        dist.broadcast(ok, src=0)
        if not ok.item():
            self.load_consolidated(path)
            return
        cfg = self.engine._config  # read by load_checkpoint only; no public setter exists
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        hyper = [{k: v for k, v in g.items() if k not in ("params", "lr")}
                 for g in base.param_groups]
        cfg.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(path), tag=uni.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        finally:
            cfg.load_universal_checkpoint = False
        if self.stage == 3:
            # DeepSpeed 0.19's ZeRO-3 universal load copies param group 0's hyperparameters
            # into every group (our no-decay group would get weight decay) and gives every
            # sub-group the *same* step tensor, which Adam then increments once per group per
            # step. Put back our groups' settings and give each state its own step counter.
            for g, h in zip(base.param_groups, hyper):
                g.update(h)
            for st in base.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        log.info("DeepSpeed resume on another world size from %s: weights and optimizer "
                 "state through the universal checkpoint", uni)

    def load_consolidated(self, path: Path) -> None:
        """Another world size: fp32 weights via zero_to_fp32, fresh optimizer state."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
        module = self.engine.module
        params = list(module.parameters())
        ctx = contextlib.nullcontext()
        if self.stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        with ctx, torch.no_grad():
            for n, p in module.named_parameters():
                if n in sd:
                    p.copy_(sd[n].to(p.dtype))
        opt = self.engine.optimizer
        # Push the new weights into ZeRO's fp32 master partitions.
        for fn in ("refresh_fp32_params", "_restore_from_bit16_weights"):
            if hasattr(opt, fn):
                getattr(opt, fn)()
                break
        log.warning("DeepSpeed resume on another world size: weights restored from %s, "
                    "optimizer state restarted (DeepSpeed's sharded optimizer state does not "
                    "reshard without universal-checkpoint conversion)", path)
