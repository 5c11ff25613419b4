"""LoRA through PEFT on a real tiny world model: injection, trainable set, merge (~5 s).
The export of a trained LoRA run is covered by tests/test_workflow_e2e.py."""
from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer

from worldline.models.dit import DiTArgs
from worldline.models.text import TextEncoderArgs
from worldline.models.world_model import WorldModel
from worldline.train.config_stage import LoraConfig
from worldline.train.lora import inject_lora, lora_state_dict, merged_state_dict

DIT = DiTArgs(in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=32,
              num_action_slots=0, camera_dim=0, mask_channel=True)
TEXT = TextEncoderArgs(dim=32, depth=1, num_heads=4, max_len=16)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 3, 4, 4, generator=g), torch.rand(2, generator=g),
            torch.randint(0, 255, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.bool))


def test_lora_targets_only_the_configured_projections_and_starts_as_identity() -> None:
    torch.manual_seed(0)
    model = WorldModel(DIT, TEXT).eval()
    base = copy.deepcopy(model)
    cfg = OmegaConf.structured(LoraConfig(enabled=True, rank=4, alpha=8.0,
                                          targets=["attn.qkv", "mlp.w_down"]))
    assert inject_lora(model, cfg) == 2 * DIT.depth
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {f"dit.blocks.{i}.{t}" for i in range(2) for t in ("attn.qkv", "mlp.w_down")}
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*x), base(*x), rtol=0, atol=0)  # B starts at zero

    model.train()
    model(*x).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_merged_weights_load_into_a_plain_model_and_match_the_adapted_one() -> None:
    torch.manual_seed(0)
    model = WorldModel(DIT, TEXT).eval()
    inject_lora(model, OmegaConf.structured(LoraConfig(enabled=True, rank=4, alpha=16.0)))
    with torch.no_grad():  # a "trained" adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    plain = WorldModel(DIT, TEXT).eval()
    missing, unexpected = plain.load_state_dict(merged_state_dict(model), strict=True)
    assert not missing and not unexpected
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(*x), model(*x), rtol=1e-4, atol=1e-5)
    sd = lora_state_dict(model)
    assert sd and all("lora_A" in k or "lora_B" in k for k in sd)
    assert sum(v.numel() for v in sd.values()) == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
