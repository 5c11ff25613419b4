"""worldline-shards: folder / CSV / JSONL of real videos -> validated, resumable shards."""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from worldline.data import ingest
from worldline.data.ingest import IngestOptions, make_shards
from worldline.data.loader import ShardLoader
from worldline.data.probe import probe_video
from worldline.data.samples import iter_tar_samples
from worldline.data.video import decode_clip, encode_mp4
from worldline.scripts.make_shards import main as shards_main
from worldline.scripts.make_shards import parse_size


def gradient(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=3)
    y, x = np.mgrid[0:h, 0:w]
    frames = [(base + np.stack([x * 2 + i * 4, y * 2, (x + y + i * 3)], -1)) % 256 for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def webm(frames: np.ndarray, fps: float) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as c:
        s = c.add_stream("libvpx-vp9", rate=int(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"deadline": "realtime", "cpu-used": "8"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


GOOD = ["cam/a", "cam/b_vfr", "c_hevc", "d_webm", "e_npy", "f_meta"]
BAD = {"x_text": "not_video", "y_trunc": "truncated_video", "z_len": "bad_actions", "w_nan": "bad_actions",
       "v_deep": "bad_actions"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A folder of real videos with every kind of sidecar, plus five bad inputs."""
    root = tmp_path_factory.mktemp("ingest_src")
    (root / "cam").mkdir()
    write = lambda rel, data: (root / rel).write_bytes(data)  # noqa: E731
    write("cam/a.mp4", encode_mp4(gradient(10, 48, 64), 10.0))
    (root / "cam/a.txt").write_text("a red square\n")
    (root / "cam/a.actions.json").write_text(json.dumps([[i % 5, 1] for i in range(10)]))
    (root / "cam/a.camera.json").write_text(json.dumps([[i, 2 * i] for i in range(10)]))
    (root / "cam/a.style.txt").write_text("noir, grainy\n")
    Image.fromarray(gradient(1, 16, 16)[0]).save(root / "cam/a.ref0.png")
    Image.fromarray(gradient(1, 16, 16, 1)[0]).save(root / "cam/a.ref1.jpg")
    times = np.cumsum([0.0] + [0.04, 0.12, 0.08] * 4)[:12]
    write("cam/b_vfr.mp4", encode_mp4(gradient(12, 40, 40, 2), 12.0, timestamps=times))
    write("c_hevc.mp4", encode_mp4(gradient(9, 130, 250, 3), 8.0, codec="libx265"))
    write("d_webm.webm", webm(gradient(8, 32, 48, 4), 8.0))
    write("e_npy.mp4", encode_mp4(gradient(8, 32, 32, 5), 8.0))
    np.save(root / "e_npy.actions.npy", np.arange(8)[:, None] % 3)
    np.save(root / "e_npy.camera.npy", np.zeros((8, 6)))  # a 6-DoF pose: kept as camera_pose
    write("f_meta.mp4", encode_mp4(gradient(8, 32, 32, 6), 8.0))
    (root / "f_meta.json").write_text(json.dumps({"caption": "from json", "style": ["x"], "scene": 4}))
    write("x_text.mp4", b"this is not a video" * 40)
    mp4 = encode_mp4(gradient(8, 32, 32, 7), 8.0)
    write("y_trunc.mp4", mp4[: len(mp4) // 2])
    write("z_len.mp4", mp4)
    (root / "z_len.actions.json").write_text(json.dumps([1, 2, 3]))
    write("w_nan.mp4", mp4)
    np.save(root / "w_nan.actions.npy", np.full((8, 1), np.nan))
    write("v_deep.mp4", mp4)  # a sidecar nested past json's recursion limit
    (root / "v_deep.actions.json").write_text("[" * 100_000 + "]" * 100_000)
    return root


def read_all(out: Path) -> dict[str, dict]:
    return {r.key: r.members for s in sorted(out.glob("shard-*.tar")) for r in iter_tar_samples(str(s))}


def test_folder_to_shards(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert shards_main([str(source), str(out), "--max-count", "2", "--processes", "2", "-q"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["samples"] == len(GOOD) and summary["shards"] == 3 and summary["skipped"] == len(BAD)
    for name in BAD:
        assert f"{name}" in captured.err  # every bad input is named on stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pattern"] == "shard-{000000..000002}.tar" and manifest["shard_counts"] == [2, 2, 2]
    assert {b["key"]: b["reason"] for b in manifest["skipped"]} == BAD
    by_key = {e["key"]: e for e in manifest["samples"]}
    keys = [k.replace("/", "_") for k in GOOD]
    assert sorted(by_key) == sorted(keys)
    assert by_key["cam_a"]["resolution"] == [48, 64] and by_key["cam_a"]["num_frames"] == 10
    assert by_key["cam_a"]["fps"] == pytest.approx(10.0) and by_key["cam_a"]["duration"] == pytest.approx(1.0)
    assert by_key["cam_b_vfr"]["vfr"] and by_key["c_hevc"]["resolution"] == [130, 250]
    # What controls the data carries, for the run's checks before start (data/controls.py).
    assert manifest["controls"] == {"samples": len(GOOD), "camera": 1, "refs": 2, "actions": {
        "samples": 2, "slots": [1, 2], "min": 0, "max": 4}}
    assert by_key["cam_a"]["controls"] == {"action_slots": 2, "action_min": 0, "action_max": 4,
                                           "camera": True, "refs": 2}
    from _runs import compose_cfg
    from worldline.train.validate import ConfigError, _validate_controls

    run = ["stage=controllability", "data=webdataset", f"data.shards={out}"]
    with pytest.raises(ConfigError, match=r"model.dit.num_action_slots.*\[1, 2\] slots"):
        _validate_controls(compose_cfg(run))

    samples = read_all(out)
    a = json.loads(samples["cam_a"]["json"])
    assert a["actions"] == [[i % 5, 1] for i in range(10)] and a["camera"][3] == [3, 6]
    assert a["style"] == ["noir", "grainy"] and samples["cam_a"]["txt"] == b"a red square"
    assert sorted(k for k in samples["cam_a"] if k.startswith("ref")) == ["ref0.png", "ref1.jpg"]
    assert probe_video(samples["d_webm"]["mp4"]).container == "mp4"  # webm re-encoded to mp4
    e = json.loads(samples["e_npy"]["json"])
    assert e["actions"] == [[i % 3] for i in range(8)] and len(e["camera_pose"][0]) == 6
    f = json.loads(samples["f_meta"]["json"])
    assert f["caption"] == "from json" and f["style"] == ["x"] and f["meta"]["scene"] == 4
    # The VFR video is stored as is: timestamps survive.
    _, idx = decode_clip(samples["cam_b_vfr"]["mp4"], num_frames=4, fps=5.0)
    assert idx.tolist() == [0, 2, 5, 7]

    # And the loader streams it, references and all.
    loader = ShardLoader(str(out), batch_size=2, num_frames=4, resolution=(32, 32), with_refs=True,
                         shuffle_shards=False)
    batch = next(iter(loader))
    assert batch["key"] == ["c_hevc", "cam_a"]  # sorted paths: "c_" < "ca"
    assert batch["refs"][0].shape == (0, 3, 32, 32) and batch["refs"][1].shape == (2, 3, 32, 32)
    assert batch["style"][1] == ["noir", "grainy"] and batch["actions"].shape == (2, 4, 2)


def test_csv_and_jsonl_manifests(source, tmp_path):
    rows = [
        {"video": "cam/a.mp4", "caption": "csv caption", "actions": "cam/a.actions.json",
         "style": "one;two", "refs": "cam/a.ref0.png", "rating": "5"},
        {"video": str(source / "e_npy.mp4"), "key": "e", "camera": "e_npy.camera.npy"},
        {"video": "x_text.mp4"},
    ]
    with open(source / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "key", "caption", "actions", "camera", "style", "refs", "rating"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl = source / "list.jsonl"
    inline = {"video": "f_meta.mp4", "actions": [[1]] * 8, "camera": [[0, 0]] * 8, "style": ["inline"]}
    jsonl.write_text("\n".join(json.dumps(r) for r in [*rows[:2], inline]) + "\n")
    m1 = make_shards(source / "list.csv", tmp_path / "csv", max_count=10)
    assert [e["key"] for e in m1["samples"]] == ["cam_a", "e"] and [b["key"] for b in m1["skipped"]] == ["x_text"]
    s1 = read_all(tmp_path / "csv")
    a = json.loads(s1["cam_a"]["json"])
    assert a["caption"] == "csv caption" and a["style"] == ["one", "two"] and a["meta"]["rating"] == "5"
    assert "ref0.png" in s1["cam_a"]  # the manifest's refs column
    m2 = make_shards(jsonl, tmp_path / "jsonl", max_count=10)
    assert [e["key"] for e in m2["samples"]] == ["cam_a", "e", "f_meta"]
    f = json.loads(read_all(tmp_path / "jsonl")["f_meta"]["json"])
    assert f["actions"] == [[1]] * 8 and f["style"] == ["inline"]


def test_shard_size_target_in_bytes(source, tmp_path):
    sizes = [len(m["mp4"]) for m in read_all_from(source, tmp_path / "ref").values()]
    target = 2 * max(sizes) + 8 * 1024
    m = make_shards(source, tmp_path / "sized", max_bytes=target, processes=2)
    assert sum(m["shard_counts"]) == len(GOOD) and len(m["shards"]) >= 2
    for name, size, count in zip(m["shards"], m["shard_bytes"], m["shard_counts"]):
        assert size == (tmp_path / "sized" / name).stat().st_size
        assert size <= target + 10240 or count == 1  # tar end-of-archive padding aside
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2KiB") == 2048


def read_all_from(source: Path, out: Path) -> dict[str, dict]:
    make_shards(source, out, max_count=100)
    return read_all(out)


def test_interrupted_write_resumes_to_the_same_result(source, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    make_shards(source, reference, max_count=2)
    out = tmp_path / "out"
    calls = itertools.count()
    real = ingest.prepare

    def crashing(item, opts):
        if next(calls) == 7:  # after 3 complete shards (+ bad inputs), mid-way through a 4th
            raise KeyboardInterrupt
        return real(item, opts)

    monkeypatch.setattr(ingest, "prepare", crashing)
    with pytest.raises(KeyboardInterrupt):
        make_shards(source, out, max_count=2)
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp-*"))
    kept = sorted(p.name for p in out.glob("shard-*.tar"))
    assert kept and len(kept) < 3 + 1
    monkeypatch.setattr(ingest, "prepare", real)
    done = make_shards(source, out, max_count=2)
    ref = json.loads((reference / "manifest.json").read_text())
    assert done["shards"] == ref["shards"] and done["samples"] == ref["samples"]
    # (list.csv / list.jsonl, written into the folder by the manifest test, are unused files)
    assert sorted(b["key"] for b in done["skipped"] if b["reason"] != "unused_file") == sorted(BAD)
    for name in ref["shards"]:  # byte-identical to the uninterrupted run
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    with pytest.raises(ValueError, match="other settings"):
        make_shards(source, out, max_count=3)


def test_reencode_and_downscale_keep_frames_and_times(source, tmp_path):
    opts = IngestOptions(reencode="libx264", max_side=32, validate="full")
    m = make_shards(source, tmp_path / "small", max_count=10, options=opts)
    by_key = {e["key"]: e for e in m["samples"]}
    assert by_key["c_hevc"]["resolution"] == [16, 32] and by_key["c_hevc"]["num_frames"] == 9
    assert max(by_key["cam_a"]["resolution"]) == 32 and by_key["cam_a"]["num_frames"] == 10
    vfr = read_all(tmp_path / "small")["cam_b_vfr"]["mp4"]
    assert probe_video(vfr).vfr and probe_video(vfr).codec == "avc1"
    _, idx = decode_clip(vfr, num_frames=4, fps=5.0)
    assert idx.tolist() == [0, 2, 5, 7]  # same times as the original


def test_console_entry_point_in_a_subprocess(source, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "worldline.scripts.make_shards", str(source), str(out), "--max-size", "1MB",
           "--processes", "2", "--strict"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # --strict: bad inputs make it fail
    assert "skipped" in proc.stderr and json.loads(proc.stdout.splitlines()[-1])["samples"] == len(GOOD)
    # Re-running a finished output is a no-op returning the same manifest.
    again = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["samples"] == len(GOOD)


def test_a_crashing_decoder_is_isolated_and_reported(source, tmp_path, monkeypatch):
    """A worker killed by a native crash (here: SIGSEGV on one input) neither hangs nor stops
    the run: the input is reported as ``decoder_crash`` and every other input is written."""
    import faulthandler
    import os
    import signal

    real = ingest.prepare

    def segfaulting(item, opts):
        if item.key == "e_npy":
            faulthandler.disable()  # no traceback dump from the dying worker
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(item, opts)

    monkeypatch.setattr(ingest, "prepare", segfaulting)
    m = make_shards(source, tmp_path / "out", max_count=2, processes=2)
    assert sorted(e["key"] for e in m["samples"]) == sorted(k.replace("/", "_") for k in GOOD if k != "e_npy")
    assert {b["key"]: b["reason"] for b in m["skipped"] if b["reason"] != "unused_file"} == \
        {**BAD, "e_npy": "decoder_crash"}
