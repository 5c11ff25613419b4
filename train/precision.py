"""One precision policy for the whole run: autocast, FSDP2 mixed precision, DeepSpeed and the
MFU probe all read ``train.precision`` through :class:`PrecisionPolicy` (never the string)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Parameters stay fp32; ``compute_dtype`` (None: fp32) is what matmuls run in."""

    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(f"train.precision: {self.name!r} is not one of {sorted(_DTYPES)}")

    @classmethod
    def from_config(cls, cfg: Any) -> "PrecisionPolicy":
        """From a full config (``cfg.train.precision``) or the value itself."""
        value = cfg.train.precision if hasattr(cfg, "train") else cfg
        return cls(str(getattr(value, "value", value)))

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return _DTYPES[self.name]

    @property
    def peak_dtype(self) -> torch.dtype:
        """The dtype the MFU peak is probed in (bf16 matmuls run ~4x fp32 on AMX CPUs)."""
        return self.autocast_dtype or torch.float32

    def autocast(self, device_type: str) -> ContextManager[Any]:
        """Autocast for the forward (a no-op context in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def fsdp_mixed_precision(self) -> Optional[Any]:
        """FSDP2's MixedPrecisionPolicy: bf16 params in compute, fp32 gradient reduction."""
        if self.autocast_dtype is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)

    def deepspeed_config(self) -> dict[str, Any]:
        """The ds_config fragment for this precision."""
        return {"bf16": {"enabled": self.autocast_dtype is torch.bfloat16}}
