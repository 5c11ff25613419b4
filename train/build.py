"""A run config → a composed :class:`~worldline.train.trainer.Trainer`.

The order is fixed (torchtitan's): join the process group → build the models on the meta
device → freeze → ``parallelize`` (AC → compile → CP → DDP/FSDP) → materialise only the local
shards (train/materialize.py) → load ``init_from`` / ``autoencoder_from`` weights → optimizer,
schedule and step engine (DeepSpeed wraps here) → EMA → loaders → checkpoint → hooks. The
frozen autoencoder is built and loaded on its own, never sharded with the trained model.

Nothing here mutates the composed config: derived values (the step count of
``stage.epochs``, a sweep job's run dir) live in typed objects.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from worldline.train import checkpoint as ckpt_lib
from worldline.train import hooks as hk
from worldline.train.components import (
    is_foreign,
    load_pretrained_dit,
    pretrained_text_encoder,
    pretrained_vae,
)
from worldline.train.config import to_container
from worldline.train.dist import cpu_setup, init_distributed, pick_device
from worldline.train.guard import NonFiniteGuard
from worldline.train.loaders import LoaderFactory
from worldline.train.lr import WarmupCosineLR
from worldline.models.init import build_on_meta
from worldline.train.materialize import materialize
from worldline.train.objectives import AutoencoderObjective, FlowObjective
from worldline.train.parallel import (
    ParallelDims,
    deepspeed_stage,
    make_step_engine,
    parallelize,
)
from worldline.train.pipeline import WorldPipeline
from worldline.train.pipeline_io import (
    autoencoder_args,
    build_models,
    load_autoencoder,
    pipeline_settings,
)
from worldline.train.precision import PrecisionPolicy
from worldline.train.preempt import slurm_restart_count
from worldline.train.resume import Generators, RunCheckpoint
from worldline.train.trainer import LoopSettings, Trainer
from worldline.train.weights import load_module_weights

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "train_steps", "run_name"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def train_steps(cfg: DictConfig, world_size: Optional[int] = None) -> int:
    """``train.steps``, or for ``stage.epochs`` the steps of that many passes over the data."""
    e = cfg.stage.get("epochs")
    if e is None:
        return int(cfg.train.steps)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    per_step = cfg.data.batch_size * cfg.train.grad_accum * (world // max(1, cfg.dist.cp))
    steps = max(1, math.ceil(e * num_training_samples(cfg) / per_step))
    log.info("stage.epochs=%d -> %d steps", e, steps)
    return steps


def run_name(cfg: DictConfig) -> str:
    """``run.name``; in a Hydra multirun (``-m``, any launcher) every job trains in its own
    run dir ``<run.name>/<job number>``, also Hydra's output dir for the job (hydra.sweep in
    conf/config.yaml). A requeued sweep job keeps its number, hence its run dir, and resumes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{cfg.run.name}/{HydraConfig.get().job.num}"
    return str(cfg.run.name)


def _setup_process(cfg: DictConfig) -> tuple[ParallelDims, torch.device, Any]:
    info = init_distributed(cfg.dist.timeout_s)
    dims = ParallelDims(info.world_size, info.rank, cfg.dist.cp, cfg.dist.replicate)
    device = pick_device()
    mesh = dims.build_mesh(device.type)
    if device.type == "cpu":
        cpu_setup(cfg.run.threads)
    elif cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.run.seed)
    return dims, device, mesh


def _optimizer(module: torch.nn.Module, o: Any) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    # No weight decay on gains, biases and embeddings' 1-D parameters.
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    # fused: its kernel takes the non-finite guard's flag and skips the update on the
    # device (train/guard.py), so no host sync is needed to skip a NaN step.
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


