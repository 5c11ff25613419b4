"""FlowObjective's moving-region loss weight (``stage.flow.moving_weight``)."""
from __future__ import annotations

import pytest
import torch

from _runs import compose_cfg
from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
from worldline.train.config import ConfigError
from worldline.train.objectives import FlowObjective
from worldline.train.pipeline import WorldPipeline
from worldline.train.validate import validate


def test_moving_weight_lands_on_the_latent_positions_that_move() -> None:
    """A 2x2 dot moving in pixel frames 5-8 of a still 9-frame clip: with 8x8x4 latent
    blocks only latent frame 2's blocks the dot crosses get 1 + w; all else 1."""
    stage = compose_cfg(["stage=pretrain", "stage.flow.moving_weight=9"]).stage
    pipe = WorldPipeline(VideoAutoencoder(AutoencoderArgs(
        kind="pixel", latent_channels=3 * 4 * 64, temporal_downsample=4, spatial_downsample=8)))
    video = torch.full((1, 3, 9, 32, 32), 100, dtype=torch.uint8)
    for i, f in enumerate(range(5, 9)):  # dot at x = 17 + i, y = 10: latent block (1, 2)
        video[0, :, f, 10:12, 17 + i: 19 + i] = 250
    x0 = pipe.encode_video(video)
    w = FlowObjective(stage, 0)._moving_latent_weights(pipe, video, x0)
    assert w.shape == (1, 1, 3, 4, 4)
    expected = torch.ones_like(w)
    expected[0, 0, 2, 1, 2] = 10.0
    assert torch.equal(w, expected)


def test_moving_weight_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match=r"stage\.flow\.moving_weight"):
        validate(compose_cfg(["model=tiny_pixel", "stage=pretrain",
                              "stage.flow.moving_weight=-1"]))
