"""Bad configs through the real CLI under torchrun (2 ranks): each fails while the config is
composed or validated — before the process group, the data or the model exist — with one
clear message per rank that names the key.

"Before any worker starts" is checked from the outside: no rank logs joining the process
group, no run dir and no dataset are created, and the launch is over within seconds.
"""
from __future__ import annotations

import time

import pytest

from faults._helpers import run, train_args

pytestmark = pytest.mark.faults

CASES = {
    # composition (Hydra + the structured schema)
    "wrong type": (["train.steps=abc"], "train.steps"),
    "unknown key": (["train.stepz=5"], "train.stepz"),
    "forced unknown key": (["+dist.zero_stage=3"], "dist.zero_stage"),
    # validate(): impossible combinations
    "ZeRO-3 without re-partitioning": (["dist=deepspeed_zero3", "dist.reshard_after_forward=false"],
                                       "dist.reshard_after_forward"),
    "bucket above the model maximum": (
        ["model.max_resolution=[16,16]", "model.max_frames=5",
         "data.buckets=[{height:16,width:16,num_frames:5,batch_size:1},"
         "{height:32,width:32,num_frames:5,batch_size:1}]"], "data.buckets[1]"),
    "watchdog slower than the collective timeout": (["dist.stall_timeout_s=900"],
                                                    "dist.stall_timeout_s"),
}


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict:
    """The cases, three launches at a time (each is a few seconds of imports; one by one they
    cost the suite ~45 s): case -> (result, seconds, its tmp dir)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: str):
        tmp = tmp_path_factory.mktemp("badcfg")
        t0 = time.monotonic()
        r = run(train_args(tmp, "bad", tmp / "_datasets", "dist=ddp", *CASES[case][0]),
                check=False, timeout=180)
        return r, time.monotonic() - t0, tmp

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(CASES, pool.map(one, CASES)))


@pytest.mark.parametrize("case", list(CASES), ids=[c.replace(" ", "-") for c in CASES])
def test_bad_config_fails_before_any_worker_starts(case: str, launches: dict) -> None:
    key = CASES[case][1]
    r, took, tmp_path = launches[case]
    datasets = tmp_path / "_datasets"
    out = r.stdout + r.stderr
    assert r.returncode != 0
    # One message per rank (torchrun may stop the second rank before it prints), each
    # naming the key: validate()'s "worldline: error: invalid config: <key>: ...", or Hydra's
    # override error during composition.
    if "worldline: error:" in r.stderr:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("worldline: error:")]
        assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, r.stderr[-3000:]
        assert f"invalid config: {key}:" in errors[0], errors[0]
    else:
        hydra_errors = [ln for ln in r.stderr.splitlines() if ln.strip() == f"full_key: {key}"]
        assert 1 <= len(hydra_errors) <= 2, r.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File \"/work" not in r.stderr
    assert "up via torchrun" not in out, "a rank joined the process group"
    # Only Hydra's own record of the launch (.hydra/, main.log) may exist: no config.yaml,
    # checkpoints or metrics of ours, and no generated dataset.
    made = {p.name for p in (tmp_path / "bad").iterdir()} if (tmp_path / "bad").exists() else set()
    assert made <= {".hydra", "main.log"}, made
    assert not datasets.exists()
    print(f"\n{case}: failed in {took:.1f} s (2 ranks, torchrun; 3 launched at a time)")
