"""The procedural world, shard writing and the cached synthetic dataset."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import tarfile
import time

import numpy as np
import pytest

from worldline.data.shards import (
    brace_pattern,
    ensure_synthetic_dataset,
    read_manifest,
    synthetic_dataset_dir,
    write_shards,
)
from worldline.data.synthetic import (
    ACTION_DELTAS,
    AGENT_COLOURS,
    ACTION_NAMES,
    COLOURS,
    NUM_ACTIONS,
    PAN_DIRECTIONS,
    SyntheticWorldConfig,
    _agent_size,
    _agent_step,
    _sprite_size,
    _sprite_step,
    clip_to_sample,
    render_clip,
    world_size,
)


def test_determinism(data_small_cfg):
    a, b = render_clip(data_small_cfg, 5), render_clip(data_small_cfg, 5)
    np.testing.assert_array_equal(a["frames"], b["frames"])
    np.testing.assert_array_equal(a["actions"], b["actions"])
    np.testing.assert_array_equal(a["camera"], b["camera"])
    assert a["caption"] == b["caption"]
    other = render_clip(data_small_cfg, 6)
    assert not np.array_equal(a["frames"], other["frames"])
    reseeded = render_clip(dataclasses.replace(data_small_cfg, seed=4), 5)
    assert not np.array_equal(a["frames"], reseeded["frames"])


def test_shapes_dtypes_and_ranges():
    cfg = SyntheticWorldConfig(num_frames=11, height=40, width=56, num_sprites=4)
    clip = render_clip(cfg, 0)
    assert clip["frames"].shape == (11, 40, 56, 3) and clip["frames"].dtype == np.uint8
    assert clip["actions"].shape == (11, 4) and clip["actions"].dtype == np.int64
    assert clip["camera"].shape == (11, 2) and clip["camera"].dtype == np.float32
    assert len(clip["sprites"]) == 4
    assert len(ACTION_NAMES) == NUM_ACTIONS == 5
    world_h, world_w = world_size(cfg)
    for index in range(20):
        clip = render_clip(cfg, index)
        assert clip["actions"].min() >= 0 and clip["actions"].max() < NUM_ACTIONS
        cam = clip["camera"]
        assert (cam >= 0).all() and (cam[:, 0] <= world_w - 56).all() and (cam[:, 1] <= world_h - 40).all()


def test_caption_names_sprites_location_and_pan(data_small_cfg):
    for index in range(8):
        clip = render_clip(data_small_cfg, index)
        for sprite in clip["sprites"]:
            assert f"{sprite['colour']} {sprite['shape']}" in clip["caption"]
        assert clip["location"] in clip["caption"]
        pan = clip["pan"]
        assert ("static camera" if pan == "static" else f"camera panning {pan}") in clip["caption"]
        # The camera really moves the way the caption says (y grows downwards).
        motion = np.sign(clip["camera"][-1] - clip["camera"][0])
        assert tuple(motion.astype(int)) == PAN_DIRECTIONS[pan]


def test_sprites_move_according_to_actions_and_are_drawn():
    # Without agent dots: one drawn on top may cover the sprite pixel checked below.
    cfg = SyntheticWorldConfig(num_frames=17, height=64, width=64, agents=False)
    size, step = _sprite_size(cfg), _sprite_step(cfg)
    world_h, world_w = world_size(cfg)
    moved = 0
    for index in range(10):
        clip = render_clip(cfg, index)
        for s, sprite in enumerate(clip["sprites"]):
            pos = sprite["positions"]
            expected = np.clip(
                pos[:-1] + step * ACTION_DELTAS[clip["actions"][:-1, s]], 0, [world_w - size, world_h - size]
            )
            np.testing.assert_array_equal(pos[1:], expected)
            moved += int((pos[1:] != pos[:-1]).any())
        # The last sprite is drawn on top: its centre pixel (inside the view at t=0) has its colour.
        top = clip["sprites"][-1]
        cx, cy = top["positions"][0] - clip["camera"][0].astype(int) + size // 2
        np.testing.assert_array_equal(clip["frames"][0, cy, cx], COLOURS[top["colour"]])
    assert moved > 10  # the random policy does move sprites


def test_agents_are_small_fast_dots_the_actions_drive():
    """One 2-4 px dot per action slot, moved by that slot's action twice a sprite's step,
    kept in view, drawn on top; sprites, camera and caption are those of the world without
    agents, and the shard's json carries their tracks."""
    assert [_agent_size(SyntheticWorldConfig(height=h, width=h)) for h in (32, 64, 128)] == [2, 3, 4]
    cfg = SyntheticWorldConfig(num_frames=17, height=64, width=64)
    size, step = _agent_size(cfg), _agent_step(cfg)
    assert step > size  # fast: a dot never overlaps where it was
    moved = 0
    for index in range(6):
        clip, plain = render_clip(cfg, index), render_clip(dataclasses.replace(cfg, agents=False), index)
        assert "agents" not in plain and clip["caption"] == plain["caption"]
        for a, b in zip(clip["sprites"], plain["sprites"]):
            np.testing.assert_array_equal(a["positions"], b["positions"])
        cam = clip["camera"].astype(int)
        assert len(clip["agents"]) == cfg.num_sprites and clip["agent_size"] == size
        for s, agent in enumerate(clip["agents"]):
            pos = agent["positions"]
            expected = np.clip(pos[:-1] + step * ACTION_DELTAS[clip["actions"][:-1, s]],
                               cam[1:], cam[1:] + [cfg.width - size, cfg.height - size])
            np.testing.assert_array_equal(pos[1:], expected)
            moved += int((pos[1:] != pos[:-1]).any())
        top = clip["agents"][-1]  # drawn last: every pixel of its box has its colour
        for t in range(cfg.num_frames):
            x, y = top["positions"][t] - cam[t]
            assert (clip["frames"][t, y:y + size, x:x + size] == AGENT_COLOURS[cfg.num_sprites - 1]).all()
        meta = clip_to_sample(cfg, index, clip)["json"]
        assert meta["agents"][0]["positions"] == clip["agents"][0]["positions"].tolist()
    assert moved > 5


