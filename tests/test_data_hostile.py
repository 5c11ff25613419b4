"""Hostile and broken input: each case is skipped, counted and warned about (shard + key);
pickle carriers are never decoded; a failure-rate threshold aborts with a clear message."""

from __future__ import annotations

import io
import itertools
import json
import logging
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from _tars import write_tar
from worldline.data.loader import ShardLoader
from worldline.data.samples import iter_tar_samples
from worldline.data.synthetic import SyntheticWorldConfig, clip_to_sample, render_clip
from worldline.data.video import encode_mp4

CFG = SyntheticWorldConfig(num_clips=8, num_frames=9, height=32, width=32, seed=9)


class _Boom:
    """Unpickling this writes a marker file: proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled!",))


def members(sample: dict) -> list[tuple[str, bytes]]:
    out = []
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        data = value if isinstance(value, bytes) else (value if isinstance(value, str) else json.dumps(value)).encode()
        out.append((f"{sample['__key__']}.{ext}", data))
    return out



def patch_dims(mp4: bytes, h: int, w: int) -> bytes:
    """Rewrite the declared size in tkhd (16.16) and the stsd sample entry (16-bit): the most
    an mp4 header can claim is 65535 x 65535 (no real frame is touched)."""
    buf = bytearray(mp4)
    i = buf.find(b"tkhd")
    size = struct.unpack(">I", buf[i - 4 : i])[0]
    end = i - 4 + size
    buf[end - 8 : end] = struct.pack(">II", w << 16, h << 16)
    j = buf.find(b"avc1")
    buf[j + 28 : j + 32] = struct.pack(">HH", w, h)  # entry start (j - 4) + 32
    return bytes(buf)


def good(i: int) -> dict:
    return {**clip_to_sample(CFG, i), "__key__": f"g{i}"}


def bad_cases(tmp_path: Path) -> dict[str, tuple[list[tuple[str, bytes]], str]]:
    """case -> (tar members, expected stats reason)."""
    mp4 = good(0)["mp4"]
    meta = good(0)["json"]
    nan_meta = {**meta, "actions": [[float("nan")] * 3] * 9}
    inf_cam = {**meta, "camera": [[0.0, float("inf")]] * 9}
    evil = pickle.dumps(_Boom(str(tmp_path / "pwned")))
    deep = b"[" * 100_000 + b"]" * 100_000  # past json's recursion limit: RecursionError
    # Ids outside [0, num_actions) would index another slot's embedding rows (7, -5) or fail
    # deep in training (-1000000); booleans are not action ids.
    out_of_range = {**meta, "actions": [[7, 0, 0]] * 9}
    negative = {**meta, "actions": [[0, -1000000, 0]] * 9}
    booleans = {**meta, "actions": [[True, False, True]] * 9}
    return {
        "deep_json": (members({"__key__": "b_deep", "mp4": mp4, "json": deep}), "bad_json"),
        "action_above_range": (members({"__key__": "b_range", "mp4": mp4, "json": out_of_range}), "bad_actions"),
        "action_negative": (members({"__key__": "b_neg", "mp4": mp4, "json": negative}), "bad_actions"),
        "action_booleans": (members({"__key__": "b_bool", "mp4": mp4, "json": booleans}), "bad_actions"),
        "truncated_mdat": (members({"__key__": "b_trunc1", "mp4": mp4[: len(mp4) // 2], "json": meta}), "truncated_video"),
        "truncated_moov": (members({"__key__": "b_trunc2", "mp4": mp4[:-40], "json": meta}), "truncated_video"),
        "zero_bytes": (members({"__key__": "b_empty", "mp4": b"", "json": meta}), "empty_video"),
        "not_a_video": (members({"__key__": "b_text", "mp4": b"<html>not a video</html>" * 30, "json": meta}), "not_video"),
        "absurd_dims": (members({"__key__": "b_huge", "mp4": patch_dims(mp4, 65535, 65535), "json": meta}), "absurd_dimensions"),
        "missing_video": (members({"__key__": "b_nomp4", "json": meta, "txt": "x"}), "missing_video"),
        "missing_json": (members({"__key__": "b_nojson", "mp4": mp4, "txt": "x"}), "missing_json"),
        "bad_json": (members({"__key__": "b_json", "mp4": mp4, "json": b"{not json"}), "bad_json"),
        "json_not_object": (members({"__key__": "b_list", "mp4": mp4, "json": b"[1, 2]"}), "bad_json"),
        "nan_actions": (members({"__key__": "b_nan", "mp4": mp4, "json": nan_meta}), "bad_actions"),
        "inf_camera": (members({"__key__": "b_inf", "mp4": mp4, "json": inf_cam}), "bad_camera"),
        "pyd": (members({"__key__": "b_pyd", "mp4": mp4, "json": meta, "pyd": evil}), "unsafe_member"),
        "pickle": (members({"__key__": "b_pickle", "mp4": mp4, "json": meta, "pickle": evil}), "unsafe_member"),
        "pth": (members({"__key__": "b_pth", "mp4": mp4, "json": meta, "actions.pth": evil}), "unsafe_member"),
        "only_unsafe": ([("b_alone.pyd", evil)], "unsafe_member"),
        "short": (members({"__key__": "b_short", "mp4": encode_mp4(render_clip(CFG, 1)["frames"][:2], 8.0), "json": meta}), "too_short"),
    }


def test_every_hostile_case_is_skipped_counted_and_named(tmp_path, caplog, monkeypatch):
    cases = bad_cases(tmp_path)
    # Two bad samples, then a good one (g0..g7), over three shards; a cut-off tar in between.
    groups = []  # one member list per sample, so no sample is split across shards
    for n, (case_files, _) in enumerate(cases.values()):
        groups.append(case_files)
        if n % 2:
            groups.append(members(good(n // 2)))
    shards = [tmp_path / f"h-{i}.tar" for i in range(4)]
    for i, chunk in zip((0, 2, 3), np.array_split(np.arange(len(groups)), 3)):
        write_tar(shards[i], [f for g in chunk for f in groups[g]])
    tail = tmp_path / "tail.tar"
    write_tar(tail, members({**good(0), "__key__": "t0"}))
    shards[1].write_bytes(tail.read_bytes()[:700])  # header + part of the mp4: truncated tar

    # Nothing may unpickle or torch.load while streaming these shards.
    def forbidden(*a, **k):
        raise AssertionError("something tried to unpickle shard data")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    import torch

    monkeypatch.setattr(torch, "load", forbidden)
    loader = ShardLoader([str(s) for s in shards], batch_size=2, num_frames=4, resolution=(32, 32),
                         shuffle_shards=False, max_skip_fraction=1.0, num_actions=5)
    with caplog.at_level(logging.WARNING, logger="worldline.data.loader"):
        batches = list(itertools.islice(loader, len(cases) // 4))
    keys = [k for b in batches for k in b["key"]]
    # every good sample, in order, nothing else (one good after every second bad case)
    assert keys == [f"g{i}" for i in range(len(cases) // 2)]
    expected: dict[str, int] = {}
    for _, reason in cases.values():
        expected[reason] = expected.get(reason, 0) + 1
    reasons = loader.stats["skipped_reasons"]
    assert {k: v for k, v in reasons.items() if k != "bad_shard"} == expected
    assert loader.stats["skipped"] == len(cases) and loader.stats["shard_errors"] == reasons["bad_shard"] == 1
    messages = [r.getMessage() for r in caplog.records]
    for case_files, reason in cases.values():
        key = case_files[0][0].split(".")[0]
        assert any(f"'{key}'" in m and "shard h-" in m and reason in m for m in messages), (key, reason)
    assert any("h-1.tar" in m and "bad_shard" in m for m in messages)
    assert not (tmp_path / "pwned").exists()


def test_unsafe_members_are_never_read(tmp_path):
    evil = pickle.dumps(_Boom(str(tmp_path / "pwned")))
    path = tmp_path / "u.tar"
    write_tar(path, [("a.pyd", evil), *members(good(1)), ("c.json", b"{}"), ("c.pth", evil), *members(good(2))])
    raws = list(iter_tar_samples(str(path)))
    assert [(r.index, r.key, sorted(r.members), r.unsafe) for r in raws] == [
        (0, "a", [], ["pyd"]),
        (1, "g1", ["json", "mp4", "txt"], []),
        (2, "c", ["json"], ["pth"]),
        (3, "g2", ["json", "mp4", "txt"], []),
    ]
    # Indices stay exact even when a sample has no readable member: resume from index 3.
    assert [r.key for r in iter_tar_samples(str(path), start=3)] == ["g2"]
    assert [r.key for r in iter_tar_samples(str(path), only={0, 3})] == ["a", "g2"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_failure_rate_threshold_aborts(tmp_path, num_workers):
    mp4 = good(0)["mp4"]
    files = []
    for i in range(12):
        files += members(good(i % 8) | {"__key__": f"ok{i}"}) if i % 3 == 0 else \
            members({"__key__": f"bad{i}", "mp4": mp4[:100], "json": good(0)["json"]})
    write_tar(tmp_path / "t-0.tar", files)
    loader = ShardLoader(str(tmp_path / "t-0.tar"), batch_size=2, num_frames=4, resolution=(32, 32),
                         num_workers=num_workers, max_skip_fraction=0.5, skip_check_after=6)
    with pytest.raises(RuntimeError, match=r"skipped \(\d+%\) > max_skip_fraction=0.5 .*truncated_video"):
        list(itertools.islice(loader, 3))
    # Raised threshold: the same data streams (4 good of 12 per pass).
    ok = ShardLoader(str(tmp_path / "t-0.tar"), batch_size=2, num_frames=4, resolution=(32, 32),
                     max_skip_fraction=0.7, skip_check_after=6)
    assert len(list(itertools.islice(ok, 3))) == 3


def test_only_bad_data_is_an_error_not_a_hang(tmp_path):
    write_tar(tmp_path / "x.tar", members({"__key__": "b", "mp4": b"junk" * 10, "json": b"{}"}))
    loader = ShardLoader(str(tmp_path / "x.tar"), batch_size=1, num_frames=2, max_skip_fraction=1.0)
    with pytest.raises(RuntimeError, match="without one usable sample"):
        next(iter(loader))


def test_absurd_reference_image_is_refused(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 60000, 60000)  # IHDR width/height: header only
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # keep the chunk CRC valid
    sample = {**good(3), "ref0.png": bytes(png)}
    ok = {**good(4), "ref0.png": buf.getvalue()}
    write_tar(tmp_path / "r.tar", members(sample) + members(ok))
    loader = ShardLoader(str(tmp_path / "r.tar"), batch_size=1, num_frames=4, resolution=(16, 16),
                         with_refs=True, max_skip_fraction=1.0)
    batch = next(iter(loader))
    assert batch["key"] == ["g4"] and batch["refs"][0].shape == (1, 3, 16, 16)
    assert loader.stats["skipped_reasons"] == {"absurd_dimensions": 1}
    assert np.asarray(batch["video"]).dtype == np.uint8


def test_members_rejected_by_name_are_not_even_read(tmp_path, monkeypatch):
    """Resuming inside a shard skips earlier samples without reading their bytes from disk."""
    from worldline.data import samples as samples_lib

    big = members({**good(0), "__key__": "big", "mp4": b"\0" * 4_000_000})
    write_tar(tmp_path / "s.tar", big + members(good(1)))
    read = {"bytes": 0}

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read["bytes"] += len(data)
            return data

        def readinto(self, b):
            n = super().readinto(b)
            read["bytes"] += n or 0
            return n

    monkeypatch.setattr(samples_lib, "gopen", lambda url, mode="rb": Counting(url, "r"))
    assert [r.key for r in iter_tar_samples(str(tmp_path / "s.tar"), start=1)] == ["g1"]
    assert read["bytes"] < 200_000  # headers + g1's members, not the 4 MB member


def test_decoder_crash_in_a_worker_is_survived(data_synthetic_dir, monkeypatch):
    """A native crash (SIGSEGV) while decoding one sample kills that worker; the loader notes
    the sample, restarts its workers from the consumed position and carries on without it, and
    the crash list travels in the state so a resumed run skips the sample without crashing."""
    import faulthandler
    import os
    import signal

    from worldline.data import samples as samples_lib

    real = samples_lib.PixelCodec.decode

    def fragile(self, cand, rng, tag):
        if cand.key == "00000005":
            faulthandler.disable()  # no traceback dump from the dying worker
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(self, cand, rng, tag)

    monkeypatch.setattr(samples_lib.PixelCodec, "decode", fragile)
    kwargs = dict(batch_size=2, num_frames=3, resolution=(32, 32), num_workers=2, shuffle_shards=False)
    loader = ShardLoader(data_synthetic_dir, **kwargs)
    keys = [k for b in itertools.islice(loader, 11) for k in b["key"]]
    expected = [f"{i:08d}" for i in range(24) if i != 5]
    assert set(keys) <= set(expected) and len(keys) == len(set(keys)) == 22  # no loss, no repeat
    state = loader.state_dict()
    assert state["crashed"] == [[1, 1]]  # shard 1, sample 1
    assert loader.stats["skipped_reasons"] == {"decoder_crash": 1}
    resumed = ShardLoader(data_synthetic_dir, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.crashed == {(1, 1)}
    epoch1 = [k for b in itertools.islice(resumed, 12) for k in b["key"]]
    assert "00000005" not in epoch1
