"""WanDiT <-> diffusers ``WanTransformer3DModel`` folders (local only; nothing is downloaded).

A folder, as diffusers writes and reads it::

    config.json                               {"_class_name": "WanTransformer3DModel", ...}
    diffusion_pytorch_model.safetensors       the Wan weights (or, sharded:
    diffusion_pytorch_model-0000i-of-0000n.safetensors + ...safetensors.index.json)
    worldline_extra.json                      Worldline's DiTArgs fields diffusers lacks
    worldline_extra.safetensors               control_embed.* / control_proj.* / ref_embed

diffusers ignores the two ``worldline_extra`` files, so an exported folder opens with
``WanTransformer3DModel.from_pretrained``; ``load_wan`` reads them back. Like
``models/adapters.py``, this is the one place in models/ that reads files, because these
formats belong to the model definition rather than to a training run.

    >>> dit = WanDiT.from_diffusers("/ckpt/Wan2.1-T2V-1.3B-Diffusers/transformer",
    ...                             num_action_slots=1, camera_dim=6)   # controls: zero-init
    >>> dit.save_diffusers("/tmp/out/transformer")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from worldline.models.dit import DiTArgs

__all__ = ["dit_args_from_diffusers_config", "diffusers_config", "load_wan", "save_wan",
           "read_wan_folder_args", "WORLDLINE_FIELDS",
           "WAN_CLASS", "EXTRA_PREFIXES"]

WAN_CLASS = "WanTransformer3DModel"
# WanDiT parameters diffusers does not know (saved to worldline_extra.safetensors), by prefix.
EXTRA_PREFIXES = ("control_embed.", "control_proj.", "ref_embed")
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
EXTRA_JSON = "worldline_extra.json"
EXTRA_WEIGHTS = "worldline_extra.safetensors"
# diffusers drops these on load (_keys_to_ignore_on_load_unexpected of WanTransformer3DModel).
_IGNORED = ("norm_added_q",)
# DiTArgs fields a diffusers config cannot hold; saved in worldline_extra.json.
WORLDLINE_FIELDS = ("num_action_slots", "num_actions", "action_dim", "camera_dim",
                     "temporal_downsample", "mask_channel", "frame_causal", "max_refs",
                     "audio_dim", "audio_mode", "audio_every")


def dit_args_from_diffusers_config(cfg: dict[str, Any], **extra: Any) -> DiTArgs:
    """DiTArgs(arch="wan") of a diffusers WanTransformer3DModel ``config.json`` dict; ``extra``
    sets Worldline-only fields (controls default off: camera_dim=0). With mask_channel=True
    the config's in_channels is taken to include the mask channel only if ``extra`` says
    ``mask_in_config=True`` (what save_wan records); else the mask channel is added."""
    in_ch = int(cfg.get("in_channels", 16))
    mask_in_config = bool(extra.pop("mask_in_config", False))
    mask = bool(extra.get("mask_channel", False))
    if mask and mask_in_config:
        in_ch -= 1
    out_ch = int(cfg.get("out_channels") or in_ch + int(mask and mask_in_config))
    heads = int(cfg.get("num_attention_heads", 40))
    head_dim = int(cfg.get("attention_head_dim", 128))
    base = dict(
        arch="wan", in_channels=in_ch, out_channels=out_ch,
        patch_size=[int(p) for p in cfg.get("patch_size", (1, 2, 2))],
        hidden_size=heads * head_dim, depth=int(cfg.get("num_layers", 40)), num_heads=heads,
        text_dim=int(cfg.get("text_dim", 4096)), freq_dim=int(cfg.get("freq_dim", 256)),
        ffn_dim=int(cfg.get("ffn_dim", 13824)),
        cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
        qk_norm=cfg.get("qk_norm", "rms_norm_across_heads") is not None,
        eps=float(cfg.get("eps", 1e-6)), image_dim=int(cfg.get("image_dim") or 0),
        added_kv_proj_dim=int(cfg.get("added_kv_proj_dim") or 0),
        pos_embed_seq_len=int(cfg.get("pos_embed_seq_len") or 0),
        rope_max_seq_len=int(cfg.get("rope_max_seq_len", 1024)), camera_dim=0,
    )
    unknown = set(extra) - {f.name for f in dataclasses.fields(DiTArgs)}
    if unknown:
        raise ValueError(f"unknown DiTArgs fields {sorted(unknown)}")
    return DiTArgs(**{**base, **extra})


def diffusers_config(args: DiTArgs) -> dict[str, Any]:
    """The diffusers WanTransformer3DModel config (constructor kwargs) of ``args``; a mask
    channel counts as one more input channel (diffusers sees a C+1-channel model)."""
    if args.hidden_size % args.num_heads:
        raise ValueError(f"hidden_size {args.hidden_size} not divisible by {args.num_heads} heads")
    return {
        "patch_size": list(args.patch_size),
        "num_attention_heads": args.num_heads,
        "attention_head_dim": args.hidden_size // args.num_heads,
        "in_channels": args.in_channels + int(args.mask_channel),
        "out_channels": args.out_channels or args.in_channels,
        "text_dim": args.text_dim,
        "freq_dim": args.freq_dim,
        "ffn_dim": args.ffn_dim or int(args.mlp_ratio * args.hidden_size),
        "num_layers": args.depth,
        "cross_attn_norm": args.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if args.qk_norm else None,
        "eps": args.eps,
        "image_dim": args.image_dim or None,
        "added_kv_proj_dim": args.added_kv_proj_dim or None,
        "rope_max_seq_len": args.rope_max_seq_len,
        "pos_embed_seq_len": args.pos_embed_seq_len or None,
    }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _check_folder(folder: str | Path) -> Path:
    """The folder as a Path, or one clear error naming it (never a download)."""
    p = Path(folder).expanduser()
    if not p.exists():
        s = str(folder)
        if s.count("/") == 1 and not s.startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"{s!r} is not a local folder (it looks like a Hugging Face Hub id; Worldline "
                f"never downloads: fetch it first, e.g. `huggingface-cli download {s}`, and "
                f"pass the local transformer/ folder)")
        raise FileNotFoundError(f"no such folder: {s!r} (expected a local diffusers "
                                f"WanTransformer3DModel folder)")
    if not p.is_dir():
        raise FileNotFoundError(f"{str(p)!r} is a file; expected a diffusers model folder")
    if not (p / CONFIG).is_file():
        hint = " (a pipeline folder: pass its transformer/ subfolder)" if (
            p / "transformer" / CONFIG).is_file() else ""
        raise FileNotFoundError(f"{str(p / CONFIG)!r} not found{hint}")
    return p


def _read_config(p: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((p / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p / CONFIG)!r} is not valid JSON: {e}") from None
    name = cfg.get("_class_name")
    if name != WAN_CLASS:
        raise ValueError(f"{str(p / CONFIG)!r} has _class_name={name!r}; expected {WAN_CLASS!r}")
    return cfg


def _read_weights(p: Path) -> dict[str, Tensor]:
    """All tensors of the single-file or sharded safetensors checkpoint in ``p``."""
    from safetensors.torch import load_file

    if (p / WEIGHTS).is_file():
        return load_file(str(p / WEIGHTS))
    if (p / WEIGHTS_INDEX).is_file():
        index = json.loads((p / WEIGHTS_INDEX).read_text())
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (p / shard).is_file():
                raise FileNotFoundError(f"{str(p / shard)!r} (listed in {WEIGHTS_INDEX}) missing")
            sd.update(load_file(str(p / shard)))
        return sd
    raise FileNotFoundError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {str(p)!r} "
                            f"(only safetensors checkpoints are supported)")


def _materialize_meta(module: nn.Module, device: Any, dtype: torch.dtype) -> None:
    """Give the parameters still on the meta device (extras not in the folder) real storage."""
    for m in module.modules():
        for name, t in list(m._parameters.items()):
            if t is not None and t.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty(t.shape, device=device, dtype=dtype),
                                                   requires_grad=t.requires_grad)


def read_wan_folder_args(folder: str | Path, **extra: Any) -> DiTArgs:
    """The DiTArgs a diffusers WanTransformer3DModel folder loads as (its config.json, plus
    a Worldline export's worldline_extra.json), ``extra`` overriding Worldline-only fields;
    one clear error naming the folder when it is not such a folder."""
    p = _check_folder(folder)
    cfg = _read_config(p)
    saved: dict[str, Any] = {}
    if (p / EXTRA_JSON).is_file():
        saved = json.loads((p / EXTRA_JSON).read_text()).get("dit_args", {})
    return dit_args_from_diffusers_config(cfg, **{**saved, **extra},
                                          mask_in_config=bool(saved.get("mask_channel")))


def load_wan(cls: type, folder: str | Path, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", **extra: Any):
    """``cls`` (WanDiT) from a local diffusers WanTransformer3DModel folder.

    The Wan part loads strictly (every key, every shape; diffusers' ignored ``norm_added_q``
    aside). Worldline extras come from ``worldline_extra.*`` when present, otherwise they are
    freshly initialised (zero ``control_proj``: the output equals the pretrained Wan's). With
    ``mask_channel=True`` on a checkpoint without the mask channel, its patch_embedding column
    is zero (the mask has no effect until trained). Built on the meta device, so no memory or
    time is spent on a random init of the pretrained part. ``extra`` overrides DiTArgs fields.
    """
    from worldline.models.init import build_on_meta

    p = _check_folder(folder)
    cfg = _read_config(p)
    saved: dict[str, Any] = {}
    if (p / EXTRA_JSON).is_file():
        saved = json.loads((p / EXTRA_JSON).read_text()).get("dit_args", {})
    args = dit_args_from_diffusers_config(cfg, **{**saved, **extra},
                                          mask_in_config=bool(saved.get("mask_channel")))
    sd = _read_weights(p)
    sd = {k: v for k, v in sd.items() if not any(s in k for s in _IGNORED)}
    model = build_on_meta(lambda: cls(args))
    state = model.state_dict()
    expected = {k: v.shape for k, v in state.items() if not k.startswith(EXTRA_PREFIXES)}
    pe = "patch_embedding.weight"
    if args.mask_channel and pe in sd and sd[pe].shape[1] + 1 == expected[pe][1]:
        sd[pe] = torch.cat([sd[pe], sd[pe].new_zeros(sd[pe][:, :1].shape)], dim=1)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or unexpected or bad:
        shapes = [(k, tuple(sd[k].shape), tuple(expected[k])) for k in bad[:8]]
        raise ValueError(f"{str(p)!r} does not match its config.json: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, shape mismatch {shapes}")
    extras: dict[str, Tensor] = {}
    if (p / EXTRA_WEIGHTS).is_file():
        from safetensors.torch import load_file

        extras = load_file(str(p / EXTRA_WEIGHTS))
        want = {k: tuple(v.shape) for k, v in state.items() if k.startswith(EXTRA_PREFIXES)}
        wrong = sorted(k for k in extras if want.get(k) != tuple(extras[k].shape))
        if wrong:
            raise ValueError(f"{str(p / EXTRA_WEIGHTS)!r}: {wrong[:8]} do not fit the requested "
                             f"DiTArgs (changed controls/refs?)")
    full = {k: v.to(device=device, dtype=dtype) for k, v in {**sd, **extras}.items()}
    model.load_state_dict(full, strict=False, assign=True)
    # Extras a folder lacks are initialised whole (a partly saved extra is an error).
    fresh = []
    for name, m in model.extra_modules().items():
        params = [m] if isinstance(m, nn.Parameter) else list(m.parameters())
        meta = [t.is_meta for t in params]
        if any(meta) and not all(meta):
            raise ValueError(f"{str(p / EXTRA_WEIGHTS)!r} holds only part of {name}")
        if all(meta):
            fresh.append(name)
    _materialize_meta(model, device, dtype)
    model.init_extras(fresh, reset_defaults=True)
    return model


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _shards(sd: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    return shards


def save_wan(model: nn.Module, folder: str | Path, max_shard_bytes: int = 10 << 30,
             drop_mask_channel: bool = False) -> Path:
    """Write ``model`` (a WanDiT) as a diffusers WanTransformer3DModel folder: config.json
    (with ``_class_name``, ``_diffusers_version``), the Wan weights (sharded with an index
    beyond ``max_shard_bytes``), and worldline_extra.json (+ .safetensors when the model has
    extras). Returns the folder.

    ``drop_mask_channel``: write the model without its clean-frame mask input channel
    (in_channels = latent channels), as ``WanPipeline`` feeds only noisy latents. Exact for
    text-to-video, where the mask is 0 everywhere; loading it back with ``mask_channel=True``
    restores a zero column."""
    from safetensors.torch import save_file

    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    try:
        from diffusers import __version__ as version
    except Exception:  # noqa: BLE001 - diffusers is optional; the field is informational
        version = "0.35.0"
    drop = drop_mask_channel and model.args.mask_channel
    config = {"_class_name": WAN_CLASS, "_diffusers_version": version,
              **diffusers_config(model.args)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if drop:  # the mask is the last input channel of each patch (see WanDiT.patchify)
        config["in_channels"] -= 1
        w = state["patch_embedding.weight"]
        state["patch_embedding.weight"] = w[:, : w.shape[1] - 1].contiguous()
    (p / CONFIG).write_text(json.dumps(config, indent=2))
    wan = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIXES)}
    extra = {k: v for k, v in state.items() if k.startswith(EXTRA_PREFIXES)}
    for old in [WEIGHTS, WEIGHTS_INDEX, EXTRA_WEIGHTS, *[f.name for f in p.glob(
            "diffusion_pytorch_model-*-of-*.safetensors")]]:
        (p / old).unlink(missing_ok=True)  # no stale shard may shadow the new weights
    shards = _shards(wan, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(p / WEIGHTS), metadata=meta)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(p / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in wan.values())
        (p / WEIGHTS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if extra:
        save_file(extra, str(p / EXTRA_WEIGHTS), metadata=meta)
    fields = {f: getattr(model.args, f) for f in WORLDLINE_FIELDS}
    if drop:
        fields["mask_channel"] = False
    (p / EXTRA_JSON).write_text(json.dumps(
        {"format": 1, "dit_args": fields, "extra_keys": sorted(extra),
         "note": "Worldline additions to a diffusers WanTransformer3DModel; diffusers ignores "
                 "this file and worldline_extra.safetensors."}, indent=2))
    return p

