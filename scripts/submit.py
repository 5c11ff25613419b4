"""``worldline-submit``: render an sbatch script from the Hydra config and submit it.

The arguments are ``worldline-train`` overrides; the ``slurm.*`` keys (train/config.py
:class:`SlurmConfig`) choose the template and the ``#SBATCH`` options, everything is passed on
to every rank unchanged. The run dir is made absolute, the rendered script is kept in
``<run dir>/slurm/`` next to the job logs, and the job id and run dir are printed.

Examples::

    # 4 nodes x 8 GPUs, torchrun per node (c10d rendezvous on the first node)
    worldline-submit stage=pretrain run.name=world stage.autoencoder_from=runs/ae \\
        slurm.nodes=4 slurm.partition=gpu slurm.account=proj slurm.time=2-00:00:00 dist=fsdp
    # one task per GPU started by srun, only print the script
    worldline-submit --dry-run slurm.mode=srun slurm.nodes=2 run.name=world stage=autoencoder
    # the local CPU test cluster (slurm/local_cluster.sh): 2 nodes x 1 gloo rank
    worldline-submit experiment=smoke stage=autoencoder dist=ddp logger=none \\
        slurm.nodes=2 slurm.gpus_per_node=0 slurm.cpus_per_task=1 slurm.time=10
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

#: The repository's slurm/ folder (the package is installed editable from the repository).
SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
TEMPLATES = {"torchrun": "train_torchrun.sbatch", "srun": "train_srun.sbatch"}


class SubmitError(RuntimeError):
    """Submission cannot go ahead (bad template, sbatch failure)."""


def compose(overrides: list[str]) -> DictConfig:
    """The config ``worldline-train`` would compose from ``overrides``, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import worldline.train.main  # noqa: F401  (registers the schema)
    from worldline.train.validate import validate

    from hydra.errors import ConfigCompositionException

    from worldline.train.config import composition_error

    with initialize_config_module(config_module="worldline.conf", version_base=None):
        try:
            cfg = hydra_compose("config", overrides=overrides)
        except ConfigCompositionException as e:  # e.g. slurm.mode=mpirun (an enum field)
            raise composition_error(e) from e
    validate(cfg)
    return cfg


def render_template(text: str, values: dict[str, str], name: str = "template") -> str:
    """Replace ``{{key}}`` placeholders; an unknown or unused-but-required key is an error.

    Hand-written (a dozen lines) rather than Jinja: the templates are bash, whose own ``${}``
    syntax must pass through untouched, and the project does not otherwise depend on Jinja."""
    missing = sorted(set(re.findall(r"{{(\w+)}}", text)) - set(values))
    if missing:
        raise SubmitError(f"{name}: no value for placeholder(s) {missing}")
    return re.sub(r"{{(\w+)}}", lambda m: values[m.group(1)], text)


def _user_overrides(overrides: list[str], run_root: Path) -> list[str]:
    # run.root becomes absolute (the job runs from the repository root, not from here); every
    # other override reaches the ranks exactly as typed.
    rest = [o for o in overrides if not o.startswith(("run.root=", "+run.root=", "++run.root="))]
    return [*rest, f"run.root={run_root}"]


def build_script(cfg: DictConfig, overrides: list[str], template: Optional[Path] = None) -> str:
    """The sbatch script for ``cfg`` (composed from ``overrides``)."""
    s = cfg.slurm
    run_root = Path(cfg.run.root).expanduser().resolve()
    run_dir = run_root / cfg.run.name
    ranks_per_node = max(1, s.gpus_per_node)
    cpus = s.cpus_per_task or 8 * (ranks_per_node if s.mode == "torchrun" else 1)
    extra = []
    for key, opt in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
                     ("constraint", "--constraint")):
        if s[key]:
            extra.append(f"#SBATCH {opt}={s[key]}")
    if s.gpus_per_node:
        extra.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    extra += [f"#SBATCH {opt}" for opt in s.extra]
    setup = Path(s.setup).expanduser().resolve() if s.setup else SLURM_DIR / "env.sh"
    if not setup.is_file():
        raise SubmitError(f"slurm.setup: {setup} does not exist")
    values = {
        "job_name": re.sub(r"[^\w.-]", "_", cfg.run.name),
        "nodes": str(s.nodes),
        "cpus_per_task": str(cpus),
        "time": str(s.time),
        "signal_s": str(s.signal_s),
        # How long torchrun lets its ranks checkpoint after forwarding a signal.
        "stop_timeout_s": str(max(60, s.signal_s)),
        "run_dir": shlex.quote(str(run_dir)),
        "repo": shlex.quote(str(SLURM_DIR.parent)),
        "nproc_per_node": str(ranks_per_node),
        "max_restarts": str(s.max_restarts),
        "train_args": " ".join(shlex.quote(o) for o in _user_overrides(overrides, run_root)),
        "setup": shlex.quote(str(setup)),
        "nccl": f"source {shlex.quote(str(SLURM_DIR / 'nccl.sh'))}"
                if s.nccl and s.gpus_per_node else "# (no GPUs requested: NCCL settings skipped)",
        "preempt": (SLURM_DIR / "templates" / "preempt.sh").read_text(),
        "sbatch_extra": "\n".join(extra),
    }
    path = template or SLURM_DIR / "templates" / TEMPLATES[s.mode]
    return render_template(path.read_text(), values, str(path))


def submit(script: str, run_dir: Path, sbatch: str = "sbatch") -> str:
    """Write ``script`` into ``<run_dir>/slurm/`` and sbatch it. Returns the job id."""
    logs = run_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    path = logs / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    r = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise SubmitError(f"sbatch {path} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="worldline-submit", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    ap.add_argument("--template", type=Path, help="an sbatch template instead of slurm/templates/")
    ap.add_argument("overrides", nargs="*", help="worldline-train overrides (incl. slurm.*)")
    args = ap.parse_args(argv)
    from worldline.train.config import ConfigError

    try:
        cfg = compose(args.overrides)
        if cfg.resume is None:
            raise ConfigError("invalid config: resume: a requeued job must resume its run dir; "
                              "keep resume=auto (or a path) with worldline-submit")
        script = build_script(cfg, args.overrides, args.template)
        run_dir = Path(cfg.run.root).expanduser().resolve() / cfg.run.name
        if args.dry_run:
            print(script, end="")
            return 0
        job = submit(script, run_dir)
    except (ConfigError, SubmitError, FileNotFoundError) as e:
        print(f"worldline-submit: error: {e}", file=sys.stderr)
        return 2
    print(f"job {job}")
    print(f"run_dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
