"""Soak: 2,000 tiny optimizer steps, a checkpoint every 50, keeping the last 3.

The run is one real ``worldline-train`` process (the test-only tiny recipe, ~10 ms a step);
the test samples its resident memory and the checkpoint dir's size while it runs, and reads
the per-interval throughput from metrics.jsonl. Pass criteria:

- RSS grows by less than 5 % from the warmed-up level (steps 300-500) to the last 300
  steps (the end-of-run sample videos are not training memory);
- step time stays flat: the median time per step of the last 10 log intervals is within
  1.5x of intervals 3-12 (CI machines are shared; the ratio measured is printed);
- disk stays bounded: never more than keep_last + 1 checkpoints' worth (one being written),
  exactly 3 at the end, no leftover partial dirs.
"""
from __future__ import annotations

import statistics
import subprocess
import time

import psutil
import pytest

from faults._helpers import command, dir_bytes, env, metric_rows, train_args

pytestmark = pytest.mark.faults

STEPS, EVERY, KEEP = 2000, 50, 3


def test_soak_2000_steps(tmp_path, fault_datasets, reference_run) -> None:
    args = train_args(tmp_path, "soak", fault_datasets, f"train.steps={STEPS}",
                      f"train.ckpt_every={EVERY}", f"train.keep_last={KEEP}",
                      f"train.log_every={EVERY}", "dist.heartbeat_s=0")
    log = open(tmp_path / "soak.log", "w")
    proc = subprocess.Popen(command(args, nproc=1), stdout=log, stderr=subprocess.STDOUT,
                            env=env())
    ps = psutil.Process(proc.pid)
    ckpts = tmp_path / "soak" / "checkpoints"
    samples: list[tuple[int, int, int]] = []  # (last logged step, rss, checkpoint bytes)
    rows: list[dict] = []
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        rows = [r for r in metric_rows(tmp_path / "soak") if "loss" in r]
        step = rows[-1]["step"] if rows else 0
        try:
            disk = dir_bytes(ckpts) if ckpts.is_dir() else 0
        except FileNotFoundError:  # a checkpoint pruned while we walked it
            continue
        samples.append((step, rss, disk))
        time.sleep(0.25)
    assert proc.wait(timeout=600) == 0, (tmp_path / "soak.log").read_text()[-3000:]
    rows = [r for r in metric_rows(tmp_path / "soak") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(EVERY, STEPS + 1, EVERY))

    warm = [rss for s, rss, _ in samples if 300 <= s <= 500]
    # (before the last step's row: the end-of-run sampling then allocates on top)
    late = [rss for s, rss, _ in samples if STEPS - 300 <= s < STEPS]
    assert warm and late, samples[:3]
    growth = max(late) / statistics.median(warm) - 1

    # seconds per step of each log interval (batch 1, one process: 1 / samples_per_s)
    per_step = [1.0 / r["samples_per_s"] for r in rows]
    early, tail = statistics.median(per_step[2:12]), statistics.median(per_step[-10:])

    one = dir_bytes(ckpts / f"step_{STEPS}")
    peak_disk = max(d for _, _, d in samples)
    final = sorted(p.name for p in ckpts.iterdir())
    print(f"\nsoak: RSS {statistics.median(warm) / 2**20:.1f} -> {max(late) / 2**20:.1f} MiB "
          f"({100 * growth:+.2f} %), step time {1e3 * early:.1f} -> {1e3 * tail:.1f} ms "
          f"(x{tail / early:.2f}), checkpoint dir peak {peak_disk / 2**20:.2f} MiB "
          f"= {peak_disk / one:.2f} checkpoints, {len(samples)} samples")
    assert growth < 0.05, f"RSS grew {100 * growth:.1f} %"
    assert tail < 1.5 * early, (early, tail)
    assert peak_disk <= (KEEP + 1) * one * 1.05, (peak_disk, one)
    assert final == ["latest", *sorted(f"step_{s}" for s in range(STEPS - (KEEP - 1) * EVERY,
                                                                   STEPS + 1, EVERY))], final
