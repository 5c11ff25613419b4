"""Worldline on a real SLURM cluster: munge + slurmctld + two slurmd nodes on this host, set up by
the project's own slurm/local_cluster.sh (which apt-installs the Debian packages when missing)
and stopped when the session ends. Jobs are submitted with the real ``worldline-submit``.

- (a) a 2-node x 1-task job, torchrun per node (c10d rendezvous on node1), trains the tiny
  autoencoder with DDP over gloo and writes its checkpoints;
- (b) the same run, one srun task per rank, gets ``scancel --signal=USR1 --batch`` mid-run: the
  batch shell forwards it, the ranks stop after one step and checkpoint, the batch script
  requeues the job (~15 s with the cluster's cred_expire/sched_interval), the requeued job
  resumes in the same (offline) W&B run and finishes at the last step, and its loss sequence
  equals (a)'s exactly;
- (c) a Hydra multirun with ``launcher=slurm`` (hydra-submitit-launcher) runs 2 jobs on the
  cluster, each in its own run dir; job 0 gets submitit's USR2 mid-run, checkpoints the stop
  step, hands the signal to submitit, which requeues it, and resumes from that step.

Measured on the shared 2-core machine: the whole module 120-150 s (cluster start < 2 s,
stop 5-11 s).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from _runs import BIN
from _slurm import TERMINAL, job_state
from worldline.train.tracking import read_metrics

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
STEPS = 40
COMMON = ["experiment=smoke", "stage=autoencoder", "dist=ddp", "run.threads=1",
          f"train.steps={STEPS}", "train.log_every=1", f"train.ckpt_every={STEPS}",
          "sample.num_steps=1", "slurm.nodes=2", "slurm.gpus_per_node=0",
          "slurm.cpus_per_task=1", "slurm.time=10", "slurm.signal_s=60"]
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_runs")


@pytest.fixture(scope="module")
def datasets(root) -> Path:
    """The smoke world, generated once before any job (the ranks then only read it)."""
    from _runs import compose_cfg
    from worldline.data.shards import ensure_synthetic_dataset
    from worldline.data.synthetic import SyntheticWorldConfig

    cfg = compose_cfg(["experiment=smoke"])
    syn = SyntheticWorldConfig(**OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    ensure_synthetic_dataset(root / "_datasets", syn)
    return root / "_datasets"


def wait_done(env: dict[str, str], job: str, run_dir: Path, timeout: float = 240) -> str:
    """Poll until the job reaches a terminal state; return it (the log is attached on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(env, job).get("JobState", "")
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job} not done after {timeout} s ({state}):\n{job_log(run_dir, 6000)}")


def job_log(run_dir: Path, tail: int = 0) -> str:
    """The job's output file(s) (``--output`` in the run dir); ``tail``: last chars only."""
    text = "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))
    return text[-tail:] if tail else text


