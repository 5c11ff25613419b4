"""Worker for tests/test_dist_cp.py (run under torchrun, 2 ranks, gloo): the Ulysses
context-parallel DiT against the same DiT without parallelism, on every rank.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_cp.py <out.json>
"""
from __future__ import annotations

import copy
import json
import sys


def main() -> int:
    import torch
    import torch.distributed as dist

    from worldline.models.dit import DiTArgs, VideoDiT
    from worldline.train.dist import init_distributed
    from worldline.train.parallel.context import apply_context_parallel

    init_distributed()
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    args = DiTArgs(in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=32,
                   num_action_slots=2, camera_dim=2, temporal_downsample=4)
    ref = VideoDiT(args).double()
    # adaLN-zero makes every block the identity at init: perturb so attention matters.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cp = copy.deepcopy(ref)
    apply_context_parallel(cp, dist.group.WORLD)
    seen = {}

    def record(mod, inputs, output) -> None:
        seen["tokens_per_rank"] = inputs[0].shape[1]

    cp.blocks[0].attn.qkv.register_forward_hook(record)
    g = torch.Generator().manual_seed(1)
    b, t = 2, 4  # 4 latent frames -> 4 token frames, 2 per rank
    x = torch.randn(b, 4, t, 8, 8, generator=g, dtype=torch.float64)
    tt = torch.rand(b, generator=g, dtype=torch.float64)
    text = torch.randn(b, 5, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[1, 3:] = False
    actions = torch.randint(0, 5, (b, 1 + (t - 1) * 4, 2), generator=g)
    camera = torch.randn(b, 1 + (t - 1) * 4, 2, generator=g, dtype=torch.float64)
    w = torch.randn(b, 4, t, 8, 8, generator=g, dtype=torch.float64)
    report = {}
    for causal in (False, True):
        outs, grads = [], []
        for model in (ref, cp):
            model.zero_grad(set_to_none=True)
            out = model(x, tt, text, mask, actions, camera, frame_causal=causal)
            (out * w).sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None})
        # CP ranks hold cp x their share of each gradient; the mean over ranks is the true one.
        for v in grads[1].values():
            dist.all_reduce(v)
            v /= world
        report[f"causal={causal}"] = {
            "out_max_abs_diff": (outs[0] - outs[1]).abs().max().item(),
            "out_max_abs": outs[0].abs().max().item(),
            "grad_max_rel_diff": max(((grads[0][n] - grads[1][n]).abs().max()
                                      / grads[0][n].abs().max().clamp_min(1e-12)).item()
                                     for n in grads[0]),
            "same_grad_keys": sorted(grads[0]) == sorted(grads[1]),
            "num_grads": len(grads[0]),
            "tokens_per_rank": seen["tokens_per_rank"],
            "tokens": 4 * 4 * 4,
        }
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    from worldline.train.dist import run_and_finish

    run_and_finish(main)
