"""Latent rectified-flow training of the world model on a frozen autoencoder (every flow stage).

What the stage config drives here (conf/stage/*.yaml):

* ``stage.conditions``: which conditioning modules exist and are fed (text, actions, camera,
  refs); ``stage.flow.*_dropout``: per-condition classifier-free-guidance dropout.
* ``stage.tasks``: the text-to-video / image-to-video / continuation mix (clean latent prefix +
  mask channel) and diffusion forcing (per-frame noise levels).
* ``stage.schedule``: resolution/length phases that step up during the run.
* ``stage.init_from`` + ``stage.freeze_policy``: grow the previous stage's model (new modules
  zero-initialised) and train the new parts first.
* ``stage.lora``, ``stage.validation`` (early stopping), ``stage.prior``: studio fine-tuning.

Tiny CPU example::

    worldline-train experiment=smoke stage=pretrain run.name=w stage.autoencoder_from=runs/ae
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from worldline.models.autoencoder import VideoAutoencoder
from worldline.models.conditioning import draw_references
from worldline.models.flow import (
    euler_sample,
    flow_loss,
    heun_sample,
    interpolate,
    multi_cfg_velocity,
    resolution_shift,
    sample_frame_timesteps,
    sample_timesteps,
    velocity_target,
)
from worldline.models.world_model import WorldModel
from worldline.train import checkpoint as ckpt_lib
from worldline.train.dist import all_reduce_scalars
from worldline.train.media import save_samples
from worldline.data.stage_loader import StageLoader
from worldline.train.stages import (
    FreezePolicy,
    load_init_weights,
    stage_dit_args,
    zero_init_new_controls,
)
from worldline.train.tasks import TaskProbs, clean_prefix_inputs, sample_prefix_lengths
from worldline.train.trainer import Trainer

log = logging.getLogger(__name__)


def to_unit_range(video_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, T, H, W] → float [-1, 1]. Done on the device, after the transfer, so the
    host→device copy moves 1 byte per value instead of 4."""
    return video_u8.float().div_(127.5).sub_(1.0)


