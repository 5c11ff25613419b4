"""Preemption and time-limit handling: signal → collective stop → checkpoint → requeue.

SLURM warns a job before its time limit with the signal named in ``--signal=B:USR1@N`` (sent to
the batch shell, which forwards it to the ranks, see slurm/templates/) and sends SIGTERM to every
process on preemption. A rank that catches one of :attr:`PreemptConfig.signals` only records
it; the Trainer asks :meth:`PreemptionHandler.should_stop` after a step, and all ranks take the
same decision (an all-reduce MAX of the local flags), so every rank leaves the loop after the
same step, writes its part of one checkpoint and exits. The entry point then writes
``<run dir>/status.json`` (``finished`` or ``stopped``); the batch script requeues the job
(``scontrol requeue``) only when the run is not finished, and the requeued job resumes from
``checkpoints/latest`` (``resume=auto``) in the same W&B run.

Cost of the check: the flags are reduced on the CPU over gloo (the default group on CPU runs,
a separate gloo group under NCCL), so the check never waits for the GPU; it is a tiny
rendezvous of the ranks' host threads, once every ``preempt.check_every`` steps. A larger
interval saves that rendezvous but delays the stop by up to ``check_every`` steps, which must
fit into the warning time (``--signal=...@N``) or, for SIGTERM, into SLURM's KillWait
(default 30 s) minus the time a checkpoint takes.

Example (any launcher; ``kill -USR1`` a rank or the batch shell and the run stops cleanly)::

    worldline-train stage=autoencoder experiment=smoke run.name=p preempt.check_every=1
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Sequence

from worldline.data.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: Exit status of an entry point whose run stopped on a signal after checkpointing (not an error:
#: the batch script requeues it). 0 means finished, 1 a crash, 2 a config error.
EXIT_STOPPED = 3
STATUS_FILE = "status.json"


def slurm_restart_count(environ: Optional[dict[str, str]] = None) -> Optional[int]:
    """How often SLURM requeued this job (``SLURM_RESTART_COUNT``; 0 on the first start), or
    None outside a SLURM job."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0)


class PreemptionHandler:
    """Records stop signals and turns them into one decision shared by all ranks.

    Construct it on every rank, as early as possible (a SIGUSR1 that arrives before a handler
    exists kills the process: that is the signal's default action)."""

    def __init__(self, signals: Sequence[str] = ("SIGUSR1", "SIGTERM"), check_every: int = 1,
                 enabled: bool = True) -> None:
        self.check_every = max(1, int(check_every))
        self.enabled = enabled
        self._chained: dict[int, Any] = {}
        self.received: Optional[int] = None  # first signal number caught on this rank
        self._group: Any = None
        self._group_ready = False
        self._previous: dict[int, Any] = {}
        if not enabled:
            return
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread install handlers (e.g. a Trainer built inside a
            # worker thread); such a run simply cannot be preempted gracefully.
            log.warning("preemption handler not installed: not on the main thread")
            return
        for name in signals:
            sig = signal.Signals[name] if isinstance(name, str) else signal.Signals(name)
            self._previous[sig] = signal.signal(sig, self._on_signal)
        # Kept after restore(): see chain().
        self._chained = dict(self._previous)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only a flag here: logging or collectives inside a signal handler can deadlock.
        if self.received is None:
            self.received = signum
        msg = f"worldline: received {signal.Signals(signum).name}; stopping after this step\n"
        os.write(2, msg.encode())

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received else None

    def _reduce_group(self) -> Any:
        """The group whose all-reduce runs on CPU tensors: the default one under gloo, a gloo
        group of all ranks otherwise (created on first use, which every rank reaches at the same
        step, so the collective ``new_group`` call is matched)."""
        import torch.distributed as dist

        if not self._group_ready:
            if dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group

    def should_stop(self, step: int) -> bool:
        """True on every rank iff any rank caught a stop signal (checked every ``check_every``
        steps; the others return False without communicating)."""
        if not self.enabled or step % self.check_every:
            return False
        import torch  # here, not at import: the entry points import this module
        import torch.distributed as dist

        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._reduce_group())
        if flag.item() and self.received is None:
            self.received = int(flag.item())  # another rank's signal: report it as ours
        return bool(flag.item())

    def chain(self) -> None:
        """Hand the stop signal on to the handler that was installed before ours, if that was a
        Python function, once our checkpoint is written. In a ``launcher=slurm`` sweep job that
        is submitit's checkpoint-and-requeue (USR2): the job requeues itself and resumes from
        the checkpoint of the stop step instead of the last periodic one. May not return."""
        prev = self._chained.get(self.received) if self.received else None
        if callable(prev):
            prev(self.received, None)

    def restore(self) -> None:
        """Put back the handlers that were installed before this one."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}


def write_status(run_dir: str | Path, state: str, step: int, steps: int,
                 stop_signal: Optional[str] = None) -> Path:
    """Write ``<run_dir>/status.json`` atomically: ``state`` is ``finished`` or ``stopped``.

    The batch script reads it to decide whether to requeue (slurm/templates/preempt.sh)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"state": state, "step": step, "steps": steps, "signal": stop_signal,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": slurm_restart_count(), "time": time.time()}
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(body, indent=1) + "\n")
    return run_dir / STATUS_FILE


def read_status(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """``status.json`` of a run, or None when the run never reached the end of ``train()``."""
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
