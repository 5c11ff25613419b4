"""Preprocessing past one machine (worldline.data.ingest_dist, worldline.scripts.shards_slurm,
worldline-encode-latents under torchrun): every scaled-out result equals a single process's.

- (a) ``worldline-shards --partitions 2 --partition i`` as two separate processes + ``--merge``
  gives the samples of one ``worldline-shards`` run: keys, order, every member's bytes,
  manifest entries, skipped list and provenance summary (also with a duplicate that only the
  merge can see, and a bad input); a finished partition is not redone;
- (b) the same through a real SLURM array + dependent merge job on the local cluster; a failing
  task cancels the merge, and resubmitting the command redoes nothing finished;
- (c) ``worldline-encode-latents`` under torchrun with 2 gloo ranks, and as 2 srun tasks on the
  two cluster nodes, equals 1 process, per key (plus the rank/resume/manifest contract of
  ``encode_latent_shards`` in one process).

Measured on the shared 2-core machine: the whole module ~80 s with the cluster (start/stop
~10 s), the non-SLURM tests ~37 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from _runs import BIN
from worldline.data.video import encode_mp4


def clip(seed: int, t: int = 4) -> bytes:
    """A tiny 32x32 mp4, different per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    return encode_mp4(np.repeat(base, t, axis=0) + np.arange(t, dtype=np.uint8)[:, None, None, None], 8.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """8 inputs: 5 good clips, a non-video (skipped) and two copies of the first clip in the
    second half: partition 1 keeps c6_copy and skips c7_copy as its duplicate; only the merge
    sees that both copy c0."""
    root = tmp_path_factory.mktemp("scaleout_src")
    for i in range(5):
        (root / f"c{i}.mp4").write_bytes(clip(i))
        (root / f"c{i}.txt").write_text(f"clip {i}")
    (root / "c5_bad.mp4").write_bytes(b"not a video at all")
    (root / "c6_copy.mp4").write_bytes((root / "c0.mp4").read_bytes())
    (root / "c7_copy.mp4").write_bytes((root / "c0.mp4").read_bytes())
    return root


@pytest.fixture(scope="module")
def single(corpus: Path, tmp_path_factory) -> Path:
    """The reference: one ``worldline-shards`` process over the corpus."""
    out = tmp_path_factory.mktemp("scaleout_single") / "single"
    shards(str(corpus), str(out))
    return out


def shards(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "worldline-shards"), *args, "--max-count", "2", "--processes", "0", "-q"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def members(out: Path) -> list[tuple[str, bytes]]:
    """Every member of every shard, in manifest order: (name, bytes)."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = []
    for name in manifest["shards"]:
        with tarfile.open(out / name) as tar:
            found += [(m.name, tar.extractfile(m).read()) for m in tar]
    return found


def same_samples(single: Path, merged: Path) -> None:
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (single, merged))
    strip = lambda m: [{k: v for k, v in e.items() if k != "shard"} for e in m["samples"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert a["skipped"] == b["skipped"] and a["provenance"] == b["provenance"]
    assert a["num_samples"] == b["num_samples"]
    assert members(single) == members(merged)
    for m, out in ((a, single), (b, merged)):  # entries name the shard that holds them
        for e in m["samples"]:
            with tarfile.open(out / e["shard"]) as tar:
                assert f"{e['key']}.mp4" in tar.getnames()


def test_partitions_then_merge_equal_one_process(corpus: Path, single: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    procs = [subprocess.Popen([str(BIN / "worldline-shards"), str(corpus), str(dist), "--partitions", "2",
                               "--partition", str(i), "--max-count", "2", "--processes", "0", "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:  # concurrently, as two array tasks would
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    part1 = dist / "parts" / "part-1"
    stamp = {p.name: p.stat().st_mtime_ns for p in part1.iterdir()}
    shards(str(corpus), str(dist), "--partitions", "2", "--partition", "1")  # finished: a no-op
    assert {p.name: p.stat().st_mtime_ns for p in part1.iterdir()} == stamp
    r = shards(str(corpus), str(dist), "--partitions", "2", "--merge")
    assert json.loads(r.stdout.splitlines()[-1])["samples"] == 5
    same_samples(single, dist)
    manifest = json.loads((dist / "manifest.json").read_text())
    # The copies of c0 sit in partition 1: the merge drops c6_copy from its shard and names
    # c0 as the kept copy for both, as one run does (same_samples compared the messages).
    assert [b["key"] for b in manifest["skipped"]] == ["c5_bad", "c6_copy", "c7_copy"]
    assert all(b["reason"] == "duplicate" and b["message"].endswith("(key c0), kept")
               for b in manifest["skipped"][1:])
    assert json.loads((single / "manifest.json").read_text())["shard_counts"] == [2, 2, 1]
    # The merge is idempotent too, and the parts keep only their small bookkeeping files.
    before = (dist / "manifest.json").read_bytes()
    shards(str(corpus), str(dist), "--partitions", "2", "--merge")
    assert (dist / "manifest.json").read_bytes() == before
    assert not list((dist / "parts").rglob("*.tar"))
    # A merge interrupted after moving the shards (before its manifest) finishes on a rerun.
    (dist / "manifest.json").unlink()
    shards(str(corpus), str(dist), "--partitions", "2", "--merge")
    assert (dist / "manifest.json").read_bytes() == before
    # --partitions without --partition: every partition in this process, then the merge.
    here = tmp_path / "here"
    shards(str(corpus), str(here), "--partitions", "3")
    same_samples(single, here)


def submit_shards(slurm_env: dict, *args: str) -> dict:
    """``worldline-shards ... --slurm`` on the local cluster; returns its printed job ids."""
    r = subprocess.run([str(BIN / "worldline-shards"), *args, "--slurm", "--slurm-cpus", "1", "--slurm-time", "10",
                        "--max-count", "2", "-q"], capture_output=True, text=True, timeout=120, env=slurm_env)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def wait_job(slurm_env: dict, jobs: dict, job: str, timeout: float = 240) -> str:
    """Poll ``job`` to a terminal state (its task logs attached on a timeout)."""
    from _slurm import TERMINAL, job_state

    deadline, state = time.monotonic() + timeout, ""
    while state not in TERMINAL:
        logs = "\n".join(p.read_text()[-3000:] for p in Path(jobs["logs"]).rglob("*_log.*"))
        assert time.monotonic() < deadline, f"job {job} still {state}:\n{logs}"
        time.sleep(0.5)
        state = job_state(slurm_env, job).get("JobState", "")
    return state


@pytest.mark.slurm
def test_slurm_array_then_merge_job_equal_one_process(corpus: Path, single: Path, tmp_path: Path,
                                                      slurm_env) -> None:
    from _slurm import job_state

    dist = tmp_path / "dist"
    # A failing task (--strict: partition 1 holds a bad input) cancels the merge job.
    start = time.monotonic()
    jobs = submit_shards(slurm_env, str(corpus), str(dist), "--partitions", "2", "--strict")
    assert wait_job(slurm_env, jobs, jobs["merge"]) == "CANCELLED"
    states = [job_state(slurm_env, f"{jobs['array']}_{i}").get("JobState") for i in range(2)]
    assert states == ["COMPLETED", "FAILED"], states
    assert not (dist / "manifest.json").exists()
    print(f"SLURM array with a failing task, merge cancelled: {time.monotonic() - start:.1f} s")
    # The same command again (without --strict): finished partitions are kept, the merge runs.
    start = time.monotonic()
    mtimes = {p: p.stat().st_mtime_ns for p in (dist / "parts").rglob("*")
              if p.is_file() and "slurm" not in p.parts}  # the parts' shards and bookkeeping
    jobs = submit_shards(slurm_env, str(corpus), str(dist), "--partitions", "2")
    assert wait_job(slurm_env, jobs, jobs["merge"]) == "COMPLETED"
    print(f"SLURM array (2 tasks, already done) + merge: {time.monotonic() - start:.1f} s")
    tasks = [job_state(slurm_env, f"{jobs['array']}_{i}") for i in range(2)]
    assert all(t.get("JobState") == "COMPLETED" for t in tasks), tasks
    assert {t["NodeList"] for t in tasks} <= {"node1", "node2"}
    # The partitions were not redone: their files are untouched, only the shards were moved.
    assert {p: p.stat().st_mtime_ns for p in mtimes if p.suffix != ".tar"} == \
        {p: t for p, t in mtimes.items() if p.suffix != ".tar"}
    assert any(p.suffix == ".tar" for p in mtimes) and not any(p.exists() for p in mtimes if p.suffix == ".tar")
    same_samples(single, dist)


def test_merge_refuses_unfinished_or_foreign_partitions(corpus: Path, tmp_path: Path) -> None:
    from worldline.data.ingest import make_shards
    from worldline.data.ingest_dist import Partition, make_partition, merge_parts, partition

    assert [partition(list(range(7)), 3, i) for i in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    make_partition(corpus, tmp_path, 2, 0, max_count=2, processes=0)
    with pytest.raises(FileNotFoundError, match=r"partitions \[1\]"):
        merge_parts(tmp_path, 2)
    with pytest.raises(ValueError, match="other settings"):  # a 2-way part never resumes as 3-way
        make_shards(corpus, tmp_path / "parts" / "part-0", max_count=2, processes=0, select=Partition(3, 0))
    with pytest.raises(ValueError, match="written as 'partition 0 of 2'"):
        merge_parts(tmp_path, 1)


def latents_by_key(out: Path) -> dict[str, dict]:
    """key -> {member ext: bytes} over every latent shard of ``out``'s manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, dict] = {}
    for name in manifest["shards"]:
        with tarfile.open(out / name) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return found


@pytest.fixture(scope="module")
def encoded_once(data_synthetic_dir: str, tmp_path_factory) -> tuple[list[str], Path]:
    """A tiny saved autoencoder, the encode arguments, and one process's latent output."""
    import torch
    from dataclasses import asdict

    from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
    from worldline.train.checkpoint import Checkpointer
    from worldline.train.state import TrainState

    tmp = tmp_path_factory.mktemp("scaleout_latents")
    torch.manual_seed(0)
    ae = VideoAutoencoder(AutoencoderArgs(latent_channels=4, base_channels=8, channel_mult=[1, 2, 2],
                                          temporal_downsample=4, spatial_downsample=8)).eval()
    run = tmp / "ae_run"
    Checkpointer(run, keep_last=1).save(1, {"model": ae.state_dict()}, TrainState(), {},
                                        {"config": {"model": {"autoencoder": asdict(ae.args)}}})
    args = ["--checkpoint", str(run), "--num-frames", "5", "--resolution", "32", "32", "--position",
            "random", "--workers", "0", "--dtype", "float32", "--device", "cpu", "--batch-size", "3"]
    one = tmp / "one"
    r = subprocess.run([str(BIN / "worldline-encode-latents"), data_synthetic_dir, str(one), *args],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return args, one


def same_latents(one: Path, two: Path, world: int = 2) -> None:
    """``two`` (a ``world``-rank run) holds exactly ``one``'s latent samples and manifest."""
    from safetensors.numpy import load

    a, b = (json.loads((p / "manifest.json").read_text()) for p in (one, two))
    assert a == b  # shards, counts, per-sample entries, skips, clip settings
    la, lb = latents_by_key(one), latents_by_key(two)
    assert sorted(la) == sorted(lb) and len(la) == 24
    for key in la:  # per key, every tensor (latents, actions, camera) and the metadata
        ta, tb = load(la[key]["safetensors"]), load(lb[key]["safetensors"])
        assert set(ta) == set(tb)
        for name in ta:
            np.testing.assert_array_equal(ta[name], tb[name])
        assert la[key]["json"] == lb[key]["json"]
    journals = sorted(p.name for p in two.iterdir() if p.name.startswith(".encode_latents"))
    assert journals == [f".encode_latents.journal.rank{r}-of-{world}.jsonl" for r in range(world)]
    ranks = [{json.loads(line)["shard"] for line in (two / j).read_text().splitlines()[1:]} for j in journals]
    assert all(ranks) and not set.intersection(*ranks)  # each rank wrote its own shards


@pytest.mark.dist
def test_encode_latents_two_gloo_ranks_equal_one_process(data_synthetic_dir: str, encoded_once, tmp_path: Path) -> None:
    args, one = encoded_once
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(BIN / "worldline-encode-latents"), data_synthetic_dir, str(two), *args],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"2 gloo ranks: {time.monotonic() - start:.1f} s")
    same_latents(one, two)


