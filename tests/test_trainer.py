"""The training loop on real components: synthetic mp4 shards, decord, DCP checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _runs import compose_cfg, smoke_overrides
from worldline.train.checkpoint import latest_checkpoint, list_checkpoints
from worldline.train.main import run_training
from worldline.train.build import build_trainer as make_trainer
from worldline.train.tracking import read_metrics


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, datasets) -> Path:
    """A short autoencoder run whose checkpoint the latent stages start from."""
    root = tmp_path_factory.mktemp("ae")
    run_training(compose_cfg(smoke_overrides(root, "ae", datasets, "stage=autoencoder",
                                             "train.steps=30")))
    return root / "ae"


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("stage", ["autoencoder", "pretrain"])
def test_one_step_changes_parameters(tmp_path, datasets, ae_run, stage) -> None:
    extra = ["stage.autoencoder_from=" + str(ae_run)] if stage == "pretrain" else []
    # Weight decay off: a tensor must move because of its gradient, not because of decay.
    cfg = compose_cfg(smoke_overrides(tmp_path, "one", datasets, f"stage={stage}",
                                      "train.steps=1", "optim.weight_decay=0", *extra))
    trainer = make_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    frozen = [trainer.pipeline.autoencoder] if stage == "pretrain" else []
    frozen_before = {n: p.detach().clone() for m in frozen for n, p in m.named_parameters()}
    trainer.train()
    after = dict(trainer.module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if stage == "autoencoder":
        assert changed == set(before), set(before) - changed
    else:
        # adaLN-zero: on step 1 only the zero-initialised output layer and gates receive
        # gradient (everything upstream is multiplied by them); every one of those must move.
        with_grad = {n for n, p in trainer.module.named_parameters()
                     if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("dit.final") for n in with_grad), with_grad
        assert with_grad <= changed, with_grad - changed
    for n, p in (n_p for m in frozen for n_p in m.named_parameters()):
        assert torch.equal(frozen_before[n], p), f"frozen {n} changed"
    assert latest_checkpoint(tmp_path / "one" / "checkpoints").name == "step_1"


def test_autoencoder_loss_decreases(tmp_path, datasets) -> None:
    run_training(compose_cfg(smoke_overrides(tmp_path, "ae100", datasets, "stage=autoencoder",
                                             "train.steps=100", "train.log_every=10")))
    losses = [loss for _, loss in _losses(tmp_path / "ae100")]
    assert len(losses) == 10
    assert losses[-1] < 0.5 * losses[0], losses


def test_world_model_loss_decreases(tmp_path, datasets, ae_run) -> None:
    run_training(compose_cfg(smoke_overrides(
        tmp_path, "fm100", datasets, "stage=pretrain", f"stage.autoencoder_from={ae_run}",
        "train.steps=100", "train.log_every=10")))
    losses = [loss for _, loss in _losses(tmp_path / "fm100")]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2, losses


def test_exact_resume_is_bitwise(tmp_path, datasets, ae_run) -> None:
    """2N steps straight == N steps, then resume=auto for N more: identical losses, bitwise."""
    n = 6
    common = ["stage=pretrain", f"stage.autoencoder_from={ae_run}", f"train.steps={2 * n}",
              "train.log_every=1", f"train.ckpt_every={n}", "train.keep_last=5",
              # a DataLoader worker process and W&B are part of what must resume exactly
              "data.num_workers=1", "logger=wandb", "train.grad_accum=2"]
    straight = tmp_path / "straight"
    run_training(compose_cfg(smoke_overrides(tmp_path, "straight", datasets, *common)))
    # The interrupted run: everything the straight run had on disk right after step N's save,
    # plus metrics rows past N that a crash would leave behind (resume must drop them).
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{2 * n}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{n}")
    shutil.rmtree(resumed / "samples")
    trainer = run_training(compose_cfg(smoke_overrides(tmp_path, "resumed", datasets, *common)))
    assert trainer.state.step == 2 * n
    a, b = _losses(straight), _losses(resumed)
    assert [s for s, _ in a] == list(range(1, 2 * n + 1))
    assert a == b  # float equality of every step's loss
    ta = torch.load(straight / "checkpoints" / f"step_{2 * n}" / "ranks" / "rank_0.pt",
                    weights_only=True)
    tb = torch.load(resumed / "checkpoints" / f"step_{2 * n}" / "ranks" / "rank_0.pt",
                    weights_only=True)
    assert torch.equal(ta["generators"]["train"], tb["generators"]["train"])
    sa = json.loads((straight / "checkpoints" / f"step_{2 * n}" / "train_state.json").read_text())
    sb = json.loads((resumed / "checkpoints" / f"step_{2 * n}" / "train_state.json").read_text())
    assert sa == sb  # same data position, scheduler, W&B id, counters
    # W&B: the resumed process continued the same run id, offline, inside the run dir.
    runs = sorted((resumed / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(runs) == 2 and ids == {sa["wandb_run_id"]}
    assert all(list(p.glob("run-*.wandb")) for p in runs)


def test_resume_final_weights_equal_straight_run(tmp_path, datasets) -> None:
    """Autoencoder stage: weights, EMA and optimizer after a resume equal the straight run's."""
    common = ["stage=autoencoder", "train.steps=8", "train.ckpt_every=4", "data.num_workers=2"]
    a = run_training(compose_cfg(smoke_overrides(tmp_path, "a", datasets, *common)))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_8")
    (tmp_path / "b" / "checkpoints" / "latest").unlink()  # auto falls back to newest complete
    b = run_training(compose_cfg(smoke_overrides(tmp_path, "b", datasets, *common)))
    for (n, pa), (_, pb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(pa, pb), n
    for n in a.ema.shadow:
        assert torch.equal(a.ema.shadow[n], b.ema.shadow[n]), n
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_metrics_and_run_dir_layout(tmp_path, datasets) -> None:
    run_training(compose_cfg(smoke_overrides(tmp_path, "layout", datasets, "stage=autoencoder",
                                             "train.steps=10", "train.log_every=2",
                                             "train.ckpt_every=5", "logger=wandb")))
    run = tmp_path / "layout"
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu",
                "data_wait_frac"):
        assert all(key in r for r in rows if "loss" in r), key
    assert (run / "config.yaml").is_file()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5, 10]
    assert (run / "checkpoints" / "latest").read_text() == "step_10"
    assert list((run / "samples" / "step_10").glob("*.mp4"))
    assert (run / "samples" / "step_10" / "contact_sheet.png").is_file()
    wandb_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and wandb_files[0].stat().st_size > 0


