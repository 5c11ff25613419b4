"""Per-rank parameter + gradient + optimizer-state bytes under FSDP2 and DeepSpeed ZeRO-3.

Builds the configured world model (``model=tiny`` by default), wraps it with the real backend
code from train/parallel (built on the meta device, materialised after sharding), runs one
optimizer step on random latents, and counts the bytes each
rank holds: parameters (local shards), gradients, optimizer state (Adam moments, and
DeepSpeed's fp32 master partition). Run once with 1 process and once with N; the report line
gives per-rank ÷ (1-rank total / N) — 1.0 is perfect sharding.

    python -m worldline.scripts.bench_memory --backend fsdp --out /tmp/m1.json
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m worldline.scripts.bench_memory --backend fsdp --out /tmp/m2.json
"""
from __future__ import annotations

import argparse
import json
import os


def _bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def measure(backend: str, model: str) -> dict:
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_module

    import worldline.train.main  # noqa: F401  (config schema)
    from worldline.models.world_model import WorldModel
    from worldline.train.dist import init_distributed
    from omegaconf import OmegaConf

    info = init_distributed()
    torch.set_num_threads(1)
    with initialize_config_module(config_module="worldline.conf", version_base=None):
        cfg = compose("config", overrides=[f"model={model}", f"dist={backend}",
                                           "stage.autoencoder_from=x", "logger=none"])
    m = cfg.model
    from worldline.models.init import build_on_meta
    from worldline.train.guard import NonFiniteGuard
    from worldline.train.materialize import materialize
    from worldline.train.parallel import ParallelDims, make_step_engine, parallelize
    from worldline.train.precision import PrecisionPolicy

    dims = ParallelDims(info.world_size, info.rank)
    mesh = dims.build_mesh("cpu")
    precision = PrecisionPolicy.from_config(cfg)
    # Built on the meta device and materialised after sharding, as the Trainer does.
    module = build_on_meta(lambda: WorldModel(OmegaConf.to_object(m.dit),
                                              OmegaConf.to_object(m.text)))
    params_total = sum(p.numel() for p in module.parameters())
    device = torch.device("cpu")
    torch.manual_seed(0)
    if backend == "fsdp":
        model_ = parallelize(module, mesh, cfg.dist, precision, device)
        materialize(module, device)
    else:
        model_ = parallelize(materialize(module, device), mesh, cfg.dist, precision, device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=False)
    engine = make_step_engine(model_, module, opt, cfg.dist, dims, micro_batch=2, grad_accum=1,
                              grad_clip=1.0, precision=precision)
    model_ = engine.model
    dit = m.dit
    b, t, hw = 2, 5, 8
    x = torch.randn(b, dit.in_channels + int(dit.mask_channel), t, hw, hw)
    tt = torch.rand(b)
    ids = torch.randint(0, m.text.vocab_size, (b, 16))
    mask = torch.ones(b, 16, dtype=torch.bool)
    engine.zero_grad()
    with engine.micro_step(True):
        out = model_(x, tt, ids, mask)
        engine.backward(out.float().pow(2).mean())
    engine.step(NonFiniteGuard(device, 3, False))
    if backend == "fsdp":
        p_bytes = sum(_bytes(p) for p in module.parameters())
        g_bytes = sum(_bytes(p.grad) for p in module.parameters())
        o_bytes = sum(_bytes(v) for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.numel() > 1)
    else:
        zopt = model_.optimizer
        p_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                      for p in module.parameters())
        flat = getattr(zopt, "fp32_partitioned_groups_flat", [])
        master = sum(_bytes(f) for f in flat)
        g_bytes = sum(_bytes(f.grad) for f in flat)
        o_bytes = sum(_bytes(v) for st in zopt.optimizer.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.numel() > 1)
        # The fp32 master partition is optimizer state unless it aliases the parameters.
        if flat and flat[0].data_ptr() != next(module.parameters()).ds_tensor.data_ptr():
            o_bytes += master
    row = torch.tensor([p_bytes, g_bytes, o_bytes], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(info.world_size)]
    if info.world_size > 1:
        dist.all_gather(rows, row)
    else:
        rows = [row]
    return {"backend": backend, "model": model, "world_size": info.world_size,
            "params": params_total,
            "per_rank": [dict(zip(("param_bytes", "grad_bytes", "optim_bytes"), r.tolist()))
                         for r in rows]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench_memory")
    ap.add_argument("--backend", choices=["fsdp", "deepspeed_zero3"], default="fsdp")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", help="the 1-rank JSON, to print per-rank / (total / N)")
    a = ap.parse_args(argv)

    def run() -> int:
        res = measure(a.backend, a.model)
        if a.baseline:
            base = json.load(open(a.baseline))["per_rank"][0]
            total = sum(base.values())
            n = res["world_size"]
            res["ratio_per_rank"] = [sum(r.values()) / (total / n) for r in res["per_rank"]]
            res["baseline_total_bytes"] = total
        if int(os.environ.get("RANK", 0)) == 0:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
            print(json.dumps(res))
        return 0

    from worldline.train.dist import run_and_finish

    run_and_finish(run)


if __name__ == "__main__":
    main()
