"""Building a :class:`~worldline.train.pipeline.WorldPipeline` from a run config, and reading
and writing it as one folder.

A pipeline folder (the layout diffusers users know)::

    model_index.json            {"_class_name": "WorldPipeline", "settings": {...},
                                 "vae": [module, class], "text_encoder": [...], ...}
    vae/config.json             AutoencoderArgs     + model.safetensors (latent stats incl.)
    text_encoder/config.json    TextEncoderArgs     + model.safetensors
    transformer/config.json     DiTArgs             + model.safetensors (+ null_text)

Models are built on the meta device and materialised by loading, so a 7B pipeline never
holds a randomly initialised copy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
from worldline.models.dit import DiTArgs
from worldline.models.text import TextEncoder, TextEncoderArgs
from worldline.models.world_model import WorldModel
from worldline.train import checkpoint as ckpt_lib
from worldline.models.init import build_on_meta
from worldline.train.components import (
    is_foreign,
    load_foreign,
    pretrained_text_dim,
    pretrained_text_encoder,
    pretrained_vae,
    save_foreign,
    text_max_len,
)
from worldline.train.weights import load_module_weights, world_model_state

log = logging.getLogger(__name__)

__all__ = ["PipelineSettings", "autoencoder_args", "world_model_args", "pipeline_settings",
           "build_models", "load_autoencoder", "load_pipeline", "save_pipeline", "MODEL_INDEX"]

CONDITIONS = ("text", "actions", "camera", "refs", "audio")
MODEL_INDEX = "model_index.json"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
# What a diffusers WanPipeline folder written by Worldline holds besides diffusers' own files.
WAN_NULL_TEXT = "worldline_null_text.safetensors"
WAN_SETTINGS = "worldline_pipeline.json"


@dataclass
class PipelineSettings:
    """What belongs to a trained world model besides its weights (saved in model_index.json).

    ``conditions``: the inputs it was trained with (text, actions, camera, refs);
    ``shift``: the flow time shift (None: from the token count, SD3's rule);
    ``text_max_len``: tokens per prompt; ``sample_size``: its (frames, height, width);
    ``audio_rate``: the sample rate its audio front end expects (audio-conditioned models);
    ``fps``: the frame rate it was trained at (None: unknown), which fixes how many audio
    samples one frame covers."""

    conditions: list[str] = field(default_factory=lambda: ["text"])
    shift: Optional[float] = None
    text_max_len: int = 256
    sample_size: tuple[int, int, int] = (17, 64, 64)
    audio_rate: int = 16000
    fps: Optional[float] = None

    def __post_init__(self) -> None:
        bad = set(self.conditions) - set(CONDITIONS)
        if bad:
            raise ValueError(f"unknown conditions {sorted(bad)}; choose from {CONDITIONS}")
        self.conditions = list(self.conditions)
        self.sample_size = tuple(int(v) for v in self.sample_size)  # type: ignore[assignment]


def _plain(node: Any) -> Any:
    """A DictConfig or a plain mapping as plain containers."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def _args(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` with only the fields ``cls`` has (configs carry comments-as-keys such
    as ``name``), enum values as their plain values."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: getattr(v, "value", v) for k, v in values.items() if k in names})


def stage_dit_args(args: DiTArgs, conditions: list[str]) -> DiTArgs:
    """DiTArgs with the conditioning modules a stage does not use removed (the model config
    gives capacity, e.g. the synthetic world's 3 action slots; the stage decides which modules
    exist, and the controllability stage that lists them *adds* them)."""
    active = set(conditions)
    changes: dict[str, Any] = {}
    if "actions" not in active:
        changes.update(num_action_slots=0, action_dim=0)
    if "camera" not in active:
        changes["camera_dim"] = 0
    if "refs" not in active:
        changes["max_refs"] = 0
    if "audio" not in active:
        changes["audio_dim"] = 0
    return dataclasses.replace(args, **changes)


def autoencoder_args(cfg: Any) -> AutoencoderArgs:
    """AutoencoderArgs of a run config (``model.autoencoder``)."""
    return _args(AutoencoderArgs, _plain(cfg["model"]["autoencoder"]))


