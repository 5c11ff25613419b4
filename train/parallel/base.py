"""What every backend shares: block discovery, activation checkpointing, per-block compile,
and the optimizer-step interface (:class:`StepEngine`) the Trainer drives."""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from worldline.train.ema import EMA
from worldline.train.guard import NonFiniteGuard

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


# "selective" keeps what is expensive to recompute: matmul and attention outputs (the FLOPs
# of a block) and recomputes the cheap, memory-heavy rest (norms, modulation, activations,
# RoPE) — torch's selective activation checkpointing (create_selective_checkpoint_contexts)
# with a fixed op list, the policy torchtitan's "op" mode uses. A per-op list is simple and
# needs no model change; it composes with non-reentrant checkpoint and torch.compile.
_SAC_SAVE = [getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(torch.ops.aten, name)]


def _checkpointed(inner: Any, selective: bool) -> Any:
    """``inner`` run under non-reentrant ``torch.utils.checkpoint`` while grad is enabled
    (eval / sampling under no_grad runs it plainly: nothing to save)."""
    kw: dict[str, Any] = {}
    if selective:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kw["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _SAC_SAVE)

    @functools.wraps(inner)
    def fwd(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kw, **kwargs)

    return fwd


def apply_activation_checkpointing(module: nn.Module, mode: str, every: int) -> int:
    """Recompute activations in backward (``dist.activation_checkpointing``):

    - ``full``: every block; ``every_k``: every ``every``-th block (the whole block);
    - ``attention``: only the self-attention (``block.attn``) of every ``every``-th block —
      the MLP keeps its activations (cheaper backward than full AC, less memory saved);
      blocks without ``attn`` (autoencoder stages) are left alone;
    - ``selective``: every ``every``-th block, saving matmul/attention outputs and
      recomputing the rest (``_SAC_SAVE``).

    Patches ``forward`` on the instance (non-reentrant ``torch.utils.checkpoint``) instead of
    inserting a wrapper module, so parameter names — and therefore checkpoints and EMA keys —
    stay the same with AC on or off. Returns the number of checkpointed modules."""
    if mode == "none":
        return 0
    n = 0
    for i, block in enumerate(block_modules(module)):
        if mode != "full" and i % every != 0:
            continue
        target = block
        if mode == "attention":
            target = getattr(block, "attn", None)
            if not isinstance(target, nn.Module):
                continue
        target.forward = _checkpointed(target.forward, selective=mode == "selective")
        n += 1
    return n


def compile_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` each block in place (regional compilation: ``nn.Module.compile``
    keeps parameter names, and blocks of one class share their compiled graphs, so the compile
    time is one block's, not the model's). ``backend``: torch.compile's (tests use
    ``aot_eager``: same dynamo graphs and recompiles, no minutes of Inductor C++ builds)."""
    blocks = block_modules(module)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


class StepEngine:
    """One optimizer step over accumulated micro-batches, the same interface for every
    backend: ``zero_grad`` → per micro-batch ``micro_step(last)`` + ``backward`` → ``step``.

    This class is the plain-torch version (single process, DDP): gradients accumulate in
    ``.grad``, ``step`` clips by the global norm and runs the optimizer masked on the device
    by the non-finite guard (train/guard.py)."""

    #: Checkpoints through torch.distributed.checkpoint (False: the engine writes its own).
    uses_dcp = True

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer,
                 grad_accum: int, grad_clip: float) -> None:
        #: What forward/backward run on (a DDP/FSDP wrapper or DeepSpeed's engine).
        self.model = model
        #: The pure module inside it (names, EMA, weight I/O).
        self.module = module
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip

    @property
    def params(self) -> list[torch.Tensor]:
        """The trainable parameters (under FSDP: the local DTensor shards)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Context of one micro-batch's forward+backward; ``last`` is the accumulation's
        final micro-batch, the only one whose backward may communicate gradients."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def grad_norm(self) -> torch.Tensor:
        """Clip to ``grad_clip`` (<= 0: no clipping); returns the global gradient norm."""
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)

    def step(self, guard: NonFiniteGuard) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, flag a non-finite step and update (masked on the device when flagged).
        Returns (gradient norm, ok) as device tensors: no host sync."""
        norm = self.grad_norm()
        ok = guard.flag(norm)
        guard.step(self.optimizer, self.optimizer.step)
        return norm, ok

    def make_ema(self, decay: float) -> EMA:
        return EMA(self.module, decay)

    def eval(self) -> None:
        self.model.eval()

    def train(self) -> None:
        self.model.train()
