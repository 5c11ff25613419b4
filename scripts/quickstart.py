"""``worldline-quickstart``: the main job, from nothing to a trained tiny world model + samples.

It runs two real stages on the embedded synthetic world (generated on first use as mp4
WebDataset shards), in one process, through the same code path as ``worldline-train``:

1. ``stage=autoencoder``  → ``<run.root>/<name>-autoencoder/`` (skipped for a pixel-space
   model, ``model=tiny_pixel``: its codec has nothing to train)
2. ``stage=pretrain`` with ``stage.conditions=[text,actions,camera]``
   → ``<run.root>/<name>-world/`` (latents from the frozen stage-1 model; an
   action-conditioned world model)

then reports whether that model follows its actions on held-out clips (train/action_report.py):
``<name>-world/action_report.json`` and ``action_contact_sheet.png``, and a table on screen.

Each stage is its own run dir (config.yaml, checkpoints/, metrics.jsonl, samples/, wandb/).
A stop signal (``preempt.signals``: SIGTERM, SLURM's SIGUSR1) checkpoints the running stage
and ends the job with exit code 3 without starting the next stage; the same command resumes.
Extra arguments are Hydra overrides applied to both stages, e.g.::

    worldline-quickstart run.root=/tmp/wl logger=none
    worldline-quickstart --ae-steps 100 --world-steps 200
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="worldline-quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="quickstart", help="prefix of the two run names")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder steps (stage default)")
    p.add_argument("--world-steps", type=int, default=None, help="world-model steps (stage default)")
    p.add_argument("--report-clips", type=int, default=4,
                   help="held-out clips of the action-following report")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both stages")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both stages; returns a process exit code."""
    from worldline.train.action_report import action_report, format_report
    from worldline.train.config import ConfigError
    from worldline.train.main import run_training  # also registers the config schema
    from worldline.train.preempt import EXIT_STOPPED

    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    t0 = time.perf_counter()
    with initialize_config_module(config_module="worldline.conf", version_base=None):
        ae_over = ["stage=autoencoder", f"run.name={args.name}-autoencoder", *args.overrides]
        if args.ae_steps:
            ae_over.append(f"train.steps={args.ae_steps}")
        ae_cfg = compose("config", overrides=ae_over)
        ae_dir = Path(ae_cfg.run.root) / ae_cfg.run.name
        # The world stage is action-conditioned from its first step (the synthetic world's
        # clips carry per-sprite actions and the camera pan): the main job ends with a world
        # model whose rollouts follow the actions, not a text-to-video model. Its task mix
        # leans to what a rollout does (continue from given frames), as stage=controllability.
        world_over = ["stage=pretrain", f"run.name={args.name}-world",
                      "stage.conditions=[text,actions,camera]", "stage.tasks.t2v=0.2",
                      "stage.tasks.i2v=0.4", "stage.tasks.continuation=0.4", *args.overrides]
        if args.world_steps:
            world_over.append(f"train.steps={args.world_steps}")
        # A pixel-space model (model=tiny_pixel) has no autoencoder to train.
        pixel = compose("config", overrides=world_over).model.autoencoder.get("kind") == "pixel"
        if not pixel:
            world_over.insert(2, f"stage.autoencoder_from={ae_dir}")
        world_cfg = compose("config", overrides=world_over)
        stages = [("world-model", world_cfg)] if pixel else [("autoencoder", ae_cfg),
                                                              ("world-model", world_cfg)]
        t_ae = 0.0
        try:
            for name, cfg in stages:
                trainer = run_training(cfg)
                if trainer.stopped_by:
                    # A stop signal stops the whole job: the next stage must not start on a
                    # half-trained autoencoder. The same command resumes where it stopped.
                    print(f"worldline-quickstart: stopped by {trainer.stopped_by} during the "
                          f"{name} stage at step {trainer.state.step} (checkpointed); run the "
                          "same command again to resume", file=sys.stderr)
                    return EXIT_STOPPED
                if name == "autoencoder":
                    t_ae = time.perf_counter() - t0
        except (ConfigError, FileNotFoundError, FileExistsError) as e:
            print(f"worldline-quickstart: error: {e}", file=sys.stderr)
            return 2
        world_dir = Path(world_cfg.run.root) / world_cfg.run.name
        t_world = time.perf_counter() - t0
        # The job's verdict: does the world model follow its actions? (held-out clips)
        try:
            rep = action_report(world_cfg, world_dir, num_clips=args.report_clips)
        except ValueError as e:  # e.g. overridden stage.conditions without actions
            rep = None
            print(f"worldline-quickstart: no action report: {e}", file=sys.stderr)
    total = time.perf_counter() - t0
    if rep is not None:
        print(f"\n{format_report(rep)}")
    print(f"\nautoencoder: {'none (pixel space)' if pixel else ae_dir}  ({t_ae:.0f}s)")
    print(f"world model: {world_dir}  ({t_world - t_ae:.0f}s)")
    samples = sorted((world_dir / "samples").glob("step_*"), key=lambda p: int(p.name[5:]))
    if samples:
        print(f"samples:     {samples[-1]}  (contact_sheet.png, generated_*.mp4)")
    if rep is not None:
        print(f"report:      {world_dir / 'action_report.json'}, {rep['contact_sheet']}  "
              f"({total - t_world:.0f}s)")
    print(f"total:       {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