def world_model_args(cfg: Any) -> tuple[DiTArgs, Optional[TextEncoderArgs]]:
    """(DiTArgs, TextEncoderArgs) of a run config, conditioning modules per its stage. With a
    pretrained text encoder (``model.text_encoder.pretrained``) there is no built-in one
    (None) and the DiT's ``text_dim`` is the encoder's width."""
    model = _plain(cfg["model"])
    conditions = list(_plain(cfg["stage"]["conditions"]))
    dit = stage_dit_args(_args(DiTArgs, model["dit"]), conditions)
    if "audio" in conditions:  # the front end's bands are the DiT's audio features
        dit = dataclasses.replace(dit, audio_dim=int((model.get("audio") or {}).get("n_mels", 32)))
    ext_dim = pretrained_text_dim({"model": model})
    if ext_dim is not None:
        return dataclasses.replace(dit, text_dim=ext_dim), None
    return dit, _args(TextEncoderArgs, model["text"])


def data_fps(cfg: Mapping[str, Any]) -> Optional[float]:
    """The frame rate clips are trained at: ``data.fps`` when resampling by time, else the
    synthetic world's rate over the frame stride; None for shards of mixed source rates."""
    data = cfg["data"]
    if data.get("fps"):
        return float(data["fps"])
    if data.get("kind") == "synthetic":
        return float(data["synthetic"]["fps"]) / int(data.get("frame_stride") or 1)
    return None


def pipeline_settings(cfg: Any) -> PipelineSettings:
    """PipelineSettings of a run config (conditions, flow shift, text length, clip size,
    audio rate, frame rate)."""
    plain = _plain(cfg)
    st, data = plain["stage"], plain["data"]
    audio = plain["model"].get("audio") or {}
    return PipelineSettings(conditions=list(st["conditions"]),
                            shift=(st.get("flow") or {}).get("shift"),
                            text_max_len=text_max_len(plain),
                            sample_size=(int(data["num_frames"]), *map(int, data["resolution"])),
                            audio_rate=int(audio.get("sample_rate", 16000)),
                            fps=data_fps(plain))


def build_models(cfg: Any, autoencoder: bool = True
                 ) -> tuple[Optional[nn.Module], Optional[WorldModel]]:
    """The autoencoder and (flow stages) the world model of a run config, on the meta device
    (LoRA adapters injected when the stage trains them). A pretrained VAE
    (``model.vae.pretrained``) is loaded from its folder instead, on the CPU;
    ``autoencoder=False`` skips it (None)."""
    ae = None
    if autoencoder:
        ae = pretrained_vae(cfg) or build_on_meta(
            lambda: VideoAutoencoder(autoencoder_args(cfg)))
    if _plain(cfg["stage"])["objective"] != "flow":
        return ae, None
    dit_args, text_args = world_model_args(cfg)
    wm = build_on_meta(lambda: WorldModel(dit_args, text_args))
    lora = _plain(cfg["stage"]).get("lora") or {}
    if lora.get("enabled"):
        from omegaconf import OmegaConf

        from worldline.train.lora import inject_lora

        with torch.device("meta"):
            inject_lora(wm, OmegaConf.create(lora))
    return ae, wm


def _materialized(module: nn.Module) -> nn.Module:
    """A meta-built module on the CPU (uninitialised: weights are loaded next); pretrained
    components are already real."""
    return module if is_foreign(module) else module.to_empty(device="cpu")


def load_autoencoder(path: str | Path, into: Optional[VideoAutoencoder] = None
                     ) -> tuple[VideoAutoencoder, Path, str]:
    """The frozen autoencoder of a run, checkpoint or export (EMA weights when saved):
    an autoencoder run stores it as its trained ``model``, later stages as ``autoencoder``.
    Loads into ``into`` when given (else a new one, built on meta). Returns it (eval mode,
    no gradients), the resolved checkpoint and the key it was stored under."""
    ckpt = ckpt_lib.resolve_checkpoint(path)
    if into is None:
        cfg = ckpt_lib.read_meta(ckpt)["config"]
        into = _materialized(build_on_meta(lambda: VideoAutoencoder(autoencoder_args(cfg))))
    key = "autoencoder" if "autoencoder" in ckpt_lib.checkpoint_keys(ckpt) else "model"
    used = load_module_weights(into, ckpt, key, prefer_ema=True)
    log.info("autoencoder from %s[%s]%s", ckpt, key, " (EMA)" if used else "")
    return into.requires_grad_(False).eval(), ckpt, key