def submit(env: dict[str, str], root: Path, datasets: Path, name: str, *extra: str) -> str:
    r = subprocess.run([str(BIN / "worldline-submit"), *COMMON, f"run.root={root}",
                        f"run.name={name}", f"data.root={datasets}", *extra],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert Path(lines["run_dir"]) == root / name
    return lines["job"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def torchrun_job(slurm_env, root, datasets) -> tuple[str, Path]:
    job = submit(slurm_env, root, datasets, "a-torchrun", "slurm.mode=torchrun", "logger=none")
    run_dir = root / "a-torchrun"
    assert wait_done(slurm_env, job, run_dir) == "COMPLETED", job_log(run_dir, 6000)
    return job, run_dir


def test_two_node_torchrun_job_trains_and_checkpoints(torchrun_job, slurm_env) -> None:
    job, run_dir = torchrun_job
    log = job_log(run_dir)
    info = job_state(slurm_env, job)
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    # Both ranks joined through torchrun's c10d rendezvous on node1's NodeAddr.
    assert "rank 0/2 (local 0) up via torchrun" in log
    assert "rank 1/2 (local 0) up via torchrun" in log
    assert "--rdzv-endpoint=\"${head_addr:-$head_node}:$port\"" in next(
        (run_dir / "slurm").glob("submit-*.sbatch")).read_text()
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS}"
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == "ddp"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == STEPS
    assert status["slurm_job_id"] == job and status["slurm_restart_count"] == 0
    assert "requeueing" not in log  # a finished run never requeues


def test_preempted_job_requeues_resumes_and_matches(torchrun_job, slurm_env, root,
                                                    datasets) -> None:
    name = "b-preempted"
    run_dir = root / name
    # W&B offline (caches inside the run dir): the requeued job must continue the same run.
    job = submit(slurm_env, root, datasets, name, "slurm.mode=srun", "logger=wandb")
    # Signal once a few steps are logged (the batch shell gets it, like --signal=B:USR1@N).
    deadline = time.monotonic() + 120
    while len(losses(run_dir)) < 4:
        assert time.monotonic() < deadline, f"job {job} did not start:\n{job_log(run_dir, 6000)}"
        assert job_state(slurm_env, job).get("JobState") not in TERMINAL, job_log(run_dir, 6000)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True,
                   timeout=30)
    assert wait_done(slurm_env, job, run_dir) == "COMPLETED", job_log(run_dir, 6000)
    log = job_log(run_dir)

    # srun started the ranks; they found the master through scontrol (NodeAddr of node1).
    assert "rank 1/2 (local 0) up via srun" in log
    # It stopped on the signal, checkpointed the stop step and was requeued exactly once.
    assert "caught SIGUSR1" in log and "requeueing job" in log, log[-6000:]
    stops = [int(line.split("stopping at step ")[1].split("/")[0])
             for line in log.splitlines() if "stopping at step" in line]
    assert len(set(stops)) == 1, log[-6000:]  # every rank stopped after the same step
    stop = stops[0]
    assert 4 <= stop < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stop}'} at step {stop}" in log
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == STEPS
    assert status["slurm_restart_count"] == 1 and status["slurm_job_id"] == job
    assert job_state(slurm_env, job).get("Restarts") == "1"
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.rsplit("-", 1)[1] for r in runs}) == 1, runs

    # One row per step; SLURM_RESTART_COUNT logged: 0 up to the stop, 1 after.
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["slurm_restart_count"] for r in rows] == [0] * stop + [1] * (STEPS - stop)
    # Bitwise the uninterrupted run's losses (same 2 gloo ranks; torchrun vs srun launch).
    assert losses(run_dir) == losses(torchrun_job[1])


def test_submitit_sweep_on_slurm(slurm_env, root, datasets) -> None:
    """2 sweep jobs on the cluster; job 0 gets submitit's time-limit signal (USR2) mid-run:
    it stops after the step, checkpoints, submitit requeues it and it resumes from that step.

    Both jobs stall 10 s at the start of step 6 (failpoint) and the signal is sent once step 5
    is logged, so it lands mid-run however fast the steps are: without the stall a smoke step
    takes ~0.1 s and under CI load the signal once arrived after the last step."""
    name, steps = "c-sweep", 30
    sweep = root / name
    cmd = [str(BIN / "worldline-train"), "-m", "launcher=slurm", "experiment=smoke",
           "stage=autoencoder", "logger=none", "run.threads=1", f"train.steps={steps}",
           f"train.ckpt_every={steps}", "train.log_every=1", "sample.num_steps=1",
           f"run.root={root}", f"run.name={name}", f"data.root={datasets}",
           "optim.lr=1e-4,3e-4", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=60"]
    env = {**slurm_env, "WORLDLINE_FAILPOINTS": "stall:steps=6,secs=10"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while len(losses(sweep / "0")) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.2)
        # submitit submits the sweep as one job array: <array id>_0 and _1.
        tasks = sorted(p.name for p in (sweep / ".submitit").iterdir()
                       if re.fullmatch(r"\d+_\d+", p.name))
        assert len(tasks) == 2 and tasks[0].endswith("_0") and tasks[1].endswith("_1"), tasks
        subprocess.run(["scancel", "--signal=USR2", tasks[0]], env=slurm_env, check=True,
                       timeout=30)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-6000:]
    lrs, job_ids = set(), set()
    for num in ("0", "1"):
        run_dir = sweep / num  # each sweep job trained in its own run dir
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "finished"
        assert status["slurm_restart_count"] == (1 if num == "0" else 0)
        job_ids.add(status["slurm_job_id"])
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{steps}"
        assert [s for s, _ in losses(run_dir)] == list(range(1, steps + 1))
        lrs.add(OmegaConf.load(run_dir / "config.yaml").optim.lr)
    assert lrs == {1e-4, 3e-4}
    assert len(job_ids) == 2  # two SLURM jobs (the array's tasks), not one process
    log = "".join(p.read_text() for p in (sweep / ".submitit" / tasks[0]).glob("*_log.*"))
    stop = int(log.split("stopping at step ")[1].split("/")[0])
    assert stop in (5, 6) and "Requeued job" in log
    assert f"resumed from {sweep / '0' / 'checkpoints' / f'step_{stop}'} at step {stop}" in log
