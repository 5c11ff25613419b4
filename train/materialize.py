"""Materialise a model built on the meta device: every parameter gets exactly the value eager
construction would have given it, and each rank allocates only what it keeps.

Models are built under ``torch.device("meta")`` (no memory, no RNG), parallelized there, then
``to_empty`` allocates the local storage and ``init_weights()`` (models/) replays the
constructor's initialisation in the same order. Unsharded, that is bitwise eager construction.

Sharded (FSDP2 DTensors), ``init_weights`` would draw random numbers per shard, so a 2-rank
run would start from other weights than a 1-rank run and the two could never be compared
(the loss-parity tests rely on that). :class:`ShardedInit` therefore intercepts every in-place
op aimed at a DTensor parameter: the op runs on a full-size temporary with the real CPU
generator (consuming the RNG exactly as one process would), and only this rank's slice is
kept. One full parameter is alive at a time, so peak memory is the local shards plus the
largest single tensor — never the whole model.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from worldline.models import init

__all__ = ["ShardedInit", "materialize", "local_parameter_bytes"]


def _local_slices(dt: DTensor) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh,
                                                          dt.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


class ShardedInit(TorchDispatchMode):
    """Run in-place initialisation of DTensor parameters as one process would (see the module
    docstring). Ops on plain tensors run unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._target: Optional[DTensor] = None
        self._full: Optional[torch.Tensor] = None
        self._flushed: set[int] = set()

    def _flush(self) -> None:
        if self._target is not None:
            self._target.to_local().copy_(self._full[_local_slices(self._target)])
            self._flushed.add(id(self._target))
        self._target = self._full = None

    def _full_of(self, dt: DTensor, overwrites: bool) -> torch.Tensor:
        if dt is not self._target:
            self._flush()
            local = dt.to_local()
            if id(dt) in self._flushed and not overwrites:
                # An op reading a finished parameter (e.g. a scale after init): gather it.
                # Every rank runs the same init sequence, so the collective lines up.
                full = dt.full_tensor().to(local.device)
            else:
                full = torch.empty(dt.shape, dtype=local.dtype, device=local.device)
            self._target, self._full = dt, full
        return self._full

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if args and isinstance(args[0], DTensor) and name.endswith("_"):
            overwrites = name in ("uniform_", "normal_", "zero_", "fill_", "copy_",
                                  "bernoulli_", "exponential_", "random_")
            full = self._full_of(args[0], overwrites)
            rest = [a.full_tensor() if isinstance(a, DTensor) else a for a in args[1:]]
            func(full, *rest, **kwargs)
            return args[0]
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is None:
            self._flush()
        return super().__exit__(*exc)


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate ``module``'s meta tensors on ``device`` (only the local shards of sharded
    parameters) and initialise them as eager construction on one process would
    (``init_weights``, models/init.py). Returns ``module``."""
    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return init.materialize(module, device)
    module.to_empty(device=device)
    with ShardedInit():
        module.init_weights()
    return module


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (a DTensor counts its local shard)."""
    total = 0
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total
