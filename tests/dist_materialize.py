"""Run under ``torchrun --nproc_per_node=2``: a world model built on the meta device, sharded
by the real ``parallelize`` (dist=fsdp) and materialised by train/materialize.py. Writes, per
rank, the local parameter bytes, the model's total bytes, and whether every gathered
parameter equals one-process eager construction bitwise (argv[1]: the JSON report path)."""
from __future__ import annotations

import json
import os
import resource
import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module

import worldline.train.main  # noqa: F401  (registers the config schema)
from worldline.models.dit import DiTArgs
from worldline.models.init import build_on_meta
from worldline.models.text import TextEncoderArgs
from worldline.models.world_model import WorldModel
from worldline.train.dist import run_and_finish
from worldline.train.materialize import local_parameter_bytes, materialize
from worldline.train.parallel import ParallelDims, parallelize
from worldline.train.precision import PrecisionPolicy


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with initialize_config_module(config_module="worldline.conf", version_base=None):
        cfg = compose("config", overrides=["dist=fsdp"])
    dit = DiTArgs(in_channels=8, hidden_size=256, depth=4, num_heads=4, text_dim=128,
                  num_action_slots=2, num_actions=5, camera_dim=2, max_refs=2,
                  mask_channel=True, frame_causal=True)
    text = TextEncoderArgs(dim=128, depth=2, num_heads=4, max_len=32)
    torch.manual_seed(7)
    eager = WorldModel(dit, text)
    total = sum(p.numel() * p.element_size() for p in eager.parameters())
    dims = ParallelDims(dist.get_world_size(), rank)
    mesh = dims.build_mesh("cpu")
    model = build_on_meta(lambda: WorldModel(dit, text))
    parallelize(model, mesh, cfg.dist, PrecisionPolicy.from_config(cfg), torch.device("cpu"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(7)
    materialize(model, "cpu")
    mismatched = [n for (n, p), q in zip(model.named_parameters(), eager.parameters())
                  if not torch.equal(p.full_tensor(), q)]
    report = {"rank": rank, "local_bytes": local_parameter_bytes(model), "total_bytes": total,
              "mismatched": mismatched, "num_params": len(list(eager.parameters())),
              "all_dtensor": all(hasattr(p, "full_tensor") for p in model.parameters()),
              "rss_kb_before_materialize": rss_before}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(reports, f)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_and_finish(main)
