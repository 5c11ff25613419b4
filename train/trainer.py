"""The training loop, shared by every objective (torchtitan-style small, overridable methods).

Example (tiny CPU run, a few minutes)::

    worldline-train stage=autoencoder run.name=ae train.steps=200

An objective subclasses :class:`Trainer` and overrides ``build_model`` (the trained module),
``compute_loss`` (one micro-batch → loss) and ``sample``/``evaluate``; the loop, optimizer,
schedule, accumulation, clipping, EMA, logging and checkpoint/resume live here only.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from worldline.data.loader import ShardLoader
from worldline.train import checkpoint as ckpt_lib
from worldline.train.config import to_container
from worldline.train.dist import all_reduce_scalars, init_distributed
from worldline.train.ema import EMA
from worldline.train import failpoints
from worldline.train.guard import NonFiniteGuard, TrainingAborted
from worldline.train.watchdog import Watchdog
from worldline.train.parallel import make_backend
from worldline.train.perf import peak_flops, peak_memory_bytes
from worldline.train.preempt import PreemptionHandler, slurm_restart_count
from worldline.train.state import TrainState, capture_rng, restore_rng
from worldline.train.tracking import Tracker

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(cfg: DictConfig):
    """Linear warmup to 1, then cosine (or constant) to ``min_lr_ratio``; a pure function of the
    step so the schedule needs no state beyond the step to resume exactly."""
    warm, total = cfg.optim.warmup_steps, cfg.train.steps
    floor = cfg.optim.min_lr_ratio

    def fn(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


class Trainer:
    """One stage of training on one process group. See the module docstring."""

    #: Checkpoint keys of modules that are saved and restored but never trained.
    frozen: dict[str, nn.Module]

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.root) / cfg.run.name
        #: Installed by ``train()`` (eval/sample apps never catch stop signals).
        self.preempt: Optional[PreemptionHandler] = None
        #: Name of the signal the run stopped on before ``train.steps`` (None: not stopped).
        self.stopped_by: Optional[str] = None
        # Joins the process group under torchrun / srun / the deepspeed launcher (gloo on
        # CPU, NCCL on GPU); one process otherwise.
        self.dist_info = init_distributed(cfg.dist.timeout_s)
        self.rank, self.world_size = self.dist_info.rank, self.dist_info.world_size
        cp = cfg.dist.cp
        if self.world_size % cp:
            raise ValueError(f"dist.cp={cp} does not divide the world size {self.world_size}")
        # Data-parallel coordinates: CP ranks of one group see the same batch and noise.
        self.dp_rank, self.dp_world = self.rank // cp, self.world_size // cp
        self.device = pick_device()
        self.mesh = self.build_mesh()
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if self.device.type == "cpu":
            # Zero-initialised (adaLN-zero) and decaying weights produce denormal floats, which
            # run ~20x slower on x86 CPUs (measured on the tiny autoencoder: 3.6 s vs 0.17 s a
            # step). Flushing them to zero changes no result we care about.
            torch.set_flush_denormal(True)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.run.seed)
        # Noise, timesteps and CFG drops come from this generator only, so they are part of the
        # checkpointed state and independent of anything else that touches global RNG.
        # One generator per micro-batch slot of the accumulation, seeded by its global index
        # ``dp_rank * grad_accum + j``: the j-th micro-batch of a single process with
        # accumulation k draws the same noise as rank j of k ranks without accumulation, just
        # as it reads the same data (the loader's stream j == rank j's shards). That is what
        # makes single-process and distributed losses comparable step by step.
        self.generators = [self._make_generator(j) for j in range(cfg.train.grad_accum)]
        self.generator = self.generators[0]
        self.frozen = {}
        # ``module`` is the pure model (attributes, EMA, weights I/O); ``model`` is what the
        # parallel backend wrapped around it (forward/backward). They are the same object
        # until a distributed backend wraps it.
        self.backend = make_backend(self)
        self.module = self.build_model().to(self.device)
        self.freeze(cfg.stage.freeze)
        self.model = self.parallelize(self.module)
        # After wrapping: under FSDP these are the DTensor shards the optimizer updates.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = self.build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # DeepSpeed wraps model + optimizer into its engine here; a no-op for the others.
        self.model = self.backend.finalize(self.model, self.optimizer)
        self.ema = self.build_ema() if cfg.train.ema_decay > 0 else None
        self.loader = self.build_loader()
        self.state = TrainState()
        self.checkpointer = ckpt_lib.Checkpointer(self.run_dir, cfg.train.keep_last,
                                                  async_save=cfg.dist.async_save)
        self.tracker: Optional[Tracker] = None
        self._step_samples = 0  # samples of the step being taken (buckets vary the batch size)
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
        # Non-finite steps are masked on the device (train/guard.py); faults are injected
        # only when WORLDLINE_FAILPOINTS is set (train/failpoints.py, tests/faults/).
        self.guard = NonFiniteGuard(self.device, cfg.train.max_nonfinite_skips,
                                    cfg.train.sync_nonfinite_check)
        if os.environ.get(failpoints.ENV):
            failpoints.arm_trainer(self)

    # ----------------------------------------------------------------- building (overridable)
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def _make_generator(self, j: int, step: int = 0) -> torch.Generator:
        idx = self.dp_rank * self.cfg.train.grad_accum + j
        return torch.Generator(device=self.device).manual_seed(
            self.cfg.run.seed * 1_000_003 + idx + 7919 * step)

    def _named_generators(self) -> dict[str, torch.Generator]:
        return {("train" if j == 0 else f"train_{j}"): g for j, g in enumerate(self.generators)}

    def build_mesh(self):
        """The device mesh of a multi-rank run: (dp, cp), or (dp_replicate, dp_shard, cp) for
        HSDP. None for one process."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        cp, rep = self.cfg.dist.cp, self.cfg.dist.replicate
        if rep > 1:
            if self.dp_world % rep:
                raise ValueError(f"dist.replicate={rep} does not divide {self.dp_world} dp ranks")
            return init_device_mesh(self.device.type, (rep, self.dp_world // rep, cp),
                                    mesh_dim_names=("dp_replicate", "dp_shard", "cp"))
        return init_device_mesh(self.device.type, (self.dp_world, cp), mesh_dim_names=("dp", "cp"))

    def fsdp_mesh(self):
        """The mesh FSDP shards over: dp (or dp x cp flattened), 2-D for HSDP."""
        m = self.mesh
        if self.cfg.dist.replicate > 1:
            return m["dp_replicate", "dp_shard"]
        if self.cfg.dist.cp > 1:
            return m["dp", "cp"]._flatten("dp_cp")
        return m["dp"]

    def parallelize(self, module: nn.Module) -> nn.Module:
        """Wrap the pure model for ``dist.backend`` (AC -> compile -> wrap; see train/parallel)."""
        return self.backend.parallelize(module)

    def build_ema(self) -> EMA:
        make = getattr(self.backend, "make_ema", None)
        return make(self.module, self.cfg.train.ema_decay) if make else \
            EMA(self.module, self.cfg.train.ema_decay)

    def freeze(self, prefixes: list[str]) -> None:
        """Freeze parameters whose name starts with any of ``prefixes``."""
        for name, p in self.module.named_parameters():
            if any(name.startswith(pre) for pre in prefixes):
                p.requires_grad_(False)

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        # No weight decay on gains, biases and embeddings' 1-D parameters.
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused: its kernel takes the non-finite guard's flag and skips the update on the
        # device (train/guard.py), so no host sync is needed to skip a NaN step.
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 fused=True)

    def dataset_shards(self) -> str:
        """Shard spec for the training data (generates the synthetic world on first use)."""
        d = self.cfg.data
        if d.kind == "synthetic":
            from worldline.data.shards import ensure_synthetic_dataset
            from worldline.data.synthetic import SyntheticWorldConfig

            syn = SyntheticWorldConfig(**OmegaConf.to_container(d.synthetic, resolve=True))
            return ensure_synthetic_dataset(d.root, syn)
        return d.shards

    def build_loader(self, shuffle: Optional[bool] = None, seed_offset: int = 0) -> ShardLoader:
        d = self.cfg.data
        return ShardLoader(
            self.dataset_shards(),
            batch_size=d.batch_size,
            num_frames=d.num_frames,
            frame_stride=d.frame_stride,
            resolution=tuple(d.resolution),
            rank=self.dp_rank,
            world_size=self.dp_world,
            num_workers=d.num_workers,
            seed=self.cfg.run.seed + seed_offset,
            position=d.position,
            shuffle_shards=d.shuffle_shards if shuffle is None else shuffle,
            # Evaluation passes (shuffle=False) read each sample once, in order.
            shuffle_buffer=d.shuffle_buffer if shuffle is None else 0,
            resample=d.resample if shuffle is None else False,
            input=d.input,
            fps=d.fps,
            crop=d.crop,
            buckets=[OmegaConf.to_container(b) for b in d.buckets] or None,
            upscale=d.upscale,
            max_skip_fraction=d.max_skip_fraction,
            skip_check_after=d.skip_check_after,
            decode_threads=d.decode_threads,
            channels_last=d.channels_last,
            with_refs=("refs" in self.cfg.stage.conditions) if d.with_refs is None
            else d.with_refs,
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------ per-objective (overridable)
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch → (scalar loss, extra tensors to log). No host syncs here."""
        raise NotImplementedError

    def tokens_per_sample(self) -> int:
        return 0

    def flops_per_sample(self) -> float:
        return 0.0

    def sample(self, step: int) -> None:
        """Write periodic samples under ``samples/step_<N>/`` and log them."""

    # ------------------------------------------------------------------------- the loop
    def next_batch(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = next(self._data_iter)
        self._data_wait += time.perf_counter() - t0
        self._step_samples += len(batch["key"])
        # channels_last batches arrive as a strided view of decord's [B, T, H, W, 3]; the
        # transpose is paid once here, on the device when there is one.
        return {k: v.to(self.device, non_blocking=True).contiguous() if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, Any], last: bool = True
                         ) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; ``last``: the accumulation's final one (the
        only one whose backward synchronises gradients across ranks)."""
        with self.backend.micro_step(self.model, last):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                loss, parts = self.compute_loss(batch)
            self.backward(loss)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    # Step hooks: DeepSpeed's engine owns backward/clip/step; the others use torch's.
    def backward(self, loss: torch.Tensor) -> None:
        self.backend.backward(loss, self.cfg.train.grad_accum)

    def clip_gradients(self) -> torch.Tensor:
        """Clip to ``train.grad_clip`` by the global norm; returns that norm."""
        return self.backend.clip(self.params, self.cfg.train.grad_clip)

    def optimizer_step(self) -> None:
        """The optimizer update, masked on the device when the guard flagged this step."""
        self.guard.step(self.optimizer, lambda: self.backend.step(self.optimizer))

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns device tensors."""
        self.backend.zero_grad(self.optimizer)
        self._step_samples = 0
        sums: dict[str, torch.Tensor] = {}
        accum = self.cfg.train.grad_accum
        for i in range(accum):
            self.generator = self.generators[i]
            parts = self.forward_backward(self.next_batch(), last=i == accum - 1)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v / accum
        grad_norm = self.clip_gradients()
        ok = self.guard.flag(grad_norm)  # device-side; see train/guard.py
        self.optimizer_step()
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.state.step, ok)
        # Buckets make the batch size vary per step; counted on this rank, then scaled by the
        # data-parallel world (ranks draw the same bucket schedule only on average).
        n = self._step_samples * self.dp_world
        self.state.samples_seen += n
        self.state.tokens_seen += n * self.tokens_per_sample()
        sums["grad_norm"] = grad_norm
        sums["nonfinite_frac"] = (~ok).float()
        t, step = self.cfg.train, self.state.step
        if t.sync_nonfinite_check or step % t.log_every == 0 or step % t.ckpt_every == 0 \
                or step == t.steps:
            # Host read of the skip counters, only where the loop syncs anyway (and before
            # any save): aborts after train.max_nonfinite_skips in a row.
            self.state.skipped_steps += self.guard.check(
                step, str(latest) if (latest := self.checkpointer.latest()) else None)
        return sums

    def train(self) -> TrainState:
        """Resume if asked, then run until ``train.steps``; checkpoint, log and sample."""
        cfg = self.cfg
        # Before the (slow) resume, so a SLURM warning that arrives during it stops the run
        # after its first step instead of being lost. Handlers are put back on return.
        self.preempt = PreemptionHandler(list(cfg.preempt.signals), cfg.preempt.check_every,
                                         cfg.preempt.enabled)
        self._restarts = slurm_restart_count()
        resumed_from = self.maybe_resume()
        self.write_run_config()
        self.tracker = Tracker(self.run_dir, cfg.logger, cfg.run.name, to_container(cfg),
                               resume_step=self.state.step if resumed_from else None,
                               run_id=self.state.wandb_run_id, rank=self.rank)
        self.state.wandb_run_id = self.tracker.run_id
        # The CPU probe runs in the training precision: bf16 matmuls run ~4x fp32 on CPUs with
        # AVX512-BF16/AMX, and an fp32 peak would overstate a bf16 run's MFU.
        peak, peak_src = peak_flops(self.device, self.autocast_dtype or torch.float32)
        fps = self.flops_per_sample()
        log.info("%s: %.2fM trainable params, %.3g train FLOPs/sample, peak %.3g FLOP/s (%s)",
                 type(self).__name__, sum(p.numel() for p in self.params) / 1e6, fps, peak, peak_src)
        self.model.train()
        self._data_iter = iter(self.loader)
        self._data_wait = 0.0
        bar = self._progress_bar()
        acc: dict[str, torch.Tensor] = {}
        n_acc, t_log, samples_log = 0, time.perf_counter(), self.state.samples_seen
        tokens_log = self.state.tokens_seen
        self.watchdog = Watchdog.for_trainer(self)  # heartbeat line + stall detection
        while self.state.step < cfg.train.steps:
            failpoints.at_step_start(self.state.step + 1, self.rank)
            self.watchdog.beat(self.state.step + 1)
            out = self.train_step()
            self.checkpointer.poll()  # makes a finished async save visible (no collective)
            for k, v in out.items():
                acc[k] = acc.get(k, 0) + v
            n_acc += 1
            step = self.state.step
            if bar is not None:
                bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                dt = time.perf_counter() - t_log
                # The only host sync of the loop: one per log interval (plus, with several
                # ranks, two small all-reduces of the logged values).
                row = all_reduce_scalars({k: v / n_acc for k, v in acc.items()}, self.device)
                samples = self.state.samples_seen - samples_log
                worst = all_reduce_scalars(
                    {"data_wait_frac": self._data_wait / dt,
                     "peak_mem_gb": peak_memory_bytes(self.device) / 2**30}, self.device, "max")
                row.update(
                    lr=self.scheduler.get_last_lr()[0],
                    samples_per_s=samples / dt,
                    tokens_per_s=(self.state.tokens_seen - tokens_log) / dt,
                    mfu=fps * samples / dt / peak / self.world_size,
                    # The slowest rank's data wait and the largest per-rank peak memory.
                    data_wait_frac=worst["data_wait_frac"],
                    peak_mem_gb=worst["peak_mem_gb"],
                    peak_mem_gb_rank0=peak_memory_bytes(self.device) / 2**30,
                    epoch=self.loader.epoch,
                    skipped_samples=int(self.loader.stats.get("skipped", 0)),
                )
                if self._restarts is not None:  # which start of a requeued SLURM job logged it
                    row["slurm_restart_count"] = self._restarts
                self.tracker.log(row, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", mfu=f"{row['mfu']:.1%}")
                else:
                    log.info("step %d | loss %.4f | %.1f samples/s | %.0f tok/s | mfu %.1f%%",
                             step, row["loss"], row["samples_per_s"], row["tokens_per_s"],
                             100 * row["mfu"])
                acc, n_acc, t_log = {}, 0, time.perf_counter()
                samples_log, tokens_log, self._data_wait = (
                    self.state.samples_seen, self.state.tokens_seen, 0.0)
            last = step == cfg.train.steps
            if step % cfg.train.ckpt_every == 0 or last:
                self.save_checkpoint()
            if (cfg.train.sample_every and step % cfg.train.sample_every == 0) or last:
                self.model.eval()
                self.sample_all_ranks(step)
                self.model.train()
            if not last and self.preempt.should_stop(step):
                # All ranks agreed (train/preempt.py): save this step unless it was just saved,
                # then leave; the entry point reports the run as stopped, not finished.
                self.stopped_by = self.preempt.signal_name
                if step % cfg.train.ckpt_every:
                    self.save_checkpoint()
                log.warning("stopping at step %d/%d on %s (checkpointed)", step, cfg.train.steps,
                            self.stopped_by)
                break
        self.watchdog.stop()
        self.checkpointer.wait()  # an async save in flight must land before we report done
        self.preempt.restore()
        if bar is not None:
            bar.close()
        if self.stopped_by is None:
            self.tracker.summary({"final_step": self.state.step})
        self.tracker.finish()
        return self.state

    def sample_all_ranks(self, step: int) -> None:
        """Periodic samples. With several ranks every rank runs the model (sharded parameters
        and DDP buffer syncs need all of them), but only rank 0's files land in the run dir."""
        if self.world_size == 1 or self.rank == 0:
            self.sample(step)
            return
        import shutil

        real, self.run_dir = self.run_dir, self.run_dir / f".sample_scratch_rank{self.rank}"
        try:
            self.sample(step)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = real

    def _progress_bar(self):
        if not self.cfg.train.progress_bar or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.state.step, desc=self.cfg.run.name,
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)

    # --------------------------------------------------------------------- checkpointing
    def checkpoint_tensors(self) -> dict[str, Any]:
        """The DCP state dict of this stage: trained model, optimizer, EMA, frozen modules."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        tensors: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        for key, module in self.frozen.items():
            tensors[key] = module.state_dict()
        return tensors

    def load_extra_tensors(self, tensors: dict[str, Any]) -> None:
        """Restore what a subclass added to :meth:`checkpoint_tensors` (loaded in place)."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's floating buffers (running statistics such as the
        autoencoder's latent mean/std are updated from each rank's local batch; DDP already
        broadcasts them every forward). Done at save time so a checkpoint holds one value
        whichever rank's copy the writer picks, and a resumed run starts where it left off."""
        if self.world_size == 1:
            return
        for b in self.module.buffers():
            if b.is_floating_point():
                dist.broadcast(b.data, src=0)

    def save_checkpoint(self) -> Optional[Path]:
        """Checkpoint this step; None when the write failed and train.on_save_error=continue."""
        self.sync_buffers()
        self.state.data = self.loader.state_dict()
        self.state.scheduler = self.scheduler.state_dict()
        meta = {
            "config": to_container(self.cfg),
            "step": self.state.step,
            "world_size": self.world_size,
            "dp_world": self.dp_world,
            "cp": self.cfg.dist.cp,
            "backend": self.cfg.dist.backend,
            "format": "dcp" if self.backend.uses_dcp else "deepspeed",
            "objective": self.cfg.stage.objective,
            "torch": torch.__version__,
            "host": platform.node(),
            "time": time.time(),
        }
        rng = capture_rng(self._named_generators())
        try:
            if not self.backend.uses_dcp:  # DeepSpeed: engine.save_checkpoint in the step dir
                return self.checkpointer.save(self.state.step, None, self.state, rng, meta,
                                              writer=self.backend.save_checkpoint)
            return self.checkpointer.save(self.state.step, self.checkpoint_tensors(),
                                          self.state, rng, meta)
        except ckpt_lib.CheckpointWriteError as e:
            return self.on_save_error(e)

    def on_save_error(self, err: Exception) -> None:
        """A failed save (every rank gets the same error): report it, keep the previous
        checkpoint as ``latest``, then continue or stop as ``train.on_save_error`` says."""
        kept = self.checkpointer.latest()
        kept_msg = f"{kept} is still the latest checkpoint" if kept else "no checkpoint yet"
        if self.cfg.train.on_save_error == "continue":
            log.error("%s; %s; training continues (train.on_save_error=continue)", err, kept_msg)
            if self.tracker is not None:
                self.tracker.log({"checkpoint_write_failed": 1}, self.state.step)
            return None
        raise TrainingAborted(f"{err}; {kept_msg}; stopping (train.on_save_error=exit), "
                              f"resume=auto continues from it") from err

    def resolve_resume(self) -> Optional[Path]:
        r = self.cfg.resume
        if r is None:
            if self.checkpointer.latest() is not None:
                raise FileExistsError(
                    f"{self.run_dir} already holds checkpoints; pass resume=auto to continue it "
                    f"or choose another run.name")
            return None
        if r == "auto":
            return self.checkpointer.latest()
        return ckpt_lib.resolve_checkpoint(r)

    def maybe_resume(self) -> Optional[Path]:
        """Restore everything from a checkpoint (``resume``), or initialise weights from
        ``stage.init_from``. Returns the checkpoint resumed from, if any."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = self.resolve_resume()
        if path is None:
            if self.cfg.stage.init_from:
                self.init_from(ckpt_lib.resolve_checkpoint(self.cfg.stage.init_from))
            return None
        meta = ckpt_lib.read_meta(path)
        old_world, old_cp = meta.get("world_size", 1), meta.get("cp", 1)
        same_layout = old_world == self.world_size and old_cp == self.cfg.dist.cp
        if not self.backend.uses_dcp:
            self.backend.load_checkpoint(path, same_layout)
        else:
            if meta.get("format", "dcp") != "dcp":
                raise ValueError(f"{path} is a {meta.get('backend')} checkpoint; resume it with "
                                 f"that backend, or export it (worldline-export) and init_from")
            # DCP stores tensors by name: N ranks' shards load on M ranks (resharding).
            tensors = self.checkpoint_tensors()
            ckpt_lib.load_tensors(path, tensors)
            set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                           optim_state_dict=tensors["optim"])
            for key, module in self.frozen.items():
                module.load_state_dict(tensors[key])
            self.load_extra_tensors(tensors)
        self.state = ckpt_lib.load_train_state(path, self.rank)
        self.scheduler.load_state_dict(self.state.scheduler)
        if same_layout:
            self.loader.load_state_dict(self.state.data)
            rng = ckpt_lib.load_rng(path, self.rank)
        else:
            # World size changed: merge every old data-parallel rank's loader state (the loader
            # deals the remaining work of the open epochs to the new ranks, each sample once).
            # RNG streams cannot be split or merged: each new rank reseeds from (seed, step).
            self.loader.load_state_dict(ckpt_lib.load_data_states(path, old_world, old_cp))
            self.state.data = {}
            rng = None
            self.generators = [self._make_generator(j, self.state.step)
                               for j in range(self.cfg.train.grad_accum)]
            self.generator = self.generators[0]
            log.info("resharded resume: %d ranks (cp %d) -> %d ranks (cp %d)", old_world, old_cp,
                     self.world_size, self.cfg.dist.cp)
        if rng is not None:
            restore_rng(rng, self._named_generators())
        log.info("resumed from %s at step %d", path, self.state.step)
        return path

    def init_from(self, path: Path) -> None:
        """Start the trained model from another run's weights (EMA if it has them)."""
        used_ema = ckpt_lib.load_module_weights(self.module, path, "model", prefer_ema=True,
                                                allow_partial=True)
        if self.ema is not None:
            self.ema = self.build_ema()
        log.info("initialised weights from %s (%s)", path, "EMA" if used_ema else "raw")

    def write_run_config(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
