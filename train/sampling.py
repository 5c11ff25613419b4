"""``worldline-sample``: text, an optional first image, reference images and an action
sequence → mp4s + a contact sheet.

Modes (``sample.mode``):

* ``full``: the whole clip at once (data.num_frames frames); a first image makes it
  image-to-video (its latent is the clean prefix), references condition appearance.
* ``rollout``: the world-model rollout: starting from the first image, generate
  ``sample.rollout_frames`` latent frames one at a time with the KV cache, reading each step's
  actions/camera from ``sample.actions``.

Audio-conditioned models take ``sample.audio=<wav|flac|mp3|m4a>`` (its first seconds drive
the clip; ``sample.audio_cfg_scale`` guides it), and their mp4s carry the audio that drove
them.

Inputs not given come from the first clips of the data spec (their actions/camera/audio, and
in rollout mode their first frame)::

    worldline-sample sample.checkpoint=runs/ctl 'sample.prompts=[a red circle in a meadow]' \
        sample.first_image=first.png 'sample.refs=[ref.png]' sample.actions=actions.json \
        sample.mode=rollout sample.rollout_frames=4 sample.seed=3 sample.num_steps=8
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from worldline.train.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["load_image", "load_controls", "sample_audio", "run_sample"]


def fit_image(rgb: np.ndarray, size: tuple[int, int], max_crop: float) -> torch.Tensor:
    """uint8 [h, w, 3] → [3, H, W] at ``size`` as training clips are fitted (``data.max_crop``:
    an aspect-preserving resize, a centre crop of at most that fraction of a side, black bars
    for the rest), so a portrait first frame keeps what the model would have seen of it."""
    from worldline.data.loader import resize_center_crop

    frames, _ = resize_center_crop(rgb[None], size, max_crop)
    return frames[0].permute(2, 0, 1).contiguous()


def load_image(path: str | Path, size: tuple[int, int],
               max_crop: float | None = None) -> torch.Tensor:
    """An image file → uint8 [3, H, W] at ``size`` (:func:`fit_image`; ``max_crop`` None: the
    data default, ``data.max_crop``'s)."""
    from PIL import Image

    from worldline.data.video import DEFAULT_MAX_CROP

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no image at {p}")
    with Image.open(p) as img:
        rgb = np.array(img.convert("RGB"))
    return fit_image(rgb, size, DEFAULT_MAX_CROP if max_crop is None else max_crop)


def load_controls(path: str | Path) -> dict[str, torch.Tensor]:
    """``sample.actions``: JSON ``{"actions": [[a_slot0, ...] per frame], "camera": [[dx, dy]
    per frame]}`` (either key optional) or a ``.npy`` of actions [T, S] → tensors [T, ...]."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sample.actions: no file at {p}")
    if p.suffix == ".npy":
        return {"actions": torch.from_numpy(np.load(p)).long()}
    data = json.loads(p.read_text())
    out = {}
    if "actions" in data:
        out["actions"] = torch.tensor(data["actions"], dtype=torch.long)
        if out["actions"].dim() == 1:
            out["actions"] = out["actions"][:, None]
    if "camera" in data:
        out["camera"] = torch.tensor(data["camera"], dtype=torch.float32)
    if not out:
        raise ConfigError(f"invalid config: sample.actions: {p} has neither 'actions' nor 'camera'")
    return out


def sample_audio(cfg: DictConfig, pipe, path: Path) -> Optional[torch.Tensor]:
    """``sample.audio`` → a mono waveform [S] at the model's audio rate (None when unset);
    a config error for a model that was not trained with audio or a missing file."""
    s = cfg.sample
    if not s.audio:
        return None
    if "audio" not in pipe.conditions:
        raise ConfigError(f"invalid config: sample.audio: {path} was not trained with audio "
                          "(stage.conditions has no audio)")
    from worldline.data.audio import read_audio_control

    try:
        return torch.from_numpy(read_audio_control(s.audio, pipe.settings.audio_rate,
                                                   "sample.audio"))
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def run_sample(cfg: DictConfig) -> list[Path]:
    """Generate per ``cfg.sample`` and write the files; returns their paths."""
    from worldline.train.inference import load_for_inference, probe_batch
    from worldline.train.media import frames_sha256, save_samples, to_uint8_frames

    s = cfg.sample
    if not s.checkpoint:
        raise ConfigError("invalid config: sample.checkpoint: required (a run or checkpoint dir)")
    run = load_for_inference(cfg, s.checkpoint, s.use_ema)
    cfg = run.cfg  # the clip size and conditions the checkpoint was trained with
    pipe, path = run.pipeline, run.path
    if pipe.world_model is None:
        raise ConfigError(f"invalid config: sample.checkpoint: {path} is an autoencoder "
                          "checkpoint; sampling needs a world-model stage")
    prompts = list(s.prompts)
    n = len(prompts)
    try:
        batch = probe_batch(run, n)
    except ValueError as e:
        raise ConfigError(f"invalid config: sample.prompts: {e}") from None
    size = tuple(cfg.data.resolution)
    prefix: Optional[torch.Tensor] = None
    if s.first_image:
        img = load_image(s.first_image, size, cfg.data.max_crop).to(pipe.device)
        prefix = pipe.encode_images(img[None])[:, :, None].expand(n, -1, -1, -1, -1)
    refs: Optional[torch.Tensor] = None
    if s.refs:
        if "refs" not in pipe.conditions:
            raise ConfigError(f"invalid config: sample.refs: {path} was not trained with "
                              "reference images (stage.conditions has no refs)")
        imgs = torch.stack([load_image(r, size, cfg.data.max_crop) for r in s.refs]
                           ).to(pipe.device)
        refs = pipe.encode_images(imgs)[None].expand(n, -1, -1, -1, -1)
    ctl = load_controls(s.actions) if s.actions else {}
    audio = sample_audio(cfg, pipe, path)
    kw = dict(actions=ctl.get("actions"), camera=ctl.get("camera"), refs=refs, seed=s.seed,
              num_steps=s.num_steps, cfg_scale=s.cfg_scale,
              action_cfg_scale=s.action_cfg_scale, batch=batch, audio=audio)
    try:
        if s.mode == "rollout":
            if prefix is None:  # the data's first frames
                prefix = pipe.latents(batch)[:n, :, :1]
            videos = pipe.rollout(prompts, s.rollout_frames, context=prefix, window=s.window,
                                  sink_frames=s.sink_frames, **kw)
        else:
            videos = pipe.generate(prompts, num_frames=cfg.data.num_frames, height=size[0],
                                   width=size[1], prefix=prefix, solver=s.solver,
                                   audio_cfg_scale=s.audio_cfg_scale, **kw)
    except ValueError as e:  # controls too short, a model that cannot roll out
        raise ConfigError(f"invalid config: sample.{'actions' if s.actions else 'mode'}: "
                          f"{e}") from e
    out = Path(s.out) if s.out else path.parent.parent / "samples" / "manual"
    fps = pipe.settings.fps or 8.0
    sound = None
    if "audio" in pipe.conditions:  # the mp4s carry the audio that drove them
        src = audio if audio is not None else batch.get("audio")
        if src is not None:
            src = torch.as_tensor(src)
            src = src[None].expand(n, -1) if src.dim() == 1 else src[:n]
            sound = {"generated": src[:, : pipe.audio_samples(videos.shape[2])]}
    files = save_samples(out, {"generated": videos}, fps=fps, captions=prompts, audio=sound,
                         audio_rate=pipe.settings.audio_rate)
    (out / "sample_config.json").write_text(json.dumps({
        "checkpoint": str(path), "mode": s.mode, "seed": s.seed, "num_steps": s.num_steps,
        "cfg_scale": s.cfg_scale, "action_cfg_scale": s.action_cfg_scale,
        "audio_cfg_scale": s.audio_cfg_scale, "audio": s.audio,
        "first_image": s.first_image, "refs": list(s.refs), "actions": s.actions,
        "frames_sha256": [frames_sha256(f) for f in to_uint8_frames(videos)]}, indent=1))
    return [*files["videos"].values(), *files["images"].values()]
