"""A LoRA run's export in the layouts PEFT and diffusers load, and the check that an adapter
is applied to the base it was trained on.

``worldline-lora RUN --out DIR [--format peft|diffusers|both]`` (:func:`export_lora`) writes::

    DIR/adapter_model.safetensors     (peft, both) keys as PeftModel.save_pretrained writes
                                      them for a PeftModel around the DiT (pipe.transformer):
                                      base_model.model.blocks.0.attn.qkv.lora_A.weight
    DIR/adapter_config.json           (peft, both) the PEFT LoraConfig as PEFT writes it
                                      (peft_type LORA, r, lora_alpha, target_modules regex),
                                      base_model_name_or_path = absolute path of DIR/base
    DIR/pytorch_lora_weights.safetensors   (diffusers, both; Wan-architecture DiTs only)
                                      transformer.<module>.lora_A.weight, the LoraConfig in
                                      the lora_adapter_metadata header (diffusers' layout)
    DIR/worldline_adapter.json        sidecar: the base's sha256, dtype and adapted shapes, the
                                      source checkpoint and step (what check_lora_base reads)
    DIR/base/                         WorldPipeline folder of the frozen base (adapter-free,
                                      un-merged) the adapter applies to
    DIR/merged/                       WorldPipeline folder with W + (alpha/r) B A merged in
    DIR/{base,merged}/config.json     the run config (LoRA off) beside model_index.json, so
                                      worldline-eval / -sample evaluate them under the run's
                                      model and stage settings; stage.init_from takes both

In Python::

    base = WorldPipeline.from_pretrained("DIR/base").transformer
    model = PeftModel.from_pretrained(base, "DIR")          # == merged/'s transformer
    pipe = WorldPipeline.from_pretrained("DIR")             # base/ + adapter, base checked
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "SIDECAR", "DIFFUSERS_WEIGHTS", "PEFT_PREFIX",
           "LoraBaseMismatch", "weights_sha256", "is_lora_export", "peft_state_dict",
           "save_peft_adapter", "save_sidecar", "diffusers_lora_state_dict", "save_diffusers_lora",
           "check_lora_base", "load_lora_export", "export_lora"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME
SIDECAR = "worldline_adapter.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers LORA_ADAPTER_METADATA_KEY
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model = the DiT
FORMATS = ("peft", "diffusers", "both")


class LoraBaseMismatch(ValueError):
    """An adapter applied to a base it was not trained on (shapes, names or weights differ)."""


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``state`` in name order: the identity of
    a base (the DiT's adapter-free weights, ``null_text`` excluded)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_lora_export(path: Path) -> bool:
    """A ``worldline-lora`` output folder (or any PEFT adapter folder)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def peft_state_dict(adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors named relative to the DiT (``get_peft_model_state_dict(model.dit)``)
    → the names ``PeftModel.save_pretrained`` writes for a PeftModel wrapping the DiT."""
    return {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v.detach().cpu().contiguous()
            for k, v in adapter.items()}


def _adapted_shapes(adapter: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """{DiT module name: [out_features, in_features]} an adapter needs its base layer to have
    (lora_A.weight is [r, in], lora_B.weight is [out, r])."""
    out: dict[str, list[int]] = {}
    for k, v in adapter.items():
        k = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if k.endswith(part):
                shape = out.setdefault(k[:-len(part)], [0, 0])
                shape[dim] = int(v.shape[dim])
    return out


def save_peft_adapter(adapter: Mapping[str, torch.Tensor], config: Any, folder: Path,
                      base_path: Optional[Path], base_cls: type) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` exactly as
    ``PeftModel.save_pretrained`` does (same keys, ``{"format": "pt"}`` header,
    inference_mode on, auto_mapping of the base class). ``adapter``: DiT-relative PEFT
    names; ``base_path``: the folder recorded as ``base_model_name_or_path`` (absolute)."""
    import copy

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(adapter), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(config)
    cfg.base_model_name_or_path = str(base_path.resolve()) if base_path is not None else None
    cfg.inference_mode = True
    cfg.save_pretrained(str(folder), auto_mapping_dict={
        "base_model_class": base_cls.__name__, "parent_library": base_cls.__module__})


def save_sidecar(folder: Path, adapter: Mapping[str, torch.Tensor],
                 base_state: Mapping[str, torch.Tensor], extra: Optional[dict] = None) -> Path:
    """``worldline_adapter.json``: the base's identity (sha256 of the DiT's adapter-free
    weights, dtypes, size) and the adapted layers' shapes, for :func:`check_lora_base`. A
    sidecar, not an adapter_config.json field: PEFT warns about every key it does not know."""
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = sorted({str(v.dtype) for v in base_state.values()})
    f = folder / SIDECAR
    f.write_text(json.dumps({
        "format": "worldline-lora", "base_sha256": weights_sha256(base_state),
        "base_dtypes": dtypes, "base_num_params": sum(v.numel() for v in base_state.values()),
        "adapted_shapes": _adapted_shapes(adapter), **(extra or {})}, indent=1))
    return f


# ---------------------------------------------------------------------- diffusers (Wan)
def diffusers_lora_state_dict(peft_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors of a Wan-architecture DiT (module names as diffusers'
    ``WanTransformer3DModel``: ``blocks.0.attn1.to_q``) → the keys
    ``WanPipeline.load_lora_weights`` / ``WanTransformer3DModel.load_lora_adapter`` take:
    ``transformer.blocks.0.attn1.to_q.lora_A.weight``. Accepts DiT-relative names or
    PeftModel's ``base_model.model.`` ones; anything but lora_A/lora_B tensors (DoRA
    magnitudes, an adapter name left in) is an error rather than silently dropped."""
    out = {}
    for k, v in peft_sd.items():
        name = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        if not name.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias")):
            raise ValueError(f"{k}: not a plain LoRA tensor (lora_A/lora_B weight); "
                             "diffusers' LoRA format holds nothing else")
        out[f"transformer.{name}"] = v.detach().cpu().contiguous()
    return out


def save_diffusers_lora(sd: Mapping[str, torch.Tensor], lora_config: Any,
                        folder: Path) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` as diffusers'
    ``WanLoraLoaderMixin.save_lora_weights`` does: ``transformer.``-prefixed tensors, and the
    LoraConfig (``transformer.r``, ``transformer.lora_alpha``, ...) as JSON in the
    ``lora_adapter_metadata`` header. Diffusers builds its LoraConfig from that header
    verbatim, so alpha != rank round-trips (without it, it would assume alpha == rank)."""
    from safetensors.torch import save_file

    if not all(k.startswith("transformer.") for k in sd):
        sd = diffusers_lora_state_dict(sd)
    meta = {}
    for k, v in lora_config.to_dict().items():
        meta[f"transformer.{k}"] = sorted(v) if isinstance(v, set) else v
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DIFFUSERS_WEIGHTS
    save_file(dict(sd), str(path), metadata={
        "format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True,
                                                            default=str)})
    return path


