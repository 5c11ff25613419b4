"""Causal video autoencoder: shapes, causality, images, reproducibility, accounting, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder, autoencoder_loss

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def ae_args(name: str) -> AutoencoderArgs:
    cfg = OmegaConf.merge(
        OmegaConf.structured(AutoencoderArgs), OmegaConf.load(CONF / f"{name}.yaml").autoencoder
    )
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def tiny() -> VideoAutoencoder:
    torch.manual_seed(0)
    return VideoAutoencoder(ae_args("tiny")).eval()


def video(b=2, t=17, h=64, w=64, seed=0) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_shapes(tiny):
    x = video()
    assert tiny.latent_shape(17, 64, 64) == (4, 5, 8, 8)
    with torch.no_grad():
        recon, mean, logvar = tiny(x)
    assert mean.shape == logvar.shape == (2, 4, 5, 8, 8)
    assert recon.shape == x.shape
    assert tiny.decode(mean).shape == x.shape


def test_small_shapes_on_a_tiny_input():
    ae = VideoAutoencoder(ae_args("small")).eval()
    x = video(t=5, h=32, w=32)
    with torch.no_grad():
        recon, mean, _ = ae(x)
    assert mean.shape == (2, ae.args.latent_channels, 2, 4, 4) and recon.shape == x.shape
    assert 5e6 < ae.num_params() < 3e7


def test_bad_frame_count_has_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"\(T - 1\) % 4 == 0"):
        tiny.encode(video(t=8, h=16, w=16))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.latent_shape(5, 60, 64)


def test_image_is_a_one_frame_video(tiny):
    x = video(t=9)
    with torch.no_grad():
        mean_img, _ = tiny.encode(x[:, :, :1])
        mean_vid, _ = tiny.encode(x)
        img = tiny.decode(mean_img)
    assert mean_img.shape == (2, 4, 1, 8, 8) and img.shape == (2, 3, 1, 64, 64)
    # The first frame is encoded on its own: a video's first latent equals the image latent.
    torch.testing.assert_close(mean_vid[:, :, :1], mean_img, atol=1e-5, rtol=1e-4)


def test_encoder_and_decoder_are_causal(tiny):
    tf = tiny.args.temporal_downsample
    x = video()
    with torch.no_grad():
        mean, _ = tiny.encode(x)
        for k in (1, 6, 12, 16):
            x2 = x.clone()
            x2[:, :, k] = -x2[:, :, k]
            mean2, _ = tiny.encode(x2)
            group = (k + tf - 1) // tf  # latent frame that contains pixel frame k
            torch.testing.assert_close(mean2[:, :, :group], mean[:, :, :group], atol=0, rtol=0)
            assert not torch.allclose(mean2[:, :, group], mean[:, :, group])
        recon = tiny.decode(mean)
        for j in (1, 3):
            z2 = mean.clone()
            z2[:, :, j] += 1.0
            recon2 = tiny.decode(z2)
            first = 1 + (j - 1) * tf  # first pixel frame produced by latent frame j
            torch.testing.assert_close(recon2[:, :, :first], recon[:, :, :first], atol=0, rtol=0)
            assert not torch.allclose(recon2[:, :, first], recon[:, :, first])


def test_posterior_sampling_is_reproducible_with_a_generator(tiny):
    x = video(t=5, h=32, w=32)
    with torch.no_grad():
        r1, m1, _ = tiny(x, generator=torch.Generator().manual_seed(3))
        r2, m2, _ = tiny(x, generator=torch.Generator().manual_seed(3))
        r3, _, _ = tiny(x, generator=torch.Generator().manual_seed(4))
        r_mean, _, _ = tiny(x, sample=False)
    assert torch.equal(r1, r2) and torch.equal(m1, m2) and not torch.equal(r1, r3)
    torch.testing.assert_close(r_mean, tiny.decode(m1))


def test_latent_normalization_buffers(tiny):
    ae = VideoAutoencoder(ae_args("tiny"))
    assert {"latent_mean", "latent_std"} <= set(ae.state_dict())
    ae.latent_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    ae.latent_std.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    z = torch.randn(2, 4, 3, 4, 4)
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    torch.testing.assert_close(ae.normalize(z)[:, 1], (z[:, 1] + 1.0) / 0.5)


def test_flops_match_a_flop_counter(tiny):
    """The analytic count equals PyTorch's FLOP counter on a real forward (x3 for training)."""
    x = video(b=1, t=9, h=32, w=32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny(x, sample=False)
    assert tiny.flops_per_sample(9, 32, 32) == pytest.approx(
        3 * counter.get_total_flops(), rel=1e-6
    )
    assert tiny.flops_per_sample(17, 64, 64) > 3.5 * tiny.flops_per_sample(9, 32, 32)


def test_loss_parts_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    args = ae_args("tiny")
    ae = VideoAutoencoder(args)
    x = video(t=9, h=32, w=32)
    recon, mean, logvar = ae(x, generator=torch.Generator().manual_seed(0))
    loss, parts = autoencoder_loss(x, recon, mean, logvar, args)
    assert set(parts) == {"loss", "l1", "l2", "kl"} and all(
        torch.is_tensor(v) for v in parts.values()
    )
    torch.testing.assert_close(
        loss,
        args.l1_weight * parts["l1"] + args.l2_weight * parts["l2"] + args.kl_weight * parts["kl"],
    )
    loss.backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tiny_autoencoder_overfits_one_clip():
    torch.manual_seed(0)
    args = ae_args("tiny")
    ae = VideoAutoencoder(args)
    # A smooth moving blob: structured like real video, not white noise.
    # 5 x 16 x 16 keeps the test to seconds on 2 cores; the latent is [4, 2, 2, 2].
    t, yy, xx = torch.meshgrid(
        torch.arange(5.0), torch.arange(16.0), torch.arange(16.0), indexing="ij"
    )
    blob = torch.exp(-((xx - 4 - 2 * t) ** 2 + (yy - 8) ** 2) / 15)
    x = torch.stack([blob * 2 - 1, 0.5 - blob, torch.full_like(blob, -0.3)])[None]
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(90):
        recon, mean, logvar = ae(x, generator=g)
        loss, parts = autoencoder_loss(x, recon, mean, logvar, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(parts["l1"] + parts["l2"]))
    assert min(losses[-5:]) < 0.1 * losses[0], losses[::20]  # ~0.03 measured
