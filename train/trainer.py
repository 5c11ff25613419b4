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
from omegaconf import DictConfig, OmegaConf
from torch import nn

from worldline.data.loader import ShardLoader
from worldline.train import checkpoint as ckpt_lib
from worldline.train.config import to_container
from worldline.train.ema import EMA
from worldline.train.perf import peak_flops, peak_memory_bytes
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
        self.rank, self.world_size = 0, 1
        self.device = pick_device()
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
        self.generator = torch.Generator(device=self.device).manual_seed(
            cfg.run.seed * 1_000_003 + self.rank)
        self.frozen = {}
        # ``module`` is the pure model (attributes, EMA, weights I/O); ``model`` is what the
        # parallel backend wrapped around it (forward/backward). They are the same object
        # until a distributed backend wraps it.
        self.module = self.build_model().to(self.device)
        self.freeze(cfg.stage.freeze)
        self.model = self.parallelize(self.module)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ema = EMA(self.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.loader = self.build_loader()
        self.state = TrainState()
        self.checkpointer = ckpt_lib.Checkpointer(self.run_dir, cfg.train.keep_last)
        self.tracker: Optional[Tracker] = None
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None

    # ----------------------------------------------------------------- building (overridable)
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def parallelize(self, module: nn.Module) -> nn.Module:
        """Wrap the pure model for the configured backend (``dist=single``: unchanged)."""
        return module

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
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 foreach=True)

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
            rank=self.rank,
            world_size=self.world_size,
            num_workers=d.num_workers,
            seed=self.cfg.run.seed + seed_offset,
            position=d.position,
            shuffle_shards=d.shuffle_shards if shuffle is None else shuffle,
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
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            loss, parts = self.compute_loss(batch)
        (loss / self.cfg.train.grad_accum).backward()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns device tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.train.grad_accum):
            parts = self.forward_backward(self.next_batch())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v / self.cfg.train.grad_accum
        clip = self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"),
                                                   foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.state.step)
        n = self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world_size
        self.state.samples_seen += n
        self.state.tokens_seen += n * self.tokens_per_sample()
        sums["grad_norm"] = grad_norm
        return sums

    def train(self) -> TrainState:
        """Resume if asked, then run until ``train.steps``; checkpoint, log and sample."""
        cfg = self.cfg
        resumed_from = self.maybe_resume()
        self.write_run_config()
        self.tracker = Tracker(self.run_dir, cfg.logger, cfg.run.name, to_container(cfg),
                               resume_step=self.state.step if resumed_from else None,
                               run_id=self.state.wandb_run_id, rank=self.rank)
        self.state.wandb_run_id = self.tracker.run_id
        peak, peak_src = peak_flops(self.device)
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
        while self.state.step < cfg.train.steps:
            out = self.train_step()
            for k, v in out.items():
                acc[k] = acc.get(k, 0) + v
            n_acc += 1
            step = self.state.step
            if bar is not None:
                bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                dt = time.perf_counter() - t_log
                # The only host sync of the loop: one per log interval.
                row = {k: float(v / n_acc) for k, v in acc.items()}
                samples = self.state.samples_seen - samples_log
                row.update(
                    lr=self.scheduler.get_last_lr()[0],
                    samples_per_s=samples / dt,
                    tokens_per_s=(self.state.tokens_seen - tokens_log) / dt,
                    mfu=fps * samples / dt / peak / self.world_size,
                    data_wait_frac=self._data_wait / dt,
                    peak_mem_gb=peak_memory_bytes(self.device) / 2**30,
                    epoch=self.loader.state_dict().get("epoch", 0),
                    skipped_samples=int(self.loader.stats.get("skipped", 0)),
                )
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
                self.sample(step)
                self.model.train()
        if bar is not None:
            bar.close()
        self.tracker.summary({"final_step": self.state.step})
        self.tracker.finish()
        return self.state

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

    def save_checkpoint(self) -> Path:
        self.state.data = self.loader.state_dict()
        self.state.scheduler = self.scheduler.state_dict()
        meta = {
            "config": to_container(self.cfg),
            "step": self.state.step,
            "world_size": self.world_size,
            "objective": self.cfg.stage.objective,
            "torch": torch.__version__,
            "host": platform.node(),
            "time": time.time(),
        }
        return self.checkpointer.save(self.state.step, self.checkpoint_tensors(), self.state,
                                      capture_rng({"train": self.generator}), meta)

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
        tensors = self.checkpoint_tensors()
        ckpt_lib.load_tensors(path, tensors)
        set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optim"])
        for key, module in self.frozen.items():
            module.load_state_dict(tensors[key])
        self.state = ckpt_lib.load_train_state(path, self.rank)
        self.scheduler.load_state_dict(self.state.scheduler)
        self.loader.load_state_dict(self.state.data)
        rng = ckpt_lib.load_rng(path, self.rank)
        if rng is not None:
            restore_rng(rng, {"train": self.generator})
        log.info("resumed from %s at step %d", path, self.state.step)
        return path

    def init_from(self, path: Path) -> None:
        """Start the trained model from another run's weights (EMA if it has them)."""
        used_ema = ckpt_lib.load_module_weights(self.module, path, "model", prefer_ema=True,
                                                allow_partial=True)
        if self.ema is not None:
            self.ema = EMA(self.module, self.cfg.train.ema_decay)
        log.info("initialised weights from %s (%s)", path, "EMA" if used_ema else "raw")

    def write_run_config(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
