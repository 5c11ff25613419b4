"""2 ranks x 2 DataLoader workers under torchrun (gloo): every sample exactly once per epoch,
then a 2 -> 1 world-size resume from the ranks' own states."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from worldline.data.loader import ShardLoader

SCRIPT = textwrap.dedent('''
    import itertools, json, sys

    def main() -> int:
        import torch.distributed as dist
        from worldline.data.loader import ShardLoader

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        root, out, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
        loader = ShardLoader(root, rank=rank, world_size=world, **json.loads(sys.argv[4]))
        seen = [[k, e] for b in itertools.islice(loader, batches) for k, e in zip(b["key"], b["epoch"])]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "seen": seen, "state": loader.state_dict(),
                                          "workers": loader.num_streams})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        return 0

    if __name__ == "__main__":
        from worldline.train.dist import run_and_finish  # barrier, destroy, flush, os._exit

        run_and_finish(main)
''')

KWARGS = dict(batch_size=2, num_frames=3, resolution=(32, 32), num_workers=2, seed=5,
              shuffle_buffer=3, position="random")


@pytest.mark.dist
def test_two_ranks_two_workers_exact_coverage(data_synthetic_dir, tmp_path):
    script, out = tmp_path / "dist_cover.py", tmp_path / "seen.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # 18 batches x 2 samples x 2 ranks = 72 samples: three epochs of 24.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), data_synthetic_dir, str(out), "18", json.dumps(KWARGS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["workers"] == 2 for r in ranks)
    everything = [k for r in ranks for k in r["seen"]]
    by_epoch: dict[int, Counter] = {}
    for key, epoch in everything:
        by_epoch.setdefault(epoch, Counter())[key] += 1
    all_keys = {f"{i:08d}" for i in range(24)}
    for epoch in (0, 1):  # complete epochs: each of the 24 samples exactly once over 2x2 streams
        assert set(by_epoch[epoch]) == all_keys and set(by_epoch[epoch].values()) == {1}, epoch
    rank_keys = [{k for k, e in r["seen"] if e == 0} for r in ranks]
    assert not rank_keys[0] & rank_keys[1]  # ranks read disjoint shards

    # Resume the same run on one rank with one worker from both ranks' states: the rest of
    # every open epoch arrives exactly once, and nothing already delivered repeats.
    states = [r["state"] for r in ranks]
    single = ShardLoader(data_synthetic_dir, **{**KWARGS, "num_workers": 1})
    single.load_state_dict(states)
    rest = [(k, e) for b in itertools.islice(single, 60) for k, e in zip(b["key"], b["epoch"])]
    merged = ShardLoader.merge_states(states)  # epochs are per sub-stream: several may be open
    assert merged["next_epoch"] >= 3
    for epoch in range(merged["next_epoch"]):
        keys = [k for k, e in everything + rest if e == epoch]
        assert sorted(keys) == sorted(all_keys), epoch
    assert single.stats["samples"] == 120 + 72  # old ranks' counters carried into rank 0
