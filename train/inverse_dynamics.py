"""Train and score the inverse-dynamics model (``models/inverse_dynamics.py``).

``train_idm`` fits the IDM to real clips with their per-frame actions (random frame pairs,
seeded, deterministic on CPU); ``action_accuracy`` is the slot-matched accuracy of its
predictions on a video against the actions it is *claimed* to show. On real clips that says
how readable actions are from pixels at all; on a world model's rollout under commanded
actions it says whether the generated motion carries those actions; on real clips against
shuffled actions it is the floor the other two must clear.

Benchmark (BENCHMARKS.md)::

    python -m worldline.train.inverse_dynamics --steps 400
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from worldline.data.synthetic import HELDOUT_SEED_OFFSET, NUM_ACTIONS, SyntheticWorldConfig, render_clip
from worldline.models.inverse_dynamics import (InverseDynamics, frame_pairs, matched_accuracy,
                                               matched_loss)

__all__ = ["synthetic_clips", "train_idm", "action_accuracy", "shuffled_actions"]

Clips = Union[Mapping[str, Tensor], tuple[Tensor, Tensor], Iterable[Any]]


def synthetic_clips(world: Any, indices: Iterable[int], num_frames: int,
                    resolution: tuple[int, int] | None = None) -> dict[str, Any]:
    """Render synthetic-world clips ``indices`` of ``num_frames`` frames (any length: the
    world is procedural) as a batch: ``video`` float ``[N, 3, T, H, W]`` in [-1, 1] (resized
    to ``resolution`` as the loader would), ``actions`` long ``[N, T, S]``, ``camera`` float
    ``[N, T, 2]`` (per-frame view deltas in output pixels, row 0 zero, the loader's
    convention) and ``caption``. ``world``: a ``SyntheticWorldConfig`` or its fields."""
    fields = world if dataclasses.is_dataclass(world) else {k: world[k] for k in world}
    if dataclasses.is_dataclass(fields):
        fields = dataclasses.asdict(fields)
    cfg = SyntheticWorldConfig(**{**fields, "num_frames": int(num_frames)})
    clips = [render_clip(cfg, int(i)) for i in indices]
    video = torch.from_numpy(np.stack([c["frames"] for c in clips])).permute(0, 4, 1, 2, 3)
    video = video.float() / 127.5 - 1
    h, w = resolution or (cfg.height, cfg.width)
    if (h, w) != (cfg.height, cfg.width):
        n, c, t = video.shape[:3]
        flat = video.transpose(1, 2).reshape(n * t, c, cfg.height, cfg.width)
        flat = F.interpolate(flat, size=(h, w), mode="bilinear", antialias=True,
                             align_corners=False)
        video = flat.reshape(n, t, c, h, w).transpose(1, 2).clamp(-1, 1)
    cam = np.stack([c["camera"] for c in clips]).astype(np.float64)  # [N, T, 2] (x, y)
    deltas = np.diff(cam, axis=1, prepend=cam[:, :1]) * np.array([w / cfg.width, h / cfg.height])
    return {"video": video.contiguous(),
            "actions": torch.from_numpy(np.stack([c["actions"] for c in clips])),
            "camera": torch.from_numpy(deltas.astype(np.float32)),
            "caption": [c["caption"] for c in clips]}


def _as_clips(data: Clips, max_clips: int) -> tuple[Tensor, Tensor]:
    """(video [N, 3, T, H, W], actions [N, T, S]) from a mapping / Batch with ``video`` and
    ``actions``, a (video, actions) pair, or an iterable of either (up to ``max_clips``)."""
    def unit(v: Tensor) -> Tensor:  # a loader's uint8 frames → [-1, 1], as evaluate does
        return v.float() / 127.5 - 1 if v.dtype == torch.uint8 else v.float()

    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return unit(data[0]), data[1].long()
    if isinstance(data, Mapping) or hasattr(data, "video"):
        get = data.__getitem__ if isinstance(data, Mapping) else lambda k: getattr(data, k)
        return unit(get("video")), get("actions").long()
    vids, acts, have = [], [], 0
    for part in data:
        v, a = _as_clips(part, max_clips)
        vids.append(v.cpu())
        acts.append(a.cpu())
        have += v.shape[0]
        if have >= max_clips:
            break
    return torch.cat(vids)[:max_clips], torch.cat(acts)[:max_clips]


def train_idm(loader_or_clips: Clips, steps: int = 300, *, batch_size: int = 32,
              lr: float = 2e-3, seed: int = 0, num_actions: int = NUM_ACTIONS,
              max_clips: int = 256, width: int = 16, size: int | None = None,
              device: torch.device | str = "cpu") -> InverseDynamics:
    """Fit an :class:`InverseDynamics` to the frame pairs of real clips (``video`` in
    [-1, 1] with its per-frame ``actions``): ``steps`` Adam steps on random pairs, the
    slot-matched cross-entropy. Seeded: the same data and seed give the same weights."""
    video, actions = _as_clips(loader_or_clips, max_clips)
    before, after, targets = frame_pairs(video, actions)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        idm = InverseDynamics(actions.shape[-1], num_actions, width=width, size=size).to(device)
    opt = torch.optim.Adam(idm.parameters(), lr=lr)
    idm.train()
    for _ in range(steps):
        idx = torch.randint(0, before.shape[0], (min(batch_size, before.shape[0]),), generator=g)
        logits = idm(before[idx].to(device), after[idx].to(device))
        loss = matched_loss(logits, targets[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return idm.eval()


@torch.no_grad()
def action_accuracy(idm: InverseDynamics, frames: Tensor, actions: Tensor,
                    chunk: int = 256) -> float:
    """Slot-matched accuracy of ``idm`` on every consecutive pair of ``frames``
    ``[N, 3, T, H, W]`` (in [-1, 1]) against ``actions`` ``[N, >= T, S]`` (row ``t`` acts
    between frames ``t`` and ``t + 1``), in [0, 1]."""
    dev = next(idm.parameters()).device
    before, after, targets = frame_pairs(frames.float(), actions.long())
    hits = [matched_accuracy(idm(before[i:i + chunk].to(dev), after[i:i + chunk].to(dev)),
                             targets[i:i + chunk].to(dev)) for i in range(0, len(before), chunk)]
    return float(torch.cat(hits).mean())


def shuffled_actions(actions: Tensor, seed: int = 0) -> Tensor:
    """``actions`` ``[N, T, S]`` with the clips' rows permuted in time (seeded): the same
    action statistics, no longer the ones the frames show (the IDM's control)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([a[torch.randperm(a.shape[0], generator=g)] for a in actions])


def main(argv: list[str] | None = None) -> dict[str, float]:
    """The benchmark: train on one synthetic world, score a differently seeded one."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--train-clips", type=int, default=128)
    p.add_argument("--eval-clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sprites", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # one thread: faster for these tiny convs on a shared VM
    world = SyntheticWorldConfig(height=a.size, width=a.size, num_sprites=a.sprites)
    t0 = time.perf_counter()
    train = synthetic_clips(world, range(a.train_clips), a.frames)
    heldout = synthetic_clips(dataclasses.replace(world, seed=world.seed + HELDOUT_SEED_OFFSET),
                              range(a.eval_clips), a.frames)
    t1 = time.perf_counter()
    idm = train_idm(train, a.steps, seed=a.seed)
    t2 = time.perf_counter()
    out = {"idm_accuracy_real": action_accuracy(idm, heldout["video"], heldout["actions"]),
           "idm_accuracy_shuffled": action_accuracy(
               idm, heldout["video"], shuffled_actions(heldout["actions"], a.seed)),
           "idm_accuracy_train": action_accuracy(idm, train["video"], train["actions"]),
           "chance": 1.0 / NUM_ACTIONS, "render_s": t1 - t0, "train_s": t2 - t1,
           "score_s": time.perf_counter() - t2}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
