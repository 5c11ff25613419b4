"""Meta-device construction and deterministic (re)initialization of Worldline models.

Big models are built on the meta device (shapes only, no memory, no RNG draws), sharded or
wrapped, and only then given real storage and initial values. For that to be a faithful
replacement of eager construction, every model class has an ``init_weights()`` that redoes
*all* of the initialization its constructor did, consuming the RNG in the same order:

1. torch's default per-layer init (``nn.Linear``/``nn.Conv*``/``nn.Embedding`` call
   ``reset_parameters()`` inside their constructors, and those draw from the RNG), replayed
   by :func:`reset_default_parameters` in pre-order over ``module.modules()``, which is
   construction order as long as each layer is assigned right after it is built;
2. the model's own init (xavier, small normals, adaLN-zero), ``_init_custom()``, which the
   constructor also calls.

So ``torch.manual_seed(s); Cls(args)`` and ``torch.manual_seed(s); materialize(
build_on_meta(lambda: Cls(args)), "cpu")`` give bitwise identical parameters and buffers:

    >>> model = build_on_meta(lambda: WorldModel(dit_args, text_args))   # no memory used
    >>> torch.manual_seed(0)
    >>> materialize(model, "cpu")                 # == torch.manual_seed(0); WorldModel(...)

Initializing on another device draws from that device's generator (CUDA's, or DTensor's
RNG tracker after sharding), so the values then differ from CPU eager construction.
"""
from __future__ import annotations

from typing import Callable, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["Initializable", "reset_default_parameters", "build_on_meta", "materialize"]

M = TypeVar("M", bound=nn.Module)


@runtime_checkable
class Initializable(Protocol):
    """A module whose ``init_weights()`` re-initializes every parameter and buffer from scratch,
    drawing from the RNG exactly as its constructor did."""

    def init_weights(self) -> None: ...


@torch.no_grad()
def reset_default_parameters(module: nn.Module) -> None:
    """Replay torch's constructor-time init: ``reset_parameters()`` of every submodule of
    ``module`` (itself included) that has one, in pre-order (= construction order).

    Norm layers have a ``reset_parameters`` too (ones/zeros, no RNG draw), so they are re-set
    here as well; that matters after ``to_empty``, which leaves uninitialized memory.
    """
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def build_on_meta(factory: Callable[[], M]) -> M:
    """Run ``factory()`` (e.g. ``lambda: VideoDiT(args)``) with the meta device as default:
    every parameter and buffer is a shape-only meta tensor; no memory, no RNG draws."""
    with torch.device("meta"):
        return factory()


def materialize(module: M, device: torch.device | str) -> M:
    """Give a meta-built model real (uninitialized) storage on ``device`` and initialize it in
    place with its ``init_weights()``; returns the module.

    Seed the generator of ``device`` first (``torch.manual_seed``) for reproducible values;
    on CPU they equal eager construction after the same seed.
    """
    if not isinstance(module, Initializable):
        raise TypeError(f"{type(module).__name__} has no init_weights(); cannot materialize it")
    module.to_empty(device=device)
    module.init_weights()
    return module
