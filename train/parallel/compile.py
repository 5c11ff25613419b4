"""Per-block ``torch.compile``: whether it is on, how many graphs it built, and dynamo's
recompile limit sized from the data's bucket shapes.

``dist.compile_blocks`` is tri-state: ``null`` (auto, the default) compiles on CUDA and stays
eager elsewhere (Inductor's CPU code is slower to build than it saves on the small CPU runs
this project does), ``true`` forces it on (also on CPU: tests, benchmarks), ``false`` keeps
eager. :func:`resolve_compile_blocks` is the one place that decides.

Warm-up: nothing is compiled ahead of time. Each bucket shape compiles on its first batch
(dynamo specialises on the first shape it sees, marks the changing sizes dynamic on the next
one, and may add a graph per grad mode for evaluation / sampling), so the first steps of each
new shape are slow and later ones are not. ``compile/graphs`` and ``compile/recompiles`` in the
periodic log rows show when that stops.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

__all__ = ["compile_metrics", "configure_recompile_limit", "expected_compiles_per_frame",
           "resolve_compile_blocks"]

# Beyond the training shapes, a compiled block may be entered under no_grad (validation,
# sampling) and with a KV cache (rollout): one more graph each.
_EXTRA_MODES = 2


def resolve_compile_blocks(setting: Optional[bool], device: torch.device,
                           backend: str = "single") -> tuple[bool, str]:
    """``dist.compile_blocks`` resolved for ``device`` and ``backend``: (on, why).

    ``None`` is auto: on for CUDA, off on other devices and with DeepSpeed ZeRO-3 (whose
    parameter-gathering hooks are installed after compile; an explicit ``true`` there is
    rejected by train/validate.py)."""
    if setting is not None:
        return bool(setting), f"dist.compile_blocks={str(bool(setting)).lower()}"
    if str(backend) == "deepspeed_zero3":
        return False, "auto: off with deepspeed_zero3 (ZeRO-3 hooks run after compile)"
    if device.type == "cuda":
        return True, "auto: on for a CUDA device"
    return False, f"auto: off on {device.type} (compile pays off on CUDA)"


def expected_compiles_per_frame(num_shapes: int) -> int:
    """Compiles of one block ``forward`` that a run with ``num_shapes`` bucket shapes may need:
    at most one per shape (automatic dynamic shapes usually need fewer) plus no_grad and
    KV-cached entries. More than this is a recompilation storm (a guard on a Python value)."""
    return max(1, num_shapes) + _EXTRA_MODES


def configure_recompile_limit(num_shapes: int) -> int:
    """Raise dynamo's per-frame recompile limit so that every bucket shape compiles once
    instead of silently running eager after torch's default (8). Twice the expected number:
    the warning in :func:`compile_metrics` fires first, the hard limit only on a real storm.
    Never lowers a limit the user set higher. Returns the limit in force."""
    import torch._dynamo.config as dcfg

    # torch >= 2.6 calls it recompile_limit (cache_size_limit is its deprecated alias).
    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(dcfg, name), 2 * expected_compiles_per_frame(num_shapes))
    setattr(dcfg, name, limit)
    _COUNTER.expected = expected_compiles_per_frame(num_shapes)
    _COUNTER.install()
    return limit


class _CompileCounter:
    """Counts dynamo compiles from ``torch._dynamo.callback_handler``'s start callbacks.

    Why this API: it is the documented hook of torch/_dynamo/callback.py (exported as
    ``torch._dynamo.callback_handler``), and each call carries the ``CompileId`` "frame/n",
    where n > 0 marks a recompile of an already compiled frame — exactly the storm signal.
    ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` also counts graphs but cannot
    tell a first compile from a recompile, and the ``torch._logging`` recompile artifact is
    text meant for humans."""

    def __init__(self) -> None:
        self.compiles = 0
        self.recompiles = 0
        self.worst = 0  # most compiles of a single frame
        self.expected = expected_compiles_per_frame(1)
        self._warned = 0
        self._installed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        """Register the start callback (again after ``torch._dynamo.reset()``, which clears
        the callbacks)."""
        from torch._dynamo import callback_handler

        if self._on_start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self._on_start)
        self._installed = True

    def _on_start(self, args: Any) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if args.callback_trigger != CallbackTrigger.DYNAMO:
            return  # lazy backward / autotuning: not a new graph
        # CompileId prints as "frame/n" (with optional "[...]" / "_attempt" decorations).
        m = re.search(r"(\d+)/(\d+)", str(args.compile_id))
        n = int(m.group(2)) if m else 0
        with self._lock:
            self.compiles += 1
            self.recompiles += n > 0
            self.worst = max(self.worst, n + 1)

    def metrics(self) -> dict[str, int]:
        if not self._installed:
            return {}
        if self.worst > self.expected and self.worst > self._warned:
            self._warned = self.worst
            log.warning("torch.compile recompiled one block %d times (expected at most %d "
                        "for the data's bucket shapes): a guard on a changing Python value? "
                        "Run with TORCH_LOGS=recompiles to see why", self.worst, self.expected)
        return {"compile/graphs": self.compiles, "compile/recompiles": self.recompiles}


_COUNTER = _CompileCounter()


def compile_metrics() -> dict[str, int]:
    """``compile/graphs`` (dynamo compiles so far) and ``compile/recompiles`` (compiles of an
    already compiled frame) for the periodic log row; empty when nothing is compiled. Warns
    once per new worst case when a frame recompiled more often than the bucket shapes
    explain."""
    return _COUNTER.metrics()
