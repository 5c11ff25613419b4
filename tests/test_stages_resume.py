"""A flow stage whose data is a resolution/length schedule plus a prior-preservation mix
resumes exactly: the phase, both loaders' positions and the served-batch count are in the
checkpoint, so N steps + resume equals 2N straight, loss for loss (~40 s on 2 cores)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _runs import compose_cfg, smoke_overrides
from worldline.train.main import run_training
from worldline.train.tracking import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("stage_resume")
    datasets = root / "_datasets"
    run_training(compose_cfg(smoke_overrides(root, "ae", datasets, "stage=autoencoder",
                                             "train.steps=4", "train.ckpt_every=4")))
    # Prior data: another synthetic world, sharded like a user's pretraining set.
    from worldline.data.shards import ensure_synthetic_dataset
    from worldline.data.synthetic import SyntheticWorldConfig

    prior = ensure_synthetic_dataset(datasets, SyntheticWorldConfig(
        num_clips=8, clips_per_shard=4, num_frames=9, height=32, width=32, seed=5))
    return root, datasets, Path(prior)


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["tokens_per_s"] / r["samples_per_s"])
            for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_schedule_and_prior_mix_resume_exactly(setup) -> None:
    root, datasets, prior = setup
    common = ["stage=pretrain_progressive", f"stage.autoencoder_from={root / 'ae'}",
              "stage.schedule=[{step: 0, resolution: [32, 32], num_frames: 5}, "
              "{step: 4, resolution: [32, 32], num_frames: 9}]",
              f"stage.prior.shards={prior}", "stage.prior.ratio=0.34",
              "train.steps=8", "train.log_every=1", "train.ckpt_every=3", "train.keep_last=5"]
    straight = root / "straight"
    run_training(compose_cfg(smoke_overrides(root, "straight", datasets, *common)))
    resumed = root / "resumed"
    shutil.copytree(straight, resumed)
    for step in (6, 8):  # back to step 3: before the phase switch at step 4
        shutil.rmtree(resumed / "checkpoints" / f"step_{step}")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    shutil.rmtree(resumed / "samples")
    trainer = run_training(compose_cfg(smoke_overrides(root, "resumed", datasets, *common)))
    assert trainer.state.step == 8 and trainer.loader.phase == 1
    a, b = _losses(straight), _losses(resumed)
    assert [s for s, _, _ in a] == list(range(1, 9))
    assert [(s, loss) for s, loss, _ in a] == [(s, loss) for s, loss, _ in b]
    # Tokens per sample of the batches actually run: 5 frames -> 2 x 2 x 2 = 8 tokens, 9 frames
    # -> 3 x 2 x 2 = 12 from step 5 on; step 3 ran prior batch #2, whose clips are 9 frames
    # (the prior shards at data.* size), so 12 tokens there too.
    assert [round(t) for _, _, t in a] == [8, 8, 12, 8] + [12] * 4
    # 8 batches served; with ratio 0.34, batches #2 and #5 came from the prior shards.
    assert trainer.loader.served == 8


@pytest.mark.slow
def test_full_finetune_early_stopping_survives_a_resume(setup) -> None:
    """Full fine-tuning (LoRA off) from the pretrain run, validating every 2 steps; with
    min_delta 100 only the first validation counts as an improvement, so patience 2 stops the
    run after the step-6 validation. Resumed from step 4, the run replays the validations
    before the checkpoint from metrics.jsonl and stops at the same step."""
    import json

    root, datasets, _ = setup
    pre = root / "straight"
    if not (pre / "checkpoints").is_dir():
        pytest.skip("needs the pretrain run of test_schedule_and_prior_mix_resume_exactly")
    common = ["stage=finetune", f"stage.init_from={pre}", "stage.lora.enabled=false",
              "train.steps=20", "train.ckpt_every=4", "train.keep_last=5",
              "stage.validation.every=2", "stage.validation.patience=2",
              "stage.validation.min_delta=100", "stage.validation.num_batches=1"]
    t = run_training(compose_cfg(smoke_overrides(root, "ft", datasets, *common)))
    assert all(p.requires_grad for p in t.module.parameters())  # full fine-tuning
    stop = json.loads((root / "ft" / "early_stopping.json").read_text())
    assert stop["stopped_at_step"] == 7 and stop["best_step"] == 2 and t.state.step == 7
    from worldline.train.tracking import read_metrics

    def val_steps(run: Path) -> list[int]:
        return [r["step"] for r in read_metrics(run) if "val/val_loss" in r]

    assert val_steps(root / "ft") == [2, 4, 6, 7]  # the last step is validated too
    resumed = root / "ft_resumed"
    shutil.copytree(root / "ft", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_7")
    (resumed / "checkpoints" / "latest").write_text("step_4")
    (resumed / "early_stopping.json").unlink()
    t2 = run_training(compose_cfg(smoke_overrides(root, "ft_resumed", datasets, *common)))
    assert t2.state.step == 7
    assert json.loads((resumed / "early_stopping.json").read_text()) == stop
    assert val_steps(resumed) == [2, 4, 6, 7]