# ---------------------------------------------------------------------- base check
def _dit_base_state(base: nn.Module | str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(the DiT's adapter-free weights, a description) of a DiT module (LoRA layers
    ignored), a WorldPipeline folder or its transformer/ folder."""
    from worldline.train.lora import base_state_dict

    if isinstance(base, nn.Module):
        return base_state_dict(base), f"module {type(base).__name__}"
    from safetensors.torch import load_file

    folder = Path(base)
    f = folder / "transformer" / "model.safetensors"
    f = f if f.is_file() else folder / "model.safetensors"
    if not f.is_file():
        raise LoraBaseMismatch(f"LoRA base {folder}: no transformer/model.safetensors there "
                               "(expected a WorldPipeline folder)")
    sd = load_file(str(f))
    sd.pop("null_text", None)  # the world model's, not the DiT's
    return sd, str(folder)


def check_lora_base(adapter_dir: str | Path, base: nn.Module | str | Path) -> None:
    """Raise :class:`LoraBaseMismatch` (one message: the adapter folder, what it expects and
    what was found) unless ``base`` — a DiT module or a WorldPipeline folder — has every
    adapted layer with the adapter's shapes and, when the sidecar records one, the same
    weights (sha256). PEFT itself would load mismatched names silently (applying nothing)
    and fail on shapes with a message that does not say which base was meant."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    side = adapter_dir / SIDECAR
    record = json.loads(side.read_text()) if side.is_file() else {}
    weights = adapter_dir / ADAPTER_WEIGHTS
    if weights.is_file():  # the shapes from the tensors' headers; no weights are read
        with safe_open(str(weights), framework="pt") as f:
            need = _adapted_shapes({k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()})
    elif record:
        need = {k: list(v) for k, v in record["adapted_shapes"].items()}
    else:
        raise FileNotFoundError(f"{adapter_dir}: neither {ADAPTER_WEIGHTS} nor {SIDECAR}")
    sd, found = _dit_base_state(base)
    problems = []
    for name, (out_f, in_f) in sorted(need.items()):
        w = sd.get(f"{name}.weight")
        if w is None:
            problems.append(f"{name}: no such layer")
        elif list(w.shape) != [out_f, in_f]:
            problems.append(f"{name}: weight {list(w.shape)}, adapter needs [{out_f}, {in_f}]")
    digest = None
    if not problems and record.get("base_sha256"):
        digest = weights_sha256(sd)
        if digest != record["base_sha256"]:
            dtypes = sorted({str(v.dtype) for v in sd.values()})
            problems.append(f"base weights sha256 {digest[:16]}... ({', '.join(dtypes)}), "
                            f"adapter was trained on {record['base_sha256'][:16]}... "
                            f"({', '.join(record.get('base_dtypes', []))})")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LoraBaseMismatch(
            f"LoRA adapter {adapter_dir} does not fit base {found}: "
            f"{'; '.join(problems[:5])}{more}. Expected base: "
            f"{record.get('base_sha256', '?')[:16]}... with {len(need)} adapted layers, e.g. "
            f"{dict(list(sorted(need.items()))[:2])}; base_model_name_or_path in "
            f"{ADAPTER_CONFIG} names the folder it was exported with")


class _Shape:
    """Stands in for a tensor where only ``.shape`` is read (no adapter weights loaded)."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = list(shape)


# ---------------------------------------------------------------------- load
def load_lora_export(path: Path) -> Any:
    """The pipeline parts (pipeline_io.Parts, source: ``path``) of a ``worldline-lora``
    folder: its base
    (``base/``, else ``base_model_name_or_path``) loaded, checked with
    :func:`check_lora_base`, and the adapter injected with PEFT on the DiT (live LoRA
    layers: ``save_pretrained`` merges them, :func:`merged_state_dict` too)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from worldline.train.pipeline_io import load_pipeline

    path = Path(path)
    cfg = LoraConfig.from_pretrained(str(path))
    base = path / "base"
    if not (base / "model_index.json").is_file():
        if not cfg.base_model_name_or_path:
            raise FileNotFoundError(f"{path}: no base/ folder and no base_model_name_or_path "
                                    f"in {ADAPTER_CONFIG}")
        base = Path(cfg.base_model_name_or_path)
    parts = load_pipeline(base)
    wm = parts.world_model
    if wm is None:
        raise LoraBaseMismatch(f"LoRA adapter {path}: base {base} has no world model")
    check_lora_base(path, wm.dit)
    cfg.inference_mode = True
    inject_adapter_in_model(cfg, wm.dit)
    sd = {k[len(PEFT_PREFIX):]: v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    res = set_peft_model_state_dict(wm.dit, sd)
    if res.unexpected_keys:  # names the shape check could not see (e.g. lora_B.bias)
        raise LoraBaseMismatch(f"LoRA adapter {path}: tensors with no place in base {base}: "
                               f"{res.unexpected_keys[:5]}")
    wm.requires_grad_(False)
    log.info("LoRA adapter %s on base %s", path, base)
    parts.source = path
    return parts


# ---------------------------------------------------------------------- export
def export_lora(checkpoint: str | Path, out: str | Path, use_ema: bool = True,
                fmt: str = "peft") -> Path:
    """Write the folder described in the module docstring for a LoRA run's checkpoint.
    ``fmt``: ``peft`` (default), ``diffusers`` (Wan-architecture DiTs only) or ``both``."""
    from omegaconf import OmegaConf

    from worldline.train import checkpoint as ckpt_lib
    from worldline.train.lora import base_state_dict, lora_config, lora_state_dict
    from worldline.train.pipeline_io import load_pipeline, save_pipeline

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose from {FORMATS}")
    path = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(path)
    cfg = meta["config"]
    if not (cfg["stage"].get("lora") or {}).get("enabled"):
        raise ValueError(f"{path} is not a LoRA run (stage.lora.enabled is false)")
    parts = load_pipeline(path, use_ema=use_ema)  # adapters injected, loaded
    ae, wm, settings = parts.autoencoder, parts.world_model, parts.settings
    arch = getattr(wm.dit.args, "arch", "worldline")
    if fmt != "peft" and arch != "wan":
        raise ValueError(f"--format {fmt}: diffusers' LoRA layout needs a Wan-architecture DiT "
                         f"(module names as WanTransformer3DModel); {path} has arch={arch!r}. "
                         "Use --format peft")
    out = Path(out)
    lcfg = lora_config(OmegaConf.create(cfg["stage"]["lora"]), arch)
    adapter = lora_state_dict(wm)
    merged_cfg = json.loads(json.dumps(cfg))
    merged_cfg["stage"]["lora"]["enabled"] = False
    for sub, mode in (("base", "base"), ("merged", "merge")):
        save_pipeline(ae, wm, settings, out / sub, parts.text_encoder, lora=mode)
        # The run config next to model_index.json: worldline-eval / -sample read the model and
        # stage settings from it (a bare pipeline folder only has its PipelineSettings).
        (out / sub / "config.json").write_text(json.dumps({
            "format": "worldline-pipeline", "config": merged_cfg, "step": meta.get("step"),
            "source": str(path), "lora_merged": mode == "merge"}, indent=1))
    base_sd = base_state_dict(wm.dit)
    save_sidecar(out, adapter, base_sd, {"source": str(path), "step": meta.get("step"),
                                         "arch": arch, "base": str((out / "base").resolve())})
    if fmt in ("peft", "both"):
        save_peft_adapter(adapter, lcfg, out, out / "base", type(wm.dit))
    if fmt in ("diffusers", "both"):
        save_diffusers_lora(diffusers_lora_state_dict(adapter), lcfg, out)
    return out
