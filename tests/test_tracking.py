"""W&B tracking: offline runs land in the run dir whatever process owns the wandb service."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from worldline.train.tracking import Tracker

CFG = {"kind": "wandb", "project": "worldline-test", "entity": None, "mode": "offline",
       "group": None, "tags": [], "notes": None}


def test_child_process_with_inherited_wandb_service_writes_its_own_run_dir(
        tmp_path: Path, monkeypatch) -> None:
    """A run started from a process that already uses W&B (a test session, a sweep parent)
    inherits its wandb-core service (WANDB_SERVICE), which resolves relative paths against
    its own cwd: the child's relative run dir must still receive the .wandb file."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir(), child.mkdir()
    monkeypatch.chdir(parent)
    t = Tracker(Path("runs/p"), OmegaConf.create(CFG), "p", {}, None, None)
    t.log({"x": 1.0}, 1)
    code = ("from pathlib import Path; from omegaconf import OmegaConf; "
            "from worldline.train.tracking import Tracker; "
            f"t = Tracker(Path('runs/c'), OmegaConf.create({CFG!r}), 'c', {{}}, None, None); "
            "t.log({'x': 2.0}, 1); t.finish()")
    subprocess.run([sys.executable, "-c", code], cwd=child, check=True, timeout=300)
    t.finish()
    assert list((child / "runs/c/wandb").glob("offline-run-*/run-*.wandb"))
    assert list((parent / "runs/p/wandb").glob("offline-run-*/run-*.wandb"))
    assert (child / "runs/c/metrics.jsonl").read_text().strip() == '{"step": 1, "x": 2.0}'
