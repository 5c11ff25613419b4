"""Ulysses context parallelism: on 2 gloo ranks, the sharded DiT's outputs and gradients equal
the non-parallel DiT's (float64, full and frame-causal attention)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist


def test_context_parallel_matches_single_process(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(Path(__file__).parent / "dist_cp.py"), str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "terminate called" not in r.stderr
    report = json.loads(out.read_text())
    for mode, rep in report.items():
        assert rep["same_grad_keys"] and rep["num_grads"] > 20, (mode, rep)
        assert rep["tokens_per_rank"] * 2 == rep["tokens"]  # really sharded
        assert rep["out_max_abs_diff"] < 1e-10 * max(1.0, rep["out_max_abs"]), (mode, rep)
        assert rep["grad_max_rel_diff"] < 1e-9, (mode, rep)
