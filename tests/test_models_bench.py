"""scripts/bench_model.py and scripts/bench_attention.py run end to end (tiny sizes) and
report every figure they promise, in every precision."""

from __future__ import annotations

import math

from worldline.scripts import bench_attention, bench_model


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_bench_model_quick_reports_both_precisions(tmp_path):
    res = bench_model.main(["--quick", "--json", str(tmp_path / "b.json")])
    assert [s["precision"] for s in res["step"]] == ["fp32", "bf16"]
    for s in res["step"]:
        assert _finite_positive(s["mfu_vs_matmul"]) and _finite_positive(s["ratio_vs_wan"])
        assert s["params"] > 0 and s["wan_params"] > 0
    assert _finite_positive(res["rollout"]["cached_ratio"])
    assert (tmp_path / "b.json").is_file()


def test_bench_attention_quick_covers_both_kernels_and_dtypes():
    res = bench_attention.main(["--quick"])
    rows = res["crossover"]
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    assert all(_finite_positive(r["sdpa_ms"]) and _finite_positive(r["matmul_ms"]) for r in rows)
    assert res["cpu_capability"] and isinstance(res["bf16_hardware"], bool)
    causal = res["block_causal"]
    assert {r["case"] for r in causal} >= {"full sdpa", "causal dense dispatch",
                                           "causal flex eager"}
    assert all(_finite_positive(r["fwd_ms"]) for r in causal)
    # Flex has no CPU backward in torch 2.13: only the SDPA/dispatch cases time fwd+bwd.
    assert all(_finite_positive(r["fwd_bwd_ms"]) for r in causal if "flex" not in r["case"])
