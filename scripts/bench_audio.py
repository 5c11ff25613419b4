"""Audio conditioning: what it costs per training step and whether it steers.

1. Step cost: forward + backward of the tiny DiT (conf/model/tiny.yaml sizes, batch 4, 17
   frames at 64 px -> latents [4, 5, 8, 8], 32 text tokens) without audio, with per-frame
   modulation and with audio cross-attention, plus the log-mel front end; the three
   configurations interleaved round by round so machine noise hits them alike.
2. Steering (train/audio_steer.py): the same small pixel-space world model trained with
   modulation, with cross-attention and without audio, each measured on held-out clips with
   paired seeds, its seed noise floor and the pass threshold.

    python scripts/bench_audio.py                 # both parts (~5 min on 2 CPU cores)
    python scripts/bench_audio.py --skip-steer    # step cost only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from worldline.models.audio import LogMelFrames
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.train.audio_steer import SteerSetup, run_steering

MODES = ("off", "modulation", "cross_attn")


def _tiny(mode: str) -> VideoDiT:
    args = DiTArgs(in_channels=4, hidden_size=128, depth=4, num_heads=4, text_dim=128,
                   num_action_slots=3, camera_dim=2, mask_channel=True, frame_causal=True,
                   audio_dim=0 if mode == "off" else 32,
                   audio_mode="modulation" if mode == "off" else mode)
    torch.manual_seed(0)
    return VideoDiT(args)


def step_cost(rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Median / min ms per forward+backward step for each mode, interleaved."""
    b, frames = 4, 17
    x = torch.randn(b, 5, 5, 8, 8)
    t = torch.rand(b)
    text = torch.randn(b, 32, 128)
    actions = torch.randint(0, 5, (b, frames, 3))
    camera = torch.randn(b, frames, 2)
    front = LogMelFrames(16000, 32)
    wav = torch.randn(b, round(frames * 16000 / 8)) * 0.1
    models = {m: _tiny(m) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in (*MODES, "frontend")}
    for _ in range(rounds):
        for m in MODES:
            model = models[m]
            t0 = time.perf_counter()
            for _ in range(steps):
                kw = {}
                if m != "off":
                    feats, valid = front(wav, None, frames)
                    kw = {"audio": feats, "audio_valid": valid}
                out = model(x, t, text, None, actions, camera, **kw)
                out.square().mean().backward()
            times[m].append((time.perf_counter() - t0) / steps * 1e3)
        t0 = time.perf_counter()
        for _ in range(steps):
            front(wav, None, frames)
        times["frontend"].append((time.perf_counter() - t0) / steps * 1e3)
    out = {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in times.items()}
    for m in MODES:
        out[m]["params_M"] = sum(p.numel() for p in models[m].parameters()) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-steer", action="store_true")
    ap.add_argument("--steer-steps", type=int, default=SteerSetup.steps)
    args = ap.parse_args()
    report: dict = {"step_cost": step_cost(args.rounds, args.steps)}
    off = report["step_cost"]["off"]["median_ms"]
    print("step cost (tiny DiT, batch 4, fwd+bwd):")
    for m in MODES:
        r = report["step_cost"][m]
        print(f"  {m:11s} median {r['median_ms']:6.1f} ms  min {r['min_ms']:6.1f} ms  "
              f"x{r['median_ms'] / off:.3f}  params {r['params_M']:.3f} M")
    print(f"  log-mel front end: {report['step_cost']['frontend']['median_ms']:.1f} ms / batch")
    if not args.skip_steer:
        report["steering"] = {}
        for mode in ("modulation", "cross_attn", "none"):
            setup = SteerSetup(audio_mode=mode, steps=args.steer_steps)
            r = run_steering(setup)
            report["steering"][mode] = {k: v for k, v in r.items() if k != "setup"}
            print(f"steering [{mode}]: steer {r['steer']:.4f}  noise floor "
                  f"{r['noise_floor']:.4f}  sign accuracy {r['sign_accuracy']:.2f}  "
                  f"passed {r['passed']}  loss {r['final_loss']:.4f}  "
                  f"train {r['train_s']:.0f} s", flush=True)
        report["steer_setup"] = dataclasses.asdict(SteerSetup(steps=args.steer_steps))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
