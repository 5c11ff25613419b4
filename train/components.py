"""Pretrained components from local folders: the frozen diffusers video VAE and transformers
text encoder a run config names (``model.vae.pretrained``, ``model.text_encoder.pretrained``).

They stay outside the trained module: never in the optimizer, never in FSDP's trainable
shards, never in a run checkpoint (they are re-read from their folders, whose fingerprint
the run records). In a pipeline folder they are written in their own libraries' layout
(``vae/`` loads with diffusers, ``text_encoder/`` + ``tokenizer/`` with transformers).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from worldline.models.adapters import (
    DiffusersVideoVAE,
    HFTextEncoder,
    is_diffusers_vae_folder,
    read_component_config,
    text_encoder_dim,
    vae_compression,
)

log = logging.getLogger(__name__)

__all__ = ["pretrained_vae", "pretrained_text_encoder", "pretrained_text_dim",
           "pretrained_vae_channels", "text_max_len", "save_foreign", "load_foreign",
           "is_foreign"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _sub(cfg: Any, *keys: str) -> Mapping[str, Any]:
    node: Any = cfg
    for k in keys:
        node = (node.get(k) if hasattr(node, "get") else None) or {}
    return node


def _dtype(name: Optional[str], device: Optional[torch.device]) -> torch.dtype:
    """The frozen weights' dtype: as configured, else bf16 on GPU (half the memory, the
    dtype these models ship in) and fp32 on CPU (bf16 matmuls are slow there)."""
    if name:
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {sorted(_DTYPES)}")
        return _DTYPES[name]
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


def pretrained_vae(cfg: Any, device: Optional[torch.device] = None
                   ) -> Optional[DiffusersVideoVAE]:
    """The frozen diffusers VAE of ``model.vae`` on ``device`` (None when not configured)."""
    v = _sub(cfg, "model", "vae")
    if not v.get("pretrained"):
        return None
    vae = DiffusersVideoVAE.from_pretrained(
        v["pretrained"], dtype=_dtype(v.get("dtype"), device), tiling=bool(v.get("tiling")),
        slicing=bool(v.get("slicing")))
    log.info("frozen VAE %s from %s", vae.family, vae.source)
    return vae.to(device) if device is not None else vae


def text_max_len(cfg: Any) -> int:
    """Tokens per prompt: ``model.text_encoder.max_len``, else ``model.text.max_len``."""
    te = _sub(cfg, "model", "text_encoder")
    return int(te.get("max_len") or _sub(cfg, "model", "text")["max_len"])


def pretrained_text_encoder(cfg: Any, device: Optional[torch.device] = None
                            ) -> Optional[HFTextEncoder]:
    """The frozen transformers text encoder of ``model.text_encoder`` (None when not set)."""
    te = _sub(cfg, "model", "text_encoder")
    if not te.get("pretrained"):
        return None
    enc = HFTextEncoder.from_pretrained(
        te["pretrained"], max_len=text_max_len(cfg), dtype=_dtype(te.get("dtype"), device),
        tokenizer=te.get("tokenizer"), hidden_state=int(te.get("hidden_state", -1)))
    log.info("frozen text encoder %s from %s (dim %d)", type(enc.model).__name__, enc.source,
             enc.dim)
    return enc.to(device) if device is not None else enc


def pretrained_text_dim(cfg: Any) -> Optional[int]:
    """Feature width of the configured text encoder, read from its config.json (no load)."""
    path = _sub(cfg, "model", "text_encoder").get("pretrained")
    return text_encoder_dim(read_component_config(path, "text encoder")) if path else None


def pretrained_vae_channels(config: Mapping[str, Any]) -> int:
    """Latent channels of a diffusers video VAE from its config.json."""
    n = config.get("z_dim") or config.get("latent_channels")
    if not n:
        raise ValueError("has neither z_dim nor latent_channels")
    return int(n)


def is_foreign(module: nn.Module) -> bool:
    """Whether ``module`` is a pretrained component kept in its own library's format."""
    return isinstance(module, (DiffusersVideoVAE, HFTextEncoder))


