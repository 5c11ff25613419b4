"""End to end through the installed console scripts, as a user runs them."""
from __future__ import annotations

import io
import json
from pathlib import Path

import decord
import pytest

from _runs import cli
from worldline.train.checkpoint import list_checkpoints
from worldline.train.tracking import read_metrics


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """worldline-quickstart on the smoke experiment (the README command, scaled down)."""
    root = tmp_path_factory.mktemp("qs")
    r = cli("worldline-quickstart", "--ae-steps", "30", "--world-steps", "30",
            "experiment=smoke", f"run.root={root}", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world model:" in r.stdout
    return root


@pytest.mark.parametrize("run", ["quickstart-autoencoder", "quickstart-world"])
def test_quickstart_writes_a_complete_run_dir(quickstart: Path, run: str) -> None:
    d = quickstart / run
    assert (d / "config.yaml").is_file()
    assert [s for s, _ in list_checkpoints(d / "checkpoints")][-1] == 30
    assert (d / "checkpoints" / "latest").read_text() == "step_30"
    steps = [r["step"] for r in read_metrics(d) if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30]
    # An offline W&B run with its .wandb log, inside the run dir.
    assert list((d / "wandb").glob("offline-run-*/run-*.wandb"))
    sheet = d / "samples" / "step_30" / "contact_sheet.png"
    assert sheet.is_file() and sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_sample_video_decodes(quickstart: Path) -> None:
    mp4s = sorted((quickstart / "quickstart-world" / "samples" / "step_30").glob("generated_*.mp4"))
    assert len(mp4s) == 2
    vr = decord.VideoReader(io.BytesIO(mp4s[0].read_bytes()))
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    assert frames.shape == (9, 32, 32, 3)  # experiment=smoke: 9 frames at 32x32
    assert frames.std() > 1.0  # not a blank video


REPORT_FIELDS = (
    "psnr_gain_over_copy_last_db", "psnr_db", "copy_last_psnr_db", "psnr_moving_db",
    "copy_last_psnr_moving_db", "psnr_moving_gain_over_copy_last_db",
    "position_error_true_actions", "position_error_other_actions",
    "position_error_ground_truth", "divergence_other_actions", "noise_floor",
    "ratio_to_seed_noise", "pass")


def test_quickstart_ends_with_an_action_following_report(quickstart: Path) -> None:
    """The world stage is action-conditioned and the job reports on held-out clips whether
    its rollouts follow the actions: action_report.json + a labelled contact sheet."""
    import math

    from PIL import Image

    world = quickstart / "quickstart-world"
    cfg = (world / "config.yaml").read_text()
    assert "- actions" in cfg and "- camera" in cfg  # stage.conditions
    rep = json.loads((world / "action_report.json").read_text())
    assert rep["data_split"] == "heldout" and rep["horizon_latent_frames"] == 2  # 9 frames / 4
    for k in REPORT_FIELDS:
        assert k in rep, k
    for k in REPORT_FIELDS:
        v = rep[k]
        if k.startswith("position_error_") and k != "position_error_ground_truth":
            # 30 steps may draw no recognisable sprite: null, and then no detection at all.
            assert v is None and rep[k.replace("position_error", "detections")] == 0 \
                or math.isfinite(v), (k, v)
        else:
            assert v is not None and math.isfinite(v), (k, v)
    assert rep["noise_floor"] > 0 and rep["position_error_ground_truth"] < 2  # detector works
    sheet = Image.open(world / "action_contact_sheet.png")
    rows = json.loads(sheet.text["rows"])
    assert rows[:3] == ["ground truth", "rollout, true actions", "rollout, other actions"]
    assert len(rows) == 12  # 4 clips x 3 labelled rows


def test_eval_cli_reports_deterministic_metrics(quickstart: Path, tmp_path: Path) -> None:
    world = quickstart / "quickstart-world"
    reports = []
    for i in range(2):
        out = tmp_path / f"eval{i}"
        r = cli("worldline-eval", f"eval.checkpoint={world}", "experiment=smoke",
                f"run.root={quickstart}", "eval.num_batches=2", f"eval.out={out}", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[0]["val_loss"] == reports[1]["val_loss"]  # fixed timesteps + fixed noise
    assert {"val_loss/t=0.1", "val_loss/t=0.9"} <= set(reports[0])
    # By default on clips the model never saw (a differently seeded world); eval.split=train
    # evaluates the training clips, and says so.
    assert reports[0]["data_split"] == "heldout"
    out = tmp_path / "train"
    r = cli("worldline-eval", f"eval.checkpoint={world}", "experiment=smoke",
            f"run.root={quickstart}", "eval.num_batches=2", "eval.split=train",
            "eval.metrics=[val_loss]", f"eval.out={out}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train = json.loads((out / "report.json").read_text())
    assert train["data_split"] == "train" and train["val_loss"] != reports[0]["val_loss"]
    assert "may have trained on" in r.stdout + r.stderr
    ae = cli("worldline-eval", f"eval.checkpoint={quickstart / 'quickstart-autoencoder'}",
             "experiment=smoke", f"run.root={quickstart}", "eval.num_batches=2",
             f"eval.out={tmp_path / 'ae'}", timeout=300)
    assert ae.returncode == 0, ae.stderr[-3000:]
    ae_rep = json.loads((tmp_path / "ae" / "report.json").read_text())
    assert ae_rep["psnr"] > 10 and ae_rep["psnr_moving"] < ae_rep["psnr"]  # moving is harder
    assert 0 < ae_rep["moving_fraction"] < 1


def test_sample_cli_writes_mp4_and_contact_sheet(quickstart: Path, tmp_path: Path) -> None:
    r = cli("worldline-sample", f"sample.checkpoint={quickstart / 'quickstart-world'}",
            "experiment=smoke", f"run.root={quickstart}", f"sample.out={tmp_path}",
            "sample.prompts=[a red circle in a meadow,a blue square,a green dot]",
            "data.batch_size=2", "sample.num_steps=3", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # more prompts than data.batch_size
    assert all((tmp_path / f"generated_{i}.mp4").is_file() for i in range(3))
    assert (tmp_path / "contact_sheet.png").is_file()
    assert (tmp_path / "captions.txt").read_text().splitlines() == [
        "a red circle in a meadow", "a blue square", "a green dot"]


def test_sample_takes_the_clip_size_from_the_checkpoint(quickstart: Path, tmp_path: Path) -> None:
    """The model was trained on 9 frames of 32x32 (experiment=smoke); sampled without that
    experiment (data defaults: 17 frames of 64x64) it still makes 9 frames of 32x32, and says
    so. An explicit data.num_frames wins."""
    world = ["data.synthetic.num_clips=16", "data.synthetic.clips_per_shard=4",
             "data.synthetic.num_frames=9", "data.synthetic.height=32",
             "data.synthetic.width=32", "data.batch_size=2", "data.num_workers=0"]
    common = [f"sample.checkpoint={quickstart / 'quickstart-world'}", f"run.root={quickstart}",
              "sample.prompts=[a red circle]", "sample.num_steps=2", "logger=none", *world]
    r = cli("worldline-sample", *common, f"sample.out={tmp_path / 'a'}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert "data.num_frames=9" in said and "data.resolution=[32, 32]" in said
    vr = decord.VideoReader(str(tmp_path / "a" / "generated_0.mp4"))
    assert len(vr) == 9 and vr[0].shape == (32, 32, 3)
    r = cli("worldline-sample", *common, "data.num_frames=5", f"sample.out={tmp_path / 'b'}",
            timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(decord.VideoReader(str(tmp_path / "b" / "generated_0.mp4"))) == 5


def test_quickstart_stops_on_sigterm_then_resumes(tmp_path: Path) -> None:
    """SIGTERM during the autoencoder stage: that stage checkpoints, the job exits 3 and the
    world-model stage never starts; the same command then resumes and completes."""
    import os
    import signal
    import subprocess
    import time

    from _runs import BIN

    args = [str(BIN / "worldline-quickstart"), "--ae-steps", "10", "--world-steps", "4",
            "experiment=smoke", f"run.root={tmp_path}", "logger=none", "train.log_every=1"]
    # Step 4 sleeps 20 s at its start: the signal lands mid-stage, deterministically.
    env = {**os.environ, "WORLDLINE_FAILPOINTS": "stall:steps=4,secs=20"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ae = tmp_path / "quickstart-autoencoder"
    end = time.time() + 300
    while time.time() < end and not any(r.get("step") == 3 for r in read_metrics(ae)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "stopped by SIGTERM during the autoencoder stage at step 4" in err
    assert [s for s, _ in list_checkpoints(ae / "checkpoints")][-1] == 4
    assert not (tmp_path / "quickstart-world").exists()
    assert "world model:" not in out
    r = cli(*[a.split("/")[-1] if i == 0 else a for i, a in enumerate(args)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world model:" in r.stdout
    assert [s for s, _ in list_checkpoints(ae / "checkpoints")][-1] == 10
    assert [s for s, _ in list_checkpoints(tmp_path / "quickstart-world" / "checkpoints")][-1] == 4


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    r = cli("worldline-eval", f"eval.checkpoint={tmp_path / 'nope'}", timeout=120)
    assert r.returncode == 2
    assert "no complete checkpoint" in r.stderr and "nope" in r.stderr
