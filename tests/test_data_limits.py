"""Hostile inputs to ingest and the loader: every bad sidecar, member, key or path is a counted
skip naming the file or key, limits are checked before reading, and reruns say what they do.

Real tiny mp4s (encode_mp4, 8 frames of 32x32), real folders, symlinks and tars."""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _tars import write_tar
from worldline.data.loader import ShardLoader
from worldline.data.probe import VideoLimits
from worldline.data.samples import iter_tar_samples
from worldline.data.video import encode_mp4
from worldline.scripts.make_shards import main as shards_main


def clip(seed: int = 0, t: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_mp4(rng.integers(0, 255, (t, 32, 32, 3), dtype=np.uint8), 8.0)


def run(src: Path, out: Path, *extra: str, capsys) -> tuple[int, dict, str]:
    """The CLI, one process (-q: no log lines), -> (exit code, manifest or {}, stderr); the
    manifest's "run" is this run's (the CLI summary line), not the one stored on disk."""
    code = shards_main([str(src), str(out), "--max-count", "4", "--processes", "0", "-q", *extra])
    std = capsys.readouterr()
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    if code == 0:
        manifest["run"] = {**manifest.get("run", {}), "action": json.loads(std.out.splitlines()[-1])["run"]}
    return code, manifest, std.err


def skipped(manifest: dict) -> dict[str, tuple[str, str]]:
    return {Path(b["path"]).name: (b["reason"], b["message"]) for b in manifest["skipped"]}


def stored(out: Path) -> dict[str, dict]:
    return {r.key: r.members for s in sorted(out.glob("shard-*.tar")) for r in iter_tar_samples(str(s))}


def test_text_sidecars_in_any_encoding(tmp_path, capsys):
    """UTF-8 with BOM and UTF-16 with BOM are decoded; a Latin-1 caption or style file is a
    bad_encoding skip of that video only, naming the file; the run goes on (it used to exit 1)."""
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate("abcd"):
        (src / f"{name}.mp4").write_bytes(clip(i))
    (src / "a.txt").write_bytes(codecs.BOM_UTF8 + "café au lait".encode())
    (src / "b.txt").write_bytes("naïve 鳥".encode("utf-16"))  # BOM + UTF-16
    (src / "c.txt").write_bytes("café".encode("latin-1"))
    (src / "d.style.txt").write_bytes("noir, rétro".encode("latin-1"))
    code, m, err = run(src, tmp_path / "out", capsys=capsys)
    assert code == 0 and sorted(e["key"] for e in m["samples"]) == ["a", "b"]
    s = stored(tmp_path / "out")
    assert s["a"]["txt"].decode() == "café au lait" and s["b"]["txt"].decode() == "naïve 鳥"
    bad = skipped(m)
    assert bad["c.mp4"][0] == "bad_encoding" and "c.txt" in bad["c.mp4"][1]
    assert bad["d.mp4"][0] == "bad_encoding" and "d.style.txt" in bad["d.mp4"][1]
    assert "skipped" in err and "c.txt" in err


def test_every_path_is_ingested_or_skipped_with_a_reason(tmp_path, capsys):
    """Hidden files and folders, broken and looping symlinks, a PNG renamed .mp4, a FIFO and a
    stray file are each listed as skipped (they were silently ignored, and the PNG was accepted)."""
    src = tmp_path / "src"
    (src / ".git").mkdir(parents=True)
    (src / ".git" / "HEAD").write_text("ref")
    (src / "good.mp4").write_bytes(clip())
    (src / ".hidden.mp4").write_bytes(clip(1))
    (src / "broken.mp4").symlink_to(src / "nowhere.mp4")
    (src / "loop.mp4").symlink_to(src / "loop.mp4")
    (src / "linked.mp4").symlink_to(src / "good.mp4")  # a working symlink is an input
    (src / "other.mp4").symlink_to(src / ".hidden.mp4")  # (of another clip: not a duplicate)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "photo.png")
    (src / "photo.png").rename(src / "photo.mp4")
    (src / "notes.md").write_text("hi")
    os.mkfifo(src / "pipe.mp4")  # reading it would block the run forever
    code, m, _ = run(src, tmp_path / "out", capsys=capsys)
    assert code == 0 and sorted(e["key"] for e in m["samples"]) == ["good", "other"]
    reasons = {name: r for name, (r, _) in skipped(m).items()}
    # linked.mp4 is good.mp4's content again: an exact duplicate (data/provenance.py).
    assert reasons == {".git": "hidden", ".hidden.mp4": "hidden", "broken.mp4": "broken_symlink",
                       "linked.mp4": "duplicate",
                       "loop.mp4": "symlink_loop", "photo.mp4": "image_not_video", "notes.md": "unused_file",
                       "pipe.mp4": "not_a_file"}


def test_manifest_keys_unsafe_or_duplicate_and_bad_rows(tmp_path, capsys):
    """Keys with '..', '/' or odd characters are bad_key skips; a repeated key is a
    duplicate_key skip and the first row wins; an unparsable line or a row without a video is
    a bad_row naming the line; the good rows are ingested."""
    for i in range(4):
        (tmp_path / f"v{i}.mp4").write_bytes(clip(i))
    rows = [{"video": "v0.mp4", "key": "../../etc/x"}, {"video": "v1.mp4", "key": "a/b"},
            {"video": "v2.mp4", "key": "ok"}, {"video": "v3.mp4", "key": "ok"},
            {"video": "v1.mp4", "key": "fine-1"}, {"caption": "no video"}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    code, m, _ = run(tmp_path / "list.jsonl", tmp_path / "out", capsys=capsys)
    assert code == 0
    assert {e["key"]: Path(e["source"]).name for e in m["samples"]} == {"ok": "v2.mp4", "fine-1": "v1.mp4"}
    by_reason: dict[str, list[str]] = {}
    for b in m["skipped"]:
        by_reason.setdefault(b["reason"], []).append(f"{b['key']} {b['message']}")
    assert len(by_reason["bad_key"]) == 2 and any("../../etc/x" in t for t in by_reason["bad_key"])
    assert len(by_reason["duplicate_key"]) == 1 and "'ok'" in by_reason["duplicate_key"][0]
    assert sorted(t.split()[0] for t in by_reason["bad_row"]) == ["list.jsonl:6", "list.jsonl:7"]
    assert set(stored(tmp_path / "out")) == {"ok", "fine-1"}  # nothing unsafe reached a tar


def test_action_range_and_booleans_checked_at_ingest(tmp_path, capsys):
    """--num-actions: ids outside [0, N) and booleans are bad_actions skips at ingest."""
    src = tmp_path / "src"
    src.mkdir()
    acts = {"inside": [i % 5 for i in range(8)], "above": [7] * 8, "negative": [-1] * 8, "bools": [True] * 8}
    for i, (name, a) in enumerate(acts.items()):
        (src / f"{name}.mp4").write_bytes(clip(i))
        (src / f"{name}.actions.json").write_text(json.dumps(a))
    code, m, _ = run(src, tmp_path / "out", "--num-actions", "5", capsys=capsys)
    assert code == 0 and [e["key"] for e in m["samples"]] == ["inside"]
    bad = skipped(m)
    assert {k: r for k, (r, _) in bad.items()} == {"above.mp4": "bad_actions", "negative.mp4": "bad_actions",
                                                   "bools.mp4": "bad_actions"}
    assert "[0, 5)" in bad["above.mp4"][1] and "boolean" in bad["bools.mp4"][1]
    # Without --num-actions a negative id is still refused (ids index a table); large ids are
    # recorded in the manifest's controls, which the run checks against the model before start.
    code, m, _ = run(src, tmp_path / "out2", capsys=capsys)
    assert {k: r for k, (r, _) in skipped(m).items()} == {"negative.mp4": "bad_actions",
                                                          "bools.mp4": "bad_actions"}
    assert m["controls"]["actions"]["max"] == 7


def test_limits_checked_before_reading(tmp_path, capsys):
    """A video above --max-input-size, a JSON sidecar above --max-sidecar-size and a frame
    above --max-video-pixels are skipped with the limit named; a deep JSON sidecar too."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.mp4").write_bytes(clip(0))
    (src / "big.mp4").write_bytes(clip(1, t=48))
    (src / "meta.mp4").write_bytes(clip(2))
    (src / "meta.json").write_text(json.dumps({"pad": "x" * 5000}))
    (src / "deep.mp4").write_bytes(clip(3))
    (src / "deep.json").write_text(json.dumps({"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})
                                   .replace("[0]", "[" * 40 + "0" + "]" * 40))
    size = (src / "small.mp4").stat().st_size
    assert (src / "big.mp4").stat().st_size > 2 * size
    code, m, _ = run(src, tmp_path / "out", "--max-input-size", str(2 * size), "--max-sidecar-size", "4KB",
                     capsys=capsys)
    assert code == 0 and [e["key"] for e in m["samples"]] == ["small"]
    bad = skipped(m)
    assert bad["big.mp4"][0] == "too_large" and "max_input_bytes" in bad["big.mp4"][1]
    assert bad["meta.mp4"][0] == "too_large" and "meta.json" in bad["meta.mp4"][1]
    assert bad["deep.mp4"][0] == "bad_json" and "deeper than" in bad["deep.mp4"][1]
    code, m, _ = run(src, tmp_path / "px", "--max-video-pixels", "1000", capsys=capsys)
    assert m["num_samples"] == 0 and skipped(m)["small.mp4"][0] == "absurd_dimensions"


def test_rerun_says_what_it_does(tmp_path, capsys):
    """A rerun on a finished output: "nothing new" (also after a touch), new and changed
    inputs appended with the changed content really stored, other settings refused naming
    --overwrite, which then starts over."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"v{i}.mp4").write_bytes(clip(i))
    code, first, err = run(src, out, capsys=capsys)
    assert code == 0 and first["num_samples"] == 3 and first["run"]["action"] == "fresh"
    code, again, err = run(src, out, capsys=capsys)
    assert again["run"]["action"] == "nothing new" and "nothing new" in err
    os.utime(src / "v1.mp4")  # same content, new mtime: hashed, still unchanged
    assert run(src, out, capsys=capsys)[1]["run"]["action"] == "nothing new"

    (src / "v3.mp4").write_bytes(clip(3))
    (src / "v0.mp4").write_bytes(clip(9, t=12))  # replaced: 12 frames now
    code, m, err = run(src, out, capsys=capsys)
    assert code == 0 and m["run"]["new"] == 1 and m["run"]["changed"] == 1 and "appended" in err
    by_key = {e["key"]: e for e in m["samples"]}
    assert sorted(by_key) == ["v0", "v1", "v2", "v3"] and by_key["v0"]["num_frames"] == 12
    assert len(stored(out)) == 4  # the old v0 is gone from the tars, not kept beside the new
    assert run(src, out, capsys=capsys)[1]["run"]["action"] == "nothing new"

    code, _, err = run(src, out, "--max-count", "3", capsys=capsys)
    assert code == 2 and "--overwrite" in err and "resume=False" not in err.split("(")[0]
    code, m, _ = run(src, out, "--max-count", "3", "--overwrite", capsys=capsys)
    assert code == 0 and m["num_samples"] == 4 and m["shard_counts"] == [3, 1]


# ------------------------------------------------------------------------------- the loader
tar_of = write_tar


def sample(key: str, seed: int = 0, txt: bytes = b"a caption", t: int = 8) -> list[tuple[str, bytes]]:
    return [(f"{key}.mp4", clip(seed, t)), (f"{key}.json", b'{"caption": "c"}'), (f"{key}.txt", txt)]


def test_loader_skips_unsafe_repeated_oversized_and_misencoded_samples(tmp_path, caplog):
    """In a shard: keys '../../etc/x' and 'a/b' (bad_key), a key repeated (duplicate_key; the
    first copy is delivered), a member over max_member_bytes (too_large, never read), a
    Latin-1 caption (bad_encoding); each counted and named, the good samples all delivered."""
    big = sample("big", 5, t=48)
    files = (sample("ok0", 0) + sample("../../etc/x", 1) + sample("a/b", 2) + sample("ok1", 3)
             + sample("ok0", 4) + sample("latin", 6, txt="café".encode("latin-1")) + big + sample("ok2", 7))
    shard = tar_of(tmp_path / "s.tar", files)
    limit = max(len(d) for n, d in files if n != "big.mp4")
    assert len(big[0][1]) > limit
    loader = ShardLoader([shard], batch_size=1, num_frames=4, resolution=(32, 32), shuffle_shards=False,
                         max_skip_fraction=1.0, max_member_bytes=limit)
    with caplog.at_level(logging.WARNING, logger="worldline.data.loader"):
        keys = [k for b in itertools.islice(loader, 3) for k in b["key"]]
    assert keys == ["ok0", "ok1", "ok2"]
    assert loader.stats["skipped_reasons"] == {"bad_key": 2, "duplicate_key": 1, "bad_encoding": 1, "too_large": 1}
    text = "\n".join(r.getMessage() for r in caplog.records)
    for key in ("../../etc/x", "a/b", "ok0", "latin", "big"):
        assert f"'{key}'" in text, key


def test_training_can_lower_the_decode_size_limit(tmp_path):
    """ShardLoader(limits=VideoLimits(max_pixels=...)), what data.max_pixels sets: a larger
    video is an absurd_dimensions skip, decided from its header."""
    shard = tar_of(tmp_path / "s.tar", [("wide.mp4", encode_mp4(np.zeros((8, 32, 96, 3), np.uint8), 8.0)),
                                        ("wide.json", b"{}")] + sample("small", 0))
    loader = ShardLoader([shard], batch_size=1, num_frames=4, resolution=(32, 32), shuffle_shards=False,
                         max_skip_fraction=1.0, limits=VideoLimits(max_pixels=32 * 64))
    assert [b["key"] for b in itertools.islice(loader, 1)] == [["small"]]
    assert loader.stats["skipped_reasons"] == {"absurd_dimensions": 1}


def test_config_keys_and_errors_name_what_to_do(tmp_path):
    """data.max_pixels / data.max_member_bytes reach the loader; a folder without
    manifest.json is named; an unquoted brace pattern gets a hint."""
    from omegaconf import OmegaConf

    from worldline.data.loader import resolve_shards
    from worldline.train.config import DataConfig
    from worldline.train.validate import override_hints

    d = OmegaConf.structured(DataConfig)
    assert d.max_pixels is None and d.max_member_bytes == 2 << 30
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileNotFoundError, match="without manifest.json"):
        resolve_shards(str(tmp_path / "shards"))
    assert override_hints(["data.shards=/x/s-{000..009}.tar", "data.batch_size=2"])[0].startswith(
        "hint: data.shards=/x/s-{000..009}.tar has an unquoted brace pattern")
    assert override_hints(['data.shards="/x/s-{000..009}.tar"']) == []
    from _runs import compose_cfg

    from worldline.train.config import ConfigError
    from worldline.train.validate import validate

    cfg = compose_cfg(["data.kind=webdataset", f"data.shards={tmp_path / 'shards'}", "data.max_pixels=4096"])
    assert cfg.data.max_pixels == 4096
    with pytest.raises(ConfigError, match="data.shards.*without manifest.json"):  # before any worker starts
        validate(cfg)


def test_latent_writer_never_writes_an_unsafe_or_repeated_key(tmp_path):
    """worldline-encode-latents reads pixel shards through the same checks: '../../etc/x' and
    a repeated key are reported skips, never member names of its tars."""
    import torch

    from worldline.data.latents import encode_latent_shards

    src = tmp_path / "px"
    src.mkdir()
    tar_of(src / "shard-000000.tar", sample("ok0", 0) + sample("../../etc/x", 1) + sample("ok0", 2))
    out = tmp_path / "lat"
    m = encode_latent_shards([str(src / "shard-000000.tar")], out,
                             lambda v: torch.nn.functional.avg_pool3d(v.float(), (4, 8, 8)),
                             num_frames=4, resolution=(32, 32), batch_size=1, num_workers=0)
    assert m["num_samples"] == 1 and m["skipped_reasons"] == {"bad_key": 1, "duplicate_key": 1}
    names = [n for t in out.glob("*.tar") for n in tarfile.open(t).getnames()]
    assert names and all(n.startswith("ok0.") for n in names)


def test_studio_folder_with_a_latin1_caption_skips_that_clip_only(tmp_path):
    """worldline-studio-shards stages a caption it cannot decode as it is: ingest reports
    that clip (bad_encoding, file named) and shards the rest (it used to raise)."""
    from worldline.scripts.studio_shards import make_studio_shards

    studio = tmp_path / "studio"
    studio.mkdir()
    for i, name in enumerate(("good", "latin")):
        (studio / f"{name}.mp4").write_bytes(clip(i))
    (studio / "good.txt").write_text("fine")
    (studio / "latin.txt").write_bytes("pâté".encode("latin-1"))
    m = make_studio_shards(studio, tmp_path / "out", val_fraction=0.0, processes=0)["train"]
    assert [e["key"] for e in m["samples"]] == ["good"]
    assert [(Path(b["path"]).name, b["reason"]) for b in m["skipped"]] == [("latin.mp4", "bad_encoding")]
    assert "latin.txt" in m["skipped"][0]["message"]


def test_loader_drops_a_key_repeated_across_shards(tmp_path):
    """A dataset whose manifest lists key 'k' in two shards: the first shard's copy is
    delivered, the second is a counted duplicate_key skip, whatever the shard order."""
    from worldline.data.shards import write_manifest

    tar_of(tmp_path / "a.tar", sample("k", 0) + sample("a1", 1))
    tar_of(tmp_path / "b.tar", sample("b1", 2) + sample("k", 3))
    write_manifest(tmp_path, ["a.tar", "b.tar"], [2, 2],
                   [{"key": k, "shard": s} for s, k in (("a.tar", "k"), ("a.tar", "a1"), ("b.tar", "b1"), ("b.tar", "k"))])
    first = next(iter(ShardLoader([str(tmp_path / "a.tar")], batch_size=1, num_frames=4, resolution=(32, 32),
                                  shuffle_shards=False)))["video"]
    for seed in (0, 1, 2):  # two epochs each, in the shard orders these seeds draw
        loader = ShardLoader(str(tmp_path), batch_size=1, num_frames=4, resolution=(32, 32), seed=seed,
                             max_skip_fraction=1.0)
        batches = list(itertools.islice(loader, 6))
        assert sorted(b["key"][0] for b in batches) == ["a1", "a1", "b1", "b1", "k", "k"]
        assert all(torch.equal(b["video"], first) for b in batches if b["key"] == ["k"])  # a.tar's copy
        assert loader.stats["skipped_reasons"]["duplicate_key"] >= 1


def test_a_junk_file_is_refused_from_its_header_without_being_read(tmp_path, monkeypatch):
    """A 1 GiB sparse file (an mp4 'ftyp' box, then zeros) and a 1 GiB sparse non-mp4 are
    refused by the header probe; neither is ever read whole (the real read_bytes, watched)."""
    import struct

    from worldline.data import ingest
    from worldline.data.ingest import IngestOptions, make_shards

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "boxes.mp4", "wb") as f:
        f.write(struct.pack(">I4s", 16, b"ftyp") + b"isom\0\0\0\0")
        f.truncate(1 << 30)
    with open(src / "zeros.mp4", "wb") as f:
        f.truncate(1 << 30)
    (src / "good.mp4").write_bytes(clip())
    read: list[str] = []
    real = Path.read_bytes

    def watched(self):
        read.append(self.name)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", watched)
    m = make_shards(src, tmp_path / "out", max_count=4, processes=0, options=IngestOptions())
    assert [e["key"] for e in m["samples"]] == ["good"]
    assert {Path(b["path"]).name: b["reason"] for b in m["skipped"]} == {"boxes.mp4": "not_video",
                                                                          "zeros.mp4": "not_video"}
    assert read == ["good.mp4"]