@torch.no_grad()
def measure_latent_stats(pipe: WorldPipeline, loader: Any, num_batches: int = 8) -> None:
    """Per-channel mean/std of the frozen autoencoder's latents over the first clips (fixed
    order), stored in its buffers, so the diffusion targets are ~unit variance. Measured
    with the exact weights in use (e.g. EMA) and then carried by every checkpoint of this
    and later stages, so a model never sees differently-normalised latents."""
    ae = pipe.autoencoder
    ae.latent_mean.zero_()
    ae.latent_std.fill_(1.0)
    it = iter(loader)
    lat = torch.cat([pipe.latents(next(it)) for _ in range(num_batches)])
    dims = [0, 2, 3, 4]
    ae.latent_mean.copy_(lat.float().mean(dims))
    ae.latent_std.copy_(lat.float().std(dims).clamp_min(1e-4))
    m, s = ae.latent_mean, ae.latent_std
    if m.numel() <= 16:
        log.info("latent stats: mean %s std %s", [round(v, 3) for v in m.tolist()],
                 [round(v, 3) for v in s.tolist()])
    else:  # the pixel codec's 192 channels would fill the screen
        log.info("latent stats (%d channels): mean %.3f..%.3f std %.3f..%.3f", m.numel(),
                 m.min(), m.max(), s.min(), s.max())


def _frozen_autoencoder(cfg: DictConfig, device: torch.device,
                        loaders: LoaderFactory) -> torch.nn.Module:
    """The flow stages' frozen autoencoder: from ``stage.autoencoder_from`` (an autoencoder
    run gets its latent statistics measured here), ``stage.init_from``, or — resuming — the
    run's own checkpoint (loaded with it)."""
    st = cfg.stage
    ext = pretrained_vae(cfg, device)
    if ext is not None:  # a diffusers VAE: its own normalisation, nothing to measure
        return ext
    # Initialised before loading, as eager construction did: the RNG stream the world model
    # is then initialised from stays what it always was (golden losses depend on it).
    ae = materialize(build_on_meta(lambda: _ae_of(cfg)), device).requires_grad_(False).eval()
    src = st.autoencoder_from or st.init_from
    # The pixel codec has no weights; a run without a source measures its statistics here.
    key = load_autoencoder(src, into=ae)[2] if src else (
        "model" if ae.args.kind == "pixel" else None)
    if key == "model":  # straight from an autoencoder run: no statistics yet
        # The same clips on every rank and for every loader layout (rank 0 of 1, one
        # stream): per-rank statistics would train each rank on differently normalised
        # latents, and a single process would not match its distributed twin.
        first = LoaderFactory(cfg, pin_memory=loaders.pin_memory)
        measure_latent_stats(WorldPipeline(ae), first.make({"num_workers": 0}, shuffle=False))
    return ae


def _attach_text_encoder(pipe: WorldPipeline, cfg: DictConfig, device: torch.device,
                         loaders: LoaderFactory) -> None:
    """Give the pipeline its frozen pretrained text encoder. When every clip comes with
    cached text embeddings it is loaded only if a prompt must be encoded (sampling), so a
    multi-GB encoder does not occupy memory through training."""
    if not cfg.model.text_encoder.pretrained:
        return
    if loaders.text_cached():
        log.info("text embeddings are cached: the text encoder loads only to sample")
        pipe.text_encoder_loader = lambda: pretrained_text_encoder(cfg, device)
    else:
        pipe.external_text_encoder = pretrained_text_encoder(cfg, device)


def _ae_of(cfg: DictConfig) -> torch.nn.Module:
    from worldline.models.autoencoder import VideoAutoencoder

    return VideoAutoencoder(autoencoder_args(cfg))


