"""scripts/bench_data.py runs end to end (tiny sizes) and prints its ratio lines."""

from __future__ import annotations

import re

from worldline.scripts.bench_data import main


def test_bench_data_smoke(tmp_path, capsys):
    assert main(["--root", str(tmp_path), "--clips", "4", "--size", "32", "--frames", "12",
                 "--shards", "2", "--num-frames", "4", "--batch-size", "2", "--epochs", "1",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("raw_decord", "pipeline_1w", "pipeline_2w", "pyav_naive"):
        assert re.search(rf"^{row}\s+[\d.]+\s+\d+\s+[\d.]+$", out, re.M), out
    assert re.search(r"^ratio = \d+\.\d{3}$", out, re.M) and re.search(r"^speedup_2w = \d+\.\d{3}$", out, re.M)
