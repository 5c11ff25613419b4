"""What every backend shares: the hook interface, block discovery, AC and per-block compile."""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from worldline.train.trainer import Trainer

log = logging.getLogger(__name__)


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The repeated units that AC, compile and FSDP wrap: DiT blocks (``*.dit.blocks``,
    ``*.blocks``), text-encoder blocks, autoencoder encoder/decoder stages."""
    out: list[nn.Module] = []
    for name, m in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("blocks", "layers") and isinstance(m, nn.ModuleList):
            out.extend(m)
        elif leaf in ("down", "up") and isinstance(m, (nn.Sequential, nn.ModuleList)):
            out.extend(m)  # autoencoder stages
        elif leaf == "mid" and name.split(".")[-2:-1] in (["encoder"], ["decoder"]):
            out.append(m)
    # Outer-most first, never a module nested inside another chosen one.
    chosen: list[nn.Module] = []
    for m in out:
        if not any(m is c or _contains(c, m) for c in chosen):
            chosen.append(m)
    return chosen


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(c is child for c in parent.modules())


def apply_activation_checkpointing(module: nn.Module, mode: str, every: int) -> int:
    """Recompute block activations in backward. Patches the block's ``forward`` on the
    instance (non-reentrant ``torch.utils.checkpoint``) instead of inserting a wrapper module,
    so parameter names — and therefore checkpoints and EMA keys — stay the same with AC on or
    off. Returns the number of checkpointed blocks."""
    if mode == "none":
        return 0
    n = 0
    for i, block in enumerate(block_modules(module)):
        if mode == "every_k" and i % every != 0:
            continue
        inner = block.forward

        @functools.wraps(inner)
        def fwd(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = fwd
        n += 1
    return n


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` each block in place (``nn.Module.compile`` keeps parameter names)."""
    blocks = block_modules(module)
    for block in blocks:
        block.compile()
    return len(blocks)


class Backend:
    """Single-process defaults of every hook. Subclasses override what differs."""

    #: Whether checkpoints go through torch.distributed.checkpoint (False: DeepSpeed's own).
    uses_dcp = True
    #: Whether a forward needs every rank (sharded params / CP): sampling runs on all ranks.
    collective_forward = False

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.dist = trainer.cfg.dist

    # --------------------------------------------------------------------- building
    def parallelize(self, module: nn.Module) -> nn.Module:
        """AC -> compile -> wrap (``wrap``). Returns the model used for forward/backward."""
        n_ac = apply_activation_checkpointing(module, self.dist.activation_checkpointing,
                                              self.dist.ac_every)
        n_c = compile_blocks(module) if self.dist.compile_blocks else 0
        if n_ac or n_c:
            log.info("activation checkpointing on %d blocks, compiled %d blocks", n_ac, n_c)
        return self.wrap(module)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Called once the optimizer exists (DeepSpeed builds its engine here)."""
        return model

    # --------------------------------------------------------------------- step hooks
    @contextlib.contextmanager
    def micro_step(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Context of one micro-batch's forward+backward; ``last`` is the accumulation's
        final micro-batch, the only one whose backward may communicate gradients."""
        yield

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (<= 0: no clipping); returns the global grad norm."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                              foreach=True)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def reduce_group(self) -> Optional[Any]:
        """Process group over which logged metrics are averaged (None: the default group)."""
        return None
