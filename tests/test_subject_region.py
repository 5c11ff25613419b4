"""Reference similarity on the subject's region (train/subject_region.py): the sprite boxes
the synthetic world drew, a masked colour histogram, and a score that can fail."""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import torch
from omegaconf import OmegaConf

from worldline.data.synthetic import SyntheticWorldConfig, location_texture, render_clip, world_size
from worldline.train.evaluate import colour_histogram
from worldline.train.subject_region import masked_colour_histogram, sprite_masks, subject_similarity

CFG = SyntheticWorldConfig(num_clips=4, clips_per_shard=2, num_frames=9, height=32, width=32)
DATA = OmegaConf.create({"kind": "synthetic", "resolution": [32, 32], "synthetic": asdict(CFG)})


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] → [1, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def without_sprites(index: int) -> np.ndarray:
    """Clip ``index`` as rendered but with only its background (every sprite removed)."""
    clip = render_clip(CFG, index)
    h, w = world_size(CFG)
    bg = location_texture(clip["location"], h, w, CFG.seed)
    cams = np.asarray(clip["camera"]).astype(np.int64)
    return np.stack([bg[cy:cy + CFG.height, cx:cx + CFG.width] for cx, cy in cams])


def test_masks_cover_the_drawn_sprites() -> None:
    # The same clip without the agent dots (drawn from their own generator: sprites, camera and
    # location are unchanged), so every pixel that differs from the background is a sprite's.
    clip = render_clip(replace(CFG, agents=False), 1)
    masks = sprite_masks(DATA, [1], CFG.num_frames, torch.device("cpu"))[0]
    drawn = np.any(clip["frames"] != without_sprites(1), axis=-1)  # pixels a sprite changed
    assert drawn.any() and masks.numpy()[drawn].all()  # every sprite pixel is in a box
    assert masks.float().mean() < 0.5  # the boxes are the subject, not the frame


def test_masked_histogram_counts_only_the_masked_pixels() -> None:
    img = torch.full((1, 3, 4, 4), -1.0)
    img[:, :, :2] = 1.0  # top half white, bottom half black
    top = torch.zeros(1, 4, 4, dtype=torch.bool)
    top[:, :2] = True
    white = masked_colour_histogram(img, top)
    assert white.argmax() == 8**3 - 1 and (white > 0).sum() == 1
    assert masked_colour_histogram(img, torch.zeros_like(top)).abs().sum() == 0  # no subject


def test_a_clip_without_its_subject_scores_lower_on_the_region_not_on_the_frame() -> None:
    """The reference is the clip's last frame. The real clip scores high on the subject's
    region; the same clip with its sprites removed scores clearly lower there, while the
    whole-frame histogram barely tells them apart (why the region figure exists)."""
    for index in range(3):
        clip = render_clip(CFG, index)
        real, empty = to_video(clip["frames"]), to_video(without_sprites(index))
        masks = sprite_masks(DATA, [index], CFG.num_frames, torch.device("cpu"))
        ref = real[:, :, -1]
        sims = subject_similarity(ref, masks[:, -1], masks)
        s_real, s_empty = float(sims(real)), float(sims(empty))
        assert s_real > 0.8 and s_real - s_empty > 0.1, (index, s_real, s_empty)
        whole = colour_histogram(ref)

        def frame_sim(v: torch.Tensor) -> float:
            f = colour_histogram(v[0].permute(1, 0, 2, 3))
            return float(torch.nn.functional.cosine_similarity(f, whole).mean())

        assert frame_sim(real) - frame_sim(empty) < s_real - s_empty
