"""kill -9 of a 2-rank run at random points, then ``resume=auto``, six times over one run
directory: the whole job (launcher + both ranks, like a lost node) at a random step or inside
a checkpoint save, or a single rank (a crashed process; torchrun stops the other).

After every kill: the checkpoint resume=auto picks is complete (never a ``.partial``), at
most one checkpoint interval of logged steps is lost, and the next launch resumes from it.
At the end the final model, optimizer and EMA tensors equal the uninterrupted reference
run's bit for bit (CPU, deterministic), as do the logged losses.

The six kills (three inside a save, one at a random step, two of a single rank) share one
run dir (each launch resumes where the last kill left it), so the suite pays 7 launches
instead of 12; ten kills cost ~60 s more and covered no other mode.
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from faults._helpers import (
    assert_tensors_equal,
    ckpt_tensors,
    kill9,
    rank_pid,
    losses,
    run,
    start,
    train_args,
    wait_for,
)
from faults.conftest import REF_ARGS, REF_EVERY, REF_STEPS
from worldline.train.checkpoint import is_complete, latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.faults

SEEDS = range(6)
RANK_KILLS = (3, 5)  # seeds that SIGKILL a single rank (a crashed process) instead of the job
SAVE_PAUSE_S = 2.0


def launch_step(log: Path) -> int:
    """The last step one launch logged ("step N | loss ..." lines of its own output)."""
    steps = re.findall(r"\] - step (\d+) \| loss", log.read_text())
    return max(map(int, steps), default=0)


def _plan(seed: int, done: int) -> tuple[str, int]:
    """(mode, step) of one kill: even seeds die inside the save of a checkpoint step, odd
    seeds at a random training step; always ahead of the step already checkpointed."""
    rng = random.Random(seed)
    if seed in RANK_KILLS:  # one rank only; torchrun tears the other down
        return "rank", max(done, REF_EVERY) + rng.randint(1, 3 * REF_EVERY)
    if seed % 2 == 0:  # one of the next three
        return "save", done + REF_EVERY * rng.randint(1, 3)
    # From step REF_EVERY + 1 on, a checkpoint always exists to resume from.
    return "step", max(done, REF_EVERY) + rng.randint(1, 3 * REF_EVERY)


def test_kill9_at_random_points_resumes_exactly(fault_root: Path, fault_datasets: Path,
                                                reference_run: Path) -> None:
    name = "killed"
    run_dir = fault_root / name
    ckpts = run_dir / "checkpoints"
    args = train_args(fault_root, name, fault_datasets, *REF_ARGS, "resume=auto")
    report = []
    for seed in SEEDS:
        latest = latest_checkpoint(ckpts)
        done = int(latest.name.split("_")[1]) if latest else 0
        mode, step = _plan(seed, done)
        partial = ckpts / f".step_{step}.partial"
        log = fault_root / f"kill{seed}.log"
        t0 = time.time()
        proc = start(args, log, failpoints=f"save_pause:steps={step},secs={SAVE_PAUSE_S}"
                     if mode == "save" else "")
        try:
            if mode == "save":
                # The save of `step` pauses after every shard is written, before the rename:
                # the kill lands with a full-looking but unpublished checkpoint on disk.
                # (a .partial left by an earlier kill at the same step does not count)
                hit = wait_for(lambda: (partial / ".metadata").stat().st_mtime >= t0, 120, proc)
                delay = random.Random(seed).uniform(0, SAVE_PAUSE_S / 2)
            else:  # "step" / "rank": a random training step
                hit = wait_for(lambda: launch_step(log) >= step, 120, proc)
                delay = random.Random(seed).uniform(0, 0.05)
            assert hit, log.read_text()[-3000:]
            wait_for(lambda: False, delay)
            assert proc.poll() is None, f"seed {seed}: the run ended before the kill"
            if mode == "rank":
                kill9(proc, only=[rank_pid(proc, random.Random(seed).randint(0, 1))])
                assert proc.wait(timeout=60) != 0  # the launcher stops the surviving rank
        finally:
            kill9(proc)
        reached = launch_step(log)  # the last step this launch logged

        found = latest_checkpoint(ckpts)
        assert found is not None, f"seed {seed}: no checkpoint after kill at step {reached}"
        assert found.name.startswith("step_") and is_complete(found), found
        resumed_at = int(found.name.split("_")[1])
        assert reached - resumed_at <= REF_EVERY, (seed, mode, reached, resumed_at)
        if mode == "save" and partial.exists():
            # The interrupted save is never picked, whatever it holds.
            assert found != partial and resumed_at < step
        assert all(is_complete(p) for _, p in list_checkpoints(ckpts))
        report.append((seed, mode, step, reached, resumed_at))

    run(args)  # the last launch runs to the end
    final = ckpts / f"step_{REF_STEPS}"
    assert_tensors_equal(ckpt_tensors(final), ckpt_tensors(reference_run / "checkpoints" /
                                                           f"step_{REF_STEPS}"),
                         "killed+resumed vs uninterrupted")
    assert losses(run_dir) == losses(reference_run)
    assert not list(ckpts.glob(".step_*")), "leftover partial dirs after a completed save"
    print("\nseed mode  target reached resumed_from")
    for row in report:
        print("%4d %-5s %6d %7d %12d" % row)
