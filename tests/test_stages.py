"""Stage mechanics on real tiny models: growing a pretrained model with zero-initialised
control modules, the freeze policy, the task mix and the stage config rules (~10 s)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from _runs import compose_cfg
from worldline.models.dit import DiTArgs
from worldline.models.text import TextEncoderArgs
from worldline.models.world_model import WorldModel
from worldline.train.config import ConfigError
from worldline.train.config_stage import FreezePolicyConfig
from worldline.train.validate import validate
from worldline.data.stage_loader import is_prior_batch
from worldline.train.pipeline_io import stage_dit_args
from worldline.train.stages import FreezePolicy, load_init_weights, zero_init_new_controls
from worldline.train.tasks import TaskProbs, clean_prefix_inputs, sample_prefix_lengths

DIT = DiTArgs(in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=32,
              num_action_slots=3, camera_dim=2, mask_channel=True, frame_causal=True, max_refs=2)
TEXT = TextEncoderArgs(dim=32, depth=1, num_heads=4, max_len=16)


def _export(model: torch.nn.Module, out: Path) -> Path:
    """A worldline-export folder holding ``model`` (what stage.init_from accepts)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"format": "worldline-export", "config": {}}))
    return out


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 5, 3, 4, 4, generator=g)  # 4 latent channels + mask channel
    t = torch.rand(b, 3, generator=g)
    ids = torch.randint(0, 255, (b, 16), generator=g)
    mask = torch.ones(b, 16, dtype=torch.bool)
    actions = torch.randint(0, 5, (b, 9, 3), generator=g)
    camera = torch.randn(b, 9, 2, generator=g)
    return x, t, ids, mask, actions, camera