@pytest.mark.slurm
def test_encode_latents_srun_two_nodes_equal_one_process(data_synthetic_dir: str, encoded_once, tmp_path: Path,
                                                         slurm_env) -> None:
    """One srun task per node on the local cluster (ranks from SLURM_PROCID, master from
    scontrol), gloo."""
    from _slurm import TERMINAL, job_state

    args, one = encoded_once
    two = tmp_path / "two"
    script = tmp_path / "encode.sbatch"
    script.write_text("\n".join([
        "#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=1",
        "#SBATCH --time=10", f"#SBATCH --output={tmp_path}/job.out", "export OMP_NUM_THREADS=1",
        " ".join(["srun", str(BIN / "worldline-encode-latents"), data_synthetic_dir, str(two), *args]), ""]))
    start = time.monotonic()
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                       env=slurm_env)
    assert r.returncode == 0, r.stderr
    job, state = r.stdout.strip().split(";")[0], ""
    log = lambda: (tmp_path / "job.out").read_text()[-4000:] if (tmp_path / "job.out").exists() else ""  # noqa: E731
    while state not in TERMINAL:
        assert time.monotonic() - start < 240, f"job {job} still {state}:\n{log()}"
        time.sleep(0.5)
        state = job_state(slurm_env, job).get("JobState", "")
    assert state == "COMPLETED", log()
    print(f"srun, 2 nodes x 1 rank: {time.monotonic() - start:.1f} s")
    assert job_state(slurm_env, job)["NodeList"] == "node[1-2]"
    assert "rank 1/2 (local 0) up via srun" in (tmp_path / "job.out").read_text()
    same_latents(one, two)


