"""Trainer performance tooling: the profiler switch, MFU honesty, the trainer ÷ bare-step
benchmark, and apps that do not import wandb when W&B is off."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _runs import BIN, compose_cfg, smoke_overrides
from worldline.train.main import run_training
from worldline.train.perf import PeakFlops, plausible_floor


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A 3-step autoencoder run profiled for 2 steps, and a 2-step world model on it."""
    root = tmp_path_factory.mktemp("perf")
    data = root / "data"
    run_training(compose_cfg(smoke_overrides(root, "ae", data, "stage=autoencoder",
                                             "train.steps=3", "train.profile=2")))
    run_training(compose_cfg(smoke_overrides(root, "world", data, "stage=pretrain",
                                             f"stage.autoencoder_from={root / 'ae'}",
                                             "train.steps=2", "sample.num_steps=1")))
    return root


def test_profile_writes_trace_and_table(runs: Path) -> None:
    prof = runs / "ae" / "profile"
    trace, table = prof / "trace.json.gz", prof / "profile.txt"
    assert trace.is_file() and trace.stat().st_size > 1000
    text = table.read_text()
    assert "Self CPU" in text and "aten::" in text


def test_mfu_reliability_flag() -> None:
    cpu = torch.device("cpu")
    normal = PeakFlops.measure(cpu, measured=100 * plausible_floor(cpu))
    assert normal.reliable(0.4) == 1
    assert normal.reliable(1.5) == 0  # above the peak: the peak was wrong, not the model
    starved = PeakFlops.measure(cpu, measured=1e3)  # a probe that ran on a saturated CPU
    assert starved.reliable(0.4) == 0
    assert starved.mfu(2e3) == pytest.approx(2.0)  # logged as is, never capped


def test_bench_trainer_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "worldline.scripts.bench_trainer", "--quick",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"ratio", "bare_s", "trainer_s", "shape", "cpu_capability"} <= set(res)
    assert res["ratio"] > 0 and res["bare_s"] > 0 and res["trainer_s"] > 0
    assert res["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_eval_and_sample_do_not_import_wandb_when_logger_is_off(runs: Path,
                                                                tmp_path: Path) -> None:
    """A ``wandb`` that fails on import (and leaves a marker, so a caught ImportError is seen
    too) shadows the real one: both apps with ``logger=none`` must run and never try it."""
    block = tmp_path / "block"
    block.mkdir()
    marker = tmp_path / "wandb_imported"
    (block / "wandb.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        raise ImportError("wandb is blocked by test_trainer_perf")
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(block), *filter(None, [os.environ.get("PYTHONPATH")])])}
    common = ["experiment=smoke", f"run.root={runs}", f"data.root={runs / 'data'}",
              "logger=none"]
    world = runs / "world"
    cmds = [
        ["worldline-eval", f"eval.checkpoint={world}", "eval.num_batches=1",
         "eval.metrics=[val_loss]", f"eval.out={tmp_path / 'eval'}", *common],
        ["worldline-sample", f"sample.checkpoint={world}", f"sample.out={tmp_path / 's'}",
         "sample.prompts=[a red circle]", "sample.num_steps=1", *common],
    ]
    for cmd in cmds:
        r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not marker.exists(), f"{cmd[0]} imported wandb with logger=none"
    assert (tmp_path / "eval" / "report.json").is_file()
    assert (tmp_path / "s" / "generated_0.mp4").is_file()
