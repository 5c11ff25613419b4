"""Meta-device construction under FSDP2 on 2 gloo ranks: each rank materialises only its
shards, and the sharded initial weights equal one process's eager construction bitwise (so
1-rank and N-rank runs start from the same model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist


def test_fsdp_ranks_materialise_only_their_shards(tmp_path: Path) -> None:
    out = tmp_path / "materialize.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(Path(__file__).parent / "dist_materialize.py"),
                        str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "terminate called" not in r.stderr
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    for rep in reports:
        assert rep["all_dtensor"] and rep["num_params"] > 40
        assert rep["mismatched"] == [], rep["mismatched"][:5]
        ratio = rep["local_bytes"] / (rep["total_bytes"] / 2)
        assert ratio <= 1.05, (rep["rank"], ratio)
    assert sum(r["local_bytes"] for r in reports) == reports[0]["total_bytes"]
