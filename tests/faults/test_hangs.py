"""A rank that stalls, freezes or dies: the others fail within the configured time, with an
error naming the rank, instead of hanging until the collective timeout (train/watchdog.py).

- stall: rank 1 sleeps at the start of step 6 (failpoint) -> rank 0's watchdog names it;
- frozen: the test SIGSTOPs rank 1 (what a hung host looks like: sockets open, no progress,
  no heartbeats) -> rank 0's watchdog names it;
- killed: the test SIGKILLs rank 1 -> the other rank's collective fails at once and torchrun
  names the rank and its signal.

All runs log heartbeat lines. dist.timeout_s is 60 s, far above the ~4 s the watchdog takes.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from faults._helpers import kill9, last_logged_step, rank_pid, start, train_args, wait_for

pytestmark = pytest.mark.faults

WATCH = ["dist=ddp", "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1",
         "dist.heartbeat_s=1", "dist.stall_timeout_s=4", "dist.timeout_s=60"]
LIMIT_S = 25  # detection must come long before dist.timeout_s (60)


def _watch(fault_root: Path, fault_datasets: Path, name: str, failpoints: str = ""):
    log = fault_root / f"{name}.log"
    proc = start(train_args(fault_root, name, fault_datasets, *WATCH), log,
                 failpoints=failpoints)
    return proc, log


def _await_watchdog(proc, log: Path) -> tuple[float, str]:
    """Seconds until the watchdog's error appears in the log, and that error line."""
    t0 = time.monotonic()
    assert wait_for(lambda: "worldline: error: watchdog:" in log.read_text(), LIMIT_S, proc)
    took = time.monotonic() - t0
    return took, next(ln for ln in log.read_text().splitlines()
                      if "worldline: error: watchdog:" in ln)


def test_stalled_rank_is_named(fault_root, fault_datasets, reference_run) -> None:
    proc, log = _watch(fault_root, fault_datasets, "stall",
                       "stall:steps=6,rank=1,secs=600")
    try:
        assert wait_for(lambda: last_logged_step(fault_root / "stall") >= 5, 120, proc)
        took, line = _await_watchdog(proc, log)
    finally:
        kill9(proc)
    out = log.read_text()
    # rank 1 finished step 5 and stalled before step 6, where rank 0 waits for it.
    assert "rank 1 (still in step 5) stalled: it never reached step 6" in line, line
    assert "heartbeat rank 0 step" in out and "heartbeat rank 1 step" in out
    print(f"\nstall named after {took:.1f} s: {line}")


def test_frozen_rank_is_named(fault_root, fault_datasets, reference_run) -> None:
    proc, log = _watch(fault_root, fault_datasets, "frozen")
    try:
        assert wait_for(lambda: last_logged_step(fault_root / "frozen") >= 3, 120, proc)
        victim = rank_pid(proc, 1)
        psutil.Process(victim).send_signal(signal.SIGSTOP)
        took, line = _await_watchdog(proc, log)
    finally:
        kill9(proc)
    assert "rank 1 sent no heartbeat" in line and "dead or frozen" in line, line
    print(f"\nfrozen rank named after {took:.1f} s: {line}")


def test_killed_rank_is_named(fault_root, fault_datasets, reference_run) -> None:
    proc, log = _watch(fault_root, fault_datasets, "dead")
    try:
        assert wait_for(lambda: last_logged_step(fault_root / "dead") >= 3, 120, proc)
        kill9(proc, only=[rank_pid(proc, 1)])
        t0 = time.monotonic()
        proc.wait(timeout=LIMIT_S)
        took = time.monotonic() - t0
    finally:
        kill9(proc)
    out = log.read_text()
    assert proc.returncode != 0
    # torchrun's failure summary names the rank that died and how.
    assert "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, out[-3000:]
    print(f"\nall ranks down {took:.1f} s after rank 1 was killed")
