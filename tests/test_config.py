"""Config composition and validation: bad configs fail before training, naming the key."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from _runs import cli, compose_cfg
from worldline.train.config import ConfigError
from worldline.train.validate import validate


@pytest.mark.parametrize("stage", ["autoencoder", "pretrain", "controllability", "finetune"])
@pytest.mark.parametrize("model", ["tiny", "small"])
def test_every_stage_and_model_composes(stage: str, model: str) -> None:
    extra = [] if stage == "autoencoder" else ["stage.autoencoder_from=/x", "stage.init_from=/y"]
    cfg = compose_cfg([f"stage={stage}", f"model={model}", *extra])
    assert cfg.stage.name == stage and cfg.model.name == model
    validate(cfg)


def test_groups_compose() -> None:
    cfg = compose_cfg(["stage=autoencoder", "data=webdataset", "data.shards=/d", "logger=none",
                       "experiment=smoke"])
    assert cfg.data.kind == "webdataset" and cfg.logger.kind == "none"
    assert cfg.data.resolution == [32, 32]  # experiment overrides the data group
    validate(cfg)


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "stepz"),
    ("model.dit.hiden_size=3", "hiden_size"),
])
def test_unknown_key_is_rejected_naming_it(override: str, key: str) -> None:
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_cfg(["stage=autoencoder", override])
    assert key in str(e.value) + str(e.value.__cause__)


def test_forced_unknown_key_is_rejected_by_validate() -> None:
    # "+key=value" deliberately bypasses struct mode; validate() still names the key.
    cfg = compose_cfg(["stage=autoencoder", "+model.dit.hiden_size=3"])
    with pytest.raises(ConfigError, match=r"model\.dit\.hiden_size: unknown key"):
        validate(cfg)


def test_unknown_key_in_a_yaml_file_is_rejected(tmp_path) -> None:
    # A user's own experiment file with a typo, found through hydra.searchpath.
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ntrain:\n  stepz: 3\n")
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"])
    assert "stepz" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("train.steps=many", "train.steps"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("train.ema_decay=abc", "train.ema_decay"),
])
def test_wrong_type_is_rejected_naming_it(override: str, key: str) -> None:
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_cfg(["stage=autoencoder", override])
    assert key in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("data.num_frames=16", "data.num_frames"),
    ("data.resolution=[60,64]", "data.resolution"),
    ("train.precision=fp8", "train.precision"),
    ("stage.conditions=[smell]", "stage.conditions"),
    ("model.dit.in_channels=7", "model.dit.in_channels"),
    ("data.crop=left", "data.crop"),
    ("data.input=latent", "data.input"),
    ("data.fps=0", "data.fps"),
    ("data.buckets=[{height:64,width:64,num_frames:17,batch_size:2},"
     "{height:40,width:64,num_frames:9,batch_size:4}]", "data.buckets[1]"),
    ("data.buckets=[{height:64,width:64,num_frames:8,batch_size:2}]", "data.buckets[0]"),
])
def test_impossible_values_name_the_key(override: str, key: str) -> None:
    cfg = compose_cfg(["stage=autoencoder", override])
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        validate(cfg)


def test_latent_stage_without_autoencoder_is_explained() -> None:
    cfg = compose_cfg(["stage=pretrain"])
    with pytest.raises(ConfigError, match="stage.autoencoder_from"):
        validate(cfg)


def test_cli_bad_config_fails_fast_naming_key(tmp_path) -> None:
    # Real console script: unknown key, wrong type and cross-field error all exit non-zero
    # with the key in the message and nothing written to the run dir.
    for args, key in ((["train.stepz=3"], "stepz"), (["train.steps=many"], "train.steps"),
                      (["stage=autoencoder", "data.num_frames=10"], "data.num_frames")):
        r = cli("worldline-train", f"run.root={tmp_path}", "logger=none", *args, timeout=120)
        assert r.returncode != 0, r.stdout
        assert key in r.stderr, r.stderr
    assert not list(tmp_path.glob("*/checkpoints"))
