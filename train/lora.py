"""LoRA fine-tuning of the DiT through PEFT.

``inject_lora`` puts PEFT LoRA layers on the chosen projections of every DiT block
(``stage.lora.targets``, e.g. ``attn.qkv``, ``mlp.w_down``) and leaves only the adapters
trainable. A LoRA run's checkpoints hold the frozen base and the adapters;
``worldline-lora`` (:func:`worldline.train.lora_export.export_lora`) turns one into

    <out>/adapter_model.safetensors   PEFT's layout for a PeftModel around the DiT
                                      (base_model.model.blocks.0.attn.qkv.lora_A.weight)
    <out>/adapter_config.json         the LoraConfig; base_model_name_or_path = <out>/base
    <out>/worldline_adapter.json      the base's sha256 + adapted shapes (check_lora_base)
    <out>/base/                       WorldPipeline folder: the frozen, un-merged base
    <out>/merged/                     WorldPipeline folder with W + (alpha/r) B A merged in
                                      (+ config.json: worldline-eval / -sample / init_from)
    [<out>/pytorch_lora_weights.safetensors]  --format diffusers|both, Wan DiTs only

Here: the PEFT config, injection, and the three state dicts an export needs (adapters,
merged, base). Example (CLI in scripts/export.py)::

    worldline-lora runs/studio-lora --out runs/studio-lora/export
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["lora_config", "lora_targets", "inject_lora", "lora_state_dict", "merged_state_dict",
           "base_state_dict", "has_lora"]


# Worldline-layout projection names -> the Wan-architecture DiT's (diffusers' names), so one
# target list ("attention and MLP projections") means the same layers in either layout.
WAN_TARGETS = {"attn.qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"],
               "attn.proj": ["attn1.to_out.0"], "cross.q": ["attn2.to_q"],
               "cross.kv": ["attn2.to_k", "attn2.to_v"], "cross.proj": ["attn2.to_out.0"],
               "mlp.w_gate": [], "mlp.w_up": ["ffn.net.0.proj"], "mlp.w_down": ["ffn.net.2"]}


def lora_targets(targets: list[str], arch: str = "worldline") -> list[str]:
    """``stage.lora.targets`` in the DiT's own module names: for ``arch="wan"``, Worldline
    names are translated (``attn.qkv`` -> ``attn1.to_q/k/v``, ...); Wan names pass through."""
    if arch != "wan":
        return list(targets)
    out: list[str] = []
    for t in targets:
        for name in WAN_TARGETS.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def lora_config(cfg: Any, arch: str = "worldline"):
    """PEFT LoraConfig for ``stage.lora`` (targets matched as ``blocks.<i>.<target>``)."""
    from peft import LoraConfig

    alts = "|".join(re.escape(t) for t in lora_targets(cfg.targets, arch))
    return LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.alpha),
                      lora_dropout=float(cfg.dropout),
                      target_modules=rf".*blocks\.\d+\.({alts})")


def inject_lora(model: nn.Module, cfg: Any) -> int:
    """Add LoRA adapters to ``model.dit`` in place and freeze everything else. PEFT starts
    each B at zero, so the adapted model equals the base model until it trains. Returns the
    number of adapted layers."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(lora_config(cfg, getattr(model.dit.args, "arch", "worldline")),
                            model.dit)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    n = sum(isinstance(m, LoraLayer) for m in model.modules())
    if n == 0:
        raise ValueError(f"stage.lora.targets {list(cfg.targets)} matched no DiT layer")
    log.info("LoRA r=%d alpha=%g on %d layers: %.3fM trainable", cfg.rank, cfg.alpha, n,
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return n


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model.dit`` (PEFT's names, adapter name stripped)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in
            get_peft_model_state_dict(model.dit).items()}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a plain (adapter-free) model: every LoRA layer merged into its base
    weight (``W + alpha/r * B A``), PEFT's ``base_layer`` names mapped back. Merges a copy;
    ``model`` is unchanged."""
    import copy

    from peft.tuners.lora import LoraLayer

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, LoraLayer):
            mod.merge()
    out = {}
    for k, v in m.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the frozen base under the adapters: PEFT's ``.base_layer.`` names mapped
    back, every ``lora_`` tensor dropped, nothing merged (what the adapters apply *to*)."""
    return {k.replace(".base_layer.", "."): v.detach().cpu().contiguous()
            for k, v in model.state_dict().items() if "lora_" not in k}


def has_lora(model: nn.Module) -> bool:
    """Whether PEFT LoRA layers were injected into ``model``."""
    return any("lora_" in n for n, _ in model.named_parameters())
