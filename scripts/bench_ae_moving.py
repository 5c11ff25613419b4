"""Does an autoencoder keep the synthetic world's small moving objects? Per run dir: PSNR over
the whole frame, over the pixels that move (``psnr_moving``, as training and ``worldline-eval``
log it) and over the 2-4 px agent dots alone (``psnr_agents``), on held-out clips.

Example (2-core CPU, ~1 minute per run; raw rendered frames, no mp4 round trip)::

    python -m worldline.scripts.bench_ae_moving runs/ae-old runs/ae-new --clips 16

Clips are ``render_clip`` of the held-out world (``seed + 1000``, as ``stage.validation`` and
``worldline-eval`` use) at the run's ``data.synthetic`` settings; ``psnr_agents`` is over the
dots' boxes in every frame (the agents of ``data/synthetic.py``). Prints one JSON line per run
with ``moving_ok`` (``models/metrics.py:moving_verdict``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from worldline.data.synthetic import HELDOUT_SEED_OFFSET, SyntheticWorldConfig, render_clip
from worldline.models.metrics import moving_mask, moving_verdict, psnr
from worldline.train.pipeline import WorldPipeline


def agent_mask(clip: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """bool ``[T, H, W]``: the agent dots' boxes in view coordinates."""
    m = np.zeros(shape, bool)
    s, cam = clip["agent_size"], clip["camera"].astype(int)
    for agent in clip["agents"]:
        for t, (x, y) in enumerate(agent["positions"] - cam):
            m[t, y:y + s, x:x + s] = True
    return m


@torch.no_grad()
def measure(run: Path, clips: int, batch: int, use_ema: bool = True) -> dict:
    cfg = OmegaConf.load(run / "config.yaml")
    syn = SyntheticWorldConfig(**{**OmegaConf.to_container(cfg.data.synthetic), "agents": True})
    syn = dataclasses.replace(syn, seed=syn.seed + HELDOUT_SEED_OFFSET)
    ae = WorldPipeline.from_pretrained(run, use_ema=use_ema).autoencoder.eval()
    whole, moving, agents = [], [], []
    for start in range(0, clips, batch):
        rendered = [render_clip(syn, i) for i in range(start, min(start + batch, clips))]
        x = torch.from_numpy(np.stack([c["frames"] for c in rendered])).float() / 127.5 - 1
        x = x.permute(0, 4, 1, 2, 3).contiguous()  # [B, 3, T, H, W]
        mean, _ = ae.encode(x)
        recon = ae.decode(mean).clamp(-1, 1)
        m = torch.from_numpy(np.stack([agent_mask(c, x.shape[2:]) for c in rendered]))[:, None]
        whole.append(psnr(recon, x))
        moving.append(psnr(recon, x, mask=moving_mask(x)))
        agents.append(psnr(recon, x, mask=m))
    out = {"run": str(run), "clips": clips, "ema": use_ema, "psnr": float(torch.cat(whole).mean()),
           "psnr_moving": float(torch.cat(moving).nanmean()),
           "psnr_agents": float(torch.cat(agents).nanmean())}
    out["moving_ok"] = moving_verdict(out["psnr"], out["psnr_moving"])[0]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="autoencoder run dirs")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    for run in a.runs:
        print(json.dumps(measure(run, a.clips, a.batch, not a.no_ema)), flush=True)


if __name__ == "__main__":
    main()
