"""diffusers ``WanPipeline`` folders: ``worldline-export --format diffusers`` writes a
Wan-architecture run as one; ``pipeline_io.load_wan_pipeline`` reads one (an export, or a
Wan release downloaded by the user) as Worldline pipeline parts::

    model_index.json        {"_class_name": "WanPipeline", ...}
    transformer/            WanTransformer3DModel (config.json + safetensors) + Worldline's
                            action/camera/reference modules in worldline_extra.* (diffusers
                            ignores them; WorldPipeline / WanDiT.from_diffusers read them)
    vae/                    the run's AutoencoderKLWan folder
    text_encoder/, tokenizer/   the run's transformers encoder and tokenizer
    scheduler/              FlowMatchEulerDiscreteScheduler with the run's flow shift
    worldline_pipeline.json Worldline's PipelineSettings (conditions, shift, text length, size)
    worldline_null_text.safetensors   the learned null text embedding (Worldline's CFG)

diffusers runs full attention over a clip and feeds noisy latents only: a frame-causal
Worldline model gives diffusers' full-attention velocity there, and the clean-frame mask
channel is written without (exact for text-to-video, where it is 0).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from worldline.train.pipeline import WorldPipeline
from worldline.train.pipeline_io import WAN_NULL_TEXT as NULL_TEXT
from worldline.train.pipeline_io import WAN_SETTINGS as SETTINGS

__all__ = ["export_wan_pipeline"]


def _plain_dit(world_model):
    """The world model's DiT without PEFT layers: LoRA adapters merged into a fresh copy."""
    from worldline.models.init import build_on_meta
    from worldline.models.wan_dit import WanDiT
    from worldline.train.lora import has_lora, merged_state_dict

    if not has_lora(world_model):
        return world_model.dit
    sd = {k[len("dit."):]: v for k, v in merged_state_dict(world_model).items()
          if k.startswith("dit.")}
    dit = build_on_meta(lambda: WanDiT(world_model.dit.args)).to_empty(device="cpu")
    dit.load_state_dict(sd)
    return dit


def export_wan_pipeline(source: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write ``source`` (run dir, checkpoint or pipeline folder of a Wan-architecture world
    model with a diffusers Wan VAE and a transformers text encoder) as a WanPipeline folder."""
    import diffusers

    from worldline.models.adapters import DiffusersVideoVAE, HFTextEncoder

    pipe = WorldPipeline.from_pretrained(source, use_ema=use_ema)
    where = pipe.source or source
    if pipe.world_model is None or getattr(pipe.transformer.args, "arch", "") != "wan":
        raise ValueError(f"--format diffusers: {where} is not a Wan-architecture world model "
                         "(model.dit.arch=wan or model.dit.pretrained=<Wan folder>)")
    vae, text = pipe.autoencoder, pipe.external_text_encoder
    if not (isinstance(vae, DiffusersVideoVAE) and vae.family == "AutoencoderKLWan"):
        raise ValueError(f"--format diffusers: {where} does not use a diffusers Wan VAE "
                         "(model.vae.pretrained=<AutoencoderKLWan folder>); a WanPipeline "
                         "needs one")
    if not isinstance(text, HFTextEncoder):
        raise ValueError(f"--format diffusers: {where} has no transformers text encoder "
                         "(model.text_encoder.pretrained=<folder>); a WanPipeline needs one")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plain_dit(pipe.world_model).save_diffusers(out / "transformer", drop_mask_channel=True)
    vae.vae.save_pretrained(str(out / "vae"))
    text.model.save_pretrained(str(out / "text_encoder"))
    text.tokenizer.save_pretrained(str(out / "tokenizer"))
    shift = pipe.shift_for(pipe.latent_shape(*pipe.settings.sample_size))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=float(shift))
    scheduler.save_pretrained(str(out / "scheduler"))
    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "text_encoder": ["transformers", type(text.model).__name__],
             "tokenizer": ["transformers", type(text.tokenizer).__name__],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    from safetensors.torch import save_file

    save_file({"null_text": pipe.world_model.null_text.detach().cpu().contiguous()},
              str(out / NULL_TEXT))
    (out / SETTINGS).write_text(json.dumps(
        {"settings": dataclasses.asdict(pipe.settings), "source": str(where),
         "text_max_len": text.max_len, "frame_causal": pipe.transformer.args.frame_causal},
        indent=2, default=list))
    return out