def _bucketed_run(tmp_path: Path, data_mixed_dir: Path, name: str):
    """6 autoencoder steps over two buckets (9 frames x 2 clips, 5 frames x 4 clips); returns
    the final state and the video shape of every batch the loop drew."""
    cfg = compose_cfg(smoke_overrides(
        tmp_path, name, tmp_path, "stage=autoencoder", "train.steps=6", "train.log_every=1",
        "data=webdataset", f"data.shards={data_mixed_dir}", "data.num_workers=0",
        "data.upscale=true", "data.shuffle_buffer=4",
        "data.buckets=[{height:32,width:32,num_frames:9,batch_size:2},"
        "{height:32,width:32,num_frames:5,batch_size:4}]"))
    trainer = make_trainer(cfg)
    shapes = []
    orig = trainer.next_batch

    def spy() -> dict:
        batch = orig()
        shapes.append(tuple(batch["video"].shape))
        return batch

    trainer.next_batch = spy
    return trainer.train(), shapes


def test_bucketed_webdataset_training(tmp_path, data_mixed_dir) -> None:
    """data.buckets reaches the loader through the config: every batch is one bucket's shape
    and batch size, and samples are counted per real batch, not per configured batch size."""
    state, shapes = _bucketed_run(tmp_path, data_mixed_dir, "bk")
    assert set(shapes) <= {(2, 3, 9, 32, 32), (4, 3, 5, 32, 32)}, shapes
    assert len(set(shapes)) == 2, shapes  # both buckets were used
    assert state.samples_seen == sum(s[0] for s in shapes)


def test_tokens_per_s_follows_the_batches_run(tmp_path, data_mixed_dir) -> None:
    """Two buckets of different token counts (9 and 5 frames): every logged row's tokens per
    sample is that step's bucket's (T x H x W for the autoencoder), and the run's token count
    is the sum over the batches actually drawn, not a configured shape times the samples."""
    state, shapes = _bucketed_run(tmp_path, data_mixed_dir, "tok")
    assert len({s[2] for s in shapes}) == 2, shapes  # both buckets ran
    rows = [r for r in read_metrics(tmp_path / "tok") if "loss" in r]
    assert len(rows) == len(shapes) == 6
    for row, (b, _, t, h, w) in zip(rows, shapes):
        assert row["tokens_per_s"] / row["samples_per_s"] == pytest.approx(t * h * w, rel=1e-9)
    assert state.tokens_seen == sum(b * t * h * w for b, _, t, h, w in shapes)