def test_latent_ranks_in_one_process_resume_and_merge(data_synthetic_dir: str, tmp_path: Path) -> None:
    """The data-layer contract behind the torchrun run, without a process group: ranks 0 and 1
    of 2 called one after the other write disjoint shards, a finished rank's rerun encodes
    nothing, and ``write_latent_manifest`` equals a one-process run's manifest."""
    import torch

    from worldline.data.latents import encode_latent_shards, write_latent_manifest

    calls = []

    def encode(video: torch.Tensor) -> torch.Tensor:
        calls.append(len(video))
        return torch.nn.functional.avg_pool3d(video.float() / 127.5 - 1, (4, 8, 8), ceil_mode=True)

    kw = dict(num_frames=5, resolution=(32, 32), position="random", batch_size=4, dtype="float32", seed=2)
    one = encode_latent_shards(data_synthetic_dir, tmp_path / "one", encode, **kw)
    for rank in (1, 0):
        assert encode_latent_shards(data_synthetic_dir, tmp_path / "two", encode, rank=rank, world_size=2, **kw) is None
    assert not (tmp_path / "two" / "manifest.json").exists()  # only the manifest step writes it
    calls.clear()
    encode_latent_shards(data_synthetic_dir, tmp_path / "two", encode, rank=1, world_size=2, **kw)
    assert calls == []  # rank 1's shards are journaled: nothing to redo
    assert write_latent_manifest(tmp_path / "two", 2) == one
    assert latents_by_key(tmp_path / "one") == latents_by_key(tmp_path / "two")
