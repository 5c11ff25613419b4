"""What a stage builds and trains on top of the previous stage's weights.

* the DiT's conditioning modules follow ``stage.conditions``
  (:func:`worldline.train.pipeline_io.stage_dit_args`); a pretrain stage without actions has
  no action/camera/reference modules at all, and the controllability stage adds them.
* ``load_init_weights``: the previous stage's weights (EMA when saved), returning the names
  of parameters the source did not have (the new modules).
* ``zero_init_new_controls``: zero the output side of new action/camera modules (and their
  null vectors), ControlNet-style, so the grown model computes exactly what the source did.
* ``FreezePolicy``: new modules + chosen blocks train first, everything after N steps.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worldline.train.weights import load_module_weights, saved_param_names

log = logging.getLogger(__name__)

__all__ = ["load_init_weights", "zero_init_new_controls", "FreezePolicy"]


def load_init_weights(model: nn.Module, path: Path) -> set[str]:
    """Load ``path``'s trained model (EMA when present) into ``model``; returns the parameter
    names the checkpoint did not have (kept at their fresh initialisation)."""
    saved = saved_param_names(path)
    if any("lora_" in n for n in saved):
        raise ValueError(f"stage.init_from: {path} is a LoRA run (PEFT parameter names); "
                         f"export it with worldline-lora and start from <export>/merged")
    new = {n for n, _ in model.named_parameters() if n not in saved}
    # Audio cross-attention lives inside the blocks but is a conditioning module a stage adds.
    body = sorted(n for n in new if n.startswith(("dit.blocks.", "dit.x_embed.", "dit.final.",
                                                  "text_encoder.")) and ".audio" not in n)
    if body:
        # A stage grows conditioning modules only; a missing transformer weight means the
        # checkpoint is of another model size or layout, and partial loading would hide it.
        raise ValueError(f"stage.init_from: {path} lacks {len(body)} core weights of this model "
                         f"(e.g. {body[:3]}): does model=... match the run it came from?")
    used_ema = load_module_weights(model, path, "model", prefer_ema=True,
                                            allow_partial=True)
    log.info("initialised from %s (%s); %d new parameter tensors: %s", path,
             "EMA" if used_ema else "raw", len(new), sorted(new)[:8])
    return new


@torch.no_grad()
def zero_init_new_controls(model: nn.Module, new: set[str]) -> list[str]:
    """Zero the last layer and null vector of every *new* action/camera/audio embedder of the
    DiT, and the output projections of new audio cross-attention layers.

    The conditioning vector is ``c = t_emb + mlp_a(actions) + mlp_c(camera) + mlp_s(audio)``
    (or the null vectors without input), so zero output layers and nulls add exactly 0
    whatever the controls; audio cross-attention adds ``proj(...)``, exactly 0 once proj is
    zero. Their input layers keep random weights so the zeroed layers get gradients at
    the first step. Reference slots need no zeroing: without reference images the DiT never
    reads them. Returns the zeroed parameter names."""
    zeroed = []
    for name, p in model.named_parameters():
        if name not in new:
            continue
        leaf = name.split("cond_embed.", 1)[-1]
        xattn_out = ".audio_attn.layers." in f".{name}" and name.rsplit(".", 2)[-2] == "proj"
        if xattn_out or leaf in ("null_action", "null_camera", "null_audio") or leaf.startswith(
                ("action_mlp.1.", "camera_mlp.1.", "audio_mlp.1.")):
            p.zero_()
            zeroed.append(name)
    return zeroed


class FreezePolicy:
    """Train only the new modules and ``train_first`` prefixes until step ``steps``, then every
    parameter that is not frozen for the whole stage (stage.freeze, a LoRA base).

    Frozen parameters keep their place in the optimizer (built over all of them) with no
    gradient, which AdamW skips; unfreezing is then just ``requires_grad_(True)``."""

    def __init__(self, module: nn.Module, cfg: Any, new: set[str]) -> None:
        self.module, self.steps = module, cfg.steps
        self.early = {n for n, _ in module.named_parameters()
                      if (cfg.new_modules and n in new)
                      or any(n.startswith(p) for p in cfg.train_first)}
        self.permanent: set[str] | None = None
        self.phase: str | None = None

    def apply(self, step: int) -> None:
        """Set requires_grad for ``step`` (cheap when nothing changes)."""
        if self.steps <= 0:
            return
        if self.permanent is None:  # whatever is frozen before the policy ever ran
            self.permanent = {n for n, p in self.module.named_parameters() if not p.requires_grad}
        phase = "early" if step < self.steps else "all"
        if phase == self.phase:
            return
        for n, p in self.module.named_parameters():
            if n not in self.permanent:
                p.requires_grad_(phase == "all" or n in self.early)
                if not p.requires_grad:
                    p.grad = None
        self.phase = phase
        n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        log.info("freeze policy at step %d: %s (%.3fM trainable)", step,
                 "new modules + train_first" if phase == "early" else "everything", n_train / 1e6)
