"""Process-group set-up from torchrun or SLURM variables, and a clean distributed exit.

Launch modes:

- ``torchrun`` (single or multi-node with rendezvous) sets RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR and MASTER_PORT.
- ``srun`` starting one task per GPU sets SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS; the
  master is the first host of ``scontrol show hostnames $SLURM_JOB_NODELIST`` resolved through
  ``scontrol show node`` (NodeAddr, since node names need not resolve) and the port is derived
  from the job id.
- the ``deepspeed`` launcher exports the same variables as torchrun (run it with
  ``--no_local_rank``, or let ``worldline.train.main`` drop the ``--local_rank`` flag).
- Otherwise: one process, no process group.

The Trainer calls :func:`init_distributed` itself; ``worldline-train`` under several ranks
always leaves through :func:`finish`.

CUDA + NCCL when a GPU is visible, CPU + gloo otherwise.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout


def slurm_master_addr(nodelist: str) -> str:
    """NodeAddr of the first host in a SLURM nodelist expression (e.g. ``node[1-2]``)."""
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    m = re.search(r"NodeAddr=(\S+)", _scontrol("show", "node", first))
    return m.group(1) if m else first


def slurm_port(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes rarely collide.
    slurm/templates/train_torchrun.sbatch uses the same rule for the c10d rendezvous."""
    return base + int(re.sub(r"\D", "", job_id) or 0) % span


def dist_env(environ: Optional[dict[str, str]] = None) -> DistInfo:
    """Read the launcher's variables (torchrun first, then srun) without side effects."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                        env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env
                        else None, "torchrun")
    # Only inside an srun step: the batch script itself also carries SLURM_PROCID=0 and the
    # job's SLURM_NTASKS, and a process started there directly is one process, not rank 0.
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ntasks > 1:
        # Rank 0 is the first task, which SLURM places on the step's first node.
        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        return DistInfo(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), ntasks,
            env.get("MASTER_ADDR") or slurm_master_addr(nodes),
            int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_port(env["SLURM_JOB_ID"]),
            "srun")
    return DistInfo()


def pick_device() -> torch.device:
    """This rank's device: its local GPU when CUDA is available, else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
        if torch.cuda.is_available() else torch.device("cpu")


def cpu_setup(threads: int | None) -> None:
    """Settings every CPU entry point shares (train, sample, eval, play), so a result computed
    by one replays bitwise in another: ``threads`` intra-op threads (None: torch's default)
    and denormals flushed to zero.

    Zero-initialised (adaLN-zero) and decaying weights produce denormal floats, which run
    ~20x slower on x86 CPUs (measured on the tiny autoencoder: 3.6 s vs 0.17 s a step);
    flushing them changes no result we care about, but it does change bits, and so does the
    thread count (reductions split differently): a recording made with one setting replays
    exactly only under the same one."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when launched with several ranks.

    ``timeout_s`` bounds every collective, so a dead or stalled rank makes the others fail
    with an error instead of hanging forever."""
    info = dist_env()
    if not info.distributed or dist.is_initialized():
        return info
    if info.master_addr:
        os.environ["MASTER_ADDR"] = info.master_addr
    if info.master_port:
        os.environ["MASTER_PORT"] = str(info.master_port)
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d (local %d) up via %s, backend %s", info.rank, info.world_size,
             info.local_rank, info.launcher, backend)
    return info


def finish(code: int = 0, clean: Optional[bool] = None) -> None:
    """Exit a distributed entry point cleanly and never return.

    A 2-process gloo run that wrote a checkpoint can abort at interpreter shutdown
    ("terminate called without an active exception") while gloo's threads are torn down; a
    barrier, an explicit destroy, flushed streams and ``os._exit`` sidestep that teardown.
    ``clean`` (default: ``code == 0``): every rank got here, so wait for the others at a
    barrier (a run stopped on a preemption signal exits non-zero but cleanly)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if code == 0 if clean is None else clean:
                dist.barrier()
            dist.destroy_process_group()
        except Exception as e:  # a peer already died: still exit with our own code
            log.warning("process-group teardown failed: %s", e)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_finish(main: Callable[[], Optional[int]]) -> None:
    """Run a distributed entry point's ``main`` and exit through :func:`finish` with its code
    (a traceback and code 1 on an exception; ``sys.exit(n)`` keeps ``n``). Never returns."""
    import traceback

    code = 1
    try:
        code = main() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then exit through finish()
        traceback.print_exc()
    finish(code)


def all_reduce_scalars(values: dict[str, Any], device: torch.device,
                       op: str = "mean") -> dict[str, float]:
    """Scalars (floats or 0-dim tensors) by name -> their mean (or max) over all ranks, as
    floats. One collective for the whole dict; a host sync, so call it at log steps only."""
    keys = sorted(values)
    if not keys:
        return {}
    vec = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(())
                       for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op != "max":
            vec /= dist.get_world_size()
    return dict(zip(keys, vec.tolist()))