@pytest.mark.parametrize("audio_mode", ["modulation", "cross_attn"])
def test_controllability_growth_keeps_the_pretrained_outputs(tmp_path: Path,
                                                             audio_mode: str) -> None:
    torch.manual_seed(0)
    pre = WorldModel(stage_dit_args(DIT, ["text"]), TEXT)
    assert not hasattr(pre.dit.cond_embed, "action_emb") and not hasattr(pre.dit, "ref_embed")
    with torch.no_grad():  # a "trained" model: nothing at its zero init any more
        for p in pre.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = _export(pre, tmp_path / "pretrain")

    torch.manual_seed(1)
    grown_args = dataclasses.replace(DIT, audio_dim=16, audio_mode=audio_mode)
    grown = WorldModel(stage_dit_args(grown_args, ["text", "actions", "camera", "refs", "audio"]),
                       TEXT)
    new = load_init_weights(grown, src)
    assert {"dit.cond_embed.action_emb.weight", "dit.cond_embed.camera_in.weight",
            "dit.ref_embed", "dit.cond_embed.null_action"} <= new
    assert any("audio" in n for n in new)
    assert not any(n.startswith("dit.blocks.") and ".audio" not in n for n in new)
    zero_init_new_controls(grown, new)

    x, t, ids, mask, actions, camera = _inputs()
    audio = {"audio": torch.randn(2, 9, 16), "audio_valid": torch.rand(2, 9) > 0.2}
    pre.eval(), grown.eval()
    with torch.no_grad():
        want = pre(x, t, ids, mask)
        # With controls given, and with them dropped (CFG's unconditional branch).
        got = grown(x, t, ids, mask, actions=actions, camera=camera, **audio)
        got_null = grown(x, t, ids, mask, actions=actions, camera=camera,
                         drop_actions=torch.ones(2, dtype=torch.bool),
                         drop_audio=torch.ones(2, dtype=torch.bool), **audio)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_null, want, rtol=0, atol=0)

    # The zeroed output layers still learn: their input side is random, so they get gradients.
    grown.train()
    grown(x, t, ids, mask, actions=actions, camera=camera).square().mean().backward()
    w = grown.dit.cond_embed.action_mlp[1].weight
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_freeze_policy_trains_new_modules_first_then_everything() -> None:
    model = WorldModel(stage_dit_args(DIT, ["text", "actions"]), TEXT)
    model.text_encoder.requires_grad_(False)  # frozen for the whole stage (stage.freeze)
    new = {n for n, _ in model.named_parameters() if ".action" in n}
    policy = FreezePolicy(model, FreezePolicyConfig(steps=5, train_first=["dit.blocks.0."]), new)
    policy.apply(0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == new | {n for n, _ in model.named_parameters()
                               if n.startswith("dit.blocks.0.")}
    policy.apply(4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    policy.apply(5)
    for n, p in model.named_parameters():
        assert p.requires_grad == (not n.startswith("text_encoder.")), n


def test_task_mix_and_clean_prefix() -> None:
    g = torch.Generator().manual_seed(0)
    prefix, task = sample_prefix_lengths(4000, 5, TaskProbs(0.5, 0.3, 0.2), g)
    frac = torch.bincount(task, minlength=3).float() / 4000
    torch.testing.assert_close(frac, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
    assert (prefix[task == 0] == 0).all() and (prefix[task == 1] == 1).all()
    cont = prefix[task == 2]
    assert cont.min() == 2 and cont.max() == 4  # 2 .. t-1 clean frames
    x0, xt = torch.zeros(3, 4, 5, 2, 2), torch.ones(3, 4, 5, 2, 2)
    t = torch.full((3,), 0.7)
    x_in, t_in, loss_mask = clean_prefix_inputs(x0, xt, t, torch.tensor([0, 1, 3]), True)
    assert x_in.shape == (3, 5, 5, 2, 2)
    assert x_in[2, :4, :3].eq(0).all() and x_in[2, :4, 3:].eq(1).all()
    assert x_in[:, 4, :, 0, 0].tolist() == [[0] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert t_in[1].tolist() == pytest.approx([0, 0.7, 0.7, 0.7, 0.7])
    assert loss_mask[:, 0, :, 0, 0].tolist() == [[1] * 5, [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_prior_mix_is_exact_over_any_window() -> None:
    picks = [is_prior_batch(n, 0.25) for n in range(400)]
    assert sum(picks) == 100 and all(sum(picks[i:i + 4]) == 1 for i in range(0, 400, 4))
    assert not any(is_prior_batch(n, 0.0) for n in range(10))


@pytest.mark.parametrize("overrides, key", [
    (["stage.tasks.i2v=0.5", "model.dit.mask_channel=false"], "stage.tasks"),
    (["stage=controllability", "stage.init_from=x", "stage.num_refs=3"], "stage.num_refs"),
    (["stage.validation.patience=2", "stage.validation.every=0"], "stage.validation.patience"),
    (["stage.prior.ratio=0.3"], "stage.prior.shards"),
    (["stage.schedule=[{step: 0, resolution: [32, 32], num_frames: 8}]"], "stage.schedule[0]"),
    (["stage=controllability", "stage.init_from=x", "dist=ddp"], "stage.freeze_policy"),
    (["stage=finetune", "stage.init_from=x", "stage.lora.rank=0"], "stage.lora.rank"),
])
def test_bad_stage_configs_fail_in_validate(overrides: list[str], key: str) -> None:
    cfg = compose_cfg(["stage.autoencoder_from=ae", *overrides])
    pattern = key.replace("[", ".").replace("]", ".")  # regex: brackets match any character
    with pytest.raises(ConfigError, match=rf"invalid config: {pattern}"):
        validate(cfg)


def test_stage_configs_compose_and_validate() -> None:
    for stage in ("pretrain", "pretrain_progressive", "controllability", "finetune"):
        cfg = compose_cfg([f"stage={stage}", "stage.init_from=runs/x",
                           "stage.autoencoder_from=runs/ae"])
        validate(cfg)
    pre = compose_cfg(["stage=pretrain_progressive", "stage.autoencoder_from=ae"])
    assert pre.stage.name == "pretrain"
    # The schedule steps up to the data.* size.
    sizes = [(p.num_frames, list(p.resolution)) for p in pre.stage.schedule]
    assert sizes == [(9, [32, 32]), (17, [64, 64])]
    assert OmegaConf.to_object(pre.stage.tasks).diffusion_forcing


def test_init_from_a_mismatched_model_is_a_clear_error(tmp_path: Path) -> None:
    small = WorldModel(stage_dit_args(DiTArgs(**{**DIT.__dict__, "depth": 1}), ["text"]), TEXT)
    src = _export(small, tmp_path / "depth1")
    grown = WorldModel(stage_dit_args(DIT, ["text"]), TEXT)
    with pytest.raises(ValueError, match="lacks .* core weights"):
        load_init_weights(grown, src)


def test_epochs_set_the_step_count_from_the_data(tmp_path: Path) -> None:
    from worldline.train.build import train_steps

    cfg = compose_cfg(["stage=finetune", "stage.init_from=x", "experiment=smoke",
                       "stage.epochs=3", "train.grad_accum=2"])
    # 16 clips, batch 2 x accumulation 2 -> 4 steps per epoch
    assert train_steps(cfg) == 12
    shards = tmp_path / "studio"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"num_samples": 10}))
    cfg = compose_cfg(["stage=finetune", "stage.init_from=x", "experiment=smoke",
                       "data=webdataset", f"data.shards={shards}", "stage.epochs=2"])
    assert train_steps(cfg) == 10  # ceil(2 * 10 / 2)
    cfg = compose_cfg(["stage=finetune", "stage.init_from=x", "data=webdataset",
                       f"data.shards={tmp_path}", "stage.epochs=2"])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        train_steps(cfg)
