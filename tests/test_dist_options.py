"""Distributed-engine options on real gloo ranks and in one process: FSDP2 bf16 + activation
checkpointing + HSDP mesh + accumulation, FSDP x Ulysses CP on the flow stage (= the
single-process run), async DCP saves, the generated DeepSpeed config, config rules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _runs import compose_cfg, smoke_overrides
from test_dist_engine import launch, losses
from worldline.train.checkpoint import is_complete, list_checkpoints
from worldline.train.config import ConfigError
from worldline.train.validate import validate
from worldline.train.main import run_training


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("opts")


@pytest.mark.dist
def test_fsdp_bf16_ac_hsdp_accumulation(root: Path) -> None:
    run = launch(root, "hsdp", root / "_datasets", 2, "dist=fsdp", "train.precision=bf16",
                 "dist.activation_checkpointing=every_k", "dist.ac_every=2",
                 "dist.reshard_after_forward=false", "dist.replicate=2", "train.grad_accum=2",
                 "train.steps=4", "train.ckpt_every=4")
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4] and all(0 < v < 10 for v in got.values())
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4]


@pytest.fixture(scope="module")
def ae(root: Path) -> Path:
    """A 2-step autoencoder run the flow-stage tests start from."""
    return launch(root, "ae", root / "_datasets", 1, "dist=single", "train.steps=2",
                  "train.ckpt_every=2")


@pytest.mark.dist
def test_fsdp_context_parallel_flow_equals_single_process(root: Path, ae: Path) -> None:
    """dp=1 x cp=2: both ranks hold half the tokens of the same clips, so the losses equal a
    single process's (same data, same noise) up to float reduction order."""
    data = root / "_datasets"
    # 13 frames -> 4 latent frames (cp=2 must divide the token frames).
    flow = ["stage=pretrain", f"stage.autoencoder_from={ae}", "data.num_frames=13",
            "data.synthetic.num_frames=13", "train.steps=3", "train.ckpt_every=3",
            "train.ema_decay=0.99"]
    single = launch(root, "flow1", data, 1, "dist=single", *flow)
    cp = launch(root, "flowcp", data, 2, "dist=fsdp", "dist.cp=2", *flow)
    a, b = losses(single), losses(cp)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4), (s, a[s], b[s])


@pytest.mark.dist
def test_ddp_flow_equals_one_process_with_two_streams(root: Path, ae: Path) -> None:
    """dp=2 on a flow stage started from an autoencoder run: one process with two loader
    streams and accumulation 2 reads the same two batches per step and draws the same noise
    as the two ranks. It also needs the same latent statistics: they are measured on the
    same first clips whatever the layout (before, each rank measured its own shards and the
    ranks trained on differently normalised latents: 7 % apart from step 1)."""
    data = root / "_datasets"
    flow = ["stage=pretrain", f"stage.autoencoder_from={ae}", "train.steps=3",
            "train.ckpt_every=3"]
    single = launch(root, "flow2s", data, 1, "dist=single", "data.num_workers=2",
                    "train.grad_accum=2", *flow)
    ddp = launch(root, "flowddp", data, 2, "dist=ddp", *flow)
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-3), (s, a[s], b[s])


def test_async_save_single_process(tmp_path: Path) -> None:
    ds = tmp_path / "_datasets"
    t = run_training(compose_cfg(smoke_overrides(
        tmp_path, "async", ds, "stage=autoencoder", "train.steps=4", "train.ckpt_every=2",
        "dist.async_save=true")))
    ckpts = list_checkpoints(tmp_path / "async" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4] and all(is_complete(p) for _, p in ckpts)
    assert (tmp_path / "async" / "checkpoints" / "latest").read_text() == "step_4"
    assert not list((tmp_path / "async" / "checkpoints").glob(".*partial"))
    assert t.checkpoint.checkpointer._pending is None


def test_deepspeed_config_generated_and_user_json_merged(tmp_path: Path) -> None:
    from worldline.train.parallel.deepspeed import ds_config
    from worldline.train.precision import PrecisionPolicy

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123},
                                "bf16": {"enabled": False}}))
    cfg = compose_cfg(smoke_overrides(tmp_path, "x", tmp_path, "stage=autoencoder",
                                      "dist=deepspeed_zero3", "train.precision=bf16",
                                      "train.grad_accum=4", "train.grad_clip=0.5",
                                      "dist.offload_optimizer=true", "dist.offload_params=true",
                                      f"dist.ds_config={user}"))
    validate(cfg)
    c = ds_config(cfg.dist, 3, 8, cfg.data.batch_size, cfg.train.grad_accum,
                  cfg.train.grad_clip, PrecisionPolicy.from_config(cfg))
    assert c["train_micro_batch_size_per_gpu"] == 2 and c["gradient_accumulation_steps"] == 4
    assert c["train_batch_size"] == 2 * 4 * 8 and c["gradient_clipping"] == 0.5
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_param"]["device"] == "cpu" and z["reduce_bucket_size"] == 123
    assert c["bf16"] == {"enabled": False}  # the user's file wins


@pytest.mark.parametrize("overrides, key", [
    (["dist=ddp", "dist.replicate=2"], "dist.replicate"),
    (["dist=ddp", "dist.cpu_offload=true"], "dist.cpu_offload"),
    (["dist=deepspeed_zero2", "dist.offload_params=true"], "dist.offload_params"),
    (["dist=fsdp", "dist.cp=3"], "dist.cp"),
    (["dist=deepspeed_zero1", "dist.async_save=true"], "dist.async_save"),
    (["dist.backend=megatron"], "dist.backend"),
])
def test_dist_config_rules(tmp_path: Path, overrides: list[str], key: str) -> None:
    from hydra.errors import ConfigCompositionException

    # An unknown value of an enum field (dist.backend) fails already in composition.
    with pytest.raises((ConfigError, ConfigCompositionException), match=key.replace(".", r"\.")):
        validate(compose_cfg(smoke_overrides(tmp_path, "x", tmp_path, "stage=pretrain",
                                             "stage.autoencoder_from=x", *overrides)))


def test_activation_checkpointing_keeps_names_and_values(tmp_path: Path) -> None:
    import copy

    import torch

    from worldline.models.autoencoder import AutoencoderArgs, VideoAutoencoder
    from worldline.train.parallel.base import apply_activation_checkpointing, block_modules

    torch.manual_seed(0)
    m = VideoAutoencoder(AutoencoderArgs(base_channels=8, channel_mult=[1, 2],
                                         temporal_downsample=2, spatial_downsample=4))
    ac = copy.deepcopy(m)
    assert apply_activation_checkpointing(ac, "full", 1) == len(block_modules(m)) > 2
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ac.named_parameters()]
    x = torch.randn(1, 3, 5, 16, 16)
    for model in (m, ac):
        model.encode(x)[0].square().sum().backward()
    for (n, a), (_, b) in zip(m.named_parameters(), ac.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=n)
