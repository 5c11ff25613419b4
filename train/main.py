"""Hydra entry points: ``worldline-train``, ``worldline-eval`` and ``worldline-sample``.

Examples (CPU, tiny)::

    worldline-train stage=autoencoder run.name=ae
    worldline-train stage=pretrain run.name=world stage.autoencoder_from=runs/ae
    worldline-eval eval.checkpoint=runs/world
    worldline-sample sample.checkpoint=runs/world 'sample.prompts=[a red circle in a meadow]'

Every app validates the composed config (:func:`worldline.train.config.validate`) before any
model or data is built, so a bad config fails in seconds with the key named.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from worldline.train.config import ConfigError, WorldlineConfig, validate

log = logging.getLogger("worldline")

ConfigStore.instance().store(name="worldline_schema", node=WorldlineConfig)


def _fail_cleanly(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Config and missing-input errors print one clear line and exit 2 instead of a traceback."""

    def wrapper(cfg: DictConfig) -> Any:
        try:
            return fn(cfg)
        except (ConfigError, FileNotFoundError, FileExistsError) as e:
            print(f"worldline: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def run_training(cfg: DictConfig) -> Any:
    """Validate ``cfg`` and train its stage to ``train.steps``. Returns the finished Trainer."""
    from worldline.train.objectives import make_trainer

    validate(cfg)
    trainer = make_trainer(cfg)
    trainer.train()
    return trainer


def load_for_inference(cfg: DictConfig, checkpoint: str, use_ema: bool):
    """A Trainer whose model/stage config come from ``checkpoint`` (everything else — data,
    sampling and eval settings — from the command line), with the checkpoint's weights loaded."""
    from worldline.train import checkpoint as ckpt_lib
    from worldline.train.objectives import make_trainer

    path = ckpt_lib.resolve_checkpoint(checkpoint)
    saved = ckpt_lib.read_meta(path)["config"]
    # The checkpoint carries its frozen autoencoder; never chase the original training paths.
    stage = {**saved["stage"], "init_from": None,
             "autoencoder_from": str(path) if saved["stage"]["objective"] == "flow" else None}
    cfg = OmegaConf.merge(cfg, {"model": saved["model"], "stage": stage})
    validate(cfg)
    trainer = make_trainer(cfg)
    used = ckpt_lib.load_module_weights(trainer.module, path, "model", prefer_ema=use_ema)
    trainer.model.eval()
    log.info("loaded %s (%s weights)", path, "EMA" if used else "raw")
    return trainer, path


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def train_app(cfg: DictConfig) -> None:
    """``worldline-train``: train one stage (see conf/stage/). Under torchrun / srun / the
    deepspeed launcher every rank runs this; a multi-rank run always leaves through
    :func:`worldline.train.dist.finish` (barrier, destroy, flush, ``os._exit``) so gloo's
    teardown can never abort the exit."""
    import traceback

    from worldline.train.dist import dist_env, finish

    distributed = dist_env().distributed
    code = 0
    try:
        _fail_cleanly(run_training)(cfg)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then exit through finish()
        traceback.print_exc()
        code = 1
    import torch.distributed as tdist

    if distributed or (tdist.is_available() and tdist.is_initialized()):
        finish(code)
    if code:
        sys.exit(code)


@hydra.main(version_base=None, config_path="../conf", config_name="eval")
@_fail_cleanly
def eval_app(cfg: DictConfig) -> None:
    """``worldline-eval eval.checkpoint=<run or checkpoint dir>``: deterministic validation
    metrics, written as JSON next to the checkpoint (or to ``eval.out``)."""
    if not cfg.eval.checkpoint:
        raise ConfigError("invalid config: eval.checkpoint: required (a run or checkpoint dir)")
    trainer, path = load_for_inference(cfg, cfg.eval.checkpoint, cfg.eval.use_ema)
    if trainer.cfg.stage.objective == "flow":
        report = trainer.evaluate(cfg.eval.num_batches, list(cfg.eval.timesteps))
    else:
        report = trainer.evaluate(cfg.eval.num_batches)
    report = {"checkpoint": str(path), **report}
    out = Path(cfg.eval.out) if cfg.eval.out else path.parent.parent / "eval" / path.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


@hydra.main(version_base=None, config_path="../conf", config_name="sample")
@_fail_cleanly
def sample_app(cfg: DictConfig) -> None:
    """``worldline-sample sample.checkpoint=<run or checkpoint dir>``: mp4s + contact sheet for
    ``sample.prompts``, with actions/camera taken from the first clips of the data spec."""
    import torch

    from worldline.train.media import save_samples

    s = cfg.sample
    if not s.checkpoint:
        raise ConfigError("invalid config: sample.checkpoint: required (a run or checkpoint dir)")
    trainer, path = load_for_inference(cfg, s.checkpoint, s.use_ema)
    if trainer.cfg.stage.objective != "flow":
        raise ConfigError(f"invalid config: sample.checkpoint: {path} is an autoencoder "
                          "checkpoint; sampling needs a world-model stage")
    prompts = list(s.prompts)
    batch = trainer.probe_batch(len(prompts))
    with torch.no_grad():
        videos = trainer.generate(prompts, batch, s.seed, s.num_steps, s.cfg_scale)
    out = Path(s.out) if s.out else path.parent.parent / "samples" / "manual"
    files = save_samples(out, {"generated": videos}, fps=8.0, captions=prompts)
    for p in [*files["videos"].values(), *files["images"].values()]:
        print(p)


if __name__ == "__main__":  # python -m worldline.train.main (torchrun / deepspeed launcher)
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; LOCAL_RANK
    # is in the environment anyway, and Hydra would reject the flag.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    train_app()
