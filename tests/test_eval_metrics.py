"""Evaluation building blocks: Fréchet distance, the built-in appearance statistic, the PNG
plots, and the FVD / feature-extractor paths with user TorchScript files (< 5 s)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from worldline.train.evaluate import FlowEvaluator, colour_histogram, frechet_distance
from worldline.train.plots import line_plot


def test_frechet_distance_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    b = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, b) == pytest.approx(0.0, abs=0.02)
    # Shifted mean, same covariance: ||mu1 - mu2||^2.
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    # Scaled by 2 (zero mean): tr(S1 + S2 - 2 sqrt(S1 S2)) = d * (1 + 4 - 4) per unit variance.
    assert frechet_distance(a, 2 * a) == pytest.approx(3.0 * a.var(0).mean().item(), rel=0.05)


def test_colour_histogram_tells_palettes_apart() -> None:
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 0.8
    blue = torch.zeros(1, 3, 8, 8)
    blue[:, 2] = 0.8
    h = colour_histogram(torch.cat([red, red.clone(), blue]))
    sim = h @ h.T
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(0.0)


def test_line_plot_writes_a_png(tmp_path: Path) -> None:
    p = line_plot(tmp_path / "p.png", {"model": [20.0, 18.5, 17.0], "baseline": [19, 16, 15]},
                  "rollout PSNR", "horizon", "dB")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(p).size == (640, 400)


def test_fvd_and_feature_extractor_use_user_torchscript(tmp_path: Path) -> None:
    """The FVD path with a user's TorchScript video network (a tiny stand-in for I3D weights,
    which cannot be downloaded here): real vs itself is ~0, real vs noise is large."""

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)

    path = tmp_path / "i3d.pt"
    torch.jit.script(Pool()).save(str(path))
    ev = FlowEvaluator.__new__(FlowEvaluator)  # only the FVD step, without a trainer
    g = torch.Generator().manual_seed(0)
    ev.video = torch.rand(64, 3, 5, 8, 8, generator=g) * 2 - 1
    ev.device = torch.device("cpu")
    ev.e = SimpleNamespace(i3d=str(path))
    same = ev.fvd(ev.video.clone())
    noisy = ev.fvd((ev.video + 0.5 * torch.randn(ev.video.shape, generator=g)).clamp(-1, 1))
    assert same["fvd"] == pytest.approx(0.0, abs=1e-6) and same["fvd/num_videos"] == 64
    assert noisy["fvd"] > 1e-3


def test_moving_region_psnr_catches_an_erased_small_object() -> None:
    """A textured static background with a 3 px sprite moving across it (issue 17's small
    objects). A reconstruction that erases the sprite keeps a high whole-frame PSNR; the
    moving-region PSNR exposes it. A faithful one scores high on both."""
    from worldline.models.metrics import moving_mask, moving_verdict, psnr

    g = torch.Generator().manual_seed(0)
    bg = torch.rand(1, 3, 1, 48, 48, generator=g).expand(1, 3, 9, 48, 48) * 0.4 - 0.2
    video = bg.clone()
    for t in range(9):  # a bright 3x3 sprite moving right 4 px a frame
        video[0, :, t, 20:23, 4 + 4 * t: 7 + 4 * t] = 1.0
    erased = bg + 0.01 * torch.randn(bg.shape, generator=g)  # background only, slight noise
    faithful = video + 0.01 * torch.randn(video.shape, generator=g)
    mask = moving_mask(video)
    assert mask.shape == (1, 1, 9, 48, 48) and 0 < mask.float().mean() < 0.02
    whole, moving = psnr(erased, video).item(), psnr(erased, video, mask=mask).item()
    assert whole > 24 and moving < 10  # fine overall, the object is gone
    assert psnr(faithful, video, mask=mask).item() > 35
    assert torch.isnan(psnr(bg, bg, mask=moving_mask(bg))).all()  # nothing moves: NaN
    # The verdict refuses the eraser whatever its whole-frame PSNR, and passes the faithful one.
    ok, msg = moving_verdict(whole, moving)
    assert not ok and "NOT good" in msg
    assert moving_verdict(psnr(faithful, video).item(), psnr(faithful, video, mask=mask).item())[0]
    assert not moving_verdict(40.0, float("nan"))[0]  # nothing moved: unverified, not good


def test_autoencoder_eval_refuses_an_eraser_with_high_whole_frame_psnr(caplog) -> None:
    """``AutoencoderObjective.evaluate`` on the synthetic world: an "autoencoder" that returns
    each clip perfectly except for the 2-4 px agent dots (the same clip rendered without
    them) has a high whole-frame PSNR, yet ``moving_ok`` is False, with a warning."""
    import dataclasses
    import logging

    import numpy as np

    from worldline.data.synthetic import SyntheticWorldConfig, render_clip
    from worldline.train.objectives import AutoencoderObjective

    cfg = SyntheticWorldConfig(num_frames=9, height=64, width=64)

    def video_of(c: SyntheticWorldConfig) -> torch.Tensor:
        return torch.from_numpy(np.stack([render_clip(c, i)["frames"] for i in range(2)])
                                ).permute(0, 4, 1, 2, 3)

    video = video_of(cfg)
    erased = video_of(dataclasses.replace(cfg, agents=False)).float() / 127.5 - 1
    ae_cfg = SimpleNamespace(perceptual_path=None, gan_weight=0.1, gan_start=-1,
                             moving_weight=0.0, moving_psnr_min=30.0)
    obj = AutoencoderObjective(ae_cfg, torch.device("cpu"), distributed=False)
    obj.reconstruct = lambda pipe, x: erased
    pipe = SimpleNamespace(device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="worldline.train.objectives"):
        rep = obj.evaluate(pipe, [{"video": video}], 1)
    assert rep["psnr"] > 25 and rep["psnr_moving"] < rep["psnr"] - 3  # 28.0 vs 23.2 dB
    assert rep["moving_ok"] is False and rep["psnr_moving_min"] == 30.0
    assert "NOT good" in caplog.text
    obj.reconstruct = lambda pipe, x: x  # a perfect reconstruction passes
    assert obj.evaluate(pipe, [{"video": video}], 1)["moving_ok"] is True


def test_paired_steering_passes_only_above_three_times_the_seed_noise() -> None:
    """The paired-seed verdict shared by the reference and text groups: a condition that pulls
    samples to their target passes; one that changes nothing, or moves them no more than a
    second seed does, fails."""
    from worldline.train.evaluate import _paired_steering

    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def sims(v: torch.Tensor) -> torch.Tensor:  # samples [B, D] -> similarity per clip
        return torch.nn.functional.cosine_similarity(v, target, dim=-1)

    steered, unsteered = target.clone(), torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    other = target.flip(0)
    near = target + 0.01 * torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # a second seed: close
    rep = _paired_steering("text", sims, steered, unsteered, other, near, None)
    assert rep["text/pass"] == 1.0 and rep["text/gain_over_other_text"] == pytest.approx(1.0)
    assert rep["text/noise_floor"] < 1e-3
    # The condition does nothing: with == without == other.
    rep = _paired_steering("text", sims, unsteered, unsteered, unsteered, near, None)
    assert rep["text/pass"] == 0.0 and rep["text/gain_over_no_text"] == 0.0
    # A real gain, but a second seed moves the samples as much: below 3x the floor.
    rep = _paired_steering("reference", sims, steered, unsteered, None, unsteered, None)
    assert rep["reference/pass"] == 0.0 and "reference/similarity_other_ref" not in rep


def test_text_group_measures_the_caption_with_both_controls(play_model: dict,
                                                             tmp_path: Path) -> None:
    """``eval.metrics=[text]`` on a trained checkpoint: caption vs empty prompt vs a shuffled
    caption, with the seed-to-seed noise floor, every value finite."""
    import math

    from _runs import compose_cfg, smoke_overrides
    from worldline.train.evaluate import run_eval

    root = play_model["root"]
    cfg = compose_cfg(smoke_overrides(
        root, "play", root / "_datasets", f"eval.checkpoint={play_model['run']}",
        "eval.split=train", "eval.metrics=[text]", "eval.num_steps=1", "eval.num_clips=2",
        f"eval.out={tmp_path / 'eval'}"))
    rep = run_eval(cfg)
    keys = ["text/" + k for k in ("similarity_with_text", "similarity_without_text",
                                  "similarity_other_text", "noise_floor", "gain_over_no_text",
                                  "gain_over_other_text", "pass")]
    assert set(keys) <= set(rep), sorted(set(keys) - set(rep))
    assert all(math.isfinite(rep[k]) for k in keys)
    assert rep["text/pass"] == float(min(rep["text/gain_over_no_text"],
                                         rep["text/gain_over_other_text"])
                                     >= 3 * rep["text/noise_floor"])
