"""The LR schedule (train/lr.py): warmup + cosine as a pure function of the step, and a
resume that changes ``train.steps`` continues from the learning rate it stopped at."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from _runs import compose_cfg, smoke_overrides
from worldline.train.lr import WarmupCosineLR
from worldline.train.main import run_training
from worldline.train.tracking import read_metrics

OPTIM = OmegaConf.create({"warmup_steps": 2, "min_lr_ratio": 0.1, "schedule": "cosine"})


def _sched(steps: int, optim=OPTIM) -> WarmupCosineLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupCosineLR(opt, optim, steps)


def _run(s: WarmupCosineLR, n: int) -> list[float]:
    """The lr each of the next ``n`` optimizer steps uses."""
    out = []
    for _ in range(n):
        out.append(s.optimizer.param_groups[0]["lr"])
        s.optimizer.step()
        s.step()
    return out


def test_warmup_then_cosine_to_the_floor() -> None:
    lrs = _run(_sched(10), 10)
    assert lrs[:2] == [0.5, 1.0]  # linear warmup over 2 steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] > 0.1 and math.isclose(_sched(10).factor(10), 0.1)
    assert _sched(10).factor(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_same_horizon_resume_is_exact_and_old_states_load() -> None:
    straight = _run(_sched(10), 10)
    a = _sched(10)
    head = _run(a, 4)
    state = json.loads(json.dumps(a.state_dict()))  # TrainState stores it as JSON
    b = _sched(10)
    b.optimizer.param_groups[0]["lr"] = a.optimizer.param_groups[0]["lr"]  # optimizer state
    b.load_state_dict(state)
    assert head + _run(b, 6) == straight
    # A state saved before horizons were recorded: the schedule is today's config, as before.
    old = {k: v for k, v in state.items() if k not in ("horizon", "segments", "warmup", "floor",
                                                       "kind")}
    c = _sched(20)
    c.load_state_dict(old)
    assert c.segments == [] and c.factor(4) == _sched(20).factor(4)


@pytest.mark.parametrize("stop", [4, 10])
def test_raising_the_horizon_continues_without_a_jump(stop: int) -> None:
    a = _sched(10)
    _run(a, stop)
    before = a.factor(stop)  # the lr step stop + 1 would have used
    b = _sched(30)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.factor(stop) == pytest.approx(before)
    lrs = [b.factor(s) for s in range(stop, 31)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    assert b.factor(stop + 1) < before or stop == 10  # it keeps decaying (at the floor: stays)
    # A second extension stacks; a later resume replays both segments exactly.
    _run(b, 0)
    b.last_epoch = 20
    c = _sched(50)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert len(c.segments) == 2 and c.factor(20) == pytest.approx(b.factor(20))
    assert c.factor(stop + 3) == pytest.approx(b.factor(stop + 3))


def test_a_resumed_run_with_more_steps_keeps_its_learning_rate(tmp_path: Path) -> None:
    """Real runs: 6 steps, then the same run resumed with train.steps=12. The logged lr (the
    next step's) goes on from where it was instead of jumping back up the cosine."""
    datasets = tmp_path / "datasets"
    common = ["stage=autoencoder", "train.log_every=1", "optim.warmup_steps=2",
              "train.ckpt_every=3"]
    run_training(compose_cfg(smoke_overrides(tmp_path, "r", datasets, *common, "train.steps=6")))
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step_6")
    (tmp_path / "r" / "checkpoints" / "latest").unlink()  # resume from step 3
    run_training(compose_cfg(smoke_overrides(tmp_path, "r", datasets, *common,
                                             "train.steps=12")))
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "r") if "lr" in r}
    assert sorted(lr) == list(range(1, 13))
    base = lr[2]  # end of warmup: the peak
    first = [_sched(6).factor(s) * base for s in range(1, 4)]
    assert [lr[s] for s in (1, 2, 3)] == pytest.approx(first)
    # After the resume at step 3 the lr decays from the 6-step plan's value there to the floor
    # at step 12; recomputing the 12-step plan would have jumped up to its value instead.
    top = _sched(6).factor(3)
    cont = 0.1 + (top - 0.1) * 0.5 * (1 + math.cos(math.pi * (4 - 3) / (12 - 3)))
    assert lr[4] == pytest.approx(cont * base) and lr[4] < lr[3] < _sched(12).factor(4) * base
    assert all(a > b for a, b in zip([lr[s] for s in range(3, 12)],
                                     [lr[s] for s in range(4, 13)]))
    assert lr[12] == pytest.approx(0.1 * base)
