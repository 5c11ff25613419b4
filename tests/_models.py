"""Shared helpers for model tests."""
from __future__ import annotations

import torch


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialized (adaLN-zero) parameters non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
