"""Training objectives: one job each, ``loss(pipeline, batch, rng) -> (loss, metrics)``.

* :class:`FlowObjective` — latent rectified flow of the world model on the frozen
  autoencoder (every flow stage: text/actions/camera/reference conditioning with per-condition
  CFG dropout, the text-to-video / image-to-video / continuation task mix, diffusion forcing).
* :class:`AutoencoderObjective` — KL + L1/L2 reconstruction (+ perceptual, + a PatchGAN whose
  discriminator is a second optimizer the same loop drives: :class:`DiscriminatorStep`).

An objective also knows what one batch costs (``tokens``, ``flops``: from the batch's own
clip shape, so tokens/s and MFU are right with buckets of several sizes), how to evaluate
(``evaluate``) and what to show as samples (``sample``). No objective sees the Trainer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from worldline.models.conditioning import draw_references
from worldline.models.flow import (
    flow_loss,
    interpolate,
    sample_frame_timesteps,
    sample_timesteps,
    velocity_target,
)
from worldline.models.metrics import moving_mask, moving_verdict, psnr, ssim
from worldline.models.pixel_codec import space_time_to_depth
from worldline.train.pipeline import WorldPipeline, to_unit_range
from worldline.train.tasks import TaskProbs, clean_prefix_inputs, sample_prefix_lengths

log = logging.getLogger(__name__)

__all__ = ["MicroBatchRNG", "FlowObjective", "AutoencoderObjective", "DiscriminatorStep",
           "clip_shape"]


@dataclass
class MicroBatchRNG:
    """The randomness of one micro-batch: its generator (checkpointed with the run) and its
    coordinates, from which host-side choices are derived so a resumed run draws the same."""

    generator: torch.Generator
    step: int  # optimizer steps completed before this micro-batch
    micro: int = 0
    dp_rank: int = 0
    seed: int = 0


def clip_shape(batch: Mapping[str, Any]) -> tuple[int, int, int]:
    """(frames, height, width) of the pixel clips of ``batch``."""
    shape = getattr(batch, "clip_shape", None)
    if shape is not None:
        return tuple(shape)  # type: ignore[return-value]
    return tuple(batch["video"].shape[2:])  # type: ignore[return-value]


class FlowObjective:
    """Latent flow matching of the world model (see the module docstring).

    ``stage``: the ``stage.*`` config node (conditions, flow, tasks, num_refs);
    ``configured_clip``: returns the (frames, height, width) the data config asks for now (the
    current resolution phase); cached latents of another shape are refused."""

    def __init__(self, stage: Any, seed: int,
                 configured_clip: Optional[Callable[[], tuple[int, int, int]]] = None) -> None:
        self.stage, self.seed = stage, seed
        self.conditions = set(stage.conditions)
        self.configured_clip = configured_clip
        # FLOPs per sample by latent shape: counted once per shape, not once per batch.
        self._flops: dict[tuple, float] = {}

    def _batch_latent_shape(self, pipe: WorldPipeline, batch: Mapping[str, Any]) -> tuple:
        return tuple(pipe.latent_shape(*clip_shape(batch)))

    def latents(self, pipe: WorldPipeline, batch: Mapping[str, Any]) -> Tensor:
        """Normalised latents of a batch (cached latents are checked against the configured
        clip shape)."""
        expected = None
        if "latents" in batch and self.configured_clip is not None:
            expected = tuple(pipe.latent_shape(*self.configured_clip()))
        return pipe.latents(batch, expected)

    def tokens(self, pipe: WorldPipeline, batch: Mapping[str, Any]) -> int:
        """DiT tokens of this batch (host-side arithmetic, no sync)."""
        n = len(batch["key"])
        if "latents" in batch:
            return n * pipe.num_tokens(tuple(batch["latents"].shape[1:]))
        return n * pipe.num_tokens(self._batch_latent_shape(pipe, batch))

    def flops(self, pipe: WorldPipeline, batch: Mapping[str, Any]) -> float:
        """Training FLOPs (fwd + bwd) of this batch."""
        shape = tuple(batch["latents"].shape[1:]) if "latents" in batch else \
            self._batch_latent_shape(pipe, batch)
        if shape not in self._flops:
            self._flops[shape] = float(pipe.world_model.flops_per_sample(
                shape, pipe.settings.text_max_len))
        return len(batch["key"]) * self._flops[shape]

    def reference_latents(self, pipe: WorldPipeline, batch: Mapping[str, Any], x0: Tensor,
                          generator: torch.Generator) -> Tensor:
        """K = stage.num_refs reference latents per clip [B, K, C, h, w]: the dataset's
        reference images (``batch["refs"]``, e.g. a mood board) first, then random crops of
        the clip's own frames (models.conditioning.draw_references)."""
        k = self.stage.num_refs
        refs = draw_references(x0, k, generator=generator, crop_scale=(0.5, 0.9))
        given = batch.get("refs")
        if given is not None:
            for i, r in enumerate(given[: x0.shape[0]]):
                if r is not None and len(r):
                    lat = pipe.encode_images(r[:k])
                    if lat.shape[-2:] == refs.shape[-2:]:
                        refs[i, : lat.shape[0]] = lat
        return refs

    def loss(self, pipe: WorldPipeline, batch: Mapping[str, Any],
             rng: MicroBatchRNG) -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch → (scalar loss, task fractions). No host syncs."""
        f, tk, g = self.stage.flow, self.stage.tasks, rng.generator
        dev = pipe.device
        x0 = self.latents(pipe, batch)
        b, n = x0.shape[0], x0.shape[2]
        shift = pipe.shift_for(x0.shape[1:])
        noise = torch.randn(x0.shape, generator=g, device=dev)
        if tk.diffusion_forcing:
            t = sample_frame_timesteps(b, n, generator=g, device=dev, mean=f.timestep_mean,
                                       std=f.timestep_std, shift=shift,
                                       p_uniform=tk.uniform_prob)
        else:
            t = sample_timesteps(b, generator=g, device=dev, mean=f.timestep_mean,
                                 std=f.timestep_std, shift=shift)
        prefix, task = sample_prefix_lengths(b, n, TaskProbs(tk.t2v, tk.i2v, tk.continuation),
                                             g, dev)
        drop_text = torch.rand(b, generator=g, device=dev) < f.text_dropout
        drop_actions = torch.rand(b, generator=g, device=dev) < f.action_dropout
        refs, extra = None, torch.zeros((), device=dev)
        if "refs" in self.conditions:
            refs = self.reference_latents(pipe, batch, x0, g)
            # A batch-level choice made on the host (no device sync): a pure function of
            # (seed, step, data-parallel rank, micro-batch), so a resumed run draws the same.
            u = np.random.default_rng([self.seed, rng.step, rng.dp_rank, rng.micro]).random()
            if u < f.ref_dropout:
                refs = None
                # Unused this step: a zero-weighted term keeps DDP's reducer fed.
                extra = 0.0 * pipe.transformer.ref_embed.sum()
        cond = pipe.condition_inputs(batch, b, pipe.pixel_frames(n))
        drop_audio = None
        if cond["audio"] is not None:  # drawn only for audio models: others keep their stream
            drop_audio = torch.rand(b, generator=g, device=dev) < f.audio_dropout
        x_in, t_in, loss_mask = clean_prefix_inputs(x0, interpolate(x0, noise, t), t, prefix,
                                                    pipe.transformer.args.mask_channel)
        pred = pipe.velocity(x_in, t_in, cond, drop_text=drop_text, drop_actions=drop_actions,
                             drop_audio=drop_audio, refs=pipe.ref_input(refs))
        if f.moving_weight > 0 and "video" in batch:
            loss_mask = loss_mask * self._moving_latent_weights(pipe, batch["video"], x0)
        loss = flow_loss(pred, velocity_target(x0, noise), mask=loss_mask) + extra
        parts = {f"task_frac/{name}": (task == i).float().mean()
                 for i, name in enumerate(("t2v", "i2v", "continuation"))}
        return loss, parts

    @torch.no_grad()
    def _moving_latent_weights(self, pipe: WorldPipeline, video: Tensor, x0: Tensor) -> Tensor:
        """[B, 1, t, h, w]: 1 + stage.flow.moving_weight on latent positions whose pixel block
        moves (``moving_mask`` max-pooled over each latent position's pixels, the first
        frame alone as the causal autoencoder groups them), else 1."""
        v = video.to(pipe.device)
        moving = moving_mask(to_unit_range(v) if v.dtype == torch.uint8 else v).float()
        t, h = x0.shape[2:4]
        ft = (moving.shape[2] - 1) // max(1, t - 1) if t > 1 else 1
        # The autoencoder's own causal grouping, then "any pixel of the block moves".
        blocks = space_time_to_depth(moving, ft, moving.shape[3] // h)
        return 1.0 + self.stage.flow.moving_weight * blocks.amax(1, keepdim=True)

    @torch.no_grad()
    def evaluate(self, pipe: WorldPipeline, loader: Any, num_batches: int,
                 timesteps: Sequence[float]) -> dict[str, float]:
        """Flow loss at fixed timesteps with fixed noise (text-to-video, active conditions,
        references drawn with a fixed generator): deterministic, so two checkpoints (or two
        runs) are directly comparable."""
        it = iter(loader)
        g = torch.Generator(device=pipe.device).manual_seed(0)
        per_t: dict[float, list[float]] = {float(t): [] for t in timesteps}
        mask_channel = pipe.transformer.args.mask_channel
        for _ in range(num_batches):
            batch = next(it)
            x0 = self.latents(pipe, batch)
            b = x0.shape[0]
            cond = pipe.condition_inputs(batch, b, pipe.pixel_frames(x0.shape[2]))
            noise = torch.randn(x0.shape, generator=g, device=pipe.device)
            refs = (self.reference_latents(pipe, batch, x0, g)
                    if "refs" in self.conditions else None)
            zero = torch.zeros(b, dtype=torch.long, device=pipe.device)
            for t_val in per_t:
                t = torch.full((b,), t_val, device=pipe.device)
                x_in, t_in, _ = clean_prefix_inputs(x0, interpolate(x0, noise, t), t, zero,
                                                    mask_channel)
                pred = pipe.velocity(x_in, t_in, cond, refs=pipe.ref_input(refs))
                per_t[t_val].append(flow_loss(pred, velocity_target(x0, noise)).item())
        report = {f"val_loss/t={t:g}": sum(v) / len(v) for t, v in per_t.items()}
        report["val_loss"] = sum(report.values()) / len(report)
        return report

    @torch.no_grad()
    def sample(self, pipe: WorldPipeline, batch: Mapping[str, Any], s: Any
               ) -> tuple[dict[str, Tensor], dict[str, float], list[str]]:
        """Fixed prompts (text-to-video) and, for models with the mask channel, the first
        frames of the probe clips (image-to-video). Returns (video groups, metrics,
        captions)."""
        prompts = list(s.prompts)
        kw = dict(seed=s.seed, num_steps=s.num_steps, cfg_scale=s.cfg_scale,
                  action_cfg_scale=s.action_cfg_scale, solver=s.solver,
                  latent_shape=pipe.latent_shape(*clip_shape(batch)) if "video" in batch
                  else tuple(batch["latents"].shape[1:]), batch=batch)
        refs = None
        if "refs" in self.conditions:
            g = torch.Generator(device=pipe.device).manual_seed(s.seed)
            refs = self.reference_latents(pipe, batch, self.latents(pipe, batch), g)
        groups = {"generated": pipe.generate(prompts, refs=refs, **kw)}
        if pipe.transformer.args.mask_channel and "video" in batch:
            first = self.latents(pipe, batch)[:, :, :1]
            groups["image_to_video"] = pipe.generate(list(batch["caption"]), prefix=first,
                                                     refs=refs, **kw)
        if "video" in batch:
            groups["reference"] = to_unit_range(batch["video"])
        return groups, {}, prompts


class DiscriminatorStep:
    """The PatchGAN's own AdamW, stepped once per optimizer step after the autoencoder's
    update on the last micro-batch's real clips and (detached) reconstructions
    (taming-transformers' alternating scheme). Replicated with DDP across ranks; saved with
    the run (``disc``, ``disc_optim``), so a resume is exact."""

    def __init__(self, channels: int, layers: int, lr: float, start: int,
                 device: torch.device, distributed: bool) -> None:
        from worldline.models.losses import PatchDiscriminator3D

        self.start = start
        self.disc = PatchDiscriminator3D(3, channels, layers).to(device)
        self.model: nn.Module = self.disc
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.disc)
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=(0.5, 0.9))
        self.pair: Optional[tuple[Tensor, Tensor]] = None
        self.device = device

    def active(self, step: int) -> bool:
        """Whether step ``step`` (1-based, the one being taken) uses the adversarial terms."""
        return step > self.start

    def after_step(self, step: int) -> dict[str, Tensor]:
        """One hinge-loss update after optimizer step ``step``; real and fake in one forward
        (a single DDP forward per backward). Logs 0 before the GAN starts."""
        from worldline.models.losses import hinge_d_loss

        if not (self.active(step) and self.pair is not None):
            return {"d_loss": torch.zeros((), device=self.device)}
        x, fake = self.pair
        self.pair = None
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(torch.cat([x, fake]))
        d_loss = hinge_d_loss(*logits.chunk(2))
        d_loss.backward()
        self.optimizer.step()
        return {"d_loss": d_loss.detach()}

    def state_dict(self) -> dict[str, Any]:
        """DCP state of the discriminator and its optimizer (keys ``disc``, ``disc_optim``)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # get_state_dict initialises an empty optimizer's state, so a checkpoint taken
        # before the GAN starts has the same keys as one taken after.
        disc, optim = get_state_dict(self.disc, self.optimizer)
        return {"disc": disc, "disc_optim": optim}

    def load_state_dict(self, tensors: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.disc, self.optimizer, model_state_dict=tensors["disc"],
                       optim_state_dict=tensors["disc_optim"])


class AutoencoderObjective:
    """Stage ``autoencoder``: KL + L1/L2 reconstruction on pixels, optionally a perceptual
    term (``stage.ae.perceptual_path``) and a 3D PatchGAN switched on at
    ``stage.ae.gan_start`` (:class:`DiscriminatorStep`)."""

    def __init__(self, ae_cfg: Any, device: torch.device, distributed: bool) -> None:
        self.perceptual = None
        if ae_cfg.perceptual_path:
            from worldline.models.losses import PerceptualLoss

            self.perceptual = PerceptualLoss.from_path(ae_cfg.perceptual_path).to(device)
        self.gan_weight = ae_cfg.gan_weight
        self.moving_weight = float(ae_cfg.moving_weight)
        self.moving_psnr_min = float(ae_cfg.moving_psnr_min)
        # FLOPs per clip shape: the autoencoder counts them with a meta-device forward
        # (~0.2-0.7 s), so once per shape, never per batch.
        self._flops: dict[tuple, float] = {}
        self.disc: Optional[DiscriminatorStep] = None
        if ae_cfg.gan_start >= 0:
            self.disc = DiscriminatorStep(ae_cfg.disc_channels, ae_cfg.disc_layers,
                                          ae_cfg.disc_lr, ae_cfg.gan_start, device, distributed)

    @property
    def auxiliary(self) -> dict[str, DiscriminatorStep]:
        """Second optimizers the loop steps after the main update (and checkpoints)."""
        return {"disc": self.disc} if self.disc is not None else {}

    def loss(self, pipe: WorldPipeline, batch: Mapping[str, Any],
             rng: MicroBatchRNG) -> tuple[Tensor, dict[str, Tensor]]:
        from worldline.models.autoencoder import autoencoder_loss

        x = to_unit_range(batch["video"])
        recon, mean, logvar = pipe.forward_model(x, generator=rng.generator)
        logits, adv = None, 0.0
        if self.disc is not None and self.disc.active(rng.step + 1):
            # The raw module, with its weights frozen for this pass: the generator's gradient
            # must reach the autoencoder only, never the discriminator.
            d = self.disc.disc
            d.requires_grad_(False)
            logits = d(recon)
            d.requires_grad_(True)
            adv = self.gan_weight
            self.disc.pair = (x.detach(), recon.detach())
        loss, parts = autoencoder_loss(x, recon, mean, logvar, pipe.autoencoder.args,
                                       perceptual=self.perceptual, disc_logits=logits,
                                       adv_weight=adv, moving_weight=self.moving_weight)
        if self.disc is not None and logits is None:  # same logged keys every step
            parts["g_adv"] = torch.zeros((), device=pipe.device)
        return loss, parts

    def tokens(self, pipe: WorldPipeline, batch: Mapping[str, Any]) -> int:
        t, h, w = clip_shape(batch)
        return len(batch["key"]) * t * h * w

    def flops(self, pipe: WorldPipeline, batch: Mapping[str, Any]) -> float:
        shape = clip_shape(batch)
        if shape not in self._flops:
            self._flops[shape] = float(pipe.autoencoder.flops_per_sample(*shape))
        return len(batch["key"]) * self._flops[shape]

    @torch.no_grad()
    def reconstruct(self, pipe: WorldPipeline, x: Tensor) -> Tensor:
        mean, _ = pipe.autoencoder.encode(x)
        return pipe.autoencoder.decode(mean).clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, pipe: WorldPipeline, loader: Any, num_batches: int,
                 timesteps: Sequence[float] = ()) -> dict[str, float]:
        """Reconstruction PSNR/SSIM over the first ``num_batches`` batches in fixed order, and
        PSNR over the pixels that move (``psnr_moving``; ``moving_fraction`` of them), and
        ``moving_ok``: whether ``psnr_moving`` reaches ``stage.ae.moving_psnr_min`` (a loud
        warning when not: whole-frame PSNR alone never makes an autoencoder good)."""
        it = iter(loader)
        vals, sims, moving, frac = [], [], [], []
        for _ in range(num_batches):
            x = to_unit_range(next(it)["video"].to(pipe.device))
            recon = self.reconstruct(pipe, x)
            vals.append(psnr(recon, x))
            sims.append(ssim(recon, x))
            # Whole-frame PSNR alone hides erased small moving objects (models/metrics.py).
            mask = moving_mask(x)
            moving.append(psnr(recon, x, mask=mask))
            frac.append(mask.flatten(1).float().mean(1))
        whole, moving_db = float(torch.cat(vals).mean()), float(torch.cat(moving).nanmean())
        ok, msg = moving_verdict(whole, moving_db, self.moving_psnr_min)
        (log.info if ok else log.warning)("autoencoder eval: %s", msg)
        return {"psnr": whole, "ssim": float(torch.cat(sims).mean()),
                "psnr_moving": moving_db, "moving_ok": ok,
                "psnr_moving_min": self.moving_psnr_min,
                "moving_fraction": float(torch.cat(frac).mean()),
                "num_clips": len(torch.cat(vals))}

    @torch.no_grad()
    def sample(self, pipe: WorldPipeline, batch: Mapping[str, Any], s: Any
               ) -> tuple[dict[str, Tensor], dict[str, float], Optional[list[str]]]:
        """Input clips and their reconstructions, with the reconstruction PSNR."""
        x = to_unit_range(batch["video"])
        recon = self.reconstruct(pipe, x)
        whole = float(psnr(recon, x).mean())
        moving_db = float(psnr(recon, x, mask=moving_mask(x)).nanmean())
        ok, msg = moving_verdict(whole, moving_db, self.moving_psnr_min)
        log.info("autoencoder samples: %s", msg)
        return ({"input": x, "reconstruction": recon},
                {"sample/psnr": whole, "sample/psnr_moving": moving_db,
                 "sample/moving_ok": float(ok)}, None)
