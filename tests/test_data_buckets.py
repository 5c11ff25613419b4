"""Resolution x frame-count buckets: assignment, homogeneous batches, exact resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from worldline.data.buckets import Bucket, BucketSet, NoBucket, buckets_for_budget
from worldline.data.loader import ShardLoader
from worldline.data.probe import VideoInfo

BUCKETS = [Bucket(32, 32, 8, 2), Bucket(24, 40, 8, 3), Bucket(16, 16, 4, 4)]


def info(h: int, w: int, n: int, fps: float = 8.0) -> VideoInfo:
    return VideoInfo(h, w, n, fps, n / fps, (n - 1) / fps)


def test_assignment_picks_the_largest_fitting_bucket():
    bs = BucketSet(BUCKETS)
    assert bs.assign(info(32, 32, 9)) == 0
    assert bs.assign(info(24, 40, 9)) == 1  # not tall enough for 32x32 (no upscaling)
    assert bs.assign(info(32, 32, 5)) == 2  # too short for the 8-frame buckets
    assert bs.assign(info(480, 640, 100)) == 0  # fits all: 32x32x8 has the most tokens
    with pytest.raises(NoBucket) as exc:
        bs.assign(info(32, 32, 3))
    assert exc.value.reason == "too_short"
    with pytest.raises(NoBucket) as exc:
        bs.assign(info(12, 12, 9))
    assert exc.value.reason == "too_small"
    assert BucketSet(BUCKETS, upscale=True).assign(info(12, 12, 9)) == 0  # upscaling allowed
    # Equal tokens: the closer aspect ratio wins.
    tie = BucketSet([Bucket(16, 64, 4, 1), Bucket(32, 32, 4, 1), Bucket(64, 16, 4, 1)])
    assert tie.assign(info(100, 30, 9)) == 2 and tie.assign(info(30, 100, 9)) == 0
    assert tie.assign(info(70, 70, 9)) == 1
    # At a target fps the clip needs seconds, not frames: 8 frames at 4 fps = 1.75 s.
    timed = BucketSet(BUCKETS, fps=4.0)
    assert timed.assign(info(32, 32, 16)) == 0  # 2 s at 8 fps
    assert timed.assign(info(32, 32, 12)) == 2  # 1.5 s: only the 4-frame bucket (0.75 s)


def test_budget_keeps_tokens_per_batch_roughly_constant():
    budget = 4 * 17 * 64 * 64
    buckets = buckets_for_budget([(64, 64), (32, 64), (128, 128)], [17, 9], budget)
    assert buckets[0] == Bucket(128, 128, 17, 1) and buckets[-1] == Bucket(32, 64, 9, 15)
    for b in buckets:
        assert b.batch_size * b.tokens <= budget and (b.batch_size + 1) * b.tokens > budget or b.batch_size == 1
    assert Bucket.parse({"resolution": [8, 16], "num_frames": 3, "batch_size": 2}) == Bucket(8, 16, 3, 2)
    assert Bucket.parse([8, 16, 3, 2]) == Bucket(8, 16, 3, 2)


def expected_bucket(key: str) -> int:
    return int(key[1:]) % 3  # see the data_mixed_dir fixture


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_homogeneous_and_resume_exactly(data_mixed_dir, num_workers):
    kwargs = dict(buckets=BUCKETS, num_workers=num_workers, seed=2, shuffle_buffer=3, position="random",
                  crop="random")
    loader = ShardLoader(data_mixed_dir, **kwargs)
    stream = iter(loader)
    first = list(itertools.islice(stream, 5))
    state = json.loads(json.dumps(loader.state_dict()))
    assert any(st["buckets"] for st in state["streams"])  # partial buckets are part of the state
    reference = list(itertools.islice(stream, 8))
    for batch in first + reference:
        b = BUCKETS[expected_bucket(batch["key"][0])]
        assert {expected_bucket(k) for k in batch["key"]} == {expected_bucket(batch["key"][0])}
        assert batch["video"].shape == (b.batch_size, 3, b.num_frames, b.height, b.width)
        assert batch["actions"].shape[:2] == batch["camera"].shape[:2] == (b.batch_size, b.num_frames)
    resumed = ShardLoader(data_mixed_dir, **kwargs)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed, 8))
    for x, y in zip(got, reference):
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"])
        assert torch.equal(x["actions"], y["actions"]) and torch.equal(x["camera"], y["camera"])
    # Within an epoch no sample repeats (buckets only delay samples, never duplicate them).
    seen = [(k, e) for b in first + reference for k, e in zip(b["key"], b["epoch"])]
    assert len(seen) == len(set(seen))


def test_bucket_change_on_resume_keeps_coverage(data_mixed_dir):
    """Changing the bucket set is a layout change: waiting samples carry over, none is lost."""
    loader = ShardLoader(data_mixed_dir, buckets=BUCKETS, seed=1)
    before = list(itertools.islice(loader, 4))
    state = loader.state_dict()
    single = ShardLoader(data_mixed_dir, batch_size=4, num_frames=4, resolution=(16, 16), seed=1)
    single.load_state_dict(state)
    after = list(itertools.islice(single, 8))
    keys = [k for b in before + after for k, e in zip(b["key"], b["epoch"]) if e == 0]
    assert sorted(keys) == [f"m{i:03d}" for i in range(24)]


def test_small_videos_skipped_without_upscale(data_mixed_dir):
    loader = ShardLoader(data_mixed_dir, buckets=[Bucket(32, 32, 8, 2)], seed=0, shuffle_shards=False)
    batches = list(itertools.islice(loader, 4))
    assert all(expected_bucket(k) == 0 for b in batches for k in b["key"])
    assert loader.stats["skipped_reasons"] == {"too_small": 7, "too_short": 7}
