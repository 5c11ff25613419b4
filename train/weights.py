"""Weights in and out of every checkpoint format, on one process: DCP checkpoints (single,
DDP, FSDP; any world size), DeepSpeed ZeRO checkpoints (through ``zero_to_fp32``), export
folders (safetensors + config.json) and WorldPipeline folders (``model_index.json``, read as
``{"model", "autoencoder"}``). ``worldline-export``, ``worldline-lora``,
``WorldPipeline.from_pretrained``, ``stage.init_from`` and ``stage.autoencoder_from`` all read
weights here.

An export folder::

    <out>/model.safetensors        trained model, fp32, unwrapped parameter names
    <out>/ema.safetensors          its EMA weights (when the run kept an EMA)
    <out>/<frozen>.safetensors     frozen modules (e.g. autoencoder.safetensors)
    <out>/config.json              {"config": resolved run config, "step", "source", ...}
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from worldline.train import checkpoint as ckpt_lib

__all__ = ["consolidated_state", "load_module_weights", "saved_param_names", "export",
           "world_model_state", "pipeline_folder_state"]


def _plain(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared, dense tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()
            if torch.is_tensor(v)}


def consolidated_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": ..., "ema": ..., <frozen>: ...} full tensors of a checkpoint, one process."""
    path = Path(path)
    if ckpt_lib.is_export(path):
        from safetensors.torch import load_file

        return {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    if ckpt_lib.is_pipeline_folder(path):
        return pipeline_folder_state(path)
    if ckpt_lib.is_deepspeed(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt_lib.verify_deepspeed_files(path)  # zero_to_fp32 unpickles without weights_only
        out = {"model": _plain(get_fp32_state_dict_from_zero_checkpoint(str(path),
                                                                         tag=ckpt_lib.DS_TAG))}
        extra = torch.load(path / "extra.pt", weights_only=True)
        out.update({k: _plain(v) for k, v in extra.items()})
        return out
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    keys = ckpt_lib.checkpoint_keys(path) - {"optim"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        sd = _load_state_dict_from_keys(keys=keys, checkpoint_id=str(path))
    return {k: _plain(v) for k, v in sd.items()}


def world_model_state(dit_sd: dict[str, torch.Tensor],
                      text_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A WorldModel's state dict from a pipeline folder's transformer/ weights (which carry
    the world model's ``null_text``) and text_encoder/ weights."""
    dit_sd = dict(dit_sd)
    null = dit_sd.pop("null_text")
    return {**{f"dit.{k}": v for k, v in dit_sd.items()},
            **{f"text_encoder.{k}": v for k, v in text_sd.items()}, "null_text": null}


def pipeline_folder_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A WorldPipeline folder's weights under a checkpoint's keys: ``model`` (the world model;
    absent for an autoencoder-only pipeline) and ``autoencoder``, so ``stage.init_from`` /
    ``autoencoder_from`` take pipeline folders (e.g. worldline-lora's ``merged/``) too."""
    from safetensors.torch import load_file

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    out = {"autoencoder": load_file(str(path / "vae" / "model.safetensors"))}
    if "transformer" in index:
        out["model"] = world_model_state(
            load_file(str(path / "transformer" / "model.safetensors")),
            load_file(str(path / "text_encoder" / "model.safetensors")))
    return out


def saved_param_names(path: Path, key: str = "model") -> set[str]:
    """Names of the tensors a checkpoint (DCP, DeepSpeed or export folder) holds under key."""
    path = Path(path)
    if ckpt_lib.is_export(path):
        from safetensors import safe_open

        with safe_open(str(path / f"{key}.safetensors"), framework="pt") as f:
            return set(f.keys())
    if ckpt_lib.is_deepspeed(path) or ckpt_lib.is_pipeline_folder(path):
        return set(consolidated_state(path)[key])
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata()
    prefix = f"{key}."
    return {k[len(prefix):] for k in md.state_dict_metadata if k.startswith(prefix)}


def load_full_state(module: torch.nn.Module, weights: dict[str, torch.Tensor],
                    source: str, strict: bool = False) -> tuple[list[str], list[str]]:
    """Load full (unsharded) tensors into ``module``, plain or FSDP2-sharded (each rank keeps
    its shard). ``strict``: missing or unexpected names are an error naming ``source``.
    Returns (missing, unexpected)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        missing, unexpected = set_model_state_dict(
            module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    if (missing or unexpected) and strict:
        raise KeyError(f"{source}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return list(missing), list(unexpected)


def load_module_weights(
    module: torch.nn.Module, ckpt: Path, key: str = "model", prefer_ema: bool = True,
    allow_partial: bool = False,
) -> bool:
    """Load a plain (unwrapped) module's weights saved under ``key`` in ``ckpt``; when
    ``prefer_ema`` and the checkpoint holds EMA weights for it (``ema_<key>`` or ``ema``
    for the trained model), overlay those on the parameters. Returns whether EMA was used."""
    ema_key = "ema" if key == "model" else f"ema_{key}"
    if ckpt_lib.is_export(ckpt) or ckpt_lib.is_deepspeed(ckpt) or \
            ckpt_lib.is_pipeline_folder(ckpt):
        parts = consolidated_state(Path(ckpt))
        weights = dict(parts[key])
        used = prefer_ema and ema_key in parts
        if used:
            weights.update(parts[ema_key])
        load_full_state(module, weights, source=f"{ckpt}[{key}]", strict=not allow_partial)
        return used
    sd = {k: v for k, v in module.state_dict().items()}
    ckpt_lib.load_tensors(ckpt, {key: sd}, allow_partial=allow_partial)
    used_ema = False
    if prefer_ema and ema_key in ckpt_lib.checkpoint_keys(ckpt):
        ema = {n: p.detach().clone() for n, p in module.named_parameters()}
        ckpt_lib.load_tensors(ckpt, {ema_key: ema}, allow_partial=True)
        sd.update(ema)
        used_ema = True
    module.load_state_dict(sd)
    return used_ema


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the export folder for ``checkpoint`` (a run, checkpoints/ or step dir)."""
    from safetensors.torch import save_file

    path = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = consolidated_state(path)
    for key, sd in parts.items():
        save_file(sd, str(out / f"{key}.safetensors"), metadata={"source": str(path)})
    info = {
        "format": "worldline-export",
        "config": meta["config"],
        "step": meta.get("step"),
        "source": str(path),
        "source_backend": meta.get("backend", "single"),
        "source_world_size": meta.get("world_size", 1),
        "files": sorted(f"{k}.safetensors" for k in parts),
        "num_params": {k: sum(v.numel() for v in sd.values()) for k, sd in parts.items()},
    }
    (out / "config.json").write_text(json.dumps(info, indent=1, default=str))
    return out
