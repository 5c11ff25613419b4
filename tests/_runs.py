"""Shared helpers for tests that compose configs and run real training in-process or via the
installed console scripts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import worldline.train.main  # noqa: F401  (registers the config schema)

BIN = Path(sys.executable).parent


def compose_cfg(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with ``overrides`` exactly as the CLI would (minus hydra.*)."""
    with initialize_config_module(config_module="worldline.conf", version_base=None):
        return compose("config", overrides=overrides)


def smoke_overrides(root: Path, name: str, datasets: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run in ``root/name`` sharing the generated dataset in ``datasets``."""
    return ["experiment=smoke", f"run.root={root}", f"run.name={name}", f"data.root={datasets}",
            "logger=none", *extra]


def cli(tool: str, *args: str, cwd: Optional[Path] = None, timeout: int = 600,
        env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run an installed console script (worldline-train, ...) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(BIN / tool), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
