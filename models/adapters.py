"""Adapters for pretrained components loaded from **local folders** (never downloaded here):

* `DiffusersVideoVAE`: a diffusers video VAE (e.g. `AutoencoderKLWan`) behind our
  autoencoder interface (encode / decode / normalize / denormalize / latent_shape);
* `HFTextEncoder`: a frozen transformers text encoder (T5 / UMT5 / CLIP text / any AutoModel)
  with its tokenizer, returning cacheable features [B, L, D] + mask for `WorldModel`
  (`text_emb=`).

diffusers and transformers are optional (the `hf` extra); they are imported on use.

    >>> vae = DiffusersVideoVAE.from_pretrained("/ckpt/Wan2.1-VAE")         # local folder
    >>> z = vae.normalize(vae.encode(video)[0])                            # [B, 16, t, h, w]
    >>> enc = HFTextEncoder.from_pretrained("/ckpt/umt5-xxl", max_len=226)
    >>> emb, mask = enc(["a red ball rolls left"])                          # cache these
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["DiffusersVideoVAE", "HFTextEncoder"]


def _local_dir(path: str | Path) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"expected a local model folder, got {path!r}")
    return str(p)


class DiffusersVideoVAE(nn.Module):
    """A frozen diffusers video VAE with the VideoAutoencoder interface.

    Latent statistics (per-channel mean/std used by normalize) come from, in order: the
    `latents_mean`/`latents_std` arguments, the diffusers config (Wan has them), or 0/1.
    Compression factors come from the config (`scale_factor_temporal/spatial`) or arguments.
    """

    def __init__(
        self,
        vae: nn.Module,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        temporal_downsample: int | None = None,
        spatial_downsample: int | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = getattr(vae, "config", {})
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        c = get("z_dim", None) or get("latent_channels", None)
        mean = latents_mean if latents_mean is not None else get("latents_mean", None)
        std = latents_std if latents_std is not None else get("latents_std", None)
        self.latent_channels = int(c if c is not None else len(mean))
        self.temporal_downsample = int(temporal_downsample or get("scale_factor_temporal", 4))
        self.spatial_downsample = int(spatial_downsample or get("scale_factor_spatial", 8))
        n = self.latent_channels
        self.register_buffer("latent_mean", torch.tensor(mean if mean else [0.0] * n).float())
        self.register_buffer("latent_std", torch.tensor(std if std else [1.0] * n).float())

    @classmethod
    def from_pretrained(cls, path: str | Path, cls_name: str = "AutoencoderKLWan", **kwargs):
        """Load `diffusers.<cls_name>.from_pretrained(path)` from a local folder."""
        import diffusers

        vae = getattr(diffusers, cls_name).from_pretrained(_local_dir(path), local_files_only=True)
        return cls(vae, **kwargs)

    def train(self, mode: bool = True) -> "DiffusersVideoVAE":
        super().train(mode)
        self.vae.eval()  # always frozen
        return self

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the latent of a [*, 3, T, H, W] video."""
        tf, sf = self.temporal_downsample, self.spatial_downsample
        if T < 1 or (T - 1) % tf or H % sf or W % sf:
            raise ValueError(f"need T = 1 + k*{tf} and H, W multiples of {sf}; got {T, H, W}")
        return self.latent_channels, 1 + (T - 1) // tf, H // sf, W // sf

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, T, H, W] in [-1, 1] -> (mean, logvar) [B, C, t, h, w] (raw latents)."""
        self.latent_shape(*x.shape[2:])
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.logvar.float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Raw latents z [B, C, t, h, w] -> video [B, 3, T, H, W] in ~[-1, 1]."""
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def normalize(self, z: Tensor) -> Tensor:
        """(z - mean) / std per channel, the unit-variance space the DiT trains in."""
        return (z - self.latent_mean.view(-1, 1, 1, 1)) / self.latent_std.view(-1, 1, 1, 1)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.latent_std.view(-1, 1, 1, 1) + self.latent_mean.view(-1, 1, 1, 1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.vae.parameters())

    def flops_per_sample(self, T: int, H: int, W: int) -> float:
        """Not counted for foreign architectures (frozen: no training FLOPs); 0."""
        return 0.0


class HFTextEncoder(nn.Module):
    """Frozen transformers text encoder + tokenizer: texts -> (features [B, L, D], mask [B, L]).

    The model class follows the config: T5/MT5/UMT5 -> their EncoderModel (encoder only, half
    the weights of the seq2seq model), CLIP -> CLIPTextModel, anything else -> AutoModel.
    Features at padded positions are zeroed (as our TextEncoder does), so cached features do
    not depend on batch padding. Pass `text_emb=features, text_mask=mask` to WorldModel.
    """

    def __init__(self, model: nn.Module, tokenizer, max_len: int = 128) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.dim = int(getattr(model.config, "d_model", None) or model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_len: int = 128, dtype=None):
        """Model and tokenizer from one local folder (no network access)."""
        import transformers as tr

        path = _local_dir(path)
        cfg = tr.AutoConfig.from_pretrained(path, local_files_only=True)
        kind = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}.get(cfg.model_type)
        model_cls = getattr(tr, kind) if kind else tr.AutoModel
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype)
        tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tok, max_len)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """texts -> (features [B, max_len, D] float, mask [B, max_len] bool)."""
        dev = next(self.model.parameters()).device
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out * mask[..., None].to(out.dtype), mask

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
