"""Shared fixtures. Data fixtures carry a ``data_`` prefix; imports stay inside fixtures so
collecting unrelated tests does not pay for torch/decord/PyAV."""

from __future__ import annotations

import pytest


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