class FlowTrainer(Trainer):
    """Latent flow matching of the world model (see the module docstring)."""

    def __init__(self, cfg) -> None:
        self.new_params: set[str] = set()
        super().__init__(cfg)
        st = cfg.stage
        self.freeze_policy = FreezePolicy(self.module, st.freeze_policy, self.new_params)
        self._last_val_step = -1
        self._best_val: Optional[tuple[int, float]] = None
        self._bad_vals = 0
        self._val_history_read = False
        if st.schedule or st.prior.ratio > 0:
            prior = None
            if st.prior.ratio > 0:
                prior = self.loader_with({"kind": "webdataset", "shards": st.prior.shards},
                                         seed_offset=17)
            phases = self.phases()
            self.loader = StageLoader(
                lambda i: self.loader_with(phases[i][1]), [s for s, _ in phases],
                lambda: self.state.step, prior=prior, ratio=st.prior.ratio,
                on_phase=lambda i: self._set_data_shape(phases[i][1]))

    # ------------------------------------------------------------------------ building
    def build_model(self) -> nn.Module:
        m, st = self.cfg.model, self.cfg.stage
        ae = VideoAutoencoder(OmegaConf.to_object(m.autoencoder))
        src = self._autoencoder_source()
        ae.requires_grad_(False).eval().to(self.device)
        self.autoencoder = ae
        self.frozen["autoencoder"] = ae
        d = self.cfg.data
        # Before the statistics pass: cached latents are checked against this shape.
        self._set_data_shape({"num_frames": d.num_frames, "resolution": list(d.resolution)})
        if src is not None:
            path, key = src
            used_ema = ckpt_lib.load_module_weights(ae, path, key, prefer_ema=True)
            log.info("autoencoder from %s[%s]%s", path, key, " (EMA)" if used_ema else "")
            if key == "model":  # straight from an autoencoder run: no statistics yet
                self.measure_latent_stats()
        model = WorldModel(stage_dit_args(m.dit, st.conditions), OmegaConf.to_object(m.text))
        if st.init_from:
            # Loaded here rather than in init_from(): LoRA (below) renames the adapted layers,
            # and the freeze policy needs to know which modules are new.
            self.new_params = load_init_weights(model, ckpt_lib.resolve_checkpoint(st.init_from))
            zeroed = zero_init_new_controls(model, self.new_params)
            if zeroed:
                log.info("zero-initialised new control outputs: %s", zeroed)
        if st.lora.enabled:
            from worldline.train.lora import inject_lora

            inject_lora(model, st.lora)
        return model

    def init_from(self, path: Path) -> None:
        """Weights were loaded in build_model (before adapters); nothing left to do."""
        log.info("stage starts from %s", path)

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
        lat = torch.cat([self.latents(next(loader)) for _ in range(num_batches)])
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

    # ------------------------------------------------------------------ data and shapes
    def phases(self) -> list[tuple[int, dict]]:
        """(start step, data overrides) of the resolution/length schedule; phase 0 is data.*
        unless the schedule starts at step 0."""
        d = self.cfg.data
        out = [(0, {"num_frames": d.num_frames, "resolution": list(d.resolution)})]
        for ph in self.cfg.stage.schedule:
            o = {"num_frames": ph.num_frames, "resolution": list(ph.resolution)}
            if ph.batch_size is not None:
                o["batch_size"] = ph.batch_size
            if ph.step == 0:
                out[0] = (0, o)
            else:
                out.append((ph.step, o))
        return out

    def loader_with(self, data: dict, shuffle: Optional[bool] = None, seed_offset: int = 0):
        """``build_loader`` for ``data.*`` with ``data`` overridden (phase sizes, validation or
        prior shards): the one loader recipe, whatever options data.* gains."""
        saved = self.cfg
        self.cfg = OmegaConf.merge(saved, {"data": data})
        try:
            return self.build_loader(shuffle=shuffle, seed_offset=seed_offset)
        finally:
            self.cfg = saved

    def _set_data_shape(self, data: dict) -> None:
        self.data_shape = (data["num_frames"], *data["resolution"])
        self.latent_shape = self.autoencoder.latent_shape(*self.data_shape)

    def _num_tokens(self, latent_shape) -> int:
        _, t, h, w = latent_shape
        pt, ph, pw = self.module.dit.args.patch_size if hasattr(self, "module") else \
            self.cfg.model.dit.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def shift_for(self, latent_shape) -> float:
        f = self.cfg.stage.flow
        return f.shift if f.shift is not None else resolution_shift(self._num_tokens(latent_shape))

    @property
    def shift(self) -> float:
        return self.shift_for(self.latent_shape)

    def tokens_per_sample(self) -> int:
        return self._num_tokens(self.latent_shape)

    def flops_per_sample(self) -> float:
        return float(self.module.flops_per_sample(self.latent_shape, self.cfg.model.text.max_len))

    @torch.no_grad()
    def encode(self, video_u8: torch.Tensor) -> torch.Tensor:
        """uint8 video → normalised latents [B, C, t, h, w] (posterior mean: deterministic)."""
        mean, _ = self.autoencoder.encode(to_unit_range(video_u8))
        return self.autoencoder.normalize(mean)

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Normalised latents [B, C, t, h, w] of a batch: the cached posterior means of a
        latent-shard batch (``data.input=latent``: worldline-encode-latents stores them
        unnormalised, so the statistics measured here apply; the autoencoder never runs), or
        the frozen autoencoder's encoding of ``video``."""
        if "latents" not in batch:
            return self.encode(batch["video"].to(self.device))
        lat = batch["latents"].to(self.device).float()
        if tuple(lat.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(
                f"latent shards hold {list(lat.shape[1:])} latents but data.num_frames / "
                f"data.resolution give {list(self.latent_shape)}: re-encode with "
                f"worldline-encode-latents or match the data config (keys {batch['key'][:2]})")
        return self.autoencoder.normalize(lat)

    @torch.no_grad()
    def encode_images(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, H, W] → normalised 1-frame latents [N, C, h, w]."""
        return self.encode(images_u8[:, :, None])[:, :, 0]

    # ------------------------------------------------------------------------ conditions
    def conditions(self, batch: dict[str, Any], n: int) -> dict[str, Any]:
        """Text ids/mask (or cached embeddings), actions and camera for the active stage
        conditions (others None)."""
        active = set(self.cfg.stage.conditions)
        out: dict[str, Any] = {"text_ids": None, "text_mask": None, "text_emb": None}
        if "text" in active:
            if batch.get("text_emb") is not None:
                out["text_emb"] = batch["text_emb"][:n].to(self.device)
                out["text_mask"] = batch["text_mask"][:n].to(self.device).bool()
            else:
                ids, mask = self.module.tokenizer(list(batch["caption"])[:n],
                                                  self.cfg.model.text.max_len)
                out["text_ids"], out["text_mask"] = ids.to(self.device), mask.to(self.device)
        acts = batch.get("actions")
        out["actions"] = acts[:n] if ("actions" in active and acts is not None
                                      and acts.shape[-1] > 0) else None
        cam = batch.get("camera")
        out["camera"] = cam[:n].float() if ("camera" in active and cam is not None) else None
        return out

    def reference_latents(self, batch: dict[str, Any], x0: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:
        """K = stage.num_refs reference latents per clip [B, K, C, h, w]: the dataset's
        reference images (``batch["refs"]``, e.g. a mood board) first, then random crops of
        the clip's own frames (models.conditioning.draw_references)."""
        k = self.cfg.stage.num_refs
        refs = draw_references(x0, k, generator=generator, crop_scale=(0.5, 0.9))
        given = batch.get("refs")
        if given is not None:
            for i, r in enumerate(given[: x0.shape[0]]):
                if r is not None and len(r):
                    lat = self.encode_images(r[:k].to(self.device))
                    if lat.shape[-2:] == refs.shape[-2:]:
                        refs[i, : lat.shape[0]] = lat
        return refs

    def ref_input(self, refs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Reference latents [B, K, C, h, w] as the DiT takes them: with the mask channel set
        to 1 (given, clean) when the model has one."""
        if refs is None or not self.module.dit.args.mask_channel:
            return refs
        return torch.cat([refs, torch.ones_like(refs[:, :, :1])], dim=2)

    def model_input(self, x0, noise, t, prefix):
        """Noisy input with the clean prefix (and mask channel) → (x_in, t_in, loss mask)."""
        x_t = interpolate(x0, noise, t)
        return clean_prefix_inputs(x0, x_t, t, prefix, self.module.dit.args.mask_channel)

    # -------------------------------------------------------------------------- the loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        st, g = self.cfg.stage, self.generator
        f, tk = st.flow, st.tasks
        x0 = self.latents(batch)
        b, n = x0.shape[0], x0.shape[2]
        shift = self.shift_for(x0.shape[1:])
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        if tk.diffusion_forcing:
            t = sample_frame_timesteps(b, n, generator=g, device=self.device,
                                       mean=f.timestep_mean, std=f.timestep_std, shift=shift,
                                       p_uniform=tk.uniform_prob)
        else:
            t = sample_timesteps(b, generator=g, device=self.device, mean=f.timestep_mean,
                                 std=f.timestep_std, shift=shift)
        prefix, task = sample_prefix_lengths(b, n, TaskProbs(tk.t2v, tk.i2v, tk.continuation),
                                             g, self.device)
        drop_text = torch.rand(b, generator=g, device=self.device) < f.text_dropout
        drop_actions = torch.rand(b, generator=g, device=self.device) < f.action_dropout
        refs, extra = None, torch.zeros((), device=self.device)
        if "refs" in st.conditions:
            refs = self.reference_latents(batch, x0, g)
            # A batch-level choice made on the host (no device sync): a pure function of
            # (seed, step, data-parallel rank, micro-batch), so a resumed run draws the same.
            micro = self.generators.index(g) if g in self.generators else 0
            u = np.random.default_rng([self.cfg.run.seed, self.state.step, self.dp_rank,
                                       micro]).random()
            if u < f.ref_dropout:
                refs = None
                # Unused this step: a zero-weighted term keeps DDP's reducer fed.
                extra = 0.0 * self.module.dit.ref_embed.sum()
        cond = self.conditions(batch, b)
        x_in, t_in, loss_mask = self.model_input(x0, noise, t, prefix)
        pred = self.model(x_in, t_in, cond["text_ids"], cond["text_mask"],
                          actions=cond["actions"], camera=cond["camera"], drop_text=drop_text,
                          drop_actions=drop_actions, text_emb=cond["text_emb"],
                          refs=self.ref_input(refs))
        loss = flow_loss(pred, velocity_target(x0, noise), mask=loss_mask) + extra
        parts = {f"task_frac/{name}": (task == i).float().mean()
                 for i, name in enumerate(("t2v", "i2v", "continuation"))}
        return loss, parts

    # ------------------------------------------------------- per-step hooks (no loop edits)
    def next_batch(self) -> dict[str, Any]:
        step = self.state.step
        self.freeze_policy.apply(step)
        v = self.cfg.stage.validation
        if v.every and step > 0 and step % v.every == 0 and step != self._last_val_step:
            self._last_val_step = step
            self.periodic_validation(step)
        return super().next_batch()

    def validation_loader(self, shuffle: bool = False):
        """Held-out data for validation: stage.validation.shards, else for the synthetic
        world a differently seeded world (unseen clips), else data.shards."""
        v, d = self.cfg.stage.validation, self.cfg.data
        if v.shards:
            over: dict = {"kind": "webdataset", "shards": v.shards}
        elif d.kind == "synthetic":
            syn = d.synthetic
            over = {"synthetic": {"seed": syn.seed + 1000,
                                  "num_clips": max(syn.clips_per_shard,
                                                   d.batch_size * v.num_batches)}}
        else:
            over = {}
        over.update(num_frames=self.data_shape[0], resolution=list(self.data_shape[1:]))
        return self.loader_with(over, shuffle=shuffle)

    @torch.no_grad()
    def periodic_validation(self, step: int) -> None:
        """Validation loss of the live weights; early stopping when it stops improving."""
        v = self.cfg.stage.validation
        was_training = self.model.training
        self.model.eval()
        rep = self.validation_loss(self.validation_loader(), v.num_batches, list(v.timesteps))
        if was_training:
            self.model.train()
        rep = all_reduce_scalars(rep, self.device)
        val = rep["val_loss"]
        if self.tracker is not None:
            self.tracker.log({f"val/{k}": x for k, x in rep.items()}, step)
        log.info("step %d: validation loss %.5f", step, val)
        if not self._val_history_read:
            # A resumed run replays the validations before the checkpoint (metrics.jsonl keeps
            # only rows up to it), so patience counts as in an uninterrupted run.
            from worldline.train.tracking import read_metrics

            self._val_history_read = True
            for row in read_metrics(self.run_dir):
                if "val/val_loss" in row and row["step"] < step:
                    self._track_best(row["step"], row["val/val_loss"], v.min_delta)
        self._track_best(step, val, v.min_delta)
        if v.patience and self._bad_vals >= v.patience:
            # The loop runs while step < train.steps and checkpoints/samples when step ==
            # train.steps: ending at the step now being taken stops cleanly through it.
            self.cfg.train.steps = step + 1
            info = {"stopped_at_step": step + 1, "best_step": self._best_val[0],
                    "best_val_loss": self._best_val[1], "patience": v.patience}
            if self.rank == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "early_stopping.json").write_text(json.dumps(info, indent=1))
            log.info("early stopping: no improvement in %d validations (best %.5f at step %d)",
                     v.patience, self._best_val[1], self._best_val[0])

    def _track_best(self, step: int, val: float, min_delta: float) -> None:
        if self._best_val is None or val < self._best_val[1] - min_delta:
            self._best_val, self._bad_vals = (step, val), 0
        else:
            self._bad_vals += 1

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validation_loss(self, loader, num_batches: int, timesteps: list[float]) -> dict[str, float]:
        """Flow loss at fixed timesteps with fixed noise (text-to-video, active conditions,
        references drawn with a fixed generator): deterministic, so two checkpoints (or two
        runs) are directly comparable."""
        it = iter(loader)
        g = torch.Generator(device=self.device).manual_seed(0)
        per_t: dict[float, list[float]] = {float(t): [] for t in timesteps}
        for _ in range(num_batches):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in next(it).items()}
            x0 = self.latents(batch)
            b = x0.shape[0]
            cond = self.conditions(batch, b)
            noise = torch.randn(x0.shape, generator=g, device=self.device)
            refs = (self.reference_latents(batch, x0, g)
                    if "refs" in self.cfg.stage.conditions else None)
            zero = torch.zeros(b, dtype=torch.long, device=self.device)
            for t_val in per_t:
                t = torch.full((b,), t_val, device=self.device)
                x_in, t_in, _ = self.model_input(x0, noise, t, zero)
                pred = self.model(x_in, t_in, cond["text_ids"], cond["text_mask"],
                                  actions=cond["actions"], camera=cond["camera"],
                                  text_emb=cond["text_emb"], refs=self.ref_input(refs))
                per_t[t_val].append(flow_loss(pred, velocity_target(x0, noise)).item())
        report = {f"val_loss/t={t:g}": sum(v) / len(v) for t, v in per_t.items()}
        report["val_loss"] = sum(report.values()) / len(report)
        return report

    def evaluate(self, num_batches: int, timesteps: list[float]) -> dict[str, float]:
        """Validation flow loss on the configured data in fixed order (worldline-eval)."""
        return self.validation_loss(self.build_loader(shuffle=False), num_batches, timesteps)

    # -------------------------------------------------------------------- sampling
    def probe_batch(self, n: int) -> dict[str, Any]:
        """Conditions (actions, camera) and ground truth of the first ``n`` clips in fixed order
        at the current phase's size."""
        over = {"num_frames": self.data_shape[0], "resolution": list(self.data_shape[1:])}
        batch = next(iter(self.loader_with(over, shuffle=False)))
        return {k: (v[:n].to(self.device) if torch.is_tensor(v) else list(v)[:n])
                for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, prompts: list[str], batch: dict[str, Any], seed: int, num_steps: int,
                 cfg_scale: float, *, action_cfg_scale: float = 1.0,
                 prefix: Optional[torch.Tensor] = None, refs: Optional[torch.Tensor] = None,
                 solver: str = "euler", latent_shape=None) -> torch.Tensor:
        """Sample videos [N, 3, T, H, W] in [-1, 1] for ``prompts`` with ``batch``'s actions
        and camera (when the stage uses them), optional clean first latent frames ``prefix``
        [N, C, n0, h, w] (image-to-video / continuation) and reference latents ``refs``
        [N, K, C, h, w]; separate guidance scales for text and for actions/camera."""
        n = len(prompts)
        cond = self.conditions({**batch, "caption": prompts, "text_emb": None}, n)
        shape = tuple(latent_shape or self.latent_shape)
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((n, *shape), generator=g, device=self.device)
        x0 = torch.zeros_like(noise)
        n0 = 0 if prefix is None else prefix.shape[2]
        if prefix is not None:
            x0[:, :, :n0] = prefix
        n_pre = torch.full((n,), n0, dtype=torch.long, device=self.device)
        refs = self.ref_input(refs)
        none = torch.zeros(n, dtype=torch.bool, device=self.device)

        def velocity(x, t, drop_text, drop_act):
            x_in, t_in, _ = clean_prefix_inputs(x0, x, t, n_pre, self.module.dit.args.mask_channel)
            return self.model(x_in, t_in, cond["text_ids"], cond["text_mask"],
                              actions=cond["actions"], camera=cond["camera"],
                              drop_text=drop_text, drop_actions=drop_act, refs=refs)

        fn = multi_cfg_velocity(lambda x, t: velocity(x, t, none, none),
                                lambda x, t: velocity(x, t, ~none, none),
                                lambda x, t: velocity(x, t, ~none, ~none),
                                cfg_scale, action_cfg_scale)
        sampler = heun_sample if solver == "heun" else euler_sample
        z = sampler(fn, noise, num_steps, shift=self.shift_for(shape))
        if prefix is not None:
            z[:, :, :n0] = prefix
        return self.autoencoder.decode(self.autoencoder.denormalize(z)).clamp(-1, 1)

    def sample(self, step: int) -> None:
        """Fixed prompts (text-to-video) and, for models with the mask channel, the first frames
        of fixed clips (image-to-video) → samples/step_<N>/ and W&B videos."""
        s = self.cfg.sample
        prompts = list(s.prompts)
        batch = self.probe_batch(len(prompts))
        use_ema = self.ema is not None and s.use_ema
        ctx = self.ema.applied_to(self.module) if use_ema else nullcontext()
        groups: dict[str, torch.Tensor] = {}
        with ctx:
            refs = None
            if "refs" in self.cfg.stage.conditions:
                g = torch.Generator(device=self.device).manual_seed(s.seed)
                refs = self.reference_latents(batch, self.latents(batch), g)
            groups["generated"] = self.generate(prompts, batch, s.seed, s.num_steps, s.cfg_scale,
                                                action_cfg_scale=s.action_cfg_scale, refs=refs,
                                                solver=s.solver)
            if self.module.dit.args.mask_channel and "video" in batch:
                first = self.latents(batch)[:, :, :1]
                groups["image_to_video"] = self.generate(
                    list(batch["caption"]), batch, s.seed, s.num_steps, s.cfg_scale,
                    action_cfg_scale=s.action_cfg_scale, prefix=first, refs=refs,
                    solver=s.solver)
        if "video" in batch:
            groups["reference"] = to_unit_range(batch["video"])
        out = self.run_dir / "samples" / f"step_{step}"
        files = save_samples(out, groups, fps=8.0, captions=prompts)
        if self.tracker is not None:
            self.tracker.log_media(step, files["videos"], files["images"])
        log.info("step %d: samples → %s", step, out)
