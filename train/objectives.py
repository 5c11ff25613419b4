"""One Trainer subclass per objective: the autoencoder stage and latent flow matching.

Each overrides only ``build_model``, ``compute_loss``, ``sample`` and ``evaluate``; the loop,
optimizer, EMA and checkpointing stay in :mod:`worldline.train.trainer`.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from worldline.models.autoencoder import VideoAutoencoder, autoencoder_loss
from worldline.models.flow import (
    cfg_velocity,
    euler_sample,
    interpolate,
    resolution_shift,
    sample_timesteps,
    velocity_target,
)
from worldline.models.world_model import WorldModel
from worldline.train import checkpoint as ckpt_lib
from worldline.train.media import save_samples
from worldline.train.trainer import Trainer

log = logging.getLogger(__name__)


def to_unit_range(video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, T, H, W] → float [-1, 1]. Done on the device, after the transfer, so the
    host→device copy moves 1 byte per value instead of 4."""
    return video_u8.float().div_(127.5).sub_(1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of videos in [-1, 1]; [B, C, T, H, W] → [B]."""
    mse = (x - y).float().pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


class AutoencoderTrainer(Trainer):
    """Stage ``autoencoder``: KL + L1/L2 reconstruction on pixels."""

    def build_model(self) -> nn.Module:
        return VideoAutoencoder(OmegaConf.to_object(self.cfg.model.autoencoder))

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = to_unit_range(batch["video"])
        recon, mean, logvar = self.model(x, generator=self.generator)
        loss, parts = autoencoder_loss(x, recon, mean, logvar, self.module.args)
        return loss, parts

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
        """Reconstruction PSNR over the first ``num_batches`` batches in fixed order."""
        loader = iter(self.build_loader(shuffle=False))
        vals = []
        for _ in range(num_batches):
            x = to_unit_range(next(loader)["video"].to(self.device))
            vals.append(psnr(self.reconstruct(x), x))
        return {"psnr": float(torch.cat(vals).mean()), "num_clips": len(torch.cat(vals))}


class FlowTrainer(Trainer):
    """Latent rectified-flow training of the world model on a frozen autoencoder."""

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        ae = VideoAutoencoder(OmegaConf.to_object(m.autoencoder))
        src = self._autoencoder_source()
        ae.requires_grad_(False).eval().to(self.device)
        self.autoencoder = ae
        self.frozen["autoencoder"] = ae
        if src is not None:
            path, key = src
            used_ema = ckpt_lib.load_module_weights(ae, path, key, prefer_ema=True)
            log.info("autoencoder from %s[%s]%s", path, key, " (EMA)" if used_ema else "")
            if key == "model":  # straight from an autoencoder run: no statistics yet
                self.measure_latent_stats()
        model = WorldModel(OmegaConf.to_object(m.dit), OmegaConf.to_object(m.text))
        d = self.cfg.data
        self.latent_shape = ae.latent_shape(d.num_frames, *d.resolution)
        f = self.cfg.stage.flow
        self.shift = f.shift if f.shift is not None else resolution_shift(
            self._num_tokens(model))
        return model

    @torch.no_grad()
    def measure_latent_stats(self, num_batches: int = 8) -> None:
        """Per-channel mean/std of the frozen autoencoder's latents over the first clips (fixed
        order), stored in its buffers, so the diffusion targets are ~unit variance. Measured
        with the exact weights in use (e.g. EMA) and then carried by every checkpoint of this
        and later stages, so a model never sees differently-normalised latents."""
        ae = self.autoencoder
        ae.latent_mean.zero_()
        ae.latent_std.fill_(1.0)
        loader = iter(self.build_loader(shuffle=False))
        lat = torch.cat([self.encode(next(loader)["video"].to(self.device))
                         for _ in range(num_batches)])
        dims = [0, 2, 3, 4]
        ae.latent_mean.copy_(lat.float().mean(dims))
        ae.latent_std.copy_(lat.float().std(dims).clamp_min(1e-4))
        log.info("latent stats: mean %s std %s", [round(v, 3) for v in ae.latent_mean.tolist()],
                 [round(v, 3) for v in ae.latent_std.tolist()])

    def _autoencoder_source(self) -> Optional[tuple[Path, str]]:
        s = self.cfg.stage
        if s.autoencoder_from:
            path = ckpt_lib.resolve_checkpoint(s.autoencoder_from)
            # An autoencoder run stores it as the trained "model"; later stages as frozen.
            key = "autoencoder" if "autoencoder" in ckpt_lib.checkpoint_keys(path) else "model"
            return path, key
        if s.init_from:
            return ckpt_lib.resolve_checkpoint(s.init_from), "autoencoder"
        return None  # only valid when resuming: the checkpoint holds the autoencoder

    def _num_tokens(self, model: WorldModel) -> int:
        _, t, h, w = self.latent_shape
        pt, ph, pw = model.dit.args.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def tokens_per_sample(self) -> int:
        return self._num_tokens(self.module)

    def flops_per_sample(self) -> float:
        return float(self.module.flops_per_sample(self.latent_shape, self.cfg.model.text.max_len))

    @torch.no_grad()
    def encode(self, video_u8: torch.Tensor) -> torch.Tensor:
        """uint8 video → normalised latents [B, C, t, h, w] (posterior mean: deterministic)."""
        mean, _ = self.autoencoder.encode(to_unit_range(video_u8))
        return self.autoencoder.normalize(mean)

    def conditions(self, batch: dict[str, Any], n: int) -> dict[str, Any]:
        """Text ids/mask, actions and camera for the active stage conditions (others None)."""
        active = set(self.cfg.stage.conditions)
        ids, mask = self.module.tokenizer(list(batch["caption"])[:n], self.cfg.model.text.max_len)
        return {
            "text_ids": ids.to(self.device),
            "text_mask": mask.to(self.device),
            "actions": batch["actions"][:n] if "actions" in active else None,
            "camera": batch["camera"][:n].float() if "camera" in active else None,
        }

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f, g = self.cfg.stage.flow, self.generator
        x0 = self.encode(batch["video"])
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        t = sample_timesteps(b, generator=g, device=self.device, mean=f.timestep_mean,
                             std=f.timestep_std, shift=self.shift)
        drop_text = torch.rand(b, generator=g, device=self.device) < f.text_dropout
        drop_actions = torch.rand(b, generator=g, device=self.device) < f.action_dropout
        cond = self.conditions(batch, b)
        pred = self.model(interpolate(x0, noise, t), t, cond["text_ids"], cond["text_mask"],
                          actions=cond["actions"], camera=cond["camera"],
                          drop_text=drop_text, drop_actions=drop_actions)
        loss = F.mse_loss(pred.float(), velocity_target(x0, noise).float())
        return loss, {}

    def probe_batch(self, n: int) -> dict[str, Any]:
        """Conditions (actions, camera) and ground truth of the first ``n`` clips in fixed order."""
        batch = next(iter(self.build_loader(shuffle=False)))
        return {k: (v[:n].to(self.device) if torch.is_tensor(v) else list(v)[:n])
                for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, prompts: list[str], batch: dict[str, Any], seed: int, num_steps: int,
                 cfg_scale: float) -> torch.Tensor:
        """Sample videos [N, 3, T, H, W] in [-1, 1] for ``prompts`` with ``batch``'s actions and
        camera, with classifier-free guidance on the text."""
        n = len(prompts)
        cond = self.conditions({**batch, "caption": prompts}, n)
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((n, *self.latent_shape), generator=g, device=self.device)
        no_drop = torch.zeros(n, dtype=torch.bool, device=self.device)

        def velocity(x: torch.Tensor, t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            return self.model(x, t, cond["text_ids"], cond["text_mask"], actions=cond["actions"],
                              camera=cond["camera"], drop_text=drop, drop_actions=no_drop)

        fn = cfg_velocity(lambda x, t: velocity(x, t, no_drop),
                          lambda x, t: velocity(x, t, ~no_drop), cfg_scale)
        z = euler_sample(fn, noise, num_steps, shift=self.shift)
        return self.autoencoder.decode(self.autoencoder.denormalize(z)).clamp(-1, 1)

    def sample(self, step: int) -> None:
        s = self.cfg.sample
        prompts = list(s.prompts)
        batch = self.probe_batch(len(prompts))
        ctx = self.ema.applied_to(self.module) if (self.ema is not None and s.use_ema) else nullcontext()
        with ctx:
            videos = self.generate(prompts, batch, s.seed, s.num_steps, s.cfg_scale)
        out = self.run_dir / "samples" / f"step_{step}"
        files = save_samples(out, {"generated": videos,
                                   "reference": to_unit_range(batch["video"])}, fps=8.0,
                             captions=prompts)
        if self.tracker is not None:
            self.tracker.log_media(step, files["videos"], files["images"])
        log.info("step %d: samples → %s", step, out)

    @torch.no_grad()
    def evaluate(self, num_batches: int, timesteps: list[float]) -> dict[str, float]:
        """Validation flow loss at fixed timesteps with fixed noise: deterministic, so two
        checkpoints (or two runs) are directly comparable."""
        loader = iter(self.build_loader(shuffle=False))
        g = torch.Generator(device=self.device).manual_seed(0)
        per_t = {float(t): [] for t in timesteps}
        for _ in range(num_batches):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in next(loader).items()}
            x0 = self.encode(batch["video"])
            b = x0.shape[0]
            cond = self.conditions(batch, b)
            noise = torch.randn(x0.shape, generator=g, device=self.device)
            for t_val in per_t:
                t = torch.full((b,), t_val, device=self.device)
                pred = self.model(interpolate(x0, noise, t), t, cond["text_ids"],
                                  cond["text_mask"], actions=cond["actions"], camera=cond["camera"])
                per_t[t_val].append(F.mse_loss(pred.float(), velocity_target(x0, noise)).item())
        report = {f"val_loss/t={t:g}": sum(v) / len(v) for t, v in per_t.items()}
        report["val_loss"] = sum(report.values()) / len(report)
        return report


TRAINERS: dict[str, type[Trainer]] = {"autoencoder": AutoencoderTrainer, "flow": FlowTrainer}


def make_trainer(cfg: DictConfig) -> Trainer:
    """The Trainer subclass for ``cfg.stage.objective``."""
    return TRAINERS[cfg.stage.objective](cfg)
