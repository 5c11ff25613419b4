"""diffusers' LoRA layout for Wan-architecture DiTs, checked against diffusers itself: PEFT
LoRA on a tiny ``WanTransformer3DModel`` (the module names Worldline's Wan DiT shares) →
``diffusers_lora_state_dict`` → ``save_diffusers_lora`` → ``WanPipeline.load_lora_weights``
gives the PEFT-adapted outputs, alpha != rank included (~5 s)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from worldline.train.lora_export import (  # noqa: E402
    DIFFUSERS_WEIGHTS,
    diffusers_lora_state_dict,
    save_diffusers_lora,
)

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
           out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
           rope_max_seq_len=32)
TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=g), return_dict=False)


def _tiny_wan_pipeline(transformer: torch.nn.Module):
    """A WanPipeline around ``transformer`` with tiny random VAE and T5 (nothing downloaded:
    ByT5's tokenizer needs no vocabulary file). Only load_lora_weights is called on it."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    t5 = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                           temperal_downsample=[False], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4)
    return WanPipeline(tokenizer=ByT5Tokenizer(), text_encoder=t5, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer)


def test_diffusers_wan_lora_round_trip(tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(0)
    base = WanTransformer3DModel(**WAN).eval()
    base_sd = copy.deepcopy(base.state_dict())
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS)  # scale 3, not 1
    adapted = inject_adapter_in_model(cfg, copy.deepcopy(base))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    peft_sd = get_peft_model_state_dict(adapted)
    sd = diffusers_lora_state_dict(peft_sd)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in sd and len(sd) == len(peft_sd)
    save_diffusers_lora(sd, cfg, tmp_path)
    assert (tmp_path / DIFFUSERS_WEIGHTS).is_file()

    fresh = WanTransformer3DModel(**WAN).eval()
    fresh.load_state_dict(base_sd)
    pipe = _tiny_wan_pipeline(fresh)
    pipe.load_lora_weights(str(tmp_path))
    loaded = next(iter(pipe.transformer.peft_config.values()))
    assert (loaded.r, loaded.lora_alpha) == (4, 12)

    direct = WanTransformer3DModel(**WAN).eval()  # the model-level loader, same file
    direct.load_state_dict(base_sd)
    # The model-level loader only looks for .safetensors when told the name.
    direct.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name=DIFFUSERS_WEIGHTS)
    x = _inputs()
    with torch.no_grad():
        y_peft, y_base = adapted(**x)[0], base(**x)[0]
        y_pipe, y_direct = pipe.transformer(**x)[0], direct(**x)[0]
    d_pipe = (y_pipe - y_peft).abs().max().item()
    d_direct = (y_direct - y_peft).abs().max().item()
    d_base = (y_peft - y_base).abs().max().item()
    print(f"diffusers load_lora_weights vs PEFT: {d_pipe:.2e}; load_lora_adapter: "
          f"{d_direct:.2e}; PEFT vs base: {d_base:.2e}")
    assert d_pipe <= 1e-5 and d_direct <= 1e-5 and d_base > 1e-3


def test_non_lora_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        diffusers_lora_state_dict({"blocks.0.attn1.to_q.lora_magnitude_vector":
                                   torch.ones(2)})
