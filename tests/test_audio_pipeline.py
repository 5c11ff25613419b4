"""Audio as a control end to end on the synthetic world with sound (data.synthetic.audio=true):
a world model pretrained without audio grows audio conditioning in the controllability stage,
trains on the loader's audio windows, resumes exactly, samples from a wav file into mp4s that
carry it, and is evaluated with the audio-visual sync metric (~60 s on 2 cores)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _runs import cli, compose_cfg, smoke_overrides
from worldline.train.main import run_training
from worldline.train.tracking import read_metrics

SOUND = ["data.synthetic.audio=true"]
AUDIO_STAGE = ["stage=controllability", "stage.conditions=[text,actions,audio]",
               "stage.freeze_policy.steps=2", "stage.validation.every=0", "train.steps=6",
               "train.ckpt_every=3", "train.log_every=1", "train.keep_last=5",
               "sample.num_steps=1", "stage.flow.audio_dropout=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """An autoencoder and a text+actions world model (no audio) on the world with sound."""
    root = tmp_path_factory.mktemp("audio")
    data = root / "_datasets"
    run_training(compose_cfg(smoke_overrides(root, "ae", data, "stage=autoencoder",
                                             "train.steps=2", *SOUND)))
    run_training(compose_cfg(smoke_overrides(
        root, "pre", data, "stage=pretrain", "stage.conditions=[text,actions]",
        f"stage.autoencoder_from={root / 'ae'}", "train.steps=2", "sample.num_steps=1",
        *SOUND)))
    return root


def _audio_run(root: Path, name: str, *extra: str):
    return run_training(compose_cfg(smoke_overrides(
        root, name, root / "_datasets", f"stage.autoencoder_from={root / 'ae'}",
        f"stage.init_from={root / 'pre'}", *AUDIO_STAGE, *SOUND, *extra)))


def test_the_loader_serves_the_clips_audio(runs: Path) -> None:
    from worldline.train.loaders import LoaderFactory

    cfg = compose_cfg(smoke_overrides(runs, "probe", runs / "_datasets",
                                      f"stage.autoencoder_from={runs / 'ae'}",
                                      f"stage.init_from={runs / 'pre'}", *AUDIO_STAGE, *SOUND))
    batch = next(iter(LoaderFactory(cfg).make(shuffle=False)))
    # 9 frames at the world's 8 fps, 16 kHz: 18000 samples, all real, some tones audible.
    assert batch["audio"].shape == (2, 18000) and batch["audio_mask"].all()
    assert batch["audio"].abs().max() > 0.05


def test_audio_stage_trains_resumes_samples_and_evaluates(runs: Path, tmp_path: Path) -> None:
    straight = _audio_run(runs, "sound")
    run = runs / "sound"
    from worldline.train.pipeline import WorldPipeline

    pipe = WorldPipeline.from_pretrained(run)
    assert "audio" in pipe.conditions and pipe.transformer.args.audio_dim == 32
    assert pipe.settings.fps == 8.0 and pipe.settings.audio_rate == 16000
    # The audio path learned something: the audio embedder moved off its zero init.
    assert pipe.transformer.cond_embed.audio_mlp[1].weight.abs().sum() > 0

    # Exact resume with audio on: back to step 3, rerun, same losses bit for bit.
    resumed = runs / "sound_resumed"
    shutil.copytree(run, resumed)
    for step in (6,):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step}")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    shutil.rmtree(resumed / "samples", ignore_errors=True)
    _audio_run(runs, "sound_resumed")
    a = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(resumed) if "loss" in r]
    assert [s for s, _ in a] == list(range(1, 7)) and a == b
    assert straight.state.step == 6

    # worldline-sample with a wav: the mp4 carries that sound, as long as the video.
    from worldline.data.audio import probe_audio
    from worldline.data.video import write_mp4  # noqa: F401  (the muxer under test)

    rate, secs = 16000, 2.0
    tt = np.arange(int(rate * secs)) / rate
    wav = tmp_path / "drive.wav"
    _write_wav(wav, (0.5 * np.sin(2 * np.pi * 440 * tt)).astype(np.float32), rate)
    out = tmp_path / "sampled"
    res = cli("worldline-sample", "experiment=smoke", f"run.root={runs}",
              f"data.root={runs / '_datasets'}", f"sample.checkpoint={run}",
              f"sample.audio={wav}", "sample.audio_cfg_scale=2.0", "sample.num_steps=2",
              "sample.prompts=[a red circle in a meadow]", f"sample.out={out}", *SOUND)
    assert res.returncode == 0, res.stderr[-3000:]
    mp4 = out / "generated_0.mp4"
    info = probe_audio(mp4.read_bytes())
    assert info is not None and info["sample_rate"] == rate
    assert abs(info["duration"] - 9 / 8) < 0.1  # 9 frames at 8 fps
    assert json.loads((out / "sample_config.json").read_text())["audio"] == str(wav)

    # A wav for a model without audio is a config error naming the key.
    res = cli("worldline-sample", "experiment=smoke", f"run.root={runs}",
              f"data.root={runs / '_datasets'}", f"sample.checkpoint={runs / 'pre'}",
              f"sample.audio={wav}", f"sample.out={tmp_path / 'x'}", *SOUND)
    assert res.returncode != 0 and "sample.audio" in res.stderr

    # worldline-eval: the audio-visual sync group runs on the clips' own audio.
    res = cli("worldline-eval", "experiment=smoke", f"run.root={runs}",
              f"data.root={runs / '_datasets'}", f"eval.checkpoint={run}",
              "eval.metrics=[av_sync]", "eval.num_steps=1", f"eval.out={tmp_path / 'eval'}",
              *SOUND)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "av_sync/skipped" not in report
    for key in ("av_sync/score_lag0", "av_sync/noise_floor", "av_sync_real/score_lag0"):
        assert np.isfinite(report[key]), key


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    """16-bit mono PCM wav (the standard library's writer: no codec involved)."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def test_audio_settings_are_checked_before_start(runs: Path) -> None:
    from worldline.train.config import ConfigError
    from worldline.train.validate import validate

    for extra, key in ((["data.audio=false"], "data.audio"),
                       (["model.dit.audio_mode=sideways"], "model.dit.audio_mode"),
                       (["stage.flow.audio_dropout=2"], "stage.flow.audio_dropout")):
        cfg = compose_cfg(smoke_overrides(runs, "bad", runs / "_datasets",
                                          f"stage.autoencoder_from={runs / 'ae'}",
                                          f"stage.init_from={runs / 'pre'}", *AUDIO_STAGE,
                                          *extra))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(cfg)
    torch.manual_seed(0)


@pytest.mark.dist
def test_fsdp_matches_ddp_with_audio(runs: Path) -> None:
    """2 FSDP2 ranks vs 2 DDP ranks (gloo) on the audio stage: same data and per-rank noise
    (audio CFG dropout included), only the sharding and reduction differ."""
    import os
    import subprocess
    import sys

    args = [*smoke_overrides(runs, "", runs / "_datasets"), f"stage.autoencoder_from={runs / 'ae'}",
            f"stage.init_from={runs / 'pre'}", *AUDIO_STAGE, *SOUND, "train.steps=4",
            "train.ckpt_every=4", "run.threads=1"]
    args = [a for a in args if a != "run.name="]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "worldline.train.main", *args]
    for name, extra in (("ddp", ["dist=ddp", "dist.find_unused_parameters=true"]),
                        ("fsdp", ["dist=fsdp"])):
        r = subprocess.run([*torchrun, f"run.name={name}", *extra], capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "terminate called" not in r.stderr
    ddp = [r["loss"] for r in read_metrics(runs / "ddp") if "loss" in r]
    fsdp = [r["loss"] for r in read_metrics(runs / "fsdp") if "loss" in r]
    assert len(ddp) == len(fsdp) == 4
    np.testing.assert_allclose(fsdp, ddp, rtol=1e-3)
