"""Optional autoencoder losses: perceptual (user-supplied network) and adversarial (3D PatchGAN).

Both are off unless asked for. The trainer wiring for the GAN (a second optimizer on the
discriminator, switched on after a warm-up step) lives in train/; this module only holds the
networks and loss functions.

    >>> perc = PerceptualLoss.from_path("/models/lpips_vgg.pt")    # TorchScript or nn.Module
    >>> disc = PatchDiscriminator3D(in_channels=3)
    >>> loss, parts = autoencoder_loss(x, recon, mean, logvar, args, perceptual=perc,
    ...                                disc_logits=disc(recon), adv_weight=0.1)
    >>> d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from worldline.models.init import reset_default_parameters

__all__ = [
    "PerceptualLoss",
    "PatchDiscriminator3D",
    "hinge_d_loss",
]


class PerceptualLoss(nn.Module):
    """Feature-space distance under a frozen image network, averaged over frames.

    `net` maps images [N, 3, H, W] in [-1, 1] to a feature tensor or a list/tuple of them
    (e.g. VGG stages, an exported LPIPS). Each feature map is unit-normalized over channels
    (as LPIPS does) and the squared differences are averaged, then summed over stages. A net
    that already returns a scalar distance per pair can set `returns_distance=True`, in which
    case it is called as net(x, y).
    """

    def __init__(self, net: nn.Module, returns_distance: bool = False) -> None:
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():  # ScriptModules lack requires_grad_()
            p.requires_grad_(False)
        self.returns_distance = returns_distance

    @classmethod
    def from_path(cls, path: str | Path, returns_distance: bool = False) -> "PerceptualLoss":
        """Load a local TorchScript file (torch.jit.save). Plain state dicts need their
        architecture: build the module, load_state_dict, and pass it to the constructor."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual network weights not found: {path}")
        # TorchScript only: a pickled nn.Module would run arbitrary code on load, and these
        # files come from outside the project (see docs/faults.md, untrusted inputs).
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a TorchScript file ({e.__class__.__name__}); export the network "
                f"with torch.jit.save(torch.jit.script(net), path), or build the module and pass "
                f"it to PerceptualLoss(net)") from None
        return cls(net, returns_distance)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.net.eval()  # frozen: batch norms etc. stay in inference mode
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y [B, 3, T, H, W] (or [B, 3, H, W]) -> scalar loss (gradient flows into x)."""
        if x.dim() == 5:
            x = x.transpose(1, 2).flatten(0, 1)
            y = y.transpose(1, 2).flatten(0, 1)
        if self.returns_distance:
            return self.net(x, y).mean()
        fx, fy = self.net(x), self.net(y.detach())
        if isinstance(fx, Tensor):
            fx, fy = [fx], [fy]
        loss = x.new_zeros((), dtype=torch.float32)
        for a, b in zip(fx, fy):
            a = a.float() / (a.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b.float() / (b.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            loss = loss + (a - b).pow(2).mean()
        return loss


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: strided Conv3d stack -> a logit per spacetime patch [B, 1, T', H', W'].

    Spatial stride 2 per layer, temporal stride 2 on the first `time_strides` layers;
    GroupNorm + LeakyReLU(0.2) as in pix2pix/VQGAN (the discriminator need not be causal).
    Params: see num_params(); ~2.8M for the defaults.
    """

    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3,
        time_strides: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, base_channels, 4, stride=(2 if time_strides else 1, 2, 2),
                      padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = base_channels
        for i in range(1, num_layers):
            out = base_channels * min(2**i, 8)
            st = 2 if i < time_strides else 1
            layers += [nn.Conv3d(ch, out, 4, stride=(st, 2, 2), padding=1, bias=False),
                       nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            ch = out
        layers += [nn.Conv3d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def init_weights(self) -> None:
        """Re-initialize every parameter from scratch, drawing from the RNG exactly as
        construction did (torch's default conv/norm init); see models/init.py."""
        reset_default_parameters(self)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] in [-1, 1] -> patch logits [B, 1, T', H', W']."""
        return self.net(x)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: mean relu(1 - D(x)) + mean relu(1 + D(G(z))), halved."""
    return 0.5 * (torch.relu(1.0 - real_logits.float()).mean()
                  + torch.relu(1.0 + fake_logits.float()).mean())
