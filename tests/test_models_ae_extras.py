"""Chunked/tiled autoencoding, perceptual and GAN losses, PSNR/SSIM."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldline.models.autoencoder import (
    AutoencoderArgs,
    VideoAutoencoder,
    _tiled,
    autoencoder_loss,
)
from worldline.models.losses import (
    PatchDiscriminator3D,
    PerceptualLoss,
    hinge_d_loss,
)
from worldline.models.metrics import psnr, ssim

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def ae():
    torch.manual_seed(0)
    return VideoAutoencoder(AutoencoderArgs(base_channels=8)).eval()


def test_chunked_encode_decode_equal_full(ae):
    x = torch.rand(1, 3, 21, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = ae.encode(x)
        for chunk in (4, 8):
            m, lv = ae.encode(x, chunk_frames=chunk)
            torch.testing.assert_close(m, mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lv, logvar, atol=1e-5, rtol=1e-5)
        full = ae.decode(mean)
        for chunk in (1, 2):
            torch.testing.assert_close(ae.decode(mean, chunk_frames=chunk), full,
                                       atol=1e-5, rtol=1e-5)
    # state does not leak: a later whole-video call is unaffected
    assert all(getattr(m, "_stream", None) is None for m in ae.modules())


def test_tiling_blends_exactly_for_local_maps_and_approximates_the_ae(ae):
    x = torch.randn(1, 3, 2, 40, 56)
    pool = lambda v: F.avg_pool3d(v, (1, 8, 8))  # noqa: E731 - a strictly local map
    torch.testing.assert_close(_tiled(pool, x, 24, 8, 1 / 8, 3), pool(x))
    up = lambda v: v.repeat_interleave(8, -1).repeat_interleave(8, -2)  # noqa: E731
    z = torch.randn(1, 4, 2, 5, 7)
    torch.testing.assert_close(_tiled(up, z, 3, 1, 8, 4), up(z))
    vid = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, _ = ae.encode(vid)
        torch.testing.assert_close(ae.encode(vid, tile_size=64)[0], mean)  # one tile = full
        tiled, _ = ae.encode(vid, tile_size=48, tile_overlap=16)
        assert (tiled - mean).abs().mean() < 0.25 * mean.abs().mean()
        rec = ae.decode(mean)
        rec_t = ae.decode(mean, tile_size=6, tile_overlap=2)
        assert rec_t.shape == rec.shape
        assert (rec_t - rec).abs().mean() < 0.25 * rec.abs().mean()


def test_perceptual_loss_from_a_local_torchscript(tmp_path, ae):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    path = tmp_path / "feat.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    perc = PerceptualLoss.from_path(path)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    assert perc(x, x).item() == pytest.approx(0.0, abs=1e-8)
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    loss = perc(y, x)
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in perc.parameters())
    torch.save(net, tmp_path / "mod.pt")  # a pickled module: refused, never unpickled
    with pytest.raises(ValueError, match="not a TorchScript file"):
        PerceptualLoss.from_path(tmp_path / "mod.pt")
    args = AutoencoderArgs(base_channels=8, perceptual_weight=0.5)
    mean = logvar = torch.zeros(2, 4, 2, 2, 2)
    total, parts = autoencoder_loss(x, y, mean, logvar, args, perceptual=perc)
    plain, _ = autoencoder_loss(x, y, mean, logvar, args)
    torch.testing.assert_close(total, plain + 0.5 * parts["perceptual"])


def test_patch_discriminator_and_hinge_losses():
    disc = PatchDiscriminator3D(3, base_channels=8, num_layers=2)
    x = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    logits = disc(x)
    assert logits.dim() == 5 and logits.shape[:2] == (2, 1)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    # one D step then one G step (what the trainer does after the warm-up)
    opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    fake = (x + 0.5).clamp(-1, 1).requires_grad_(True)
    d_loss = hinge_d_loss(disc(x), disc(fake.detach()))
    d_loss.backward()
    opt.step()
    args = AutoencoderArgs()
    z = torch.zeros(2, 4, 2, 4, 4)
    loss, parts = autoencoder_loss(x, fake, z, z, args, disc_logits=disc(fake), adv_weight=0.1)
    loss.backward()
    assert "g_adv" in parts and fake.grad.abs().sum() > 0


def test_psnr_and_ssim_sanity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 32, 32, generator=g) * 2 - 1
    assert torch.all(psnr(x, x) > 90) and torch.allclose(ssim(x, x), torch.ones(2))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    noisier = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.all(psnr(noisy, x) > psnr(noisier, x))
    assert torch.all(ssim(noisy, x) > ssim(noisier, x))
    # MSE 0.01 on range 2 -> 10 log10(4 / 0.01) = 26.02 dB
    assert psnr(x + 0.1, x)[0].item() == pytest.approx(26.0206, abs=1e-3)
    assert ssim(x, -x).mean() < 0.1
    img = x[:, :, 0]  # images work too
    assert ssim(img, img).shape == (2,)


def test_moving_weighted_loss_emphasises_the_pixels_that_move():
    """``moving_weight``: an error on a moving 3 px object costs 1 + moving_weight times an
    equal error on the static background; the logged l1/l2 stay unweighted."""
    from worldline.models.ae_losses import moving_weights

    video = torch.zeros(1, 3, 5, 16, 16)
    for t in range(5):
        video[0, :, t, 6:9, 2 + 3 * t: 5 + 3 * t] = 1.0
    w = moving_weights(video, 9.0, dilate=0)
    assert w.shape == (1, 1, 5, 16, 16) and set(w.unique().tolist()) == {1.0, 10.0}
    assert (moving_weights(video, 9.0, dilate=1) > 1).sum() > (w > 1).sum()  # grown by 1 px
    args = AutoencoderArgs(kl_weight=0.0)
    zeros = torch.zeros(1, 4, 2, 2, 2)
    on_object = video.clone()
    on_object[0, :, 2, 7, 2 + 3 * 2] -= 0.5  # a pixel of the object at frame 2
    on_background = video.clone()
    on_background[0, :, 2, 0, 0] -= 0.5
    for kw in ({}, {"moving_weight": 9.0, "moving_dilate": 0}):
        a, pa = autoencoder_loss(video, on_object, zeros, zeros, args, **kw)
        b, pb = autoencoder_loss(video, on_background, zeros, zeros, args, **kw)
        assert pa["l1"] == pytest.approx(pb["l1"].item())  # logged: unweighted
        assert a.item() == pytest.approx(b.item() * (10.0 if kw else 1.0), rel=1e-5)
