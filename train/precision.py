"""One precision policy for the whole engine, built from ``train.precision``.

The trainer's autocast, FSDP2's mixed-precision policy, DeepSpeed's ``bf16`` section and the
MFU probe's peak dtype all follow from the one config value; deriving them here keeps the
backends from each re-deciding what "bf16" means.

    >>> policy = PrecisionPolicy.from_config(cfg)          # cfg.train.precision == "bf16"
    >>> with policy.autocast("cpu"):
    ...     loss = model(x).float().mean()
    >>> fully_shard(block, mp_policy=policy.fsdp_mixed_precision())   # None for fp32
    >>> ds_conf.update(policy.deepspeed_config())          # {"bf16": {"enabled": True}}

bf16 here is mixed precision: parameters, gradients and optimizer state stay fp32; matmuls
run in bf16 under autocast, and FSDP2 all-gathers bf16 parameters but reduce-scatters
gradients in fp32 (summing many ranks' bf16 gradients would lose their low bits).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch

from worldline.train.config_enums import Precision

__all__ = ["PrecisionPolicy"]

# What each config value computes in; None: no autocast (plain fp32).
_AUTOCAST_DTYPES: dict[Precision, Optional[torch.dtype]] = {
    Precision.fp32: None,
    Precision.bf16: torch.bfloat16,
}


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run uses reduced precision (``train.precision``): fp32, or bf16 mixed precision."""

    precision: Precision = Precision.fp32

    def __post_init__(self) -> None:
        # Accept the plain string too ("bf16"); an unknown one fails here, naming the key.
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            allowed = [p.value for p in Precision]
            raise ValueError(f"train.precision: {self.precision!r} is not one of {allowed}") \
                from None

    @classmethod
    def from_config(cls, cfg: Any) -> "PrecisionPolicy":
        """From a whole run config (``cfg.train.precision``), its ``train`` node, or the value
        itself (a :class:`Precision` or its string)."""
        if isinstance(cfg, str):  # Precision members are strings too
            return cls(cfg)
        node = cfg.train if hasattr(cfg, "train") else cfg
        return cls(node.precision)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype autocast computes in; None for fp32 (no autocast)."""
        return _AUTOCAST_DTYPES[self.precision]

    @property
    def peak_dtype(self) -> torch.dtype:
        """The dtype to measure or look up peak FLOP/s for, for MFU: the matmul dtype. A bf16
        run's MFU against an fp32 peak would be overstated on hardware with bf16 units."""
        return self.autocast_dtype or torch.float32

    def autocast(self, device_type: str) -> ContextManager[None]:
        """Context for forward passes on ``device_type`` ("cpu", "cuda"): torch.autocast in
        the policy's dtype, or a no-op for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def fsdp_mixed_precision(self) -> Optional[Any]:
        """FSDP2 ``MixedPrecisionPolicy`` for ``fully_shard(mp_policy=...)``: bf16 parameters
        for compute, fp32 gradient reduction. None for fp32 (FSDP2's default: no casting)."""
        if self.autocast_dtype is None:
            return None
        # Imported here: torch.distributed.fsdp is not needed (or cheap) for single-process use.
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)

    def deepspeed_config(self) -> dict[str, dict[str, bool]]:
        """The ds_config fragment for this policy: ``{"bf16": {"enabled": ...}}``."""
        return {"bf16": {"enabled": self.precision == Precision.bf16}}
