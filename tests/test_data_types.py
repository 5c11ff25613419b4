"""The data package's typed pieces: Batch (a dataclass readable as a mapping), the loader's
state dataclasses (round-trip to today's dicts), atomic writes and the shard writer."""

from __future__ import annotations

import dataclasses
import json
import pickle
import tarfile

import pytest
import torch

from worldline.data.atomic import atomic_path, atomic_write_json
from worldline.data.batch import Batch
from worldline.data.loader import ShardLoader
from worldline.data.shards import Journal, ShardWriter
from worldline.data.state import LoaderState, StreamState
from worldline.data.streams import Delivery


def make_batch(n: int = 3, **over) -> Batch:
    fields = dict(key=[f"k{i}" for i in range(n)], caption=["c"] * n, style=[[]] * n, epoch=[0] * n,
                  actions=torch.zeros(n, 4, 0, dtype=torch.int64), camera=torch.zeros(n, 4, 2),
                  clip_shape=(4, 8, 8), video=torch.zeros(n, 3, 4, 8, 8, dtype=torch.uint8))
    return Batch(**{**fields, **over})


def test_batch_reads_like_the_dict_it_replaces():
    b = make_batch()
    assert set(b) == {"video", "actions", "camera", "caption", "key", "style", "epoch"}
    assert "latents" not in b and b.get("refs") is None and b["video"].shape == (3, 3, 4, 8, 8)
    with pytest.raises(KeyError):
        b["latents"]
    with pytest.raises(KeyError):
        b["clip_shape"]  # batch-level facts are attributes, not per-sample keys
    assert b.num_samples == 3 and b.clip_shape == (4, 8, 8) and len(b) == 7
    assert {**b}.keys() == dict(b.items()).keys() == b.keys()
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.video = None  # type: ignore[misc]


def test_batch_validates_its_shape():
    with pytest.raises(ValueError, match="exactly one of video and latents"):
        make_batch(latents=torch.zeros(3, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="clip_shape"):
        make_batch(clip_shape=(4, 8))
    with pytest.raises(ValueError, match="caption has 2 entries for 3 keys"):
        make_batch(caption=["a", "b"])


def test_batch_concat_joins_samples_in_order():
    a = make_batch(2, refs=[torch.zeros(1, 3, 8, 8, dtype=torch.uint8)] * 2)
    b = make_batch(1, key=["z"], video=torch.ones(1, 3, 4, 8, 8, dtype=torch.uint8),
                   refs=[torch.ones(1, 3, 8, 8, dtype=torch.uint8)])
    c = Batch.concat([a, b])
    assert c.num_samples == 3 and c["key"] == ["k0", "k1", "z"] and len(c["refs"]) == 3
    assert c["video"][:2].eq(0).all() and c["video"][2].eq(1).all() and c.clip_shape == (4, 8, 8)
    with pytest.raises(ValueError, match="clip_shape or fields"):
        Batch.concat([a, make_batch(1)])  # no refs in the second


def test_batch_to_select_pickle_and_pin(monkeypatch):
    cl = torch.zeros(2, 4, 8, 8, 3, dtype=torch.uint8).permute(0, 4, 1, 2, 3)  # channels_last view
    b = make_batch(2, video=cl, refs=[torch.zeros(0, 3, 8, 8, dtype=torch.uint8)] * 2)
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and moved["video"].is_contiguous() and moved.clip_shape == (4, 8, 8)
    assert torch.equal(moved["video"], cl)
    one = b.select(1)
    assert one.num_samples == 1 and one["key"] == ["k0"] and one["video"].shape[0] == 1 and len(one["refs"]) == 1
    again = pickle.loads(pickle.dumps(b))
    assert isinstance(again, Batch) and again["key"] == b["key"] and torch.equal(again["video"], b["video"])

    # torch's pin-memory thread calls .pin_memory() on what the workers yield; the loader's
    # Delivery (and the Batch inside) must come back typed. No CUDA here: pinning is faked.
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    out = pin_memory(Delivery(b, 0, StreamState(), [], -1))
    assert isinstance(out, Delivery) and isinstance(out.batch, Batch) and out.batch.clip_shape == (4, 8, 8)
    assert len(pinned) == 5  # video, actions, camera and both refs


def test_loader_batches_carry_the_clip_shape(data_synthetic_dir):
    batch = next(iter(ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, resolution=(16, 24))))
    assert isinstance(batch, Batch) and batch.clip_shape == (3, 16, 24) and batch.num_samples == 2


def test_loader_state_round_trips_through_the_dataclasses(data_synthetic_dir):
    loader = ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, resolution=(16, 16),
                         shuffle_buffer=3, num_workers=2)
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))
    assert LoaderState.from_dict(state).to_dict() == state
    assert StreamState.from_dict(state["streams"][0]).to_dict() == state["streams"][0]
    merged = ShardLoader.merge_states([state])
    assert json.loads(json.dumps(merged)) == merged
    with pytest.raises(ValueError, match="malformed StreamState"):
        StreamState.from_dict({**state["streams"][0], "bogus": 1})
    bad = {**state, "streams": [{"todo": []}, {}]}
    with pytest.raises(ValueError, match="malformed"):
        ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, resolution=(16, 16),
                    shuffle_buffer=3, num_workers=2).load_state_dict(bad)


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_shard_writer_rolls_by_count_and_bytes_and_journal_checks_settings(tmp_path):
    closed = []
    with ShardWriter(tmp_path, "s-{:02d}.tar", max_count=3, max_bytes=4096, start=5,
                     on_close=closed.append) as writer:
        names = [writer.write({"__key__": f"k{i}", "bin": b"x" * 1000}) for i in range(5)]
    # 1000 bytes -> 512 + 1024 per sample: two fit under 4096, the third would not.
    assert names == ["s-05.tar", "s-05.tar", "s-06.tar", "s-06.tar", "s-07.tar"]
    assert [(c.name, c.count) for c in closed] == [("s-05.tar", 2), ("s-06.tar", 2), ("s-07.tar", 1)]
    with tarfile.open(tmp_path / "s-06.tar") as tar:
        assert tar.getnames() == ["k2.bin", "k3.bin"]
    with pytest.raises(ValueError, match="boom"), ShardWriter(tmp_path / "x", max_count=2) as w:
        (tmp_path / "x").mkdir()
        w.write({"__key__": "a", "bin": b"1"})
        raise ValueError("boom")
    assert list((tmp_path / "x").iterdir()) == []  # the partial shard is gone

    journal = Journal(tmp_path / "j.jsonl", {"n": (1, 2)})
    assert journal.records() is None
    journal.start()
    journal.append({"shard": "a"})
    assert Journal(tmp_path / "j.jsonl", {"n": [1, 2]}).records() == [{"shard": "a"}]
    with pytest.raises(ValueError, match="other settings"):
        Journal(tmp_path / "j.jsonl", {"n": 3}).records()