def _trained_module(cfg: DictConfig, mesh: Any, dims: ParallelDims, device: torch.device,
                    precision: PrecisionPolicy) -> tuple[torch.nn.Module, torch.nn.Module,
                                                         set[str]]:
    """(module, model, new parameter names): the trained module built on meta, frozen as the
    stage says, parallelized, materialised and loaded from ``stage.init_from``."""
    from worldline.train.stages import load_init_weights, zero_init_new_controls

    st = cfg.stage
    flow = st.objective == "flow"
    # A flow stage's frozen autoencoder is built on its own (_frozen_autoencoder).
    ae, wm = build_models({**to_container(cfg), "stage": {**to_container(cfg)["stage"],
                                                          "lora": {"enabled": False}}},
                          autoencoder=not flow)
    module = wm if flow else ae
    # Distinct clip shapes the blocks will see: sizes dynamo's recompile limit (compile).
    num_shapes = max(1, len(cfg.data.buckets))
    init_from = ckpt_lib.resolve_checkpoint(st.init_from) if st.init_from else None
    new: set[str] = set()

    def load_init() -> None:
        nonlocal new
        if init_from is None and flow and cfg.model.dit.pretrained:
            new = load_pretrained_dit(module, cfg.model.dit.pretrained)
        if init_from is None:
            return
        if flow:  # grow the previous stage's model; new control outputs start at zero
            new = load_init_weights(module, init_from)
            zeroed = zero_init_new_controls(module, new)
            if zeroed:
                log.info("zero-initialised new control outputs: %s", zeroed)
        else:
            used = load_module_weights(module, init_from, "model", prefer_ema=True,
                                       allow_partial=True)
            log.info("initialised weights from %s (%s)", init_from, "EMA" if used else "raw")

    if flow and st.lora.enabled:
        # PEFT injects into a materialised model (its adapters initialise themselves), so a
        # LoRA run materialises before sharding; its base weights are frozen anyway.
        from worldline.train.lora import inject_lora

        materialize(module, device)
        load_init()
        inject_lora(module, st.lora)
        _freeze(module, st.freeze)
        model = parallelize(module, mesh, cfg.dist, precision, device, num_shapes)
        return module, model, new
    _freeze(module, st.freeze)
    if str(cfg.dist.backend) == "fsdp" and mesh is not None:
        model = parallelize(module, mesh, cfg.dist, precision, device, num_shapes)
        materialize(module, device)  # only this rank's shards, as one process would init them
    else:  # DDP broadcasts rank 0's weights when it wraps: they must exist by then
        materialize(module, device)
        model = parallelize(module, mesh, cfg.dist, precision, device, num_shapes)
    load_init()
    return module, model, new


def _freeze(module: torch.nn.Module, prefixes: Any) -> None:
    """Freeze parameters whose name starts with any of ``prefixes`` (``stage.freeze``)."""
    for name, p in module.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)


