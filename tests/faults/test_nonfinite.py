"""Injected NaN/inf loss and gradients (train/guard.py).

- 2 ranks under torchrun: a NaN loss on rank 1 and an inf gradient on rank 0 each skip the
  step on *both* ranks: model, optimizer (moments and step count) and EMA tensors of the
  checkpoint after the skipped step equal the one before it, bit for bit; skips are counted
  in metrics.jsonl and train_state.json and logged.
- A NaN streak of ``train.max_nonfinite_skips`` aborts with one clear line; the last
  checkpoint stays the latest and holds finite weights.
- No host sync per step: with the check at log steps only, a training step calls none of
  Tensor.item/tolist/__bool__/__float__/__int__ (only the check steps do).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faults._helpers import (
    assert_tensors_equal,
    ckpt_tensors,
    metric_rows,
    run,
    train_args,
    train_state,
)
from worldline.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.faults


def test_nonfinite_steps_are_skipped_on_every_rank(fault_root: Path, fault_datasets: Path,
                                                   reference_run: Path) -> None:
    name = "nan"
    r = run(train_args(fault_root, name, fault_datasets, "dist=ddp", "train.steps=8",
                       "train.ckpt_every=1", "train.keep_last=10", "train.log_every=1"),
            failpoints="nan_loss:steps=3,rank=1;inf_grad:steps=6,rank=0")
    ck = fault_root / name / "checkpoints"
    for bad in (3, 6):
        before, after = ckpt_tensors(ck / f"step_{bad - 1}"), ckpt_tensors(ck / f"step_{bad}")
        assert_tensors_equal(before, after, f"step {bad} (skipped) vs step {bad - 1}")
        nxt = ckpt_tensors(ck / f"step_{bad + 1}")
        moved = [k for k in after if k.startswith("model.") and not torch.equal(after[k], nxt[k])]
        assert moved, f"nothing trained at step {bad + 1}"
    rows = {row["step"]: row for row in metric_rows(fault_root / name) if "loss" in row}
    assert [s for s, row in rows.items() if row["nonfinite_frac"] == 1.0] == [3, 6]
    assert all(row["nonfinite_frac"] == 0.0 for s, row in rows.items() if s not in (3, 6))
    assert train_state(ck / "step_8")["skipped_steps"] == 2
    assert (r.stdout + r.stderr).count("skipped 1 step(s) up to step") == 4  # 2 skips, 2 ranks
    assert all(torch.isfinite(v).all() for k, v in ckpt_tensors(ck / "step_8").items()
               if k.startswith(("model.", "ema.")))


def test_nonfinite_streak_aborts_keeping_last_good_checkpoint(
        fault_root: Path, fault_datasets: Path, reference_run: Path) -> None:
    name = "nan-streak"
    r = run(train_args(fault_root, name, fault_datasets, "dist=ddp", "train.steps=40",
                       "train.ckpt_every=5", "train.log_every=5",
                       "train.max_nonfinite_skips=3"),
            failpoints="nan_loss:steps=" + ",".join(map(str, range(7, 41))), check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("worldline: aborted:")]
    assert len(lines) == 2, r.stderr[-3000:]  # one line per rank, the same text
    assert "consecutive optimizer steps had non-finite loss or gradients" in lines[0]
    assert "stopped at step 10" in lines[0] and "step_5" in lines[0]
    ck = fault_root / name / "checkpoints"
    assert latest_checkpoint(ck) == ck / "step_5" and not (ck / "step_10").exists()
    good = ckpt_tensors(ck / "step_5")
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())
    # No traceback from the ranks (torchrun still prints its own summary of the exit codes).
    assert "train/trainer.py" not in r.stderr and "train/guard.py" not in r.stderr


def test_sync_check_aborts_at_the_kth_skip(tmp_path: Path, fault_datasets: Path,
                                           reference_run: Path, monkeypatch) -> None:
    """``train.sync_nonfinite_check=true`` reads the flag every step: the abort comes exactly
    at the K-th consecutive skip (one process, in-process for speed)."""
    from faults._helpers import RECIPE
    from _runs import compose_cfg
    from worldline.train.guard import TrainingAborted
    from worldline.train.main import run_training

    monkeypatch.setenv("WORLDLINE_FAILPOINTS", "nan_loss:steps=4,5,6,7,8,9")
    cfg = compose_cfg([*RECIPE, f"run.root={tmp_path}", "run.name=s",
                       f"data.root={fault_datasets}", "train.steps=20", "train.log_every=10",
                       "train.max_nonfinite_skips=3", "train.sync_nonfinite_check=true",
                       "dist.heartbeat_s=0"])
    with pytest.raises(TrainingAborted, match=r"^3 consecutive .*stopped at step 6"):
        run_training(cfg)


def test_no_host_sync_between_check_steps(tmp_path: Path, fault_datasets: Path,
                                          reference_run: Path, monkeypatch) -> None:
    from faults._helpers import RECIPE
    from _runs import compose_cfg
    from worldline.train.build import build_trainer as make_trainer

    monkeypatch.setenv("WORLDLINE_FAILPOINTS", "nan_loss:steps=3")
    cfg = compose_cfg([*RECIPE, f"run.root={tmp_path}", "run.name=h",
                       f"data.root={fault_datasets}", "train.steps=9", "train.log_every=8",
                       "train.ckpt_every=8", "dist.heartbeat_s=0"])
    trainer = make_trainer(cfg)
    trainer._data_iter, trainer._data_wait = iter(trainer.loader), 0.0
    trainer.model.train()
    # Step 1 outside the spy: creating the DataLoader iterator draws its base seed with one
    # CPU .item() (torch's DataLoader, once per epoch; not a device sync).
    trainer.train_step()
    syncs: list[str] = []
    for meth in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _name=meth, **k):
            syncs.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, spy)
    per_step = []
    for _ in range(7):
        syncs.clear()
        trainer.train_step()
        per_step.append(len(syncs))
    monkeypatch.undo()
    # Steps 2-7: no sync, the NaN step 3 included; step 8 is a log/checkpoint step: the
    # guard reads its counters there (one .tolist()).
    assert per_step[:6] == [0] * 6, per_step
    assert per_step[6] >= 1
    assert trainer.state.skipped_steps == 1
