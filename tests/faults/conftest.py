"""Fixtures shared by the fault suite: one generated world and one uninterrupted 2-rank
reference run (the kill and save-error tests compare against it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from faults._helpers import run, train_args

# The 2-rank DDP run every recovery test compares with: 160 tiny steps (room for ten kills in
# one run dir), a checkpoint every 5.
REF_STEPS, REF_EVERY = 160, 5
REF_ARGS = ["dist=ddp", f"train.steps={REF_STEPS}", f"train.ckpt_every={REF_EVERY}",
            "train.log_every=1", "train.keep_last=3"]


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def fault_datasets(fault_root) -> Path:
    return fault_root / "_datasets"


@pytest.fixture(scope="session")
def reference_run(fault_root, fault_datasets) -> Path:
    """The uninterrupted run (also generates the shared dataset before any fault run)."""
    run(train_args(fault_root, "reference", fault_datasets, *REF_ARGS))
    return fault_root / "reference"
