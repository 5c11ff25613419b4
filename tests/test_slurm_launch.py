"""The SLURM launch pieces that need no cluster: ``worldline-submit --dry-run`` renders valid bash
for both modes from the Hydra config, bad ``slurm.*`` / ``preempt.*`` values fail naming the
key, the SLURM rank variables are read only inside an srun step, a stop signal that reaches
only ONE of two gloo ranks (torchrun) still stops both after the same step with a checkpoint,
and a ``launcher=local`` (submitit) sweep gives each job its own run dir.

The real-cluster tests are in tests/test_slurm.py. Measured on 2 idle cores: ~45 s.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from _runs import cli
from worldline.train.dist import dist_env
from worldline.train.preempt import EXIT_STOPPED, PreemptionHandler, read_status
from worldline.train.tracking import read_metrics

SMOKE = ["experiment=smoke", "stage=autoencoder", "logger=none", "run.threads=1",
         "sample.num_steps=1", "train.log_every=1"]


def dry_run(*overrides: str) -> subprocess.CompletedProcess:
    """The installed ``worldline-submit --dry-run`` in a subprocess."""
    return cli("worldline-submit", "--dry-run", *overrides, timeout=120)


def dry_run_here(capsys, *overrides: str) -> tuple[int, str, str]:
    """Same, in this process (composition dominates a CLI call: ~4 s each on 2 cores)."""
    from worldline.scripts.submit import main

    code = main(["--dry-run", *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_dry_run_renders_valid_sbatch(mode: str, tmp_path: Path) -> None:
    r = dry_run(f"slurm.mode={mode}", "slurm.nodes=4", "slurm.gpus_per_node=8",
                "slurm.partition=gpu", "slurm.account=proj", "slurm.qos=high",
                "slurm.constraint=h100", "slurm.time=2-00:00:00", "slurm.signal_s=600",
                "slurm.extra=[--exclusive]", f"run.root={tmp_path}", "run.name=world",
                "stage=autoencoder", "dist=fsdp", "sample.prompts=[a red circle, in a meadow]")
    assert r.returncode == 0, r.stderr
    script = r.stdout
    for line in ["#SBATCH --nodes=4", "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --signal=B:USR1@600",
                 "#SBATCH --requeue", "#SBATCH --exclusive",
                 f"#SBATCH --output={tmp_path}/world/slurm/%x-%j.out",
                 "source /", "nccl.sh", "scontrol requeue \"$SLURM_JOB_ID\""]:
        assert line in script, line
    tasks = "#SBATCH --ntasks-per-node=1" if mode == "torchrun" else "#SBATCH --ntasks-per-node=8"
    assert tasks in script
    # 8 CPUs per rank: all 8 ranks of a node in one torchrun task, one rank per srun task.
    assert f"#SBATCH --cpus-per-task={64 if mode == 'torchrun' else 8}" in script
    # Valid bash whose TRAIN_ARGS hold the overrides exactly as typed (spaces included).
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    args_line = next(line for line in script.splitlines() if line.startswith("TRAIN_ARGS=("))
    got = subprocess.run(["bash", "-c", f'{args_line}; printf "%s\\n" "${{TRAIN_ARGS[@]}}"'],
                         capture_output=True, text=True).stdout.splitlines()
    assert "sample.prompts=[a red circle, in a meadow]" in got
    assert f"run.root={tmp_path}" in got and "dist=fsdp" in got


def test_cpu_job_skips_nccl_and_gpus(tmp_path: Path, capsys) -> None:
    code, out, err = dry_run_here(capsys, "slurm.gpus_per_node=0", f"run.root={tmp_path}",
                                  "stage=autoencoder")
    assert code == 0, err
    assert "--gpus-per-node" not in out and "nccl.sh" not in out


@pytest.mark.parametrize("override, key", [
    ("slurm.mode=mpirun", "slurm.mode"),
    ("slurm.time=tomorrow", "slurm.time"),
    ("slurm.nodes=0", "slurm.nodes"),
    ("slurm.extra=[exclusive]", "slurm.extra"),
    ("preempt.signals=[SIGFOO]", "preempt.signals"),
    ("preempt.signals=[SIGKILL]", "preempt.signals"),
    ("preempt.check_every=0", "preempt.check_every"),
    ("resume=null", "resume"),
])
def test_bad_launch_config_fails_naming_the_key(override: str, key: str, capsys) -> None:
    code, out, err = dry_run_here(capsys, "stage=autoencoder", override)
    assert code == 2 and not out
    assert f"invalid config: {key}:" in err, err


def test_srun_variables_only_inside_a_step() -> None:
    step = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]",
            "MASTER_ADDR": "10.0.0.1"}
    info = dist_env(step)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (3, 1, 4, "srun")
    assert info.master_addr == "10.0.0.1" and info.master_port == 20077  # port from the job id
    # The batch shell has SLURM_PROCID=0 and the job's task count but is no rank.
    batch = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    assert not dist_env({**batch, "SLURM_PROCID": "0"}).distributed
    # torchrun's variables win inside a torchrun-per-node task.
    assert dist_env({**step, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"


def test_handler_records_signal_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    h = PreemptionHandler(["SIGUSR1"], check_every=2)
    try:
        assert not h.should_stop(2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not h.should_stop(3)  # not a check step: no decision yet
        assert h.should_stop(4) and h.signal_name == "SIGUSR1"
    finally:
        h.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (read from /proc)."""
    out = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    for pid in map(int, out.stdout.split()):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank-{rank} worker under torchrun {launcher.pid}")


@pytest.mark.dist
def test_signal_to_one_rank_stops_all_ranks(tmp_path: Path) -> None:
    steps = 30
    args = [*SMOKE, "dist=ddp", f"train.steps={steps}", f"train.ckpt_every={steps}",
            f"run.root={tmp_path}", "run.name=p"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "worldline.train.main", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "p"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        os.kill(_worker_pid(proc, 1), signal.SIGUSR1)  # rank 1 only
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    # Workers exit with EXIT_STOPPED; torchrun reports that as a failed child.
    assert proc.returncode != 0 and f"exitcode  : {EXIT_STOPPED}" in out, out[-4000:]
    stops = {int(line.split("stopping at step ")[1].split("/")[0])
             for line in out.splitlines() if "stopping at step" in line}
    assert len(stops) == 1, out[-4000:]  # rank 0 stopped after the same step as rank 1
    stop = stops.pop()
    assert stop < steps
    status = read_status(run)
    assert status["state"] == "stopped" and status["step"] == stop
    assert status["signal"] == "SIGUSR1"  # rank 0 reports rank 1's signal
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stop}"
    # (Requeue + resume of such a run: tests/test_slurm.py.)


def test_local_submitit_sweep_gives_each_job_its_run_dir(tmp_path: Path) -> None:
    r = cli("worldline-train", "-m", "launcher=local", *SMOKE, "train.steps=2",
            f"run.root={tmp_path}", "run.name=sweep", "optim.lr=1e-4,2e-4", timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lrs = set()
    for num in ("0", "1"):
        run = tmp_path / "sweep" / num
        assert read_status(run)["state"] == "finished"
        assert (run / "checkpoints" / "latest").read_text() == "step_2"
        assert (run / ".hydra" / "overrides.yaml").is_file()  # Hydra's output dir == run dir
        lrs.add(OmegaConf.load(run / "config.yaml").optim.lr)
    assert lrs == {1e-4, 2e-4}