def save_foreign(module: nn.Module, folder: Path) -> list[str]:
    """Write a pretrained component in its library's layout; the model_index.json entry.
    A text encoder's tokenizer goes to ``<folder>/../tokenizer`` (diffusers' layout)."""
    if isinstance(module, DiffusersVideoVAE):
        module.vae.save_pretrained(str(folder))
        return ["diffusers", module.family]
    if isinstance(module, HFTextEncoder):
        module.model.save_pretrained(str(folder))
        module.tokenizer.save_pretrained(str(folder.parent / "tokenizer"))
        (folder / "worldline_text.json").write_text(json.dumps(
            {"max_len": module.max_len, "hidden_state": module.hidden_state}))
        return ["transformers", type(module.model).__name__]
    raise TypeError(f"not a pretrained component: {type(module).__name__}")


def load_foreign(folder: Path, entry: list[str]) -> nn.Module:
    """Read back what :func:`save_foreign` wrote (``entry``: its model_index.json entry)."""
    library = entry[0]
    if library == "diffusers":
        return DiffusersVideoVAE.from_pretrained(folder, cls_name=entry[1])
    if library == "transformers":
        extra = folder / "worldline_text.json"
        kw = json.loads(extra.read_text()) if extra.is_file() else {}
        tok = folder.parent / "tokenizer"
        return HFTextEncoder.from_pretrained(folder, tokenizer=tok if tok.is_dir() else None,
                                             **kw)
    raise ValueError(f"{folder}: unknown component library {library!r}")


def latent_manifest(cfg: Any) -> Optional[dict]:
    """The manifest of ``data.shards`` when the run trains on cached latents, else None."""
    d = _sub(cfg, "data")
    if str(d.get("input")) != "latent" or not d.get("shards"):
        return None
    p = Path(str(d["shards"]))
    p = p / "manifest.json" if p.is_dir() else p
    return json.loads(p.read_text()) if p.name == "manifest.json" and p.is_file() else None


def resolve_pretrained(cfg: Any) -> None:
    """Fill in what pretrained folders and caches determine, before validation, or fail
    naming the folder (``cfg`` is updated in place):

    * ``model.vae.pretrained``: the VAE's latent channels and compression become
      ``model.autoencoder.*`` (so clip-shape checks apply); the DiT's ``in_channels`` must
      match them.
    * ``model.text_encoder.pretrained``: ``model.dit.text_dim`` becomes its width.
    * latent shards with cached text embeddings: their manifest names the encoder; it is
      used when none is configured, and a configured one must be the same (fingerprint)."""
    from omegaconf import open_dict

    from worldline.models.adapters import folder_fingerprint
    from worldline.train.config import ConfigError

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"invalid config: {key}: {msg}")

    model = cfg.model
    src = (cfg.get("stage") or {}).get("autoencoder_from")
    if src and is_diffusers_vae_folder(src):
        fail("stage.autoencoder_from", f"{src} is a diffusers VAE folder: pass it as "
             "model.vae.pretrained (stage.autoencoder_from takes Worldline autoencoder runs)")
    with open_dict(model):
        if model.dit.pretrained:
            _adopt_wan_folder(model.dit, fail)
        if model.vae.pretrained:
            path = model.vae.pretrained
            try:
                vcfg = read_component_config(path, "VAE")
            except (FileNotFoundError, ValueError) as e:
                fail("model.vae.pretrained", str(e))
            try:
                tf, sf = vae_compression(vcfg)  # the class first: no channels otherwise
                channels = pretrained_vae_channels(vcfg)
            except ValueError as e:
                fail("model.vae.pretrained", f"{path}/config.json: {e}")
            if int(model.dit.in_channels) != channels:
                fail("model.dit.in_channels",
                     f"{model.dit.in_channels} != the latent channels ({channels}) of the VAE "
                     f"{model.vae.pretrained}")
            model.autoencoder.latent_channels = channels
            model.autoencoder.temporal_downsample = tf
            model.autoencoder.spatial_downsample = sf
            model.dit.temporal_downsample = tf
        cached = (latent_manifest(cfg) or {}).get("text_encoder")
        te = model.text_encoder
        if cached and not te.pretrained:
            log.info("text encoder from the latent cache's manifest: %s", cached["path"])
            te.pretrained = cached["path"]
            te.max_len = cached.get("max_len")
            te.hidden_state = cached.get("hidden_state", -1)
            te.tokenizer = cached.get("tokenizer")
        elif cached:
            mine = folder_fingerprint(te.pretrained)
            if mine["sha256"] != cached["sha256"]:
                fail("model.text_encoder.pretrained",
                     f"{mine['path']} (sha256 {mine['sha256'][:12]}) is not the encoder the "
                     f"cached text embeddings in {cfg.data.shards} were made with: "
                     f"{cached['path']} (sha256 {cached['sha256'][:12]})")
        if te.pretrained:
            try:
                dim = pretrained_text_dim(cfg)
            except (FileNotFoundError, ValueError) as e:
                fail("model.text_encoder.pretrained", str(e))
            if model.dit.pretrained and dim != model.dit.text_dim:
                fail("model.text_encoder.pretrained",
                     f"{te.pretrained} gives {dim}-wide text features, the DiT "
                     f"{model.dit.pretrained} takes {model.dit.text_dim}")
            model.dit.text_dim = dim
        elif model.dit.pretrained:
            fail("model.text_encoder.pretrained",
                 f"the pretrained DiT {model.dit.pretrained} takes {model.dit.text_dim}-wide "
                 "text features: set model.text_encoder.pretrained=<its text encoder folder, "
                 "e.g. Wan's umt5-xxl> (or train on latent shards with cached embeddings)")


