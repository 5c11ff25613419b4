"""The pixel codec (``model.autoencoder.kind=pixel``) and x-prediction (``model.dit.prediction=x``):
exact and streamable encode/decode, the velocity x-prediction implies, config rules, and a
pixel-space world model trained, saved as a pipeline folder and rolled out like any other."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _runs import compose_cfg, smoke_overrides
from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
from worldline.models.flow import X_PRED_T_MIN, interpolate, velocity_from_x0, velocity_target
from worldline.train.config import ConfigError
from worldline.train.validate import validate


def _codec(ft: int = 4, fs: int = 4) -> VideoAutoencoder:
    return VideoAutoencoder(AutoencoderArgs(kind="pixel", latent_channels=3 * ft * fs * fs,
                                            temporal_downsample=ft, spatial_downsample=fs))


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_pixel_codec_is_exact_and_streams(frames: int) -> None:
    ae = _codec()
    x = torch.rand(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == (2, 192, 1 + (frames - 1) // 4, 4, 6) and ae.num_params() == 0
    assert torch.equal(ae.decode(mean), x)  # lossless: the rearranged pixels themselves
    assert float(logvar.max()) <= -30  # a point posterior: sampling it changes nothing
    # Chunked (streaming, as worldline-play decodes) equals whole, both ways.
    assert torch.equal(ae.encode(x, chunk_frames=4)[0], mean)
    assert torch.equal(ae.decode(mean, chunk_frames=1), x)
    # Causal: latent frame i depends on pixel frames <= 4i only.
    y = x.clone()
    y[:, :, -1] = 0
    assert torch.equal(ae.encode(y)[0][:, :, :-1], mean[:, :, :-1])


def test_pixel_codec_checks_its_latent_channels() -> None:
    with pytest.raises(ValueError, match="in_channels x temporal_downsample x spatial"):
        VideoAutoencoder(AutoencoderArgs(kind="pixel", latent_channels=16))
    with pytest.raises(ValueError, match="'conv' or 'pixel'"):
        VideoAutoencoder(AutoencoderArgs(kind="pixels"))


def test_x_prediction_implies_the_flow_velocity() -> None:
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    t = torch.tensor([0.3, 0.9])
    x_t = interpolate(x0, noise, t)
    # An exact clean prediction gives the exact velocity (mask channel ignored).
    with_mask = torch.cat([x_t, torch.ones_like(x_t[:, :1])], 1)
    torch.testing.assert_close(velocity_from_x0(with_mask, t, x0), velocity_target(x0, noise))
    # Per-frame times (diffusion forcing): exact from X_PRED_T_MIN up, clipped below it.
    tf = torch.tensor([[0.0, 0.5, 1.0], [0.02, 0.2, 0.7]])
    x_tf = interpolate(x0, noise, tf)
    v = velocity_from_x0(x_tf, tf, x0)
    torch.testing.assert_close(v[:, :, 1:], velocity_target(x0, noise)[:, :, 1:])
    torch.testing.assert_close(v[:, :, 0], (x_tf[:, :, 0] - x0[:, :, 0]) / X_PRED_T_MIN)


def test_x_prediction_dit_returns_velocity_on_every_path() -> None:
    """The DiT converts its clean prediction itself, so the objective, the sampler and the
    KV-cached rollout (which call it directly) all receive a velocity."""
    import dataclasses

    from worldline.models.dit import DiTArgs, VideoDiT

    args = DiTArgs(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=0,
                   camera_dim=0, mask_channel=True, frame_causal=True)
    torch.manual_seed(0)
    v_net = VideoDiT(args)
    x_net = VideoDiT(dataclasses.replace(args, prediction="x"))
    x_net.load_state_dict(v_net.state_dict())
    x = torch.randn(2, 5, 3, 4, 4)
    t = torch.tensor([[0.0, 0.4, 0.8], [0.0, 0.1, 0.6]])
    raw = v_net(x, t, None)  # same weights: the "v" net's output is the "x" net's x0
    torch.testing.assert_close(x_net(x, t, None), velocity_from_x0(x, t, raw))
    out, kv = x_net(x, t, None, return_kv=True)
    torch.testing.assert_close(out, velocity_from_x0(x, t, raw))


@pytest.mark.parametrize("override,key", [
    (["stage=autoencoder"], "model.autoencoder.kind"),
    (["stage=pretrain", "model.autoencoder.latent_channels=48",
      "model.dit.in_channels=48"], "model.autoencoder.latent_channels"),
    (["stage=pretrain", "model.dit.prediction=eps"], "model.dit.prediction"),
])
def test_pixel_config_rules_name_the_key(override: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(["model=tiny_pixel", *override]))


def test_pixel_world_needs_no_autoencoder_run() -> None:
    validate(compose_cfg(["model=tiny_pixel", "stage=pretrain"]))
    with pytest.raises(ConfigError, match="stage.autoencoder_from"):
        validate(compose_cfg(["model=tiny", "stage=pretrain"]))


def test_pixel_quickstart_trains_saves_and_rolls_out(tmp_path: Path) -> None:
    """``worldline-quickstart model=tiny_pixel``: no autoencoder stage, a pixel-space world
    model and its action report; its pipeline folder round-trips, encode/decode stays exact
    and the KV-cached rollout runs."""
    from _runs import cli
    from worldline.train.pipeline import WorldPipeline

    r = cli("worldline-quickstart", "--world-steps", "3", "--report-clips", "1",
            "model=tiny_pixel", "experiment=smoke", f"run.root={tmp_path}", "logger=none",
            "run.threads=1", "model.dit.hidden_size=32", "model.dit.depth=1",
            "sample.num_steps=1", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "autoencoder: none (pixel space)" in r.stdout
    assert not (tmp_path / "quickstart-autoencoder").exists()
    world = tmp_path / "quickstart-world"
    assert (world / "action_report.json").is_file() and (world / "checkpoints" / "step_3").is_dir()
    pipe = WorldPipeline.from_pretrained(world)
    pipe.save_pretrained(tmp_path / "folder")
    again = WorldPipeline.from_pretrained(tmp_path / "folder")
    assert torch.equal(again.autoencoder.latent_std, pipe.autoencoder.latent_std)
    assert float(pipe.autoencoder.latent_std.min()) > 0.05  # measured, not the identity
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = again.autoencoder.encode(video)[0]
    assert torch.equal(again.autoencoder.decode(z), video)
    out = again.rollout([""], 2, first_frame=video[0, :, 0],
                        actions=torch.zeros(9, 3, dtype=torch.long), num_steps=1)
    assert out.shape == (1, 3, 9, 32, 32) and torch.isfinite(out).all()
