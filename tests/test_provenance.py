"""Provenance and consent: licences/sources recorded at ingest, exact de-duplication, an
opt-out list applied at ingest and at load time, per-licence counts of the samples consumed
in checkpoints, and provenance.json + DATA_CARD.md next to exported weights.

Real videos (PyAV-encoded mp4s of 5 frames at 16x16), real shards, real decord decoding and,
in the end-to-end test, real ``worldline-train`` runs under torchrun (2 gloo ranks, then a
resharded resume on 1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from worldline.data.ingest import IngestOptions, make_shards
from worldline.data.loader import ShardLoader
from worldline.data.provenance import OptOut, ProvenanceOptions, summarize_states
from worldline.data.sources import file_sha256
from worldline.data.state import merge_states
from worldline.data.video import encode_mp4
from worldline.scripts.data_report import main as report_main
from worldline.scripts.make_shards import main as shards_main


def clip(seed: int, t: int = 5, size: int = 16) -> bytes:
    """A distinct tiny mp4 (content differs per seed, so the sha256s differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size, size, 3))
    frames = np.stack([(base + 9 * i) % 256 for i in range(t)]).astype(np.uint8)
    return encode_mp4(frames, 8.0)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Five clips: licences from a JSON sidecar field, a .license.txt sidecar, nothing (the
    default applies), a URL source; and one byte-identical copy of the first clip."""
    src = tmp_path / "clips"
    src.mkdir()
    for i in range(4):
        (src / f"c{i}.mp4").write_bytes(clip(i))
    (src / "c0.json").write_text(json.dumps({"license": "CC-BY-4.0", "attribution": "Ann",
                                             "source": "https://vids.example/c0.mp4"}))
    (src / "c1.license.txt").write_text("\n  CC0-1.0  \nCreative Commons Zero ...\n")
    (src / "c1.attribution.txt").write_text("Bob")
    (src / "c3.json").write_text(json.dumps({"license": {"hostile": "dict"}}))  # bad_provenance
    (src / "dup.mp4").write_bytes(clip(0))  # same bytes as c0
    return src


def test_ingest_records_provenance_and_dedupes(folder, tmp_path):
    out = tmp_path / "shards"
    m = make_shards(folder, out, max_count=2, processes=0,
                    options=IngestOptions(provenance=ProvenanceOptions(default_license="Studio-Internal")))
    prov = {e["key"]: e["provenance"] for e in m["samples"]}
    assert sorted(prov) == ["c0", "c1", "c2"]
    assert prov["c0"]["license"] == "CC-BY-4.0" and prov["c0"]["attribution"] == "Ann"
    assert prov["c0"]["source"] == "https://vids.example/c0.mp4"
    assert prov["c0"]["origin"] == "https://vids.example"
    assert prov["c0"]["sha256"] == file_sha256(folder / "c0.mp4")
    assert prov["c1"]["license"] == "CC0-1.0" and prov["c1"]["attribution"] == "Bob"
    assert prov["c2"]["license"] == "Studio-Internal"  # --default-license
    assert prov["c2"]["source"] == str((folder / "c2.mp4").resolve()) and prov["c2"]["origin"] == "clips"
    skipped = {b["key"]: b for b in m["skipped"]}
    assert skipped["c3"]["reason"] == "bad_provenance" and "license" in skipped["c3"]["message"]
    dup = skipped["dup"]
    assert dup["reason"] == "duplicate"
    assert "dup.mp4" in dup["message"] and "c0" in dup["message"]  # names both copies
    assert m["provenance"]["licenses"] == {"CC-BY-4.0": 1, "CC0-1.0": 1, "Studio-Internal": 1}
    assert m["provenance"]["skipped"] == {"bad_provenance": 1, "duplicate": 1}
    # The sample JSON in the shard carries the same record.
    loader = ShardLoader(out, batch_size=1, num_frames=5, resolution=(16, 16), shuffle_shards=False)
    it = iter(loader)
    keys = [next(it).key[0] for _ in range(3)]
    assert keys == ["c0", "c1", "c2"]
    assert loader.stats["licenses"] == {"CC-BY-4.0": 1, "CC0-1.0": 1, "Studio-Internal": 1}
    assert loader.stats["sources"] == {"https://vids.example": 1, "clips": 2}


def test_manifest_columns_require_license_and_exclude_cli(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    for i in range(4):
        (src / f"v{i}.mp4").write_bytes(clip(10 + i))
    with open(src / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "license", "source", "origin", "caption"])
        w.writerow(["v0.mp4", "CC-BY-SA-4.0", "https://a.example/v0", "", "zero"])
        w.writerow(["v1.mp4", "", "", "archive-7", "one"])  # no licence: refused
        w.writerow(["v2.mp4", "MIT", "", "", "two"])
        w.writerow(["v3.mp4", "MIT", "https://b.example/v3", "", "three"])  # opted out by URL
    optout = tmp_path / "optout.txt"
    optout.write_text("# rights holders' requests\nhttps://b.example/v3  # ticket 12\n")
    out = tmp_path / "shards"
    rc = shards_main([str(src / "list.csv"), str(out), "--max-count", "1", "--processes", "0",
                      "--require-license", "--exclude", str(optout), "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 2 and summary["licenses"] == {"CC-BY-SA-4.0": 1, "MIT": 1}
    m = json.loads((out / "manifest.json").read_text())
    reasons = {b["key"]: b["reason"] for b in m["skipped"]}
    assert reasons == {"v1": "no_license", "v3": "opted_out"}
    assert "optout.txt" in next(b["message"] for b in m["skipped"] if b["key"] == "v3")
    v2 = next(e["provenance"] for e in m["samples"] if e["key"] == "v2")
    assert v2["origin"] == "m" and v2["license"] == "MIT"
    # The report command prints the licence table of the dataset.
    assert report_main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| CC-BY-SA-4.0 | 1 | 50.0% |" in text and "opted_out 1" in text and "no_license 1" in text


def test_opt_out_file_formats(tmp_path):
    sha = "ab" * 32
    j = tmp_path / "o.json"
    j.write_text(json.dumps({"sha256": [sha.upper()], "sources": ["https://x.example/a"], "keys": ["k9"]}))
    o = OptOut.load(j)
    assert o.match("k1", {"provenance": {"sha256": sha}}) == f"sha256 {sha}"
    assert o.match("k1", {"provenance": {"source": "https://x.example/a"}}) == "https://x.example/a"
    assert o.match("k9") == "k9"
    assert o.match("k1", {"provenance": "not a dict", "meta": 3}) is None
    t = tmp_path / "o.txt"
    t.write_text("clips/a.mp4\n\n# a comment\nhttps://y.example/v#t=3  # keeps its fragment\n")
    o = OptOut.load(t)
    assert o.match("x", {"meta": {"source": str(Path("clips/a.mp4").resolve())}})
    assert o.match("x", source="https://y.example/v#t=3") and len(o) == 3  # path counted twice
    j.write_text(json.dumps({"sha256": "not-a-list"}))
    with pytest.raises(ValueError, match="list"):
        OptOut.load(j)


def _two_licence_shards(tmp_path) -> tuple[Path, dict]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"s{i}.mp4").write_bytes(clip(20 + i))
        (src / f"s{i}.license.txt").write_text("CC-BY-4.0" if i % 2 == 0 else "CC0-1.0")
    out = tmp_path / "shards"
    m = make_shards(src, out, max_count=2, processes=0)
    return out, {e["key"]: e["provenance"]["sha256"] for e in m["samples"]}


def test_loader_opt_out_after_sharding_survives_resume(tmp_path):
    """A clip opted out after the shards (and a checkpoint holding it in the shuffle buffer)
    were written is never delivered; the skip is counted, and the counters resume exactly."""
    shards, sha = _two_licence_shards(tmp_path)
    kw = dict(batch_size=1, num_frames=5, resolution=(16, 16), shuffle_buffer=3, seed=1)
    first = ShardLoader(shards, **kw)
    it = iter(first)
    seen = [next(it).key[0] for _ in range(2)]
    state = first.state_dict()
    buffered = state["streams"][0]["buffer"]  # [epoch, shard, index]: read, not delivered
    assert buffered
    victim = f"s{2 * buffered[0][1] + buffered[0][2]}"  # 2 samples a shard, in input order
    assert victim not in seen
    optout = tmp_path / "optout.txt"
    optout.write_text(sha[victim] + "\n")
    resumed = ShardLoader(shards, **kw, exclude=optout)
    resumed.load_state_dict(state)
    it = iter(resumed)
    rest = [next(it).key[0] for _ in range(3)]
    assert victim not in rest and sorted(seen + rest) == sorted(k for k in sha if k != victim)
    st = resumed.stats
    assert st["skipped_reasons"] == {"opted_out": 1} and st["samples"] == 5
    assert sum(st["licenses"].values()) == 5 and sum(st["sources"].values()) == 5
    assert st["licenses"] == {"CC-BY-4.0": 3 - (victim in ("s0", "s2", "s4")),
                              "CC0-1.0": 3 - (victim in ("s1", "s3", "s5"))}


def test_merge_states_sums_provenance_counters(tmp_path):
    """Two real ranks' states merge (2 -> 1 reshard) into exact per-licence totals, which carry
    on counting in the new layout; identical states (a CP group) are summarised once."""
    shards, _ = _two_licence_shards(tmp_path)
    kw = dict(batch_size=1, num_frames=5, resolution=(16, 16), world_size=2, shuffle_shards=False)
    states = []
    for rank in (0, 1):
        loader = ShardLoader(shards, rank=rank, **kw)
        it = iter(loader)
        for _ in range(rank + 1):
            next(it)
        states.append(loader.state_dict())
    merged = merge_states(states).stats
    assert merged["samples"] == 3 and sum(merged["licenses"].values()) == 3
    assert merged["sources"] == {"src": 3}
    one = ShardLoader(shards, **{**kw, "world_size": 1})
    one.load_state_dict(states)
    it = iter(one)
    next(it)
    assert one.stats["samples"] == 4 and sum(one.stats["licenses"].values()) == 4
    summary = summarize_states([states[0], states[1], states[1]])
    assert summary["samples"] == 3 and summary["licenses"] == merged["licenses"]
    # A StageLoader nests its loaders' states; an empty state (no data yet) counts nothing.
    assert summarize_states([{}, {"main": states[0], "prior": None}])["samples"] == 1


@pytest.mark.slow
@pytest.mark.dist
def test_provenance_end_to_end(tmp_path, capsys):
    """Ingest with licences -> opt one clip out after sharding -> train 2 gloo ranks, resume
    resharded on 1 -> export: provenance.json / DATA_CARD.md count exactly the samples consumed
    and the opted-out clip (the only one under its licence) was never consumed."""
    from tests.faults._helpers import run, train_args
    from worldline.scripts.export import main as export_main

    src = tmp_path / "clips"
    src.mkdir()
    licences = ["CC-BY-4.0", "CC-BY-4.0", "CC0-1.0", "CC0-1.0", "CC-BY-4.0", "CC0-1.0", "CC0-1.0",
                "Withdrawn-1.0"]
    for i, lic in enumerate(licences):
        (src / f"k{i}.mp4").write_bytes(clip(40 + i))
        (src / f"k{i}.json").write_text(json.dumps({"license": lic, "caption": f"clip {i}"}))
    shards = tmp_path / "shards"
    m = make_shards(src, shards, max_count=2, processes=0)
    assert m["num_samples"] == 8 and m["provenance"]["licenses"]["Withdrawn-1.0"] == 1
    optout = tmp_path / "optout.txt"  # the rights holder's request arrives after sharding
    optout.write_text(f"{m['samples'][-1]['provenance']['sha256']}\n")
    data = ["dist=ddp", "data.kind=webdataset", f"data.shards={shards}", f"data.exclude={optout}",
            "train.ckpt_every=3", "train.log_every=3"]
    args = train_args(tmp_path, "pv", tmp_path / "_datasets", *data)
    run([*args, "train.steps=3"], nproc=2)  # 2 ranks x batch 1: 6 samples
    run([*args, "train.steps=6", "resume=auto"], nproc=1)  # resharded 2 -> 1: 3 more
    ckpt = tmp_path / "pv" / "checkpoints" / "step_6"
    in_ckpt = json.loads((ckpt / "provenance.json").read_text())
    assert in_ckpt["samples"] == 9 and in_ckpt["step"] == 6
    out = tmp_path / "export"
    export_main([str(tmp_path / "pv"), "--out", str(out)])
    prov = json.loads((out / "provenance.json").read_text())
    card = (out / "DATA_CARD.md").read_text()
    assert prov["samples"] == 9 == sum(prov["licenses"].values()) == sum(prov["sources"].values())
    assert "Withdrawn-1.0" not in prov["licenses"]  # the opted-out clip was never consumed
    assert prov["skipped"].get("opted_out", 0) >= 1 and set(prov["skipped"]) == {"opted_out"}
    assert set(prov["licenses"]) <= {"CC-BY-4.0", "CC0-1.0"}
    assert "Training samples consumed: **9**" in card and "Withdrawn" not in card
    for lic, n in prov["licenses"].items():
        assert f"| {lic} | {n} |" in card
    assert report_main(["report", str(tmp_path / "pv")]) == 0
    assert "9 samples" in capsys.readouterr().out


def test_latent_cache_keeps_provenance_and_opt_out(tmp_path):
    """Latent shards carry each clip's provenance, so latent runs count licences and an opt-out
    by content hash still withholds the clip (the latent bytes differ from the mp4's)."""
    import torch

    from worldline.data.latents import encode_latent_shards

    shards, sha = _two_licence_shards(tmp_path)
    pool = lambda v: torch.nn.functional.avg_pool3d(v.float() / 127.5 - 1, (5, 8, 8))  # noqa: E731
    out = tmp_path / "lat"
    encode_latent_shards(shards, out, pool, num_frames=5, resolution=(16, 16), batch_size=2,
                         dtype="float32")
    optout = tmp_path / "optout.json"
    optout.write_text(json.dumps([sha["s1"]]))
    loader = ShardLoader(out, batch_size=1, input="latent", shuffle_shards=False, exclude=optout,
                         num_frames=5, resolution=(16, 16))
    it = iter(loader)
    keys = [next(it).key[0] for _ in range(5)]
    assert keys == ["s0", "s2", "s3", "s4", "s5"]
    assert loader.stats["skipped_reasons"] == {"opted_out": 1}
    assert loader.stats["licenses"] == {"CC-BY-4.0": 3, "CC0-1.0": 2}


def test_config_exclude_must_be_a_file(tmp_path):
    """``data.exclude`` naming no file is a config error before anything starts."""
    from tests._runs import compose_cfg
    from worldline.train.config import ConfigError
    from worldline.train.validate import validate

    cfg = compose_cfg(["stage=autoencoder", f"data.exclude={tmp_path / 'missing.txt'}"])
    with pytest.raises(ConfigError, match="data.exclude"):
        validate(cfg)
    (tmp_path / "missing.txt").write_text("")
    validate(cfg)


def test_unreadable_opt_out_list_is_a_clear_error(tmp_path):
    bad = tmp_path / "optout.json"
    bad.write_text('{"sha256": [')
    with pytest.raises(ValueError, match="optout.json: not an opt-out list"):
        OptOut.load(bad)
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not an opt-out list"):
        OptOut.load(bad)


def test_counters_stay_bounded_under_hostile_labels():
    """Per-clip (or hostile, huge) origins fold into one row past MAX_NAMES: the checkpointed
    state cannot grow with every sample, and the totals stay exact."""
    from worldline.data.provenance import MAX_NAMES, OTHER, count_labels, label

    stats: dict = {}
    labels = [label({"provenance": {"license": "MIT", "origin": f"o{i}" + "x" * 5000}})
              for i in range(MAX_NAMES + 500)]
    count_labels(stats, labels)
    assert len(stats["sources"]) == MAX_NAMES + 1 and stats["sources"][OTHER] == 500
    assert sum(stats["sources"].values()) == MAX_NAMES + 500 == stats["licenses"]["MIT"]
    assert max(len(k) for k in stats["sources"]) <= 200


def test_duplicate_of_a_clip_sharded_before_an_interruption(tmp_path, monkeypatch):
    """De-duplication spans a resumed ingest: the first copy's hash comes from the journal."""
    from worldline.data import ingest

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"a{i}.mp4").write_bytes(clip(60 + i))
    (src / "z_copy.mp4").write_bytes(clip(60))  # same bytes as a0, last in input order
    real, calls = ingest.prepare, []

    def interrupted(item, opts):
        calls.append(item.key)
        if len(calls) == 3:  # a0 and a1 are in closed shards by now
            raise KeyboardInterrupt
        return real(item, opts)

    monkeypatch.setattr(ingest, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards(src, tmp_path / "out", max_count=1, processes=0)
    monkeypatch.setattr(ingest, "prepare", real)
    m = make_shards(src, tmp_path / "out", max_count=1, processes=0)
    assert [e["key"] for e in m["samples"]] == ["a0", "a1", "a2"]
    (dup,) = m["skipped"]
    assert dup["reason"] == "duplicate" and "z_copy.mp4" in dup["message"] and "(key a0)" in dup["message"]
