"""Shared fixtures. Data fixtures carry a ``data_`` prefix; imports stay inside fixtures so
collecting unrelated tests does not pay for torch/decord/PyAV."""

from __future__ import annotations

import pytest

from _slurm import slurm_env  # noqa: F401  (the local SLURM cluster, shared by slurm tests)


@pytest.fixture(autouse=True)
def _scheduling_policy_unchanged():
    """Fail a test that leaves the test process on another CPU scheduling policy: every
    later subprocess inherits it (libsvtav1 once made the whole suite SCHED_FIFO 99 and a
    later trainer starved; data/scheduling.py keep_scheduling). The policy is restored first."""
    import os

    if not hasattr(os, "sched_getscheduler"):
        yield
        return
    before = (os.sched_getscheduler(0), os.sched_getparam(0))
    yield
    after = (os.sched_getscheduler(0), os.sched_getparam(0))
    if after != before:
        os.sched_setscheduler(0, *before)
        pytest.fail(f"the test left scheduling policy {after[0]} (was {before[0]})")


@pytest.fixture(scope="session")
def data_small_cfg():
    """A small synthetic world: 6 shards x 4 clips of 9 frames at 32x32 (fast to decode)."""
    from worldline.data.synthetic import SyntheticWorldConfig

    return SyntheticWorldConfig(
        num_clips=24, clips_per_shard=4, num_frames=9, height=32, width=32, seed=3
    )


@pytest.fixture(scope="session")
def data_synthetic_dir(tmp_path_factory, data_small_cfg) -> str:
    """Directory of real mp4-in-tar shards + manifest.json for ``data_small_cfg``."""
    from worldline.data.shards import ensure_synthetic_dataset

    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data_synthetic"), data_small_cfg)


@pytest.fixture(scope="session")
def data_mixed_dir(tmp_path_factory) -> str:
    """24 clips in 6 shards with three shapes, for bucket tests: keys ``m<i>``; clip ``i``
    is 32x32 x 9 frames (i % 3 == 0), 24x40 x 9 frames (1) or 32x32 x 5 frames (2)."""
    import dataclasses

    from worldline.data.shards import write_shards
    from worldline.data.synthetic import SyntheticWorldConfig, clip_to_sample

    base = SyntheticWorldConfig(num_clips=24, num_frames=9, height=32, width=32, seed=5)
    shapes = [dict(), dict(height=24, width=40), dict(num_frames=5)]

    def samples():
        for i in range(base.num_clips):
            sample = clip_to_sample(dataclasses.replace(base, **shapes[i % 3]), i)
            yield {**sample, "__key__": f"m{i:03d}"}

    out = tmp_path_factory.mktemp("data_mixed")
    write_shards(samples(), out, samples_per_shard=4)
    return str(out)


@pytest.fixture(scope="session")
def play_model(tmp_path_factory) -> dict:
    """A tiny trained action-conditioned run + its pipeline folder (tests/_play.py)."""
    from _play import make_play_model

    return make_play_model(tmp_path_factory.mktemp("play_model"))


@pytest.fixture(scope="session")
def play_audio_model(tmp_path_factory) -> dict:
    """The same, on the world with sound and conditioned on audio (tests/_play.py)."""
    from _play import make_play_model

    return make_play_model(tmp_path_factory.mktemp("play_audio_model"), audio=True)
