"""Hydra entry points: ``worldline-train``, ``worldline-eval`` and ``worldline-sample``.

Examples (CPU, tiny)::

    worldline-train stage=autoencoder run.name=ae
    worldline-train stage=pretrain run.name=world stage.autoencoder_from=runs/ae
    worldline-eval eval.checkpoint=runs/world
    worldline-sample sample.checkpoint=runs/world 'sample.prompts=[a red circle in a meadow]'

Every app validates the composed config (:func:`worldline.train.validate.validate`) before any
model or data is built, so a bad config fails in seconds with the key named.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from worldline.train.config import ConfigError, WorldlineConfig
from worldline.train.validate import override_hints, validate
from worldline.train.guard import TrainingAborted
from worldline.train.preempt import EXIT_STOPPED, write_status

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
        except TrainingAborted as e:  # non-finite streak, failed save (train/guard.py)
            # One write, newline included: every rank prints this to the same pipe, and
            # print()'s separate newline write let two ranks' lines run together (CI, unbuffered
            # stderr). Writes under PIPE_BUF are atomic.
            sys.stderr.write(f"worldline: aborted: {e}\n")
            sys.stderr.flush()
            sys.exit(1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def run_training(cfg: DictConfig) -> Any:
    """Validate ``cfg`` and train its stage to its last step. Returns the finished Trainer."""
    from worldline.train.build import build_trainer

    validate(cfg)
    trainer = build_trainer(cfg)
    trainer.train()
    if trainer.rank == 0:
        # Read by the SLURM batch script (slurm/templates/preempt.sh): only a run that is not
        # finished is requeued.
        write_status(trainer.run_dir, "stopped" if trainer.stopped_by else "finished",
                     trainer.state.step,
                     trainer.settings.steps if trainer.stopped_by else trainer.max_steps,
                     trainer.stopped_by)
    return trainer


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
        trainer = _fail_cleanly(run_training)(cfg)
        # Stopped on a signal after checkpointing: not an error, but not finished either.
        code = EXIT_STOPPED if trainer.stopped_by else 0
        if code == EXIT_STOPPED:
            import torch.distributed as tdist

            if tdist.is_initialized():  # every rank is done with the stop checkpoint
                tdist.barrier()
            from worldline.train.hooks import PreemptionHook

            # e.g. submitit's requeue in a launcher=slurm sweep job
            trainer.find_hook(PreemptionHook).chain()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then exit through finish()
        traceback.print_exc()
        code = 1
    import torch.distributed as tdist

    if distributed or (tdist.is_available() and tdist.is_initialized()):
        finish(code, clean=code in (0, EXIT_STOPPED))
    if code:
        sys.exit(code)


def _run_eval(cfg: DictConfig) -> None:
    from worldline.train.evaluate import run_eval

    report = run_eval(cfg)
    if report is not None:  # rank 0
        print(json.dumps(report, indent=1))


@hydra.main(version_base=None, config_path="../conf", config_name="eval")
def eval_app(cfg: DictConfig) -> None:
    """``worldline-eval eval.checkpoint=<run or checkpoint dir>``: validation loss, rollout,
    action-following and reference metrics (train/evaluate.py) as report.json/.md + PNG plots
    next to the checkpoint (or in ``eval.out``), logged to W&B. Under torchrun every rank
    evaluates its share of the data and rank 0 writes the averaged report."""
    import traceback

    from worldline.train.dist import dist_env, finish

    distributed = dist_env().distributed
    code = 0
    try:
        _fail_cleanly(_run_eval)(cfg)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then exit through finish()
        traceback.print_exc()
        code = 1
    if distributed:
        finish(code)
    if code:
        sys.exit(code)


@hydra.main(version_base=None, config_path="../conf", config_name="sample")
@_fail_cleanly
def sample_app(cfg: DictConfig) -> None:
    """``worldline-sample sample.checkpoint=<run or checkpoint dir>``: mp4s + contact sheet for
    ``sample.prompts`` with an optional first image, references and action file, in full or
    rollout mode (train/sampling.py)."""
    from worldline.train.sampling import run_sample

    for p in run_sample(cfg):
        print(p)


def _with_hints(app: Callable[..., Any]) -> Callable[..., Any]:
    """``app`` (a Hydra entry point), first printing hints for overrides whose Hydra grammar
    error alone would not say what to do (``override_hints``)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        for hint in override_hints(sys.argv[1:]):
            print(f"worldline: {hint}", file=sys.stderr, flush=True)
        return app(*args, **kwargs)

    run.__name__, run.__doc__ = app.__name__, app.__doc__
    return run


train_app, eval_app, sample_app = _with_hints(train_app), _with_hints(eval_app), _with_hints(sample_app)


if __name__ == "__main__":  # python -m worldline.train.main (torchrun / deepspeed launcher)
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; LOCAL_RANK
    # is in the environment anyway, and Hydra would reject the flag.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    train_app()
