"""What every fault test needs: the tiny test-only recipe, real launches of ``worldline-train``
(one process, or 2 gloo ranks under torchrun), failpoints, and checkpoint inspection."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

CONF = Path(__file__).resolve().parent / "conf"
# The tiny recipe (tests/faults/conf/experiment/fault_tiny.yaml) added to Hydra's search path.
RECIPE = [f"hydra.searchpath=[file://{CONF}]", "experiment=fault_tiny"]


def train_args(root: Path, name: str, datasets: Path, *extra: str) -> list[str]:
    """CLI overrides of a tiny run ``root/name`` sharing the generated world in ``datasets``."""
    return [*RECIPE, f"run.root={root}", f"run.name={name}", f"data.root={datasets}", *extra]


def command(args: list[str], nproc: int = 2) -> list[str]:
    """``worldline-train`` as users launch it: torchrun for several ranks, python for one."""
    if nproc == 1:
        return [sys.executable, "-m", "worldline.train.main", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "worldline.train.main", *args]


def env(failpoints: str = "", **extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    e.pop("WORLDLINE_FAILPOINTS", None)
    if failpoints:
        e["WORLDLINE_FAILPOINTS"] = failpoints
    return e


def run(args: list[str], nproc: int = 2, failpoints: str = "", timeout: int = 180,
        check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    """Run to completion; with ``check``, fail the test on a non-zero exit (showing stderr)."""
    cmd = command(args, nproc)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=env(failpoints, **extra_env))
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    return r


def start(args: list[str], log: Path, nproc: int = 2, failpoints: str = "") -> subprocess.Popen:
    """Start a run in its own session (so the launcher and every rank can be SIGKILLed at once,
    like a node or job loss)."""
    f = open(log, "w")
    return subprocess.Popen(command(args, nproc), stdout=f, stderr=subprocess.STDOUT,
                            env=env(failpoints), start_new_session=True)


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """The launcher's worker processes (torchrun starts each rank in a session of its own,
    so they are not in the launcher's process group)."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The pid of worker ``rank`` under the launcher ``proc`` (found by its RANK variable)."""
    import psutil

    for pid in rank_pids(proc):
        try:
            if psutil.Process(pid).environ().get("RANK") == str(rank):
                return pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process under {proc.pid}")


def kill9(proc: subprocess.Popen, only: Optional[list[int]] = None) -> None:
    """SIGKILL the launcher and every rank at once (a lost node or job), or just ``only``;
    then reap the launcher."""
    targets = only if only is not None else [*rank_pids(proc), proc.pid]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if only is None:
        proc.wait(timeout=30)


def wait_for(pred, timeout: float, proc: Optional[subprocess.Popen] = None,
             poll: float = 0.01) -> bool:
    """Poll ``pred()`` until true; False on timeout or when ``proc`` exited first."""
    end = time.monotonic() + timeout
    def check() -> bool:
        try:
            return bool(pred())
        except OSError:  # a file renamed or removed between the checks
            return False

    while time.monotonic() < end:
        if check():
            return True
        if proc is not None and proc.poll() is not None:
            return check()
        time.sleep(poll)
    return False


def metric_rows(run_dir: Path) -> list[dict]:
    from worldline.train.tracking import read_metrics

    return read_metrics(run_dir)


def last_logged_step(run_dir: Path) -> int:
    return max((r["step"] for r in metric_rows(run_dir) if "loss" in r), default=0)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run_dir) if "loss" in r}


def ckpt_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, optimizer, EMA), flattened by name and loaded
    in this process (DCP's own converter, read back with ``weights_only``)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(ckpt), str(out))
        full = torch.load(out, weights_only=True)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif torch.is_tensor(node):
            flat[prefix] = node
        elif isinstance(node, (int, float)):
            flat[prefix] = torch.tensor(node)

    walk("", full)
    return flat


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                         what: str = "") -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:5]}"


def train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