def test_background_is_static_per_location():
    """Two clips at the same location show the same world pixels where their views overlap."""
    cfg = SyntheticWorldConfig(num_sprites=0)
    clips = [render_clip(cfg, i) for i in range(12)]
    by_location = {}
    for clip in clips:
        by_location.setdefault(clip["location"], []).append(clip)
    a, b = next(group for group in by_location.values() if len(group) >= 2)[:2]
    (ax, ay), (bx, by) = a["camera"][0].astype(int), b["camera"][0].astype(int)
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax, bx) + cfg.width, min(ay, by) + cfg.height
    assert x1 > x0 and y1 > y0
    np.testing.assert_array_equal(
        a["frames"][0, y0 - ay : y1 - ay, x0 - ax : x1 - ax],
        b["frames"][0, y0 - by : y1 - by, x0 - bx : x1 - bx],
    )


def test_write_shards_manifest_and_members(tmp_path, data_small_cfg):
    samples = [clip_to_sample(data_small_cfg, i) for i in range(7)]
    manifest = write_shards(samples, tmp_path, samples_per_shard=3)
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["shard_counts"] == [3, 3, 1] and manifest["num_samples"] == 7
    assert manifest["pattern"] == "shard-{000000..000002}.tar"
    assert read_manifest(tmp_path) == manifest
    entry = manifest["samples"][0]
    assert entry["key"] == "00000000" and entry["resolution"] == [32, 32]
    assert entry["fps"] == 8.0 and entry["num_frames"] == 9 and entry["duration"] == pytest.approx(9 / 8)
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]  # no temp files left behind
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames()[:3] == ["00000000.json", "00000000.mp4", "00000000.txt"]
        meta = json.loads(tar.extractfile("00000000.json").read())
        assert tar.extractfile("00000000.txt").read().decode() == samples[0]["txt"]
    assert meta["actions"] == samples[0]["json"]["actions"]
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([{"__key__": "a.b", "mp4": b"x", "json": {}}], tmp_path / "bad", 2)
    assert brace_pattern("part-{:03d}-x.tar", 12) == "part-{000..011}-x.tar"


def test_default_generation_is_fast(tmp_path):
    start = time.perf_counter()
    out = ensure_synthetic_dataset(tmp_path, SyntheticWorldConfig())  # 256 clips, 17x64x64
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"synthetic generation took {elapsed:.1f}s"
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 256 and manifest["shard_counts"] == [32] * 8


def test_ensure_is_idempotent_and_hashes_config(tmp_path, data_small_cfg):
    first = ensure_synthetic_dataset(tmp_path, data_small_cfg)
    stamp = os.stat(os.path.join(first, "manifest.json")).st_mtime_ns
    as_mapping = {**dataclasses.asdict(data_small_cfg), "fps": 8}  # e.g. from a DictConfig
    assert ensure_synthetic_dataset(tmp_path, as_mapping) == first
    assert os.stat(os.path.join(first, "manifest.json")).st_mtime_ns == stamp  # not rewritten
    assert os.path.basename(first) == synthetic_dataset_dir(tmp_path, data_small_cfg).name
    other = synthetic_dataset_dir(tmp_path, dataclasses.replace(data_small_cfg, seed=9))
    assert other.name != os.path.basename(first)
    # A directory without a manifest is incomplete and gets rebuilt.
    os.remove(os.path.join(first, "manifest.json"))
    assert ensure_synthetic_dataset(tmp_path, data_small_cfg) == first
    assert read_manifest(first)["num_samples"] == data_small_cfg.num_clips


def _ensure_in_subprocess(root: str, fields: dict, queue) -> None:
    queue.put(ensure_synthetic_dataset(root, SyntheticWorldConfig(**fields)))


def test_ensure_is_safe_across_processes(tmp_path):
    cfg = SyntheticWorldConfig(num_clips=12, clips_per_shard=4, num_frames=5, height=16, width=16)
    ctx = mp.get_context("fork")  # fork: spawn would re-import torch (seconds) for nothing
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_subprocess, args=(str(tmp_path), dataclasses.asdict(cfg), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock")) == [os.path.basename(results[0])]
    assert read_manifest(results[0])["shard_counts"] == [4, 4, 4]
