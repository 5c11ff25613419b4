"""ShardLoader over real shards: content, distribution, exact resume (also across a
world-size change), resampling, corrupt samples, pipe: URLs."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch

from worldline.data.loader import ShardLoader, resize_center_crop
from worldline.data.shards import read_manifest, write_shards
from worldline.data.synthetic import clip_to_sample, render_clip
from worldline.data.video import encode_mp4


def take(loader_or_iter, n: int) -> list[dict]:
    return list(itertools.islice(loader_or_iter, n))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        for name in ("video", "actions", "camera"):
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_batch_format_and_content(data_synthetic_dir, data_small_cfg):
    cfg = data_small_cfg
    loader = ShardLoader(
        data_synthetic_dir, batch_size=3, num_frames=5, frame_stride=2, resolution=(32, 32),
        shuffle_shards=False, position="center",
    )
    batch = next(iter(loader))
    assert set(batch) == {"video", "actions", "camera", "caption", "key", "style", "epoch"}
    assert batch["video"].is_contiguous() and batch["epoch"] == [0, 0, 0]
    assert batch["video"].shape == (3, 3, 5, 32, 32) and batch["video"].dtype == torch.uint8
    assert batch["actions"].shape == (3, 5, cfg.num_sprites) and batch["actions"].dtype == torch.int64
    assert batch["camera"].shape == (3, 5, 2) and batch["camera"].dtype == torch.float32
    assert batch["key"] == ["00000000", "00000001", "00000002"]  # manifest order, tar order
    idx = np.array([0, 2, 4, 6, 8])  # 5 frames, stride 2, centred in 9
    for b, key in enumerate(batch["key"]):
        clip = render_clip(cfg, int(key))
        decoded = batch["video"][b].permute(1, 2, 3, 0).numpy()  # [T, H, W, 3]
        err = np.abs(decoded.astype(np.int16) - clip["frames"][idx].astype(np.int16)).mean()
        assert err < 6, f"clip {key}: mean abs error {err:.2f}"
        np.testing.assert_array_equal(batch["actions"][b].numpy(), clip["actions"][idx])
        cam = clip["camera"][idx]
        np.testing.assert_array_equal(batch["camera"][b].numpy(), np.diff(cam, axis=0, prepend=cam[:1]))
        assert batch["caption"][b] == clip["caption"]
    assert loader.stats["batches"] == 1 and loader.stats["samples"] == 3 and loader.stats["skipped"] == 0


def test_resize_and_crop_preserve_aspect():
    # A 32x64 clip with a left/right colour split -> (32, 32): scale 1, centre crop.
    frames = np.zeros((2, 32, 64, 3), np.uint8)
    frames[:, :, 32:] = 200
    out, scale = resize_center_crop(frames, (32, 32))
    assert out.shape == (2, 32, 32, 3) and scale == 1.0
    assert out[0, 0, :16].max() == 0 and out[0, 0, 16:].min() == 200
    # 32x64 -> (48, 48): scale 1.5 to cover the height, then crop the width.
    up, scale = resize_center_crop(frames, (48, 48))
    assert up.shape == (2, 48, 48, 3) and up.dtype == torch.uint8 and scale == 1.5
    assert up[0, :, :20].max() == 0 and up[0, :, 28:].min() == 200


def test_user_images_are_fitted_as_training_clips_are(tmp_path):
    """worldline-sample's first frame / references and worldline-play's uploads: a portrait
    image in a square model keeps an object near its top (data.max_crop), as clips did in
    training; the old cover-and-crop cut it off."""
    from PIL import Image

    from worldline.train.sampling import load_image

    rgb = np.full((128, 64, 3), 90, np.uint8)
    rgb[20:32, 20:44] = (255, 0, 0)  # a red object 16-25% down a 1:2 portrait
    Image.fromarray(rgb).save(tmp_path / "portrait.png")
    red = lambda img: int(((img[0] > 200) & (img[1] < 50)).sum())  # noqa: E731
    assert red(load_image(tmp_path / "portrait.png", (32, 32))) > 0  # data default: 0.25
    assert red(load_image(tmp_path / "portrait.png", (32, 32), max_crop=1.0)) == 0
    fitted = load_image(tmp_path / "portrait.png", (32, 32), max_crop=0.0)
    assert fitted.shape == (3, 32, 32) and int(fitted[:, :, 0].max()) == 0  # letterboxed


def test_loader_resizes_and_scales_camera(data_synthetic_dir, data_small_cfg):
    loader = ShardLoader(data_synthetic_dir, batch_size=2, num_frames=9, resolution=(16, 24), shuffle_shards=False,
                         max_crop=1.0)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 3, 9, 16, 24)
    cam = render_clip(data_small_cfg, 0)["camera"]
    scale = 24 / 32  # cover 16x24 from 32x32
    np.testing.assert_allclose(batch["camera"][0].numpy(), np.diff(cam, axis=0, prepend=cam[:1]) * scale)


def test_shards_split_across_ranks_and_workers(data_synthetic_dir, data_small_cfg):
    n = data_small_cfg.num_clips
    seen = []
    for rank in range(2):
        loader = ShardLoader(
            data_synthetic_dir, batch_size=2, num_frames=3, resolution=(32, 32),
            rank=rank, world_size=2, num_workers=0, seed=1,
        )
        # One epoch of this rank: 3 of 6 shards x 4 samples = 6 batches of 2.
        seen.append([k for b in take(loader, 6) for k in b["key"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:08d}" for i in range(n)]
    # Worker sub-streams partition a rank's shards too (whole epoch, 2 workers).
    loader = ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, resolution=(32, 32), num_workers=2, seed=1)
    keys = [k for b in take(loader, 12) for k in b["key"]]
    assert sorted(keys) == [f"{i:08d}" for i in range(n)]


def test_shard_order_reshuffles_per_epoch(data_synthetic_dir):
    loader = ShardLoader(data_synthetic_dir, batch_size=4, num_frames=3, resolution=(32, 32), seed=0)
    assert loader.stream_shards(0, 0) != loader.stream_shards(1, 0)
    assert sorted(loader.stream_shards(0, 0)) == list(range(6))
    ordered = ShardLoader(data_synthetic_dir, batch_size=4, num_frames=3, shuffle_shards=False)
    assert ordered.stream_shards(0, 0) == ordered.stream_shards(5, 0) == list(range(6))


def test_too_few_shards_is_a_clear_error(data_synthetic_dir):
    with pytest.raises(ValueError, match=r"6 shards .*world_size=2 x num_workers=4"):
        ShardLoader(data_synthetic_dir, world_size=2, num_workers=4)
    # Resampling draws from every shard on every sub-stream: any shard count works.
    ShardLoader(data_synthetic_dir, world_size=2, num_workers=4, resample=True)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_exact_resume_across_epoch_boundary(data_synthetic_dir, num_workers):
    # 24 samples per epoch; batches of 5 with k + m = 9 batches cross two epoch boundaries,
    # and batches straddle them (5 does not divide a sub-stream's 12 or 24 samples).
    kwargs = dict(
        batch_size=5, num_frames=4, frame_stride=2, resolution=(24, 24),
        num_workers=num_workers, seed=11, position="random", shuffle_shards=True,
        crop="random", shuffle_buffer=6,
    )
    k, m = 3, 6
    loader = ShardLoader(data_synthetic_dir, **kwargs)
    stream = iter(loader)
    take(stream, k)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    reference = take(stream, m)  # the uninterrupted run, with prefetching workers

    resumed = ShardLoader(data_synthetic_dir, **kwargs)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, m), reference)
    assert resumed.state_dict() == loader.state_dict()
    assert all(st["epoch"] >= 1 for st in loader.state_dict()["streams"])  # all crossed an epoch
    assert state["streams"][0]["buffer"]  # the shuffle buffer was part of the state


def test_reiterating_continues_from_consumed_state(data_synthetic_dir):
    """Breaking out of a loop discards prefetched batches; a new iter() picks up exactly."""
    kwargs = dict(batch_size=3, num_frames=3, resolution=(32, 32), num_workers=2, seed=5)
    reference = take(ShardLoader(data_synthetic_dir, **kwargs), 7)
    loader = ShardLoader(data_synthetic_dir, **kwargs)
    got = take(loader, 2) + take(loader, 1) + take(loader, 4)
    assert_batches_equal(got, reference)


def test_incompatible_state_is_rejected(data_synthetic_dir):
    loader = ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, num_workers=2, world_size=2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, num_workers=2, seed=1,
                    world_size=2).load_state_dict(state)
    # A different layout needs every old rank's state: one of two is not enough.
    with pytest.raises(ValueError, match="all 2 ranks"):
        ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="empty"):
        ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3).load_state_dict({})
    with pytest.raises(ValueError, match="resample"):
        ShardLoader(data_synthetic_dir, batch_size=2, num_frames=3, num_workers=2, world_size=2,
                    resample=True).load_state_dict(state)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, data_small_cfg, caplog):
    good = [clip_to_sample(data_small_cfg, i) for i in range(8)]
    short = clip_to_sample(data_small_cfg, 90)
    short["mp4"] = encode_mp4(render_clip(data_small_cfg, 90)["frames"][:2], fps=8.0)
    bad = [
        {**clip_to_sample(data_small_cfg, 91), "mp4": b""},  # 0-byte member
        {**clip_to_sample(data_small_cfg, 92), "mp4": b"\x00garbage" * 64},  # not a video
        {"__key__": "00000093", "mp4": good[0]["mp4"], "txt": "no json"},  # missing member
        {**clip_to_sample(data_small_cfg, 94), "json": "{not json"},  # bad JSON
        short,  # 2 frames, the loader wants 4
    ]
    g, b = good, bad
    samples = [g[0], b[0], g[1], b[1], b[2], g[2], b[3], b[4], g[3], g[4], g[5], g[6], g[7]]
    write_shards(samples, tmp_path, samples_per_shard=4)
    (tmp_path / "shard-000003.tar").write_bytes(b"truncated tar")  # unreadable shard (g[7])

    loader = ShardLoader(tmp_path, batch_size=2, num_frames=4, resolution=(32, 32), shuffle_shards=False)
    with caplog.at_level(logging.WARNING, logger="worldline.data.loader"):
        batches = take(loader, 4)
        keys = [k for batch in batches for k in batch["key"]]
        # Epoch 0 yields g0..g6, skipping the bad samples and shard 3; epoch 1 starts with g0.
        assert keys == [g[i]["__key__"] for i in (0, 1, 2, 3, 4, 5, 6, 0)]
        assert loader.stats["skipped"] == 5 and loader.stats["shard_errors"] == 1
        assert loader.stats["skipped_reasons"] == {
            "empty_video": 1, "not_video": 1, "missing_json": 1, "bad_json": 1, "too_short": 1, "bad_shard": 1,
        }
        for sample in bad:  # each bad sample is warned about, naming its shard and key
            assert any(sample["__key__"] in r.message and "shard-00000" in r.message for r in caplog.records)
        # Epoch 1 meets b0, b1, b2 again before [g1, g2]: counted again, not warned again.
        assert take(loader, 1)[0]["key"] == [g[1]["__key__"], g[2]["__key__"]]
    assert loader.stats["skipped"] == 8
    assert sum(bad[0]["__key__"] in r.message for r in caplog.records) == 1


def test_manifest_dir_list_and_brace_inputs_agree(data_synthetic_dir):
    manifest = read_manifest(data_synthetic_dir)
    as_list = [f"{data_synthetic_dir}/{s}" for s in manifest["shards"]]
    as_brace = f"{data_synthetic_dir}/{manifest['pattern']}"
    kwargs = dict(batch_size=2, num_frames=3, resolution=(32, 32), seed=2)
    assert ShardLoader(as_list, **kwargs).shards == ShardLoader(data_synthetic_dir, **kwargs).shards
    assert ShardLoader(as_brace, **kwargs).shards == as_list
    comma = f"{data_synthetic_dir}/shard-{{000000,000001}}.tar," + ",".join(as_list[2:])
    assert ShardLoader(comma, **kwargs).shards == as_list
    assert_batches_equal(take(ShardLoader(as_brace, **kwargs), 2), take(ShardLoader(as_list, **kwargs), 2))


def test_pipe_urls_read_like_paths(data_synthetic_dir):
    manifest = read_manifest(data_synthetic_dir)
    pipe = f"pipe:cat {data_synthetic_dir}/{manifest['pattern']}"
    kwargs = dict(batch_size=3, num_frames=3, resolution=(32, 32), seed=2, shuffle_buffer=4)
    via_pipe = ShardLoader(pipe, **kwargs)
    assert len(via_pipe.shards) == 6 and all(u.startswith("pipe:cat ") for u in via_pipe.shards)
    ref = ShardLoader(data_synthetic_dir, **kwargs)
    assert_batches_equal(take(via_pipe, 3), take(ref, 3))
    assert via_pipe.state_dict()["streams"] == ref.state_dict()["streams"]


def test_target_fps_sampling(data_synthetic_dir, data_small_cfg):
    # Source 8 fps, 9 frames; 4 fps picks every other frame by time.
    loader = ShardLoader(data_synthetic_dir, batch_size=2, num_frames=5, fps=4.0, resolution=(32, 32),
                         shuffle_shards=False)
    batch = next(iter(loader))
    clip = render_clip(data_small_cfg, 0)
    np.testing.assert_array_equal(batch["actions"][0].numpy(), clip["actions"][[0, 2, 4, 6, 8]])
    with pytest.raises(ValueError, match="fps"):
        ShardLoader(data_synthetic_dir, fps=4.0, frame_stride=2)


def keys_by_epoch(batches: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for b in batches:
        for key, epoch in zip(b["key"], b["epoch"]):
            out.setdefault(epoch, []).append(key)
    return out


ALL = [f"{i:08d}" for i in range(24)]


@pytest.mark.parametrize("old,new", [((2, 2), (1, 1)), ((1, 2), (2, 1)), ((2, 1), (3, 2))])
def test_resume_across_world_size_change(data_synthetic_dir, old, new):
    """(world_size, workers) old -> new: the rest of each open epoch is delivered exactly once;
    nothing delivered before comes again in the same epoch."""
    kwargs = dict(batch_size=2, num_frames=3, resolution=(32, 32), seed=7, shuffle_buffer=3,
                  position="random")
    (w0, nw0), (w1, nw1) = old, new
    before, states = [], []
    for rank in range(w0):
        loader = ShardLoader(data_synthetic_dir, rank=rank, world_size=w0, num_workers=nw0, **kwargs)
        before += take(loader, 3)  # 6 of this rank's samples: mid-shard, buffer not empty
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert any(st["buffer"] for s in states for st in s["streams"])
    merged = ShardLoader.merge_states(states)
    assert merged["format"] == "global" and merged["next_epoch"] >= 1
    after = []
    for rank in range(w1):
        loader = ShardLoader(data_synthetic_dir, rank=rank, world_size=w1, num_workers=nw1, **kwargs)
        loader.load_state_dict(states if rank % 2 else merged)  # list or merged: the same
        after += take(loader, 36 // w1)  # ~3 epochs over all new ranks: drains every buffer
    old_keys, new_keys = keys_by_epoch(before), keys_by_epoch(after)
    for epoch in range(merged["next_epoch"]):  # every epoch opened before: exactly once overall
        assert sorted(old_keys.get(epoch, []) + new_keys.get(epoch, [])) == ALL, epoch
    regular = new_keys[merged["next_epoch"]]  # then regular epochs under the new layout
    assert len(set(regular)) == len(regular) >= 12
    # Carried-over samples keep their clip window (rng of seed, epoch, shard, index).
    again = ShardLoader(data_synthetic_dir, rank=0, world_size=w1, num_workers=nw1, **kwargs)
    again.load_state_dict(merged)
    assert_batches_equal(take(again, 4), [b for b in after[: 4]])


def test_resampled_mode_is_infinite_and_resumes_exactly(data_synthetic_dir):
    kwargs = dict(batch_size=3, num_frames=3, resolution=(32, 32), seed=3, resample=True,
                  shuffle_buffer=4, num_workers=2, position="random")
    loader = ShardLoader(data_synthetic_dir, **kwargs)
    stream = iter(loader)
    first = take(stream, 5)
    state = loader.state_dict()
    reference = take(stream, 6)
    assert all(e == -1 for b in first for e in b["epoch"])
    resumed = ShardLoader(data_synthetic_dir, **kwargs)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, 6), reference)
    # Draws are with replacement: 33 samples of 24 include repeats, and all keys are real.
    keys = [k for b in first + reference for k in b["key"]]
    assert len(set(keys)) < len(keys) and set(keys) <= set(ALL)
    # A new layout carries the buffered samples over and starts fresh draws.
    merged = ShardLoader.merge_states([state])
    assert merged["generation"] == 1 and all(w[3] is not None or w[2] > 0 for w in merged["work"])
    one = ShardLoader(data_synthetic_dir, **{**kwargs, "num_workers": 0})
    one.load_state_dict(state)
    assert len(take(one, 4)) == 4


@pytest.mark.parametrize("num_workers", [0, 1])
def test_channels_last_batches_hold_the_same_pixels(data_synthetic_dir, num_workers):
    kwargs = dict(batch_size=3, num_frames=4, resolution=(24, 32), seed=1, num_workers=num_workers)
    ref = next(iter(ShardLoader(data_synthetic_dir, **kwargs)))
    cl = next(iter(ShardLoader(data_synthetic_dir, channels_last=True, **kwargs)))
    assert cl["video"].shape == ref["video"].shape == (3, 3, 4, 24, 32)
    assert not cl["video"].is_contiguous() and cl["video"].permute(0, 2, 3, 4, 1).is_contiguous()
    assert torch.equal(cl["video"], ref["video"]) and cl["key"] == ref["key"]


def test_pooled_batch_buffers_are_never_overwritten_while_held(data_synthetic_dir):
    """Workers recycle shared-memory batch buffers only after every view of a batch is gone."""
    kwargs = dict(batch_size=2, num_frames=3, resolution=(32, 32), seed=4, position="random")
    kwargs["num_workers"] = 2
    reference = []
    for batch in itertools.islice(ShardLoader(data_synthetic_dir, **kwargs), 30):
        reference.append({"video": batch["video"].clone()})  # copied before anything is reused
    loader = ShardLoader(data_synthetic_dir, **kwargs)
    stream = iter(loader)
    held = [b["video"][:1] for b in take(stream, 10)]  # keep views of the first 10 batches
    rest = []
    for _ in range(20):
        batch = next(stream)
        rest.append(batch["video"].clone())
        del batch  # dropped: its buffer may be reused from now on
    assert len(loader._outstanding) <= 10 + 3  # the held 10 + in flight: the rest were released
    for view, ref in zip(held, reference[:10]):
        assert torch.equal(view, ref["video"][:1])  # held views were never overwritten
    for got, ref in zip(rest, reference[10:]):
        assert torch.equal(got, ref["video"])


def test_default_resize_keeps_the_frame_edges(tmp_path):
    """A portrait clip in a square bucket: resize-to-cover cuts its top and bottom (a marker
    there disappears); the default bound (data.max_crop 0.25) keeps it and letterboxes."""
    frames = np.full((9, 128, 64, 3), 90, np.uint8)
    frames[:, 14:28, 20:44] = 255  # an object in the top sixth (a 32-row centre crop of the cover resize drops it)
    sample = {"__key__": "portrait", "mp4": encode_mp4(frames, fps=8.0), "json": {"caption": "portrait"}}
    write_shards([sample], tmp_path / "shards", samples_per_shard=1)

    def first(**kw) -> np.ndarray:
        loader = ShardLoader(tmp_path / "shards", batch_size=1, num_frames=5, resolution=(32, 32), **kw)
        return next(iter(loader))["video"][0, :, 0].permute(1, 2, 0).numpy()  # [H, W, 3]

    kept, cut = first(), first(max_crop=1.0)
    assert cut.max() < 200  # cropped to the middle: the object is gone
    assert kept[:12].max() > 200  # still there, near the top
    bars = kept[:, :3].max(), kept[:, -3:].max()  # 128x64 -> 43x21 shown, 32 rows of it kept
    assert max(bars) == 0 and kept[:, 8:24].min() > 60
