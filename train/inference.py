"""What ``worldline-eval`` and ``worldline-sample`` work with: a loaded
:class:`~worldline.train.pipeline.WorldPipeline`, its objective (for evaluation losses) and
loaders for the data spec given on the command line. No Trainer, no optimizer, no training
loader; a process group only when launched on several ranks (evaluation shares the data)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from worldline.train.config import ConfigError, command_line_keys
from worldline.train.dist import cpu_setup, init_distributed, pick_device
from worldline.train.loaders import LoaderFactory
from worldline.train.objectives import AutoencoderObjective, FlowObjective
from worldline.train.pipeline import WorldPipeline
from worldline.train.validate import validate

log = logging.getLogger(__name__)

__all__ = ["InferenceRun", "load_for_inference"]


@dataclass
class InferenceRun:
    """A checkpoint opened for evaluation or sampling."""

    pipeline: WorldPipeline
    objective: Any
    loaders: LoaderFactory
    cfg: DictConfig  # the command line's config with the checkpoint's model and stage
    path: Path  # the checkpoint (or folder) loaded
    rank: int = 0
    world_size: int = 1

    @property
    def device(self) -> torch.device:
        return self.pipeline.device


def _clip_size_from_model(cfg: DictConfig, pipe: WorldPipeline, path: Path) -> DictConfig:
    """``data.num_frames``/``data.resolution`` of the model's training clips (its
    ``sample_size``) unless the command line sets them: a 96x80 model must not be evaluated
    or sampled at the 64x64 default without anyone asking."""
    given = command_line_keys()
    if given is None:  # a programmatic caller's config is taken as given
        return cfg
    frames, h, w = pipe.settings.sample_size
    new: dict[str, Any] = {}
    if "data.num_frames" not in given and int(cfg.data.num_frames) != frames:
        new["num_frames"] = frames
    if "data.resolution" not in given and list(cfg.data.resolution) != [h, w]:
        new["resolution"] = [h, w]
    if new:
        log.info("clip size from %s: %s (set data.num_frames / data.resolution to override)",
                 path, ", ".join(f"data.{k}={v}" for k, v in new.items()))
        cfg = OmegaConf.merge(cfg, {"data": new})
    return cfg


def load_for_inference(cfg: DictConfig, checkpoint: str, use_ema: bool) -> InferenceRun:
    """Open ``checkpoint`` (run, checkpoint, export or pipeline folder): its weights, model and
    stage config; everything else (data, sampling and eval settings) from ``cfg``."""
    from worldline.train import checkpoint as ckpt_lib

    if not checkpoint:
        raise ConfigError("invalid config: checkpoint: required (a run or checkpoint dir)")
    pipe = WorldPipeline.from_pretrained(checkpoint, use_ema=use_ema)
    path = Path(getattr(pipe, "source", checkpoint))
    saved = None
    if (path / "meta.json").is_file() or (path / "config.json").is_file():
        saved = ckpt_lib.read_meta(path).get("config")
    if saved is not None:
        # The checkpoint carries its frozen autoencoder (the pipeline loaded it from there);
        # nothing that only shapes training (schedule, freezing, GAN, early stopping) runs.
        flow = pipe.world_model is not None
        stage = {**saved["stage"], "init_from": None, "schedule": [], "epochs": None,
                 "autoencoder_from": str(path) if flow else None}
        for key, off in (("freeze_policy", {"steps": 0}), ("prior", {"ratio": 0.0}),
                         ("validation", {"every": 0, "patience": 0}),
                         ("ae", {"gan_start": -1, "perceptual_path": None})):
            if key in stage:
                stage[key] = {**stage[key], **off}
        cfg = OmegaConf.merge(cfg, {"model": saved["model"], "stage": stage})
    else:  # a pipeline folder: its settings are all there is
        # Its autoencoder is in the folder: a flow stage's "needs an autoencoder" rule holds.
        stage = {"conditions": pipe.settings.conditions}
        if pipe.world_model is not None:
            stage["autoencoder_from"] = str(path)
        cfg = OmegaConf.merge(cfg, {"stage": stage})
    cfg = _clip_size_from_model(cfg, pipe, path)
    validate(cfg)
    info = init_distributed(cfg.dist.timeout_s)  # no-op for one process
    device = pick_device()
    if device.type == "cpu":  # as the Trainer and worldline-play: replays are bitwise
        cpu_setup(cfg.run.threads)
    pipe.to(device)
    pipe.eval()
    dp = info.world_size // max(1, cfg.dist.cp)
    loaders = LoaderFactory(cfg, info.rank // max(1, cfg.dist.cp), dp)
    if pipe.world_model is not None:
        objective: Any = FlowObjective(cfg.stage, cfg.run.seed,
                                        lambda: loaders.clip_shape)
    else:
        objective = AutoencoderObjective(cfg.stage.ae, pipe.device, distributed=False)
    log.info("loaded %s for inference", path)
    return InferenceRun(pipe, objective, loaders, cfg, path, info.rank, info.world_size)


def first_clips(loader: Any, n: int, device: torch.device) -> Any:
    """The first ``n`` clips ``loader`` yields as one ``Batch`` on ``device``: as many
    batches as ``n`` needs (``n`` may exceed ``data.batch_size``); data of fewer clips than
    ``n`` is a ``ValueError`` naming both."""
    from worldline.data.batch import Batch
    from worldline.train.hooks import head

    parts, have = [], 0
    for batch in loader:
        parts.append(batch)
        have += batch.num_samples
        if have >= n:
            break
    if have < n:
        raise ValueError(f"{n} clips asked of data that holds {have}")
    return head(parts[0] if len(parts) == 1 else Batch.concat(parts), n, device)


def probe_batch(run: InferenceRun, n: int) -> Any:
    """The first ``n`` clips of the data spec in fixed order, on the pipeline's device."""
    return first_clips(run.loaders.probe(), n, run.device)
