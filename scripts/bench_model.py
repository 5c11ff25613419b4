"""Model benchmarks, each figure measured side by side in one run (timings on shared machines
are noisy: compare ratios, not absolute numbers).

1. DiT fwd+bwd step time (small config) and achieved FLOP/s / this machine's matmul FLOP/s in
   the same precision (an MLP-shaped matmul probe at the model's width, same thread count).
2. fwd+bwd time / diffusers WanTransformer3DModel with the same width, depth, heads, FFN
   parameters, token count and text length (interleaved repeats, medians).
   Figures 1-2 are taken in fp32 and in bf16 autocast (what ``train.precision=bf16`` runs;
   both models under the same autocast), each precision side by side in its own loop.
3. KV-cached rollout: per-frame time at a 64-frame context / at 8 (window = context), the
   matching FLOP ratio, the uncached ratio, and a rolling window of 8 at frame 64 vs frame 8.

    python -m worldline.scripts.bench_model                 # ~3-5 min on 2 CPU cores
    python -m worldline.scripts.bench_model --quick         # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.rollout import rollout


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_flops(n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of a [2048, n] @ [n, 4n] probe (the MLP's shape) in `dtype`."""
    a, b = torch.randn(2048, n, dtype=dtype), torch.randn(n, 4 * n, dtype=dtype)
    t = min(median_time(lambda: a @ b, 1, 1) for _ in range(repeats))
    return 2 * 2048 * n * 4 * n / t


