"""``worldline-shards --partitions N --slurm``: the partitions as a SLURM array, then the merge.

Submitted with submitit (as ``launcher=slurm`` sweeps are, conf/launcher/slurm.yaml): one
array task per partition runs ``worldline-shards ... --partition $i`` in-process, and one
merge job, started only when every task succeeded (``afterok`` on the array), runs
``worldline-shards ... --merge``. Every step is idempotent (``worldline.data.ingest_dist``),
so a failed or preempted array task can simply be resubmitted with the same command: finished
partitions are not redone. Logs: ``OUT/parts/slurm/<job id>_<task>_log.{out,err}``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

#: Flags of this submission only: the jobs get the rest of the command line.
_SLURM_FLAGS = {"--slurm": 0, "--slurm-partition": 1, "--slurm-account": 1, "--slurm-time": 1,
                "--slurm-cpus": 1, "--slurm-parallelism": 1}


def job_argv(argv: list[str]) -> list[str]:
    """``argv`` without the ``--slurm*`` options (``--flag value`` and ``--flag=value``)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _SLURM_FLAGS:
            skip = _SLURM_FLAGS[name] if "=" not in a else 0
            continue
        out.append(a)
    return out


def run_step(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """One job's work: ``main(argv)`` (``worldline-shards``' main, passed in rather than
    imported: make_shards imports this module) in this process; raises when it fails, so SLURM
    marks the task failed and the dependent merge never starts."""
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"worldline-shards {' '.join(argv)} exited {code}")
    return code


def submit_partitions(argv: list[str], args: argparse.Namespace, main: Callable[[list[str]], int]) -> dict:
    """Submit ``args.partitions`` array tasks running ``main(argv + ["--partition", i])`` and
    the dependent ``--merge`` job; returns ``{"array": id, "merge": id, "logs": folder}``."""
    import submitit

    base = job_argv(argv)
    # Absolute paths: the jobs may start in another working directory.
    base = [str(Path(a).resolve()) if a in (args.source, args.out) else a for a in base]
    logs = Path(args.out).resolve() / "parts" / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")
    params = {"name": "worldline-shards", "timeout_min": args.slurm_time, "cpus_per_task": args.slurm_cpus,
              "nodes": 1, "tasks_per_node": 1, "slurm_array_parallelism": args.slurm_parallelism}
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    if args.slurm_account:
        params["slurm_account"] = args.slurm_account
    executor.update_parameters(**params)
    if "--processes" not in " ".join(base):  # a task uses the CPUs it asked for
        base += ["--processes", str(args.slurm_cpus)]
    tasks = [[*base, "--partition", str(i)] for i in range(args.partitions)]
    jobs = executor.map_array(functools.partial(run_step, main), tasks)
    array = jobs[0].job_id.split("_")[0]
    executor.update_parameters(name="worldline-shards-merge", cpus_per_task=1,
                               # A failed task cancels the merge instead of leaving it pending
                               # forever; rerunning the command redoes only unfinished parts.
                               slurm_additional_parameters={"dependency": f"afterok:{array}",
                                                            "kill-on-invalid-dep": "yes"})
    merge = executor.submit(run_step, main, [*base, "--merge"])
    return {"array": array, "merge": merge.job_id, "logs": str(logs)}
