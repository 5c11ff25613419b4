"""Does an audio-conditioned world model move what it hears? A measurement that can fail.

The synthetic world with sound (``data.synthetic.audio=true``) gives every sprite its own
tone, sounding while the sprite moves. Here each clip has two sprites and exactly one of them
moves (a random direction, held for the clip); the soundtrack is that sprite's tone. A small
DiT learns these clips image-to-video (the first frame clean, the rest generated) with the
audio front end and audio conditioning the training stages use (``models/audio.py``, the
DiT's ``audio`` input). It works on pixels (3 channels, no autoencoder, one latent frame per
pixel frame): the question is the conditioning path, and that keeps it to CPU seconds.

Steering, per held-out clip, with paired seeds: generate from the first frame once with the
mover's tone and once with the other sprite's tone (same on/off pattern). ``E(v, k)`` is how
much sprite k's first-frame box changes over the clip (a sprite that leaves its box changes
it; a static one does not). ``steer = [E(a,A) - E(a,B)] - [E(b,A) - E(b,B)]`` is positive
when the sound moves the sprite it belongs to. Its noise floor is the same difference between
two seeds under the same sound. A model without audio gives steer = 0 exactly (paired
seeds); the pass threshold (``passed``) asks for a mean steer above ``z`` standard errors of
the seed noise and the right sign on at least ``min_accuracy`` of the clips.

``scripts/bench_audio.py`` runs it for both audio modes and without audio;
``tests/test_audio_steer.py`` runs a smaller version.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from worldline.data.synthetic import SyntheticWorldConfig, render_audio, render_clip, tone_of
from worldline.models.audio import LogMelFrames
from worldline.models.dit import DiTArgs, VideoDiT
from worldline.models.flow import (euler_sample, flow_loss, interpolate, sample_timesteps,
                                   velocity_target)
from worldline.train.tasks import clean_prefix_inputs

__all__ = ["SteerSetup", "sound_world", "train_steer_model", "steering", "run_steering"]


@dataclass
class SteerSetup:
    """Sizes of the experiment (the benchmark's and the test's: ~1 min of training on 2 CPU
    cores)."""

    size: int = 16  # frame height = width (pixels)
    frames: int = 5
    train_clips: int = 256
    eval_clips: int = 24
    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-3
    hidden: int = 64
    depth: int = 2
    heads: int = 4
    n_mels: int = 32
    audio_mode: str = "modulation"  # or "cross_attn"; "none": the unconditioned control
    direction: int = 0  # the mover's action (1-4: up/down/left/right); 0: random per clip
    # Only clips whose two sprites have these colours (each colour has its own tone); empty:
    # any colours (8 tone-colour pairs to learn instead of 2: much longer training).
    colours: tuple[str, ...] = ("red", "blue")
    sample_steps: int = 8
    seed: int = 0
    z: float = 3.0  # pass: mean steer > z standard errors of the seed noise
    min_accuracy: float = 0.75

    def world(self) -> SyntheticWorldConfig:
        # No agent dots: at 16 px a 2 px dot moving with the sounding sprite is a second mover
        # inside the boxes this experiment compares (and its benchmark predates them).
        return SyntheticWorldConfig(num_frames=self.frames, height=self.size, width=self.size,
                                    num_sprites=2, audio=True, agents=False)


def _clip(cfg: SyntheticWorldConfig, index: int, direction: int,
          colours: list[str]) -> Optional[dict[str, Any]]:
    """Clip ``index``: one random sprite moves (``direction``, or a random one), the other
    stays; None when its sprites are not of ``colours`` (sorted; empty: any). Rendered
    silent, its sound made only for kept clips (the tones cost more than the pictures)."""
    rng = np.random.default_rng([cfg.seed, index, 31])
    mover = int(rng.integers(2))
    actions = np.zeros((cfg.num_frames, 2), np.int64)
    drawn = int(rng.integers(1, 5))  # up/down/left/right, held
    actions[:, mover] = direction or drawn
    clip = render_clip(dataclasses.replace(cfg, audio=False), index, actions=actions,
                       pan="static")
    if colours and sorted(s["colour"] for s in clip["sprites"]) != colours:
        return None
    tones = [tone_of(s["colour"]) for s in clip["sprites"]]
    moving = np.zeros((cfg.num_frames, 2), bool)
    moving[1:] = np.any(np.diff(np.stack([s["positions"] for s in clip["sprites"]], 1), axis=0)
                        != 0, axis=-1)
    swapped = moving[:, ::-1]
    size = clip["sprite_size"]
    boxes = [(p[0] - clip["camera"][0]).astype(int).tolist() for p in
             (s["positions"] for s in clip["sprites"])]
    return {"frames": clip["frames"], "audio": render_audio(cfg, moving, tones),
            "swapped": render_audio(cfg, swapped, tones), "mover": mover,
            "boxes": [(x, y, size) for x, y in boxes]}


def sound_world(setup: SteerSetup, start: int, n: int) -> dict[str, Any]:
    """``n`` clips from index ``start`` on (of ``setup.colours``): video [n, 3, T, H, W] in [-1, 1], audio and swapped audio
    [n, S], the moving sprite's index [n] and both sprites' first-frame boxes."""
    cfg = setup.world()
    clips, index = [], start
    want = sorted(setup.colours)
    while len(clips) < n:
        clip = _clip(cfg, index, setup.direction, want)
        index += 1
        if clip is not None:
            clips.append(clip)
    video = torch.from_numpy(np.stack([c["frames"] for c in clips])).permute(0, 4, 1, 2, 3)
    return {"video": video.float() / 127.5 - 1.0,
            "audio": torch.from_numpy(np.stack([c["audio"] for c in clips])),
            "swapped": torch.from_numpy(np.stack([c["swapped"] for c in clips])),
            "mover": torch.tensor([c["mover"] for c in clips]),
            "boxes": [c["boxes"] for c in clips], "rate": cfg.audio_rate}


def _dit(setup: SteerSetup) -> VideoDiT:
    audio = setup.audio_mode != "none"
    args = DiTArgs(in_channels=3, patch_size=[1, 2, 2], hidden_size=setup.hidden,
                   depth=setup.depth, num_heads=setup.heads, text_dim=0, camera_dim=0,
                   temporal_downsample=1, mask_channel=True, frame_causal=False,
                   audio_dim=setup.n_mels if audio else 0,
                   audio_mode=setup.audio_mode if audio else "modulation")
    torch.manual_seed(setup.seed)
    return VideoDiT(args)


def _velocity(dit: VideoDiT, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              feats: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The DiT on x with latent frame 0 clean (image-to-video)."""
    one = torch.ones(x.shape[0], dtype=torch.long)
    x_in, t_in, _ = clean_prefix_inputs(x0, x, t, one, True)
    kw = {} if feats is None else {"audio": feats[0], "audio_valid": feats[1]}
    return dit(x_in, t_in, **kw)


