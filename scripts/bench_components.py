"""Memory of pretrained components and of the trained DiT, per model size.

Every module is built on the meta device from its published configuration (diffusers /
transformers classes with the released models' hyper-parameters, Worldline's conf/model/*.yaml)
and its parameters counted: no weights are downloaded or allocated. Bytes are then:

* frozen components (VAE, text encoder): parameters only, in the dtype they run in (bf16 on
  GPU), no gradients or optimizer state — they never enter the optimizer or FSDP's shards;
* the trained DiT: fp32 parameters + fp32 gradients + AdamW's two fp32 moments = 16 B per
  parameter (bf16 compute copies under FSDP2 mixed precision come on top, transiently),
  divided by the data-parallel world size under FSDP2 / ZeRO-3;
* a LoRA fine-tune: the frozen DiT in bf16 + 16 B per adapter parameter.

    python -m worldline.scripts.bench_components            # markdown table to stdout
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import nn

GIB = 1024 ** 3


def _count(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def frozen_components() -> list[tuple[str, int]]:
    """(name, parameters) of the pretrained VAEs and text encoders users start from."""
    import diffusers
    import transformers as tr

    return [
        ("Wan 2.1 VAE (AutoencoderKLWan defaults)", _count(diffusers.AutoencoderKLWan)),
        ("HunyuanVideo VAE", _count(diffusers.AutoencoderKLHunyuanVideo)),
        ("LTX-Video 0.9 VAE", _count(diffusers.AutoencoderKLLTXVideo)),
        ("UMT5-XXL encoder (Wan's text encoder)", _count(lambda: tr.UMT5EncoderModel(
            tr.UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                          num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")))),
        ("T5-v1.1-XXL encoder", _count(lambda: tr.T5EncoderModel(tr.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
            num_heads=64, feed_forward_proj="gated-gelu")))),
        ("CLIP ViT-L/14 text", _count(lambda: tr.CLIPTextModel(tr.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12)))),
    ]


def trained_dits(text_dim: int) -> list[tuple[str, int]]:
    """(name, parameters) of the DiTs a run trains: Worldline's sizes with a pretrained text
    encoder of width ``text_dim`` (no built-in encoder), and Wan's released transformers."""
    import diffusers

    from worldline.models.dit import DiTArgs, VideoDiT
    from worldline.train.config import load_model_config

    out = []
    for size in ("tiny", "small", "base", "1B", "3B", "7B"):
        m = load_model_config(size)
        fields = {k: v for k, v in m["dit"].items() if k in DiTArgs.__dataclass_fields__}
        args = DiTArgs(**{**fields, "text_dim": text_dim})
        out.append((f"model={size} DiT (worldline)", _count(lambda: VideoDiT(args))))
    for name, heads, ffn, layers in (("Wan2.1-T2V-1.3B transformer", 12, 8960, 30),
                                     ("Wan2.1-T2V-14B transformer", 40, 13824, 40)):
        out.append((name, _count(lambda: diffusers.WanTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn,
            num_layers=layers, in_channels=16, out_channels=16, text_dim=4096))))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, default=8, help="FSDP/ZeRO-3 ranks")
    ap.add_argument("--lora-fraction", type=float, default=0.01,
                    help="adapter parameters as a fraction of the DiT (rank-dependent)")
    a = ap.parse_args(argv)
    print("| frozen component | params | bf16 weights |")
    print("|---|---:|---:|")
    for name, n in frozen_components():
        print(f"| {name} | {n / 1e6:,.1f} M | {2 * n / GIB:.2f} GiB |")
    print()
    print(f"| trained DiT (text_dim 4096) | params | full FT: 16 B/param | "
          f"÷ {a.world_size} ranks (FSDP2) | LoRA ({a.lora_fraction:.0%}): bf16 base + "
          "adapters |")
    print("|---|---:|---:|---:|---:|")
    for name, n in trained_dits(4096):
        full = 16 * n
        lora = 2 * n + 16 * a.lora_fraction * n
        print(f"| {name} | {n / 1e6:,.1f} M | {full / GIB:.2f} GiB | "
              f"{full / a.world_size / GIB:.2f} GiB | {lora / GIB:.2f} GiB |")


if __name__ == "__main__":
    main()