@dataclass
class Parts:
    """What a pipeline is made of (see :meth:`WorldPipeline.from_pretrained`)."""

    autoencoder: nn.Module
    world_model: Optional[WorldModel]
    settings: PipelineSettings
    source: Path
    text_encoder: Optional[nn.Module] = None  # a pretrained one, outside the world model


def load_pipeline(path: Path, use_ema: bool = True) -> Parts:
    """The parts of a pipeline folder, export, checkpoint or run dir; see
    :meth:`WorldPipeline.from_pretrained`. Pretrained components a run took from folders are
    read from those folders again."""
    if (path / MODEL_INDEX).is_file():
        return _load_folder(path)
    ckpt = ckpt_lib.resolve_checkpoint(path)
    cfg = ckpt_lib.read_meta(ckpt)["config"]
    ae, wm = build_models(cfg)
    ae, settings = _materialized(ae), pipeline_settings(cfg)
    if wm is None:  # an autoencoder run: the trained model is the autoencoder
        used = load_module_weights(ae, ckpt, "model", prefer_ema=use_ema)
    else:
        if not is_foreign(ae):
            load_module_weights(ae, ckpt, "autoencoder", prefer_ema=False)
        used = load_module_weights(_materialized(wm), ckpt, "model", prefer_ema=use_ema)
    log.info("pipeline from %s (%s weights)", ckpt, "EMA" if used else "raw")
    return Parts(ae, wm, settings, ckpt, pretrained_text_encoder(cfg) if wm else None)


def _read_component(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for f in (folder / "config.json", folder / WEIGHTS):
        if not f.is_file():
            raise FileNotFoundError(f"pipeline component incomplete: no {f}")
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / WEIGHTS))


def _load_folder(path: Path) -> Parts:
    index = json.loads((path / MODEL_INDEX).read_text())
    if index.get("_class_name") == "WanPipeline":
        return load_wan_pipeline(path)
    if index.get("_class_name") != "WorldPipeline":
        raise ValueError(f"{path / MODEL_INDEX}: not a WorldPipeline folder "
                         f"(_class_name={index.get('_class_name')!r})")
    settings = PipelineSettings(**index.get("settings", {}))
    if _is_foreign_entry(index["vae"]):
        ae = load_foreign(path / "vae", index["vae"])
    else:
        ae_cfg, ae_sd = _read_component(path / "vae")
        ae = _materialized(build_on_meta(
            lambda: VideoAutoencoder(_args(AutoencoderArgs, ae_cfg))))
        ae.load_state_dict(ae_sd)
    wm, ext_text = None, None
    if "transformer" in index:
        dit_cfg, dit_sd = _read_component(path / "transformer")
        dit_args, text_args = _args(DiTArgs, dit_cfg), None
        text_sd: dict[str, torch.Tensor] = {}
        if _is_foreign_entry(index["text_encoder"]):
            ext_text = load_foreign(path / "text_encoder", index["text_encoder"])
        else:
            text_cfg, text_sd = _read_component(path / "text_encoder")
            text_args = _args(TextEncoderArgs, text_cfg)
        wm = _materialized(build_on_meta(lambda: WorldModel(dit_args, text_args)))
        wm.load_state_dict(world_model_state(dit_sd, text_sd))
    return Parts(ae, wm, settings, path, ext_text)


def _is_foreign_entry(entry: list[str]) -> bool:
    return entry[0] in ("diffusers", "transformers")


def _write_component(folder: Path, args: Any, state: dict[str, torch.Tensor],
                     cls: type) -> list[str]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": cls.__name__, **_plain(dataclasses.asdict(args))}
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              str(folder / WEIGHTS))
    return [cls.__module__, cls.__name__]