def small_dit(size: str = "small", **kw) -> VideoDiT:
    from worldline.train.config import load_model_config

    dit = load_model_config(size).dit  # the size's hidden/depth/heads: conf/model/<size>.yaml
    args = DiTArgs(**{k: dit[k] for k in ("hidden_size", "depth", "num_heads")},
                   **{"in_channels": 8, "text_dim": 256, "num_action_slots": 3,
                      "camera_dim": 2, **kw})
    torch.manual_seed(0)
    dit = VideoDiT(args)
    with torch.no_grad():  # leave the zero-init (trivially cheap, denormal-prone) regime
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return dit


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_step(batch: int, latent: tuple[int, int, int, int], text_len: int, repeats: int,
               precision: str = "fp32"):
    """Figures 1-2 in one precision: fp32, or bf16 autocast as the Trainer runs it."""
    dtype = PRECISIONS[precision]
    dit = small_dit()
    c, t, h, w = latent
    x = torch.randn(batch, c, t, h, w)
    tt = torch.rand(batch)
    text = torch.randn(batch, text_len, 256)
    t_pix = 1 + (t - 1) * 4
    acts = torch.randint(0, 5, (batch, t_pix, 3))
    cam = torch.randn(batch, t_pix, 2)

    def autocast():
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def ours():
        dit.zero_grad(set_to_none=True)
        with autocast():
            out = dit(x, tt, text, None, acts, cam)
        out.float().pow(2).mean().backward()

    a = dit.args
    wan = None
    try:
        from diffusers import WanTransformer3DModel

        hidden = dit.blocks[0].mlp.w_up.out_features  # SwiGLU: 3 matrices
        torch.manual_seed(0)
        wan = WanTransformer3DModel(
            patch_size=tuple(a.patch_size), num_attention_heads=a.num_heads,
            attention_head_dim=a.hidden_size // a.num_heads, in_channels=c, out_channels=c,
            text_dim=256, freq_dim=256, ffn_dim=3 * hidden // 2,  # GELU MLP of equal params
            num_layers=a.depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    except ImportError:
        pass

    def theirs():
        wan.zero_grad(set_to_none=True)
        with autocast():
            out = wan(x, (tt * 1000), text, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    res = {"ours_s": [], "wan_s": [], "probe": []}
    for _ in range(3):  # warm-up: oneDNN builds its bf16 kernels on first use of a shape
        ours()
        if wan is not None:
            theirs()
    for _ in range(repeats):  # interleaved: all three see the same machine load
        res["probe"].append(matmul_flops(a.hidden_size, 3, dtype))
        res["ours_s"].append(median_time(ours, 1, 0))
        if wan is not None:
            res["wan_s"].append(median_time(theirs, 1, 0))
    ours_s = statistics.median(res["ours_s"])
    flops = dit.flops_per_sample(latent, text_len) * batch
    out = {"precision": precision, "batch": batch, "latent": list(latent), "text_len": text_len,
           "tokens_per_sample": t * h * w // 4, "params": dit.num_params(),
           "flops_per_step": flops, "ours_s": ours_s, "ours_flops_per_s": flops / ours_s,
           "matmul_flops_per_s": statistics.median(res["probe"]),
           "mfu_vs_matmul": flops / ours_s / statistics.median(res["probe"])}
    if wan is not None:
        wan_s = statistics.median(res["wan_s"])
        out.update(wan_s=wan_s, wan_params=sum(p.numel() for p in wan.parameters()),
                   ratio_vs_wan=ours_s / wan_s)
    return out


def bench_rollout(hw: int, contexts: list[int], new_frames: int, steps: int, repeats: int,
                  size: str = "small"):
    dit = small_dit(size, frame_causal=True).eval()
    text = torch.randn(1, 16, 256)
    out = {"size": size, "params": sum(p.numel() for p in dit.parameters()), "latent_hw": hw,
           "tokens_per_frame": (hw // 2) ** 2, "num_steps": steps}

    def gaps(ctx: int, use_cache: bool, window: int | None) -> list[float]:
        """Wall times between consecutive finished frames of one rollout (prefill excluded)."""
        context = torch.randn(1, 8, ctx, hw, hw)
        noise = torch.randn(1, 8, new_frames, hw, hw)
        acts = torch.randint(0, 5, (1, 1 + (ctx + new_frames - 1) * 4, 3))
        stamps: list[float] = []
        rollout(dit, context, new_frames, text=text, actions=acts, noise=noise,
                num_steps=steps, window=window, use_cache=use_cache,
                on_frame=lambda i, x: stamps.append(time.perf_counter()))
        return [b - a for a, b in zip(stamps[:-1], stamps[1:])]

    lo, hi = contexts[0], contexts[-1]
    runs = {f"cached_ctx{lo}_s": (lo, True, lo), f"cached_ctx{hi}_s": (hi, True, hi),
            f"window{lo}_ctx{hi}_s": (hi, True, lo), f"uncached_ctx{lo}_s": (lo, False, None)}
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so load changes hit every configuration alike
        for k, cfg in runs.items():
            samples[k] += gaps(*cfg)
    out.update({k: statistics.median(v) for k, v in samples.items()})
    out["cached_ratio"] = out[f"cached_ctx{hi}_s"] / out[f"cached_ctx{lo}_s"]
    out["window_ratio"] = out[f"window{lo}_ctx{hi}_s"] / out[f"cached_ctx{lo}_s"]
    out["uncached_vs_cached_ctx"] = out[f"uncached_ctx{lo}_s"] / out[f"cached_ctx{lo}_s"]
    # FLOP ratio of one denoising step of one frame against a context of lo vs hi frames
    n = out["tokens_per_frame"]
    p_tok, _, _ = dit._matmul_params()
    d, depth = dit.args.hidden_size, dit.args.depth

    def step_flops(ctx):
        return 2 * p_tok * n + 4 * depth * d * n * n * (ctx + 1) + 4 * depth * d * n * 16

    out["flop_ratio"] = step_flops(hi) / step_flops(lo)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None, help="also write the results here")
    # The per-frame cost grows only through attention to cached keys, whose share of the work
    # shrinks with width; interactive world models are base-size and up, so that is the default.
    p.add_argument("--rollout-sizes", default="small,base",
                   help="comma-separated DiT sizes for the rollout figure ('' skips it)")
    p.add_argument("--skip-step", action="store_true", help="rollout figure only")
    p.add_argument("--latent", default="8,5,16,16",
                   help="C,t,h,w of the step figures' latent (default: 320 tokens)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated precisions for the step figures (fp32, bf16)")
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)  # zero-init nets: denormals cost ~20x on CPU
    torch.set_num_threads(a.threads)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, {a.threads} threads, "
                      f"torch {torch.__version__}",
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    precisions = a.precisions.split(",")
    if bad := sorted(set(precisions) - set(PRECISIONS)):
        p.error(f"--precisions: unknown {bad}; choose from {sorted(PRECISIONS)}")
    if a.quick:
        res["step"] = [bench_step(1, (8, 2, 8, 8), 8, 1, pr) for pr in precisions]
        res["rollout"] = bench_rollout(4, [2, 4], 3, 1, 1)
    else:
        if not a.skip_step:
            latent = tuple(int(v) for v in a.latent.split(","))
            res["step"] = [bench_step(1, latent, 32, 8, pr) for pr in precisions]
        res["rollout"] = [bench_rollout(8, [8, 64], 5, 4, 3, size)
                          for size in a.rollout_sizes.split(",") if size]
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
