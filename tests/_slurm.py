"""The local SLURM cluster the slurm-marked tests share (slurm/local_cluster.sh): munge +
slurmctld + two slurmd "nodes" on this host, started once per session by the ``slurm_env``
fixture (registered in conftest.py) and stopped when the session ends."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "slurm" / "local_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _packages_missing() -> list[str]:
    missing = []
    for p in PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                           text=True)
        if "install ok installed" not in r.stdout:
            missing.append(p)
    return missing


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """Start the local cluster (installing SLURM if needed); yield the env for its clients."""
    if os.geteuid() != 0 and _packages_missing():
        pytest.skip(f"SLURM packages {_packages_missing()} missing and not root to install them")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "WORLDLINE_SLURM_PORTS": " ".join(map(str, _free_ports(3)))}
    r = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, f"cluster start failed:\n{r.stdout}\n{r.stderr}"
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env["OMP_NUM_THREADS"] = "1"
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], env=env, timeout=120)


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (no accounting here: sacct does not work)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         env=env, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