def test_latent_shards_train_like_pixels(tmp_path, datasets, ae_run) -> None:
    """data=latent streams shards encoded once by worldline-encode-latents: the autoencoder
    never runs, and the losses equal a pixel-input run's on the same clips and seed."""
    from worldline.data.shards import ensure_synthetic_dataset
    from worldline.scripts.encode_latents import main as encode_main

    base = compose_cfg(smoke_overrides(tmp_path, "pix", datasets, "stage=pretrain"))
    from worldline.data.synthetic import SyntheticWorldConfig
    from omegaconf import OmegaConf

    pixels = ensure_synthetic_dataset(
        base.data.root, SyntheticWorldConfig(**OmegaConf.to_container(base.data.synthetic)))
    lat_dir = tmp_path / "latents"
    assert encode_main([str(pixels), str(lat_dir), "--checkpoint", str(ae_run), "--num-frames",
                        "9", "--resolution", "32", "32", "--workers", "0", "--dtype", "float32",
                        "--device", "cpu"]) == 0
    common = ["stage=pretrain", f"stage.autoencoder_from={ae_run}", "train.steps=3",
              "train.log_every=1", "data.shuffle_shards=false"]
    run_training(compose_cfg(smoke_overrides(tmp_path, "pix", datasets, *common)))
    trainer = make_trainer(compose_cfg(smoke_overrides(
        tmp_path, "lat", datasets, *common, "data=latent", f"data.shards={lat_dir}",
        "data.num_frames=9", "data.resolution=[32,32]", "data.batch_size=2",
        "data.num_workers=0")))
    trainer.pipeline.encode_video = None  # any pixel encode would now fail loudly
    trainer.train()
    pix, lat = _losses(tmp_path / "pix"), _losses(tmp_path / "lat")
    assert [s for s, _ in pix] == [s for s, _ in lat] == [1, 2, 3]
    for (_, a), (_, b) in zip(pix, lat):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (pix, lat)


def test_autoencoder_gan_and_perceptual_resume_exactly(tmp_path, datasets) -> None:
    """stage.ae: a local TorchScript perceptual net and a PatchGAN switched on at step 2.
    Before it the discriminator is untouched; after it both losses are logged and the
    discriminator trains; a run resumed at step 3 ends bitwise equal to a straight one."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    torch.jit.save(torch.jit.script(net), str(tmp_path / "perc.pt"))
    extra = ["stage=autoencoder", "train.steps=5", "train.log_every=1", "train.ckpt_every=3",
             "stage.ae.gan_start=2", "stage.ae.disc_channels=8", "stage.ae.disc_layers=2",
             f"stage.ae.perceptual_path={tmp_path / 'perc.pt'}",
             "model.autoencoder.perceptual_weight=0.1"]
    straight = make_trainer(compose_cfg(smoke_overrides(tmp_path, "gan", datasets, *extra)))
    d0 = {n: p.detach().clone() for n, p in straight.objective.disc.disc.named_parameters()}
    straight.train()
    rows = [r for r in read_metrics(tmp_path / "gan") if "loss" in r]
    assert [r["d_loss"] == 0 for r in rows] == [True, True, False, False, False]
    assert all(r["perceptual"] > 0 for r in rows) and rows[-1]["g_adv"] != 0
    assert any(not torch.equal(d0[n], p)
               for n, p in straight.objective.disc.disc.named_parameters())

    # A crash right after the step-3 save, then resume=auto.
    shutil.copytree(tmp_path / "gan", tmp_path / "gan2")
    shutil.rmtree(tmp_path / "gan2" / "checkpoints" / "step_5")
    (tmp_path / "gan2" / "checkpoints" / "latest").unlink()
    resumed = make_trainer(compose_cfg(smoke_overrides(tmp_path, "gan2", datasets, *extra)))
    resumed.train()
    for a, b in ((straight.module, resumed.module),
                 (straight.objective.disc.disc, resumed.objective.disc.disc)):
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
