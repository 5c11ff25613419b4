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

import hashlib
import json
from pathlib import Path

from typing import Any, Mapping

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["DiffusersVideoVAE", "HFTextEncoder", "VAE_FAMILIES", "local_model_dir",
           "read_component_config", "folder_fingerprint", "text_encoder_dim",
           "vae_compression", "is_diffusers_vae_folder"]


# diffusers video VAE classes Worldline knows how to normalise (see VAE_FAMILIES).
VAE_FAMILIES = ("AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo")


def local_model_dir(path: str | Path, what: str = "model") -> Path:
    """``path`` as an existing local folder, or one error saying why it is not (Worldline never
    downloads: a hub id such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` must be fetched by the
    user, e.g. with ``huggingface-cli download``, and the folder given instead)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    hint = ""
    if not p.is_absolute() and len(p.parts) == 2 and not str(path).startswith("."):
        hint = (" — it looks like a hub id; Worldline never downloads: download it yourself "
                "(e.g. `huggingface-cli download <id> --local-dir DIR`) and pass DIR")
    raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist{hint}")


def read_component_config(path: str | Path, what: str = "model") -> dict:
    """The ``config.json`` of a local diffusers/transformers folder (clear error if absent)."""
    folder = local_model_dir(path, what)
    f = folder / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "vocab.txt",
                    "tokenizer.model")


def is_diffusers_vae_folder(path: str | Path) -> bool:
    """Whether ``path`` is a local diffusers video VAE folder (config.json of a known class)."""
    cfg = Path(str(path)) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") in VAE_FAMILIES
    except json.JSONDecodeError:
        return False


def text_encoder_dim(config: dict) -> int:
    """Feature width of a transformers text encoder from its ``config.json`` (T5: d_model,
    CLIP/BERT-like: hidden_size; a CLIP pair config keeps it under text_config)."""
    config = config.get("text_config", config) if "d_model" not in config else config
    dim = config.get("d_model") or config.get("hidden_size")
    if not dim:
        raise ValueError("text encoder config.json has neither d_model nor hidden_size")
    return int(dim)


def folder_fingerprint(path: str | Path) -> dict:
    """Identity of a model folder: its resolved path and a sha256 over its config and weight
    files (names and contents; ~1 GB/s on one core, so a UMT5-XXL encoder takes seconds).
    Caches and runs record it so a cache made with another encoder is refused."""
    folder = local_model_dir(path)
    h = hashlib.sha256()
    files = sorted(f for f in folder.rglob("*") if f.is_file() and (
        f.suffix in (".safetensors", ".bin", ".json", ".model", ".txt")))
    for f in files:
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return {"path": str(folder.resolve()), "sha256": h.hexdigest()}


def vae_compression(config: Mapping[str, Any]) -> tuple[int, int]:
    """(temporal, spatial) compression of a diffusers video VAE from its config (a loaded
    model's ``.config`` or its folder's config.json), as the model itself computes them:
    Wan ``scale_factor_temporal/spatial`` (Wan 2.2: 4 / 16), HunyuanVideo's ratios, LTX's
    ratios or, when unset, its patching x 2^(scaled stages) (8 x 32 for 0.9.x: 9x64x64
    frames -> 2x2x2 latents)."""
    name = config.get("_class_name")
    if name == "AutoencoderKLWan":
        return (int(config.get("scale_factor_temporal") or 4),
                int(config.get("scale_factor_spatial") or 8))
    if name == "AutoencoderKLHunyuanVideo":
        return (int(config.get("temporal_compression_ratio", 4)),
                int(config.get("spatial_compression_ratio", 8)))
    if name == "AutoencoderKLLTXVideo":
        scaled = sum(bool(v) for v in config.get("spatio_temporal_scaling",
                                                 (True, True, True, False)))
        return (int(config.get("temporal_compression_ratio")
                    or config.get("patch_size_t", 1) * 2 ** scaled),
                int(config.get("spatial_compression_ratio")
                    or config.get("patch_size", 4) * 2 ** scaled))
    raise ValueError(f"_class_name is {name!r}, expected a diffusers video VAE "
                     f"({' | '.join(VAE_FAMILIES)})")


def _vae_normalisation(vae: nn.Module) -> tuple[list | None, list | None, float]:
    """(mean, std, scaling_factor) of a diffusers video VAE as its own diffusers pipeline
    uses them:

    * Wan (``AutoencoderKLWan``): ``(z - latents_mean) / latents_std`` (config lists).
    * HunyuanVideo: ``z * scaling_factor`` (no shift).
    * LTX-Video: ``(z - latents_mean) * scaling_factor / latents_std`` with the per-channel
      statistics stored as buffers in the weights.
    """
    cfg = vae.config
    name = type(vae).__name__
    if name == "AutoencoderKLWan":
        return list(cfg.latents_mean), list(cfg.latents_std), 1.0
    if name == "AutoencoderKLHunyuanVideo":
        return None, None, float(cfg.scaling_factor)
    if name == "AutoencoderKLLTXVideo":
        return (vae.latents_mean.float().tolist(), vae.latents_std.float().tolist(),
                float(cfg.scaling_factor))
    raise ValueError(f"unsupported diffusers VAE class {name}; supported: {VAE_FAMILIES}")


class DiffusersVideoVAE(nn.Module):
    """A frozen diffusers video VAE with the VideoAutoencoder interface.

    ``normalize`` maps raw latents to the unit-variance space the DiT trains in with the
    family's own formula (see :func:`_vae_normalisation`), kept as one per-channel affine map
    ``(z - latent_mean) / latent_std`` (``latent_std = std / scaling_factor``), so pipelines
    treat it exactly like Worldline's autoencoder. ``latents_mean``/``latents_std`` override
    the statistics (e.g. measured on your data); compression factors come from the VAE.
    """

    def __init__(
        self,
        vae: nn.Module,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        temporal_downsample: int | None = None,
        spatial_downsample: int | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.family = type(vae).__name__
        self.source = source
        mean, std, scale = _vae_normalisation(vae)
        tf, sf = vae_compression({**vae.config, "_class_name": self.family})
        cfg = vae.config
        self.latent_channels = int(getattr(cfg, "z_dim", None) or cfg.latent_channels)
        mean = latents_mean if latents_mean is not None else mean
        std = latents_std if latents_std is not None else std
        n = self.latent_channels
        for name, v in (("latents_mean", mean), ("latents_std", std)):
            if v is not None and len(v) != n:
                raise ValueError(f"{source or self.family}: {name} has {len(v)} values for "
                                 f"{n} latent channels")
        self.scaling_factor = scale
        self.temporal_downsample = int(temporal_downsample or tf)
        self.spatial_downsample = int(spatial_downsample or sf)
        self.register_buffer("latent_mean", torch.tensor(mean if mean else [0.0] * n).float())
        std_t = torch.tensor(std if std else [1.0] * n).float()
        self.register_buffer("latent_std", std_t / scale)

    @classmethod
    def from_pretrained(cls, path: str | Path, cls_name: str | None = None,
                        dtype: torch.dtype | None = None, tiling: bool = False,
                        slicing: bool = False, **kwargs) -> "DiffusersVideoVAE":
        """Load a diffusers video VAE from a local folder; its class comes from the folder's
        ``config.json`` ``_class_name`` (``cls_name`` only checks it). ``tiling``/``slicing``
        switch on diffusers' memory savers for long or large clips."""
        import diffusers

        folder = local_model_dir(path, "VAE")
        found = read_component_config(folder, "VAE").get("_class_name")
        if found not in VAE_FAMILIES or (cls_name and found != cls_name):
            want = cls_name or " | ".join(VAE_FAMILIES)
            raise ValueError(f"{folder}/config.json: _class_name is {found!r}, expected a "
                             f"diffusers video VAE ({want})")
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        vae = getattr(diffusers, found).from_pretrained(str(folder), local_files_only=True,
                                                        **kw)
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
        return cls(vae, source=str(folder), **kwargs)

    def train(self, mode: bool = True) -> "DiffusersVideoVAE":
        super().train(mode)
        self.vae.eval()  # always frozen
        return self

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the latent of a [*, 3, T, H, W] video."""
        tf, sf = self.temporal_downsample, self.spatial_downsample
        if T < 1 or (T - 1) % tf or H % sf or W % sf:
            raise ValueError(f"{self.family}: need T = 1 + k*{tf} and H, W multiples of {sf}; "
                             f"got {T, H, W}")
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
        kw = {}
        if getattr(self.vae.config, "timestep_conditioning", False):
            # LTX 0.9.1+ decoders are timestep-conditioned; 0 = decode a clean latent, the
            # diffusers pipeline's default decode_timestep.
            kw["temb"] = torch.zeros(z.shape[0], device=z.device, dtype=self.vae.dtype)
        return self.vae.decode(z.to(self.vae.dtype), **kw).sample.float()

    def normalize(self, z: Tensor) -> Tensor:
        """The family's normalisation: raw -> the unit-variance space the DiT trains in."""
        return (z - self.latent_mean.view(-1, 1, 1, 1)) / self.latent_std.view(-1, 1, 1, 1)

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
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

    def __init__(self, model: nn.Module, tokenizer, max_len: int = 128,
                 hidden_state: int = -1, source: str | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.hidden_state = hidden_state
        self.source = source
        self.dim = text_encoder_dim(model.config.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, max_len: int = 128, dtype=None,
                        tokenizer: str | Path | None = None,
                        hidden_state: int = -1) -> "HFTextEncoder":
        """Model (and tokenizer, from ``tokenizer`` or the same folder) from local folders;
        ``hidden_state``: which layer's output (-1 the last, -2 the penultimate CLIP users
        take, ...). No network access."""
        import transformers as tr

        folder = local_model_dir(path, "text encoder")
        read_component_config(folder, "text encoder")
        cfg = tr.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        kind = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}.get(cfg.model_type)
        model_cls = getattr(tr, kind) if kind else tr.AutoModel
        model = model_cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        tok_dir = local_model_dir(tokenizer, "tokenizer") if tokenizer else folder
        # transformers 5 silently builds an *empty* T5 tokenizer from a folder without
        # tokenizer files; require them so prompts are never tokenised by a blank vocabulary.
        if not any((tok_dir / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"no tokenizer in {tok_dir} (none of {', '.join(_TOKENIZER_FILES)}); pass "
                "model.text_encoder.tokenizer=<folder with the tokenizer files>")
        try:
            tok = tr.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(
                f"no tokenizer in {tok_dir} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "pass model.text_encoder.tokenizer=<folder with the tokenizer files>") from None
        return cls(model, tok, max_len, hidden_state, source=str(folder))

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
        want_all = self.hidden_state != -1
        res = self.model(input_ids=ids, attention_mask=mask.long(),
                         output_hidden_states=want_all)
        out = res.hidden_states[self.hidden_state] if want_all else res.last_hidden_state
        out = out.float()
        return out * mask[..., None].to(out.dtype), mask

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
