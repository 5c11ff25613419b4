"""Untrusted inputs: tampered checkpoints, configs inside checkpoints, hostile shards,
escaping manifests and W&B keys.

- every ``torch.load`` in Worldline's own code passes ``weights_only=True`` (AST audit), and a
  checkpoint whose per-rank RNG file carries a pickle payload is refused on resume without
  running it;
- a ``_target_`` in a checkpoint's stored config is rejected (the allowlist is empty: nothing
  in Worldline instantiates configs, which the audit also checks) by worldline-eval and by
  resume;
- a training run over shards with pickle-typed members trains on the good samples and never
  unpickles anything;
- a dataset manifest.json (and, with a configured root, an ingest manifest) cannot name files
  outside the dataset root;
- with WANDB_API_KEY set, no file of the run dir and no log line contains the key.
"""
from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faults._helpers import RECIPE, metric_rows, run, train_args

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
OWN_CODE = ["train", "data", "models", "scripts"]
# torch.load calls allowed to unpickle, with the reason. Anything new fails the audit.
PICKLE_EXCEPTIONS: set[str] = set()


class _Boom:
    """Unpickling this writes a marker file: proof that something ran the payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled!",))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_audit_no_unsafe_loading_or_instantiation() -> None:
    unsafe, instantiate = [], []
    for d in OWN_CODE:
        for path in sorted((REPO / d).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for node, owner, name in _calls(ast.parse(path.read_text())):
                kw = {k.arg: k.value for k in node.keywords}
                if owner == "torch" and name == "load":
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and \
                        kw["weights_only"].value is True
                    if not ok and rel not in PICKLE_EXCEPTIONS:
                        unsafe.append(f"{rel}:{node.lineno}")
                if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
                    unsafe.append(f"{rel}:{node.lineno}")
                if name == "load" and owner in ("np", "numpy"):
                    ap = kw.get("allow_pickle")
                    if isinstance(ap, ast.Constant) and ap.value:
                        unsafe.append(f"{rel}:{node.lineno}")
                if name == "instantiate":  # hydra.utils.instantiate, or imported bare
                    instantiate.append(f"{rel}:{node.lineno}")
    assert not unsafe, f"loading that can run pickled code: {unsafe}"
    assert not instantiate, f"config instantiation (needs the _target_ allowlist): {instantiate}"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, fault_datasets, reference_run) -> Path:
    """A finished one-process run with a checkpoint at step 4."""
    root = tmp_path_factory.mktemp("untrusted")
    run(train_args(root, "src", fault_datasets, "train.steps=4", "train.ckpt_every=4",
                   "dist.heartbeat_s=0"), nproc=1)
    return root / "src"


def test_pickle_payload_in_checkpoint_is_refused(small_run: Path, tmp_path: Path,
                                                 fault_datasets: Path) -> None:
    run_dir = tmp_path / "tampered"
    shutil.copytree(small_run, run_dir)
    marker = tmp_path / "pwned"
    import torch

    rng_file = run_dir / "checkpoints" / "step_4" / "ranks" / "rank_0.pt"
    state = torch.load(rng_file, weights_only=True)
    state["python"] = _Boom(str(marker))  # what an attacker would plant
    torch.save(state, rng_file)
    r = run(train_args(tmp_path, "tampered", fault_datasets, "train.steps=6",
                       "train.ckpt_every=6", "dist.heartbeat_s=0"), nproc=1, check=False)
    assert r.returncode != 0
    assert "Weights only load failed" in r.stderr, r.stderr[-2000:]
    assert not marker.exists(), "the checkpoint's pickle payload ran"


def _with_target(run_dir: Path) -> Path:
    meta_file = run_dir / "checkpoints" / "step_4" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["autoencoder"]["_target_"] = "os.system"
    meta_file.write_text(json.dumps(meta))
    return meta_file


def test_deepspeed_checkpoint_pickles_are_scanned_before_deepspeed_loads(tmp_path: Path) -> None:
    """DeepSpeed's loaders unpickle with weights_only=False: a payload planted in a ZeRO shard
    is refused by the scan (resume, export and eval all go through it) and never runs, while
    the classes DeepSpeed really pickles pass."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from worldline.train.weights import consolidated_state
    from worldline.train.checkpoint import verify_deepspeed_files

    ckpt = tmp_path / "step_4"
    (ckpt / "ds").mkdir(parents=True)
    torch.save({"loss_scaler": LossScaler(1.0), "w": torch.ones(2)},
               ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    verify_deepspeed_files(ckpt)  # DeepSpeed's own classes are allowed
    marker = tmp_path / "ran"
    torch.save({"state": _Boom(str(marker))}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    for load in (verify_deepspeed_files, consolidated_state):
        with pytest.raises(ValueError, match="refusing to load .*mp_rank_00_model_states"):
            load(ckpt)
    assert not marker.exists()


def test_target_in_checkpoint_config_is_rejected(small_run: Path, tmp_path: Path,
                                                 fault_datasets: Path) -> None:
    run_dir = tmp_path / "target"
    shutil.copytree(small_run, run_dir)
    meta_file = _with_target(run_dir)
    want = f"{meta_file}: config.model.autoencoder._target_='os.system' is not in the allowlist"
    # worldline-eval reads the model config from the checkpoint.
    r = subprocess.run([str(Path(sys.executable).parent / "worldline-eval"), *RECIPE,
                        f"eval.checkpoint={run_dir}", f"data.root={fault_datasets}",
                        f"run.root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("worldline: error:")]
    assert len(errors) == 1 and want in errors[0], r.stderr[-2000:]
    # resume=auto reads the same file.
    r = run(train_args(tmp_path, "target", fault_datasets, "train.steps=6",
                       "dist.heartbeat_s=0"), nproc=1, check=False)
    assert r.returncode == 2 and want in r.stderr, r.stderr[-2000:]


def test_pickle_members_in_shards_are_never_decoded(tmp_path: Path, reference_run) -> None:
    from worldline.data.shards import write_shards
    from worldline.data.synthetic import SyntheticWorldConfig, clip_to_sample

    world = SyntheticWorldConfig(num_clips=8, clips_per_shard=2, num_frames=5, height=16,
                                 width=16, seed=11)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Boom(str(marker)))

    def samples():
        for i in range(world.num_clips):
            s = clip_to_sample(world, i)
            if i % 4 == 1:  # a quarter of the samples carry a pickle member
                s = {**s, "pickle": evil}
            yield s

    shards = tmp_path / "shards"
    write_shards(samples(), shards, samples_per_shard=2)
    run(train_args(tmp_path, "hostile", tmp_path / "_d", "data.kind=webdataset",
                   f"data.shards={shards}", "train.steps=8", "train.log_every=8",
                   "data.skip_check_after=1000", "dist.heartbeat_s=0"), nproc=1)
    assert not marker.exists(), "a shard member was unpickled"
    rows = [r for r in metric_rows(tmp_path / "hostile") if "loss" in r]
    assert rows[-1]["step"] == 8 and rows[-1]["skipped_samples"] >= 1


def test_dataset_manifest_cannot_escape_its_root(tmp_path: Path, fault_datasets: Path,
                                                 reference_run) -> None:
    from worldline.data.loader import resolve_shards

    src = next(p.parent for p in fault_datasets.rglob("manifest.json"))
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    assert len(resolve_shards(str(ds))) >= 1  # the real manifest resolves
    outside = tmp_path / "outside.tar"
    shutil.copy(next(ds.glob("*.tar")), outside)
    manifest = json.loads((ds / "manifest.json").read_text())
    for bad in ("../outside.tar", str(outside), "sub/../../outside.tar"):
        (ds / "manifest.json").write_text(json.dumps({**manifest, "shards": [bad]}))
        with pytest.raises(ValueError, match="resolves outside the dataset root"):
            resolve_shards(str(ds))
    # A symlink inside the root that points out of it is an escape too.
    (ds / "link.tar").symlink_to(outside)
    (ds / "manifest.json").write_text(json.dumps({**manifest, "shards": ["link.tar"]}))
    with pytest.raises(ValueError, match="outside the dataset root"):
        resolve_shards(str(ds))


def test_ingest_manifest_cannot_escape_configured_root(tmp_path: Path) -> None:
    from worldline.data.ingest import IngestOptions, make_shards
    from worldline.data.sources import read_manifest

    root = tmp_path / "clips"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"")
    (tmp_path / "secret.mp4").write_bytes(b"")
    csv = root / "list.csv"
    csv.write_text("video,caption\na.mp4,fine\n../secret.mp4,escape\n")
    assert len(read_manifest(csv)) == 2  # no root configured: paths are taken as given
    with pytest.raises(ValueError, match=r"list.csv: ___secret: video path .* outside the "
                                         r"dataset root"):
        read_manifest(csv, root=root)
    with pytest.raises(ValueError, match="outside the dataset root"):
        make_shards(csv, tmp_path / "out", max_count=4,
                    options=IngestOptions(source_root=str(root)))


def test_wandb_key_never_reaches_run_dir_or_logs(tmp_path: Path, fault_datasets: Path,
                                                 reference_run) -> None:
    key = "wl" + "0123456789abcdef" * 2 + "feedbeef"  # 40 chars, the shape of a real key
    r = run(train_args(tmp_path, "wb", fault_datasets, "logger.kind=wandb", "logger.mode=offline",
                       "train.steps=4", "train.ckpt_every=4", "dist.heartbeat_s=0"),
            nproc=1, WANDB_API_KEY=key, HF_TOKEN=key[::-1])
    run_dir = tmp_path / "wb"
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert any(f.suffix == ".wandb" for f in files), "no offline W&B run was written"
    leaked = [str(f) for f in files if key.encode() in f.read_bytes()
              or key[::-1].encode() in f.read_bytes()]
    assert not leaked, leaked
    assert key not in r.stdout + r.stderr
