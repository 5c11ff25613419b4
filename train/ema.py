"""Exponential moving average of the trainable parameters.

The shadow tensors are created with ``detach().clone()`` from the parameters themselves, so
they share the parameters' device, dtype and (under FSDP2) DTensor placement: EMA is sharded
exactly like the model and costs one extra copy of the local shard per rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class EMA:
    """EMA with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``, so early
    averages are not dominated by the random initialisation.

    ``every`` (``train.ema_every``, set by the builder): blend only on steps divisible by it,
    with ``decay_t ** every`` so the average spans the same number of steps; 1 (default)
    is the plain per-step EMA, bit for bit."""

    every: int = 1

    def blend_weight(self, step: int) -> Optional[float]:
        """``1 - decay`` for optimizer step ``step``, or None when this step does not update."""
        if step % self.every:
            return None
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        return 1.0 - (d if self.every == 1 else d ** self.every)

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone() for n in self.names}
        self._params = [params[n] for n in self.names]
        self._shadow = [self.shadow[n] for n in self.names]

    @torch.no_grad()
    def update(self, step: int, ok: Optional[torch.Tensor] = None) -> None:
        """Blend in the current parameters; ``step`` is the optimizer step just taken.
        ``ok`` (0-dim bool on the device): False leaves the average untouched (a step the
        non-finite guard skipped), without a host sync."""
        lerp = self.blend_weight(step)
        if lerp is None:
            return
        if ok is None:
            # One fused kernel over all tensors; no host sync.
            torch._foreach_lerp_(self._shadow, [p.detach() for p in self._params], lerp)
            return
        # Lerp weight (1 - d) * ok: 0 keeps each shadow bit for bit. Local shards, so the
        # plain weight tensor never meets a DTensor (FSDP2).
        w = ok.to(self._shadow[0].dtype if self._shadow else torch.float32) * lerp
        local = [getattr(t, "_local_tensor", t) for t in self._shadow]
        params = [getattr(p, "_local_tensor", p).detach() for p in self._params]
        torch._foreach_lerp_(local, params, [w] * len(local))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @contextmanager
    @torch.no_grad()
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into ``model`` (e.g. to sample), then restore the
        live weights bit for bit."""
        backup = [p.detach().clone() for p in self._params]
        for p, s in zip(self._params, self._shadow):
            p.copy_(s)
        try:
            yield model
        finally:
            for p, b in zip(self._params, backup):
                p.copy_(b)