def _adopt_wan_folder(dit: Any, fail: Callable[[str, str], None]) -> None:
    """model.dit from a diffusers WanTransformer3DModel folder: its architecture fields, the
    run config's Worldline-only fields (controls, mask channel, causality, references)."""
    from worldline.models.wan_io import WORLDLINE_FIELDS, read_wan_folder_args

    try:
        args = read_wan_folder_args(dit.pretrained,
                                    **{f: dit[f] for f in WORLDLINE_FIELDS if f in dit})
    except (FileNotFoundError, ValueError) as e:
        fail("model.dit.pretrained", str(e))
    for f in dataclasses.fields(args):
        if f.name != "pretrained":
            dit[f.name] = getattr(args, f.name)


def load_pretrained_dit(model: nn.Module, folder: str | Path) -> set[str]:
    """Initialise ``model.dit`` (a WanDiT, plain or FSDP-sharded) from a diffusers
    WanTransformer3DModel folder: the Wan weights strictly, Worldline's extra modules from
    the folder when it has them, else fresh with a zero output projection (the model then
    computes exactly the pretrained Wan's velocity). Returns the names of those fresh
    ("new") parameters, for the stage's freeze policy."""
    from worldline.models.wan_dit import WanDiT
    from worldline.models.wan_io import EXTRA_JSON, EXTRA_PREFIXES, WORLDLINE_FIELDS
    from worldline.train.weights import load_full_state

    args = model.dit.args
    ref = WanDiT.from_diffusers(folder, **{f: getattr(args, f) for f in WORLDLINE_FIELDS})
    mine = {k: tuple(v.shape) for k, v in model.dit.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"model.dit.pretrained={folder}: does not fit the configured DiT "
                         f"({diff[:5]}: {[(mine.get(k), theirs.get(k)) for k in diff[:5]]})")
    load_full_state(model, {f"dit.{k}": v for k, v in ref.state_dict().items()},
                    source=str(folder))
    extra_json = Path(folder) / EXTRA_JSON
    saved = set(json.loads(extra_json.read_text()).get("extra_keys", [])) \
        if extra_json.is_file() else set()
    new = {f"dit.{n}" for n, _ in model.dit.named_parameters()
           if n.startswith(EXTRA_PREFIXES) and n not in saved}
    log.info("DiT initialised from %s; new modules: %s", folder, sorted(new)[:8])
    return new
