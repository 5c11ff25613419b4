"""One Trainer subclass per objective: the autoencoder stage here, latent flow matching in
:mod:`worldline.train.flow_trainer`.

Each overrides only ``build_model``, ``compute_loss``, ``sample`` and ``evaluate``; the loop,
optimizer, EMA and checkpointing stay in :mod:`worldline.train.trainer`.
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from worldline.models.autoencoder import VideoAutoencoder, autoencoder_loss
from worldline.models.metrics import ssim
from worldline.train.flow_trainer import FlowTrainer, to_unit_range  # noqa: F401 - re-export
from worldline.train.media import save_samples
from worldline.train.trainer import Trainer

log = logging.getLogger(__name__)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of videos in [-1, 1]; [B, C, T, H, W] → [B]."""
    mse = (x - y).float().pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


class AutoencoderTrainer(Trainer):
    """Stage ``autoencoder``: KL + L1/L2 reconstruction on pixels, optionally a perceptual
    term (``stage.ae.perceptual_path``) and a 3D PatchGAN switched on at ``stage.ae.gan_start``.

    The discriminator has its own AdamW and steps once per optimizer step, on the last
    micro-batch's real clips and (detached) reconstructions, after the autoencoder's update
    (taming-transformers' alternating scheme). It is replicated with DDP across ranks and
    saved with the run (``disc``, ``disc_optim``), so a resume is exact."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        a = cfg.stage.ae
        self.perceptual = None
        if a.perceptual_path:
            from worldline.models.losses import PerceptualLoss

            self.perceptual = PerceptualLoss.from_path(a.perceptual_path).to(self.device)
        self.disc = self.disc_model = self.disc_optim = None
        if a.gan_start >= 0:
            from worldline.models.losses import PatchDiscriminator3D

            self.disc = PatchDiscriminator3D(3, a.disc_channels, a.disc_layers).to(self.device)
            self.disc_model = self.disc
            if self.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.disc_model = DistributedDataParallel(self.disc)
            self.disc_optim = torch.optim.AdamW(self.disc.parameters(), lr=a.disc_lr,
                                                betas=(0.5, 0.9))
        self._last_pair: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def build_model(self) -> nn.Module:
        return VideoAutoencoder(OmegaConf.to_object(self.cfg.model.autoencoder))

    def gan_on(self) -> bool:
        """Whether the step being taken (``state.step + 1``) uses the adversarial terms."""
        return self.disc is not None and self.state.step + 1 > self.cfg.stage.ae.gan_start

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = to_unit_range(batch["video"])
        recon, mean, logvar = self.model(x, generator=self.generator)
        logits, adv = None, 0.0
        if self.gan_on():
            # The raw module, with its weights frozen for this pass: the generator's gradient
            # must reach the autoencoder only, never the discriminator.
            self.disc.requires_grad_(False)
            logits = self.disc(recon)
            self.disc.requires_grad_(True)
            adv = self.cfg.stage.ae.gan_weight
            self._last_pair = (x.detach(), recon.detach())
        loss, parts = autoencoder_loss(x, recon, mean, logvar, self.module.args,
                                       perceptual=self.perceptual, disc_logits=logits,
                                       adv_weight=adv)
        if self.disc is not None and logits is None:  # same logged keys every step
            parts["g_adv"] = torch.zeros((), device=self.device)
        return loss, parts

    def train_step(self) -> dict[str, torch.Tensor]:
        out = super().train_step()
        if self.gan_on_after_step():
            out["d_loss"] = self.discriminator_step()
        elif self.disc is not None:
            out["d_loss"] = torch.zeros((), device=self.device)
        return out

    def gan_on_after_step(self) -> bool:
        return self.disc is not None and self.state.step > self.cfg.stage.ae.gan_start \
            and self._last_pair is not None

    def discriminator_step(self) -> torch.Tensor:
        """One hinge-loss update of the discriminator; real and fake in one forward (a single
        DDP forward per backward)."""
        from worldline.models.losses import hinge_d_loss

        x, fake = self._last_pair
        self._last_pair = None
        self.disc_optim.zero_grad(set_to_none=True)
        logits = self.disc_model(torch.cat([x, fake]))
        d_loss = hinge_d_loss(*logits.chunk(2))
        d_loss.backward()
        self.disc_optim.step()
        return d_loss.detach()

    def checkpoint_tensors(self) -> dict[str, Any]:
        tensors = super().checkpoint_tensors()
        if self.disc is not None:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            # get_state_dict initialises an empty optimizer's state, so a checkpoint taken
            # before the GAN starts has the same keys as one taken after.
            tensors["disc"], tensors["disc_optim"] = get_state_dict(self.disc, self.disc_optim)
        return tensors

    def load_extra_tensors(self, tensors: dict[str, Any]) -> None:
        if self.disc is not None:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.disc, self.disc_optim, model_state_dict=tensors["disc"],
                           optim_state_dict=tensors["disc_optim"])

    def tokens_per_sample(self) -> int:
        d = self.cfg.data
        return d.num_frames * d.resolution[0] * d.resolution[1]

    def flops_per_sample(self) -> float:
        d = self.cfg.data
        return float(self.module.flops_per_sample(d.num_frames, *d.resolution))

    def probe_batch(self) -> dict[str, Any]:
        """The first batch of the data in fixed (unshuffled) order: the same clips every time."""
        loader = self.build_loader(shuffle=False)
        batch = next(iter(loader))
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mean, _ = self.module.encode(x)
        return self.module.decode(mean).clamp(-1, 1)

    def sample(self, step: int) -> None:
        batch = self.probe_batch()
        x = to_unit_range(batch["video"])
        ctx = self.ema.applied_to(self.module) if self.ema is not None else nullcontext()
        with ctx:
            recon = self.reconstruct(x)
        out = self.run_dir / "samples" / f"step_{step}"
        files = save_samples(out, {"input": x, "reconstruction": recon}, fps=8.0)
        value = float(psnr(recon, x).mean())
        if self.tracker is not None:
            self.tracker.log({"sample/psnr": value}, step)
            self.tracker.log_media(step, files["videos"], files["images"])
        log.info("step %d: reconstruction PSNR %.2f dB → %s", step, value, out)

    @torch.no_grad()
    def evaluate(self, num_batches: int) -> dict[str, float]:
        """Reconstruction PSNR/SSIM over the first ``num_batches`` batches in fixed order."""
        loader = iter(self.build_loader(shuffle=False))
        vals, sims = [], []
        for _ in range(num_batches):
            x = to_unit_range(next(loader)["video"].to(self.device))
            recon = self.reconstruct(x)
            vals.append(psnr(recon, x))
            sims.append(ssim(recon, x))
        return {"psnr": float(torch.cat(vals).mean()), "ssim": float(torch.cat(sims).mean()),
                "num_clips": len(torch.cat(vals))}


TRAINERS: dict[str, type[Trainer]] = {"autoencoder": AutoencoderTrainer, "flow": FlowTrainer}


def num_training_samples(cfg: DictConfig) -> int:
    """Samples in the training data (manifest.json of data.shards, or the synthetic world)."""
    d = cfg.data
    if d.kind == "synthetic":
        return int(d.synthetic.num_clips)
    from worldline.data.shards import MANIFEST

    manifest = Path(str(d.shards)) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"stage.epochs needs the sample count: no {manifest} "
                                f"(point data.shards at a worldline-shards output folder)")
    return int(json.loads(manifest.read_text())["num_samples"])


def resolve_epochs(cfg: DictConfig) -> None:
    """``stage.epochs`` → ``train.steps`` (passes over a small studio set rather than steps)."""
    e = cfg.stage.epochs
    if e is None:
        return
    import math
    import os

    world = int(os.environ.get("WORLD_SIZE", 1)) // max(1, cfg.dist.cp)
    per_step = cfg.data.batch_size * cfg.train.grad_accum * world
    cfg.train.steps = max(1, math.ceil(e * num_training_samples(cfg) / per_step))
    log.info("stage.epochs=%d -> train.steps=%d", e, cfg.train.steps)


def make_trainer(cfg: DictConfig) -> Trainer:
    """The Trainer subclass for ``cfg.stage.objective``."""
    resolve_epochs(cfg)
    return TRAINERS[cfg.stage.objective](cfg)