def save_pipeline(ae: nn.Module, wm: Optional[nn.Module], settings: PipelineSettings,
                  path: Path, text_encoder: Optional[nn.Module] = None,
                  lora: str = "merge") -> Path:
    """See :meth:`WorldPipeline.save_pretrained`. Pretrained components (a diffusers VAE, a
    transformers text encoder) are written in their own libraries' layout. A world model
    with LoRA adapters is written with them merged (``lora="merge"``) or as its frozen base
    without them (``"base"``)."""
    path.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": "WorldPipeline", "_format_version": FORMAT_VERSION,
                             "settings": dataclasses.asdict(settings)}
    if is_foreign(ae):
        index["vae"] = save_foreign(ae, path / "vae")
    else:
        index["vae"] = _write_component(path / "vae", ae.args, ae.state_dict(), type(ae))
    if wm is not None:
        from worldline.train.lora import base_state_dict, has_lora, merged_state_dict

        if lora not in ("merge", "base"):
            raise ValueError(f"lora={lora!r}: 'merge' or 'base'")
        sd = wm.state_dict() if not has_lora(wm) else (
            merged_state_dict(wm) if lora == "merge" else base_state_dict(wm))
        dit = {k[len("dit."):]: v for k, v in sd.items() if k.startswith("dit.")}
        text = {k[len("text_encoder."):]: v for k, v in sd.items()
                if k.startswith("text_encoder.")}
        dit["null_text"] = sd["null_text"]
        index["transformer"] = _write_component(path / "transformer", wm.dit.args, dit,
                                                 type(wm.dit))
        if text_encoder is not None:
            index["text_encoder"] = save_foreign(text_encoder, path / "text_encoder")
        else:
            index["text_encoder"] = _write_component(
                path / "text_encoder", wm.text_encoder.args, text, TextEncoder)
    (path / MODEL_INDEX).write_text(json.dumps(index, indent=1))
    return path


def load_wan_pipeline(path: Path) -> Parts:
    """Pipeline parts of a diffusers WanPipeline folder: WanDiT (+ Worldline's extras when the
    folder is an export), the Wan VAE, the text encoder + tokenizer, and the settings an
    export recorded. A Wan release has no learned null text embedding: it starts at zero,
    which is what WanPipeline's zero-padded empty prompt mostly is."""
    from safetensors.torch import load_file

    from worldline.models.adapters import DiffusersVideoVAE, HFTextEncoder
    from worldline.models.wan_dit import WanDiT

    path = Path(path)
    sf = path / WAN_SETTINGS
    meta = json.loads(sf.read_text()) if sf.is_file() else {}
    dit = WanDiT.from_diffusers(path / "transformer")
    tok = path / "tokenizer"
    text = HFTextEncoder.from_pretrained(path / "text_encoder", max_len=int(
        meta.get("text_max_len", 512)), tokenizer=tok if tok.is_dir() else None)
    if text.dim != dit.args.text_dim:
        raise ValueError(f"{path}: text_encoder gives {text.dim}-wide features, the "
                         f"transformer takes {dit.args.text_dim}")
    vae = DiffusersVideoVAE.from_pretrained(path / "vae")
    wm = build_on_meta(lambda: WorldModel(dit.args, None)).to_empty(device="cpu")
    nf = path / WAN_NULL_TEXT
    null = load_file(str(nf))["null_text"] if nf.is_file() else torch.zeros(dit.args.text_dim)
    wm.load_state_dict({**{f"dit.{k}": v for k, v in dit.state_dict().items()},
                        "null_text": null})
    conditions = ["text"] + (["actions"] if dit.args.num_action_slots or dit.args.action_dim
                             else []) + (["camera"] if dit.args.camera_dim else []) + (
        ["refs"] if dit.args.max_refs else [])
    settings = PipelineSettings(**meta["settings"]) if "settings" in meta else \
        PipelineSettings(conditions=conditions, text_max_len=text.max_len)
    return Parts(vae, wm, settings, path, text)
