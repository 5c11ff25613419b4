"""Long-horizon evaluation (``eval.long_horizon.frames > 0``): does a world model trained on
short clips keep the world, and keep obeying its actions, over a long rollout?

On the eval world (the held-out synthetic world by default; the world is procedural, so
ground truth of any length exists) ``num_clips`` clips of ``1 + frames * tf`` pixel frames
are rendered, the model continues each from its first frame under the clip's own actions and
camera (KV-cached rollout with a rolling window: by default the training clip's latent
frames - 1 past frames, so attention never spans more frames than it was trained on), and
``report.json`` gets under ``long_horizon/``:

* per horizon step (latent frame 1..frames) lists: ``psnr``, ``ssim``, ``psnr_moving``
  (PSNR on the pixels that move, ``metrics.moving_mask``), the same for the copy-last-frame
  baseline in pixels (``baseline_*``) and for the last context frame through the same
  autoencoder (``ae_baseline_*``: encode-decode, i.e. what a model that stops the world
  would score at best), and ``drift``;
* ``drift``: per horizon step, mean over clips and channels of ``|mu_gen - mu_gt| +
  |sigma_gen - sigma_gt|`` of the frames' pixel statistics ([-1, 1] units). It does not ask
  for pixel alignment, so it isolates slow degradation (colour shift, fading to grey,
  saturation) from the expected loss of exact positions; ``drift_slope`` and ``psnr_slope``
  are least-squares slopes over the horizon (per latent frame);
* action accuracy by inverse dynamics (train/inverse_dynamics.py): an IDM trained on the
  training world's clips scores ``idm_accuracy_real`` (the held-out clips with their actions:
  how readable actions are at all), ``idm_accuracy_rollout`` (the rollouts under the actions
  they were commanded), ``idm_accuracy_ratio`` (rollout / real; 1 = the rollout shows its
  actions as legibly as reality), ``idm_accuracy_shuffled`` (real clips against their
  actions shuffled in time: the floor) and ``idm_chance`` (1 / num_actions).

Other data kinds report ``long_horizon/skipped`` (no ground truth beyond the clip length).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from worldline.models.metrics import moving_mask, psnr, ssim
from worldline.train.inverse_dynamics import (action_accuracy, shuffled_actions,
                                              synthetic_clips, train_idm)

log = logging.getLogger(__name__)

__all__ = ["long_horizon_metrics", "horizon_metrics", "slope"]


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against 1, 2, ... (NaN entries skipped; NaN when
    fewer than two remain)."""
    pts = [(i + 1.0, v) for i, v in enumerate(values) if v == v]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _drift(g: torch.Tensor, y: torch.Tensor) -> float:
    dims = (2, 3, 4)  # per clip and channel, over the step's frames and pixels
    return float(((g.mean(dims) - y.mean(dims)).abs() + (g.std(dims) - y.std(dims)).abs()).mean())


@torch.no_grad()
def horizon_metrics(gen: torch.Tensor, gt: torch.Tensor, ae_first: torch.Tensor,
                    tf: int) -> dict[str, Any]:
    """Per-horizon-step metrics of ``gen`` against ``gt`` (both ``[N, 3, 1 + F * tf, H, W]``
    in [-1, 1], frame 0 the context) and the two baselines: ``gt``'s frame 0 repeated, and
    ``ae_first`` (``[N, 3, 1, H, W]``: frame 0 through the autoencoder) repeated. Lists of
    length F, plus slopes (no prefix)."""
    n_steps = (gt.shape[2] - 1) // tf
    moving = moving_mask(gt)
    copies = {"": gen, "baseline_": gt[:, :, :1], "ae_baseline_": ae_first}
    out: dict[str, Any] = {f"{p}{k}": [] for p in copies for k in ("psnr", "ssim", "psnr_moving")}
    out["drift"] = []
    for k in range(1, n_steps + 1):
        frames = list(range(1 + (k - 1) * tf, 1 + k * tf))
        y, m = gt[:, :, frames], moving[:, :, frames]
        for p, v in copies.items():
            g = v[:, :, frames] if v.shape[2] > 1 else v.expand_as(y)
            out[f"{p}psnr"].append(float(psnr(g, y).mean()))
            out[f"{p}ssim"].append(float(ssim(g, y).mean()))
            out[f"{p}psnr_moving"].append(float(psnr(g, y, mask=m).nanmean()))
        out["drift"].append(_drift(gen[:, :, frames].float(), y.float()))
    for k in ("psnr", "baseline_psnr", "ae_baseline_psnr", "drift"):
        out[f"{k}_slope"] = slope(out[k])
    return out