def train_steer_model(setup: SteerSetup, data: dict[str, Any]) -> tuple[VideoDiT, dict]:
    """Train the DiT on ``data`` (from :func:`sound_world`); returns it and timings."""
    dit = _dit(setup)
    front = LogMelFrames(data["rate"], setup.n_mels)
    opt = torch.optim.AdamW(dit.parameters(), lr=setup.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(setup.seed)
    n = len(data["video"])
    t0 = time.perf_counter()
    losses = []
    for step in range(setup.steps):
        idx = torch.randint(0, n, (setup.batch_size,), generator=g)
        x0 = data["video"][idx]
        feats = None
        if setup.audio_mode != "none":
            feats = front(data["audio"][idx], None, setup.frames)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_timesteps(len(idx), generator=g)
        one = torch.ones(len(idx), dtype=torch.long)
        x_in, t_in, mask = clean_prefix_inputs(x0, interpolate(x0, noise, t), t, one, True)
        kw = {} if feats is None else {"audio": feats[0], "audio_valid": feats[1]}
        lr = setup.lr * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = flow_loss(dit(x_in, t_in, **kw), velocity_target(x0, noise), mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dit.eval()
    return dit, {"train_s": time.perf_counter() - t0,
                 "final_loss": float(np.mean(losses[-20:]))}


def _box_change(video: torch.Tensor, boxes: list[list[tuple[int, int, int]]],
                k: torch.Tensor) -> torch.Tensor:
    """Per clip: mean |frame_t - frame_0| over frames 1.. inside sprite k's first-frame box."""
    out = []
    for i, v in enumerate(video):
        x, y, s = boxes[i][int(k[i])]
        h, w = v.shape[-2:]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, w), min(y + s, h)
        if x0 >= x1 or y0 >= y1:
            out.append(torch.tensor(0.0))
            continue
        patch = v[:, :, y0:y1, x0:x1]
        out.append((patch[:, 1:] - patch[:, :1]).abs().mean())
    return torch.stack(out)


@torch.no_grad()
def _generate(dit: VideoDiT, first: torch.Tensor, feats, steps: int, seed: int) -> torch.Tensor:
    x0 = torch.zeros_like(first)
    x0[:, :, :1] = first[:, :, :1]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(first.shape, generator=g)
    z = euler_sample(lambda x, t: _velocity(dit, x0, x, t, feats), noise, steps)
    z[:, :, :1] = first[:, :, :1]
    return z.clamp(-1, 1)


@torch.no_grad()
def steering(dit: VideoDiT, setup: SteerSetup, data: dict[str, Any]) -> dict[str, float]:
    """The steering report (module docstring) on held-out ``data``."""
    front = LogMelFrames(data["rate"], setup.n_mels)
    audio_on = setup.audio_mode != "none"
    feats = {k: front(data[k], None, setup.frames) if audio_on else None
             for k in ("audio", "swapped")}
    mover, other = data["mover"], 1 - data["mover"]
    video, boxes = data["video"], data["boxes"]

    def gap(v: torch.Tensor) -> torch.Tensor:  # motion at the mover's box minus the other's
        return _box_change(v, boxes, mover) - _box_change(v, boxes, other)

    s = setup.seed + 7
    a1 = _generate(dit, video, feats["audio"], setup.sample_steps, s)
    b1 = _generate(dit, video, feats["swapped"], setup.sample_steps, s)
    a2 = _generate(dit, video, feats["audio"], setup.sample_steps, s + 1)
    steer = gap(a1) - gap(b1)
    noise = gap(a1) - gap(a2)
    floor = float(noise.std()) if len(noise) > 1 else float(noise.abs().mean())
    se = floor / max(len(steer), 1) ** 0.5
    mean, acc = float(steer.mean()), float((steer > 0).float().mean())
    return {"steer": mean, "noise_floor": floor, "steer_over_noise": mean / max(floor, 1e-8),
            "sign_accuracy": acc, "real_gap": float(gap(video).mean()),
            "generated_gap_true_audio": float(gap(a1).mean()),
            "generated_gap_swapped_audio": float(gap(b1).mean()),
            "passed": bool(mean > setup.z * se and acc >= setup.min_accuracy)}


def run_steering(setup: SteerSetup) -> dict[str, Any]:
    """Build the world, train, measure: the report plus timings and the setup."""
    train = sound_world(setup, 0, setup.train_clips)
    held = sound_world(setup, 100_000, setup.eval_clips)
    dit, info = train_steer_model(setup, train)
    return {**steering(dit, setup, held), **info, "setup": dataclasses.asdict(setup)}
