"""Config composition and validation: bad configs fail before training, naming the key."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from _runs import cli, compose_cfg
from worldline.train.config import (ConfigError, Precision, load_model_config,
                                    model_config_names, to_container)
from worldline.train.precision import PrecisionPolicy
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
    # Enum fields: OmegaConf itself rejects a value outside the set, during composition.
    ("train.precision=fp8", "train.precision"),
    ("stage.conditions=[smell]", "stage.conditions"),
    ("data.crop=left", "data.crop"),
    ("dist.backend=zero4", "dist.backend"),
    ("train.on_save_error=retry", "train.on_save_error"),
])
def test_wrong_type_is_rejected_naming_it(override: str, key: str) -> None:
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_cfg(["stage=autoencoder", override])
    assert key in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("data.num_frames=16", "data.num_frames"),
    ("data.resolution=[60,64]", "data.resolution"),
    ("model.dit.in_channels=7", "model.dit.in_channels"),
    ("data.input=latent", "data.input"),
    ("data.fps=0", "data.fps"),
    ("data.max_crop=1.5", "data.max_crop"),
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


def test_enum_fields_behave_like_their_strings(tmp_path) -> None:
    cfg = compose_cfg(["stage=controllability", "stage.autoencoder_from=/x", "train.precision=bf16",
                       "train.on_save_error=continue", "dist=fsdp"])
    validate(cfg)
    assert cfg.train.precision is Precision.bf16 and cfg.train.precision == "bf16"
    assert f"{cfg.dist.backend}" == str(cfg.dist.backend) == "fsdp"
    assert {"fsdp": 1}[cfg.dist.backend] == 1 and "refs" in set(cfg.stage.conditions)
    assert cfg.train.on_save_error == "continue"  # a keyword, hence the functional enum form
    # Everything that leaves the process sees plain strings, and reads back the same.
    plain = to_container(cfg)
    assert type(plain["train"]["precision"]) is str and plain["stage"]["conditions"][-1] == "refs"
    assert json.loads(json.dumps(plain)) == plain
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    torch.save({"config": plain}, tmp_path / "meta.pt")
    assert torch.load(tmp_path / "meta.pt", weights_only=True)["config"] == plain
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert "precision: bf16" in (tmp_path / "config.yaml").read_text()
    # A saved config merges back onto the schema (what resuming from a checkpoint does).
    again = OmegaConf.merge(compose_cfg(["stage=autoencoder"]), {"train": plain["train"],
                                                                "stage": plain["stage"]})
    assert again.train.precision is Precision.bf16 and again.stage.objective == "flow"


def test_model_sizes_come_from_conf_model() -> None:
    assert model_config_names() == ["1B", "3B", "7B", "base", "small", "tiny", "tiny_pixel"]
    for name in model_config_names():
        m = load_model_config(name)
        assert m.name == name and m.dit.hidden_size % m.dit.num_heads == 0
        # The same file through Hydra (model=<name>) gives the same model config.
        assert compose_cfg(["stage=autoencoder", f"model={name}"]).model == m


# --- train/precision.py: one PrecisionPolicy from train.precision ---------------------------
def test_fp32_is_a_no_op_policy() -> None:
    p = PrecisionPolicy.from_config(compose_cfg(["stage=autoencoder"]))
    assert p.precision is Precision.fp32 and p.autocast_dtype is None
    assert p.peak_dtype is torch.float32
    assert p.fsdp_mixed_precision() is None
    assert p.deepspeed_config() == {"bf16": {"enabled": False}}
    a = torch.randn(4, 4)
    with p.autocast("cpu"):
        assert (a @ a).dtype is torch.float32 and not torch.is_autocast_enabled("cpu")


def test_bf16_policy_from_each_kind_of_input() -> None:
    cfg = compose_cfg(["stage=autoencoder", "train.precision=bf16"])
    policies = [PrecisionPolicy.from_config(x)
                for x in (cfg, cfg.train, cfg.train.precision, "bf16", Precision.bf16)]
    assert all(p == policies[0] for p in policies)
    p = policies[0]
    assert p.autocast_dtype is torch.bfloat16 and p.peak_dtype is torch.bfloat16
    assert p.deepspeed_config() == {"bf16": {"enabled": True}}
    a = torch.randn(4, 4)
    with p.autocast("cpu"):
        assert (a @ a).dtype is torch.bfloat16
    assert (a @ a).dtype is torch.float32


def test_bf16_fsdp_policy_gathers_bf16_and_reduces_fp32() -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = PrecisionPolicy("bf16").fsdp_mixed_precision()
    assert isinstance(mp, MixedPrecisionPolicy)
    assert mp.param_dtype is torch.bfloat16 and mp.reduce_dtype is torch.float32


def test_unknown_precision_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"train\.precision: 'fp8'"):
        PrecisionPolicy.from_config("fp8")


def _manifest(tmp_path, controls: dict) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": ["s.tar"],
                                                        "controls": controls}))
    return str(tmp_path)


@pytest.mark.parametrize("data, key", [
    (["data.synthetic.num_sprites=2"], "model.dit.num_action_slots"),  # 2 sprites, 3 slots
    ("ids 0..6", "model.dit.num_actions"),  # the tiny model has 5 actions
])
def test_action_settings_are_checked_against_the_data(tmp_path, caplog, data, key) -> None:
    """The model's action table against what the data carries (data.synthetic, or the
    manifest's ``controls`` written at ingest), one line naming the key, before any worker."""
    from worldline.train.validate import _validate_controls

    if data == "ids 0..6":
        data = ["data=webdataset", "data.shards=" + _manifest(tmp_path, {
            "samples": 4, "camera": 4, "refs": 0,
            "actions": {"samples": 4, "slots": [3], "min": 0, "max": 6}})]
    cfg = compose_cfg(["stage=controllability", *data])
    with pytest.raises(ConfigError, match=key) as err:
        _validate_controls(cfg)
    assert "\n" not in str(err.value)
    # The defaults agree with the synthetic world; the matching manifest passes.
    _validate_controls(compose_cfg(["stage=controllability"]))
    # Data without actions (style clips for a controllable model) is allowed, and said.
    caplog.set_level("WARNING")
    _validate_controls(compose_cfg(["stage=controllability", "data=webdataset", "data.shards="
                                    + _manifest(tmp_path, {"samples": 4, "camera": 0})]))
    assert "only ever see the null path" in caplog.text
    # ... naming the conditions that would leave them out.
    assert "actions and camera" in caplog.text and "stage.conditions=[text,refs]" in caplog.text
    _validate_controls(compose_cfg(["stage=controllability", "data=webdataset", "data.shards="
                                    + _manifest(tmp_path, {"samples": 4, "camera": 4, "refs": 0,
                                                           "actions": {"samples": 4, "slots": [3],
                                                                       "min": 0, "max": 4}})]))
