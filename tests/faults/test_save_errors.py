"""A checkpoint write that fails: injected ENOSPC on one rank, and a really full disk.

Every case: the error is reported (naming the rank and phase), the partial write is removed,
the previous checkpoint stays ``latest`` and complete, and the run continues
(``train.on_save_error=continue``) or exits cleanly with one line (``exit``, the default).
Either way, resuming from what is on disk ends with the uninterrupted run's weights.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from faults._helpers import (
    assert_tensors_equal,
    ckpt_tensors,
    dir_bytes,
    losses,
    metric_rows,
    run,
    train_args,
)
from faults.conftest import REF_ARGS, REF_STEPS
from worldline.train.checkpoint import is_complete, latest_checkpoint

pytestmark = pytest.mark.faults


def _final_equals_reference(run_dir: Path, reference: Path) -> None:
    name = f"step_{REF_STEPS}"
    assert_tensors_equal(ckpt_tensors(run_dir / "checkpoints" / name),
                         ckpt_tensors(reference / "checkpoints" / name), f"{run_dir.name} final")
    assert losses(run_dir) == losses(reference)


def test_write_error_reported_and_training_continues(fault_root, fault_datasets,
                                                      reference_run) -> None:
    name = "save-continue"
    r = run(train_args(fault_root, name, fault_datasets, *REF_ARGS,
                       "train.on_save_error=continue"),
            failpoints="save_error:steps=10,rank=1")
    out = r.stdout + r.stderr
    assert "checkpoint step_10: per-rank state write failed on rank(s) [1]" in out
    assert "[Errno 28]" in out and "step_5 is still the latest checkpoint" in out
    run_dir = fault_root / name
    assert [row["step"] for row in metric_rows(run_dir) if "checkpoint_write_failed" in row] \
        == [10]
    assert not list((run_dir / "checkpoints").glob(".step_*"))
    _final_equals_reference(run_dir, reference_run)


def test_write_error_exits_cleanly_then_resumes(fault_root, fault_datasets,
                                                reference_run) -> None:
    name = "save-exit"
    args = train_args(fault_root, name, fault_datasets, *REF_ARGS)
    r = run(args, failpoints="save_error:steps=15,rank=0", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("worldline: aborted:")]
    assert len(lines) == 2, r.stderr[-3000:]  # one per rank; rank 0's also has its errno
    for line in lines:
        assert "checkpoint step_15: per-rank state write failed on rank(s) [0]" in line
        assert "step_10 is still the latest checkpoint" in line
    assert sum("[Errno 28]" in line for line in lines) == 1
    assert "train/trainer.py" not in r.stderr  # one line, no traceback from the ranks
    ck = fault_root / name / "checkpoints"
    assert latest_checkpoint(ck) == ck / "step_10" and is_complete(ck / "step_10")
    assert not (ck / "step_15").exists() and not (ck / ".step_15.partial").exists()
    run(args)  # resume=auto from step_10
    _final_equals_reference(fault_root / name, reference_run)


def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_full_disk_keeps_previous_checkpoint(fault_root, fault_datasets, reference_run) -> None:
    """checkpoints/ on a real tmpfs with room for two checkpoints: the third save hits ENOSPC
    inside DCP's tensor write, on whichever rank fills the disk."""
    name = "save-full"
    run_dir = fault_root / name
    one = dir_bytes(reference_run / "checkpoints" / f"step_{REF_STEPS}")
    mnt = fault_root / "full-disk"
    if not _mount_tmpfs(mnt, int(2.5 * one)):
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the injected "
                    "ENOSPC tests above cover the same code path")
    try:
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoints").symlink_to(mnt, target_is_directory=True)
        args = train_args(fault_root, name, fault_datasets, *REF_ARGS)
        r = run(args, check=False)
        assert r.returncode == 1, r.stderr[-3000:]
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith("worldline: aborted:"))
        assert "checkpoint step_15: " in line and "write failed on rank(s)" in line, line
        assert "step_10 is still the latest checkpoint" in line
        ck = run_dir / "checkpoints"
        assert latest_checkpoint(ck) == ck / "step_10" and is_complete(ck / "step_10")
        assert not list(ck.glob(".step_*")), "the failed write was not cleaned up"
        kept = ckpt_tensors(ck / "step_10")  # loads in full: the previous checkpoint is intact
        assert all(v.isfinite().all() for v in kept.values() if v.is_floating_point())
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    # (Resuming after a failed save equals the uninterrupted run: see the test above.)