def build_trainer(cfg: DictConfig) -> Trainer:
    """The Trainer for ``cfg`` (validated by the caller; see worldline.train.main)."""
    dims, device, mesh = _setup_process(cfg)
    precision = PrecisionPolicy.from_config(cfg)
    steps = train_steps(cfg, dims.world_size)
    name = run_name(cfg)
    run_dir = Path(cfg.run.root) / name
    loaders = LoaderFactory(cfg, dims.dp_rank, dims.dp_world, device.type == "cuda")
    flow = cfg.stage.objective == "flow"
    frozen = _frozen_autoencoder(cfg, device, loaders) if flow else None
    module, model, new = _trained_module(cfg, mesh, dims, device, precision)
    if flow:
        pipe = WorldPipeline(frozen, module, pipeline_settings(cfg))
        _attach_text_encoder(pipe, cfg, device, loaders)
        objective: Any = FlowObjective(cfg.stage, cfg.run.seed, lambda: loaders.clip_shape)
        if cfg.stage.name == "self_forcing":  # + frozen teacher, fake score, its optimizer
            from worldline.train.self_forcing import SelfForcingObjective

            objective = SelfForcingObjective.build(cfg, device, dims.world_size > 1,
                                                   lambda: loaders.clip_shape)
    else:
        pipe = WorldPipeline(module, None, pipeline_settings(cfg))
        objective = AutoencoderObjective(cfg.stage.ae, device, dims.world_size > 1)
    optimizer = _optimizer(module, cfg.optim)
    scheduler = WarmupCosineLR(optimizer, cfg.optim, steps)
    if deepspeed_stage(cfg.dist.backend) is not None:
        # DeepSpeed JIT-builds ops (on CPU: its shared-memory comm op, ~1 min) into
        # TORCH_EXTENSIONS_DIR: keep that cache under the run root, shared by its runs.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                              str(Path(cfg.run.root).resolve() / ".torch_extensions"))
    t = cfg.train
    engine = make_step_engine(model, module, optimizer, cfg.dist, dims,
                              micro_batch=cfg.data.batch_size, grad_accum=t.grad_accum,
                              grad_clip=t.grad_clip, precision=precision)
    pipe.forward_model = engine.model
    ema = engine.make_ema(t.ema_decay) if t.ema_decay > 0 else None
    if ema is not None:
        ema.every = t.ema_every
    holder: dict[str, Trainer] = {}
    loader = loaders.training(lambda: holder["t"].state.step)
    generators = Generators(cfg.run.seed, dims.dp_rank, t.grad_accum, device)
    parts: dict[str, Any] = {}
    if ema is not None:
        parts["ema"] = ema
    if frozen is not None and not is_foreign(frozen):
        # A pretrained VAE is re-read from its folder (fingerprinted), not checkpointed.
        parts["autoencoder"] = frozen
    parts.update(getattr(objective, "auxiliary", {}))
    checkpoint = RunCheckpoint(
        ckpt_lib.Checkpointer(run_dir, t.keep_last, async_save=cfg.dist.async_save), engine,
        parts=parts, loader=loader, scheduler=scheduler, generators=generators, dims=dims,
        meta={"config": to_container(cfg), "backend": str(cfg.dist.backend),
              "objective": str(cfg.stage.objective), "steps": steps},
        on_error=str(t.on_save_error),
        report=lambda m, s: holder["t"].tracker and holder["t"].tracker.log(m, s))
    trainer = Trainer(
        pipeline=pipe, objective=objective, engine=engine, scheduler=scheduler, loader=loader,
        checkpoint=checkpoint, tracker_factory=_tracker_factory(cfg, run_dir, name, dims.rank),
        settings=LoopSettings(steps=steps, grad_accum=t.grad_accum, log_every=t.log_every,
                              ckpt_every=t.ckpt_every,
                              sync_nonfinite_check=t.sync_nonfinite_check,
                              progress_bar=t.progress_bar, seed=cfg.run.seed, name=name),
        dims=dims, device=device, precision=precision, generators=generators,
        guard=NonFiniteGuard(device, t.max_nonfinite_skips, t.sync_nonfinite_check),
        run_dir=run_dir, ema=ema, hooks=_hooks(cfg, objective, loaders, module, new, flow),
        resume=lambda tr: _resume(cfg, tr, run_dir),
        log_extras=_log_extras())
    holder["t"] = trainer
    from worldline.train import failpoints

    if os.environ.get(failpoints.ENV):
        failpoints.arm_trainer(trainer)
    return trainer


def _hooks(cfg: DictConfig, objective: Any, loaders: LoaderFactory, module: torch.nn.Module,
           new: set[str], flow: bool) -> list[hk.Hook]:
    st = cfg.stage
    out: list[hk.Hook] = [hk.FaultPointHook(), hk.WatchdogHook(cfg.dist)]
    if flow:
        from worldline.train.stages import FreezePolicy

        out.append(hk.FreezePolicyHook(FreezePolicy(module, st.freeze_policy, new)))
        out.append(hk.ValidationHook(objective, loaders, st.validation))
    out.append(hk.SamplingHook(objective, loaders, cfg.sample, cfg.train.sample_every,
                               num_clips=len(cfg.sample.prompts) if flow else None))
    out.append(hk.PreemptionHook(cfg.preempt))
    if cfg.train.profile:
        from worldline.train.profiling import ProfilerHook

        out.append(ProfilerHook(cfg.train.profile))
    return out


def _tracker_factory(cfg: DictConfig, run_dir: Path, name: str, rank: int):
    from worldline.train.tracking import Tracker

    def make(state: Any, resumed: bool) -> Tracker:
        return Tracker(run_dir, cfg.logger, name, to_container(cfg),
                       resume_step=state.step if resumed else None,
                       run_id=state.wandb_run_id, rank=rank)

    return make


def _log_extras() -> dict[str, Any]:
    restarts = slurm_restart_count()  # which start of a requeued SLURM job logged a row
    return {} if restarts is None else {"slurm_restart_count": restarts}


def _resume(cfg: DictConfig, trainer: Trainer, run_dir: Path) -> bool:
    """Restore the run from ``resume`` (auto: its newest checkpoint); write config.yaml."""
    path = trainer.checkpoint.resolve(cfg.resume, run_dir)
    if path is not None:
        trainer.state = trainer.checkpoint.load(path, trainer.rank)
    if trainer.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return path is not None