def _train_latent_frames(run: Any, tf: int) -> int:
    return 1 + (int(run.cfg.data.num_frames) - 1) // tf


@torch.no_grad()
def _rollout(ev: Any, clips: dict[str, Any], frames: int, window: int) -> tuple[torch.Tensor, ...]:
    pipe = ev.pipe
    video = clips["video"].to(ev.device)
    ctx = pipe.encode_images(video[:, :, 0])[:, :, None]
    gen = pipe.rollout(list(clips["caption"]), frames, context=ctx, actions=clips["actions"],
                       camera=clips["camera"], window=window, num_steps=int(ev.e.num_steps),
                       seed=0)
    return gen.float(), video, pipe.decode(ctx).float()


def long_horizon_metrics(ev: Any) -> dict[str, Any]:
    """The ``long_horizon/*`` report entries (module docstring) for a ``FlowEvaluator``
    ``ev`` whose ``e.long_horizon.frames`` > 0."""
    lc, run, pipe = ev.e.long_horizon, ev.run, ev.pipe
    dit = pipe.transformer
    if ev.data.kind != "synthetic":
        return {"long_horizon/skipped": "needs the synthetic world (ground truth of any length)"}
    if not (dit.args.frame_causal and dit.args.patch_size[0] == 1):
        return {"long_horizon/skipped": "needs a block-causal model (KV-cached rollout)"}
    tf, frames = int(dit.args.temporal_downsample), int(lc.frames)
    window = int(lc.window) if lc.window is not None else max(1, _train_latent_frames(run, tf) - 1)
    res = tuple(int(r) for r in ev.data.resolution)
    clips = synthetic_clips(ev.data.synthetic, range(int(lc.num_clips)), 1 + frames * tf, res)
    gen, video, ae_first = _rollout(ev, clips, frames, window)
    # "clips", not "num_clips": every rank renders the same clips (no sum over ranks).
    out: dict[str, Any] = {"frames": frames, "window": window, "clips": int(lc.num_clips)}
    out.update(horizon_metrics(gen, video, ae_first, tf))
    acts = clips["actions"]
    if "actions" in pipe.conditions and acts.shape[-1] > 0:
        # The IDM learns from the training world (the model's own data); indices after the
        # scored clips', so that with eval.split=train it never trains on the clips it scores.
        n = int(lc.num_clips)
        train = synthetic_clips(run.cfg.data.synthetic, range(n, n + int(lc.idm_train_clips)),
                                int(run.cfg.data.num_frames), res)
        idm = train_idm(train, int(lc.idm_steps), num_actions=int(dit.args.num_actions),
                        seed=0, device=ev.device)
        real = action_accuracy(idm, video, acts)
        rolled = action_accuracy(idm, gen, acts)
        out.update(idm_accuracy_real=real, idm_accuracy_rollout=rolled,
                   idm_accuracy_ratio=rolled / max(real, 1e-12),
                   idm_accuracy_shuffled=action_accuracy(idm, video, shuffled_actions(acts)),
                   idm_chance=1.0 / int(dit.args.num_actions), idm_steps=int(lc.idm_steps))
    log.info("long horizon: %d latent frames (window %d), PSNR slope %.3g dB/frame, drift "
             "slope %.3g", frames, window, out["psnr_slope"], out["drift_slope"])
    return {f"long_horizon/{k}": v for k, v in out.items()}
