"""Pretrained components from local folders in config: a diffusers Wan VAE and a transformers
T5 encoder (tiny, random, built here and saved as a user's download would be) train a latent
stage, then sample, export, resume, and feed a text-embedding cache that refuses another
encoder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _runs import cli, compose_cfg, smoke_overrides

diffusers = pytest.importorskip("diffusers", reason="the hf extra is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from worldline.train.checkpoint import checkpoint_keys, resolve_checkpoint  # noqa: E402
from worldline.train.config import ConfigError  # noqa: E402
from worldline.train.hooks import FreezePolicyHook  # noqa: E402
from worldline.train.main import run_training  # noqa: E402
from worldline.train.tracking import read_metrics  # noqa: E402
from worldline.train.pipeline import WorldPipeline  # noqa: E402
from worldline.train.validate import validate  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "green", "blue", "circle", "square",
         "moves", "left", "right", "up", "down", "on", "in"]


def _t5_folder(path: Path, seed: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                               unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(seed)
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _wan_vae_folder(path: Path, z_dim: int = 4) -> Path:
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.1] * z_dim,
        latents_std=[0.8] * z_dim).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {"vae": _wan_vae_folder(root / "wan-vae"), "t5": _t5_folder(root / "t5", 0),
            "t5b": _t5_folder(root / "t5-other", 1), "datasets": root / "datasets"}


def _overrides(root: Path, name: str, f: dict[str, Path], *extra: str) -> list[str]:
    return smoke_overrides(root, name, f["datasets"], "stage=pretrain",
                           f"model.vae.pretrained={f['vae']}",
                           f"model.text_encoder.pretrained={f['t5']}",
                           "model.text_encoder.max_len=16", *extra)


def test_a_latent_stage_on_a_diffusers_vae_and_t5_trains_samples_exports_resumes(
        tmp_path, folders) -> None:
    common = ["train.steps=4", "train.ckpt_every=2", "train.log_every=1"]
    trainer = run_training(compose_cfg(_overrides(tmp_path, "wan", folders, *common)))
    pipe = trainer.pipeline
    # Frozen components stay outside the trained module and its optimizer.
    assert type(pipe.autoencoder).__name__ == "DiffusersVideoVAE"
    assert type(pipe.text_encoder).__name__ == "HFTextEncoder"
    assert trainer.module.text_encoder is None and trainer.module.dit.args.text_dim == 32
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    frozen = list(pipe.autoencoder.parameters()) + list(pipe.text_encoder.parameters())
    assert frozen and not any(id(p) in trained for p in frozen)
    ckpt = resolve_checkpoint(tmp_path / "wan")
    assert "autoencoder" not in checkpoint_keys(ckpt)  # re-read from its folder, not copied

    # Inference from the run dir: the same folders come back, prompts go through T5.
    loaded = WorldPipeline.from_pretrained(tmp_path / "wan")
    assert loaded.text_encoder.source == str(folders["t5"])
    video = loaded.generate(["a red circle moves left"], num_steps=2, seed=0)
    assert video.shape == (1, 3, 9, 32, 32)

    # A pipeline folder: vae/ and text_encoder/ in their own libraries' layout.
    out = loaded.save_pretrained(tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    diffusers.AutoencoderKLWan.from_pretrained(out / "vae")
    transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    again = WorldPipeline.from_pretrained(out)
    torch.testing.assert_close(again.generate(["a red circle moves left"], num_steps=2, seed=0),
                               video, rtol=0, atol=1e-5)

    # Resume: more steps on the same run continue from its checkpoint.
    resumed = run_training(compose_cfg(_overrides(tmp_path, "wan", folders, "train.steps=6",
                                                  "train.ckpt_every=2", "train.log_every=1")))
    assert resumed.state.step == 6


def test_text_cache_names_its_encoder_and_refuses_another(tmp_path, folders) -> None:
    # Pixel shards of the smoke world, then latents + T5 embeddings through the CLI.
    cfg = compose_cfg(_overrides(tmp_path, "probe", folders))
    from worldline.train.loaders import LoaderFactory

    pixels = LoaderFactory(cfg).shards(cfg.data)
    cache = tmp_path / "cache"
    # a diffusers VAE folder passed as --checkpoint is recognised as one (same as --vae)
    r = cli("worldline-encode-latents", pixels, str(cache), "--checkpoint", str(folders["vae"]),
            "--text-encoder", str(folders["t5"]), "--text-max-len", "16", "--num-frames", "9",
            "--resolution", "32", "32", "--dtype", "float32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    te = manifest["text_encoder"]
    assert te["path"] == str(folders["t5"].resolve()) and len(te["sha256"]) == 64
    assert manifest["autoencoder"]["class"] == "AutoencoderKLWan"

    latent = ["data.input=latent", f"data.shards={cache}", "data.kind=webdataset"]
    # No encoder configured: the cache's is adopted (its width becomes the DiT's text_dim).
    cfg = compose_cfg(smoke_overrides(tmp_path, "cached", folders["datasets"], "stage=pretrain",
                                      f"model.vae.pretrained={folders['vae']}", *latent,
                                      "train.steps=2", "stage.validation.every=0"))
    validate(cfg)
    assert cfg.model.text_encoder.pretrained == te["path"] and cfg.model.dit.text_dim == 32
    trainer = run_training(cfg)
    # Embeddings cached: the encoder was loaded only for the final samples, not to train.
    assert trainer.pipeline.text_encoder_loader is not None
    # Another encoder with the same architecture: refused, naming both folders.
    bad = compose_cfg(smoke_overrides(tmp_path, "bad", folders["datasets"], "stage=pretrain",
                                      f"model.vae.pretrained={folders['vae']}", *latent,
                                      f"model.text_encoder.pretrained={folders['t5b']}"))
    with pytest.raises(ConfigError, match=r"t5-other \(sha256 \w+\) is not the encoder .*/t5 \(sha"):
        validate(bad)


def test_bad_pretrained_folders_fail_before_training_naming_the_path(tmp_path, folders) -> None:
    wide = _wan_vae_folder(tmp_path / "vae8", z_dim=8)
    cases = [
        ([f"model.vae.pretrained={wide}"], r"model.dit.in_channels: 4 != the latent channels "
                                           r"\(8\) of the VAE .*vae8"),
        ([f"model.vae.pretrained={folders['t5']}"], r"model.vae.pretrained: .*t5/config.json: "
                                                     r"_class_name is None"),
        (["model.text_encoder.pretrained=google/umt5-xxl"], r"hub id.*never downloads"),
        (["stage=autoencoder", f"model.vae.pretrained={folders['vae']}"], "is frozen"),
    ]
    for extra, pattern in cases:
        cfg = compose_cfg(smoke_overrides(tmp_path, "x", folders["datasets"], "stage=pretrain",
                                          "stage.autoencoder_from=x", *extra))
        with pytest.raises(ConfigError, match=pattern):
            validate(cfg)


def test_a_pretrained_wan_becomes_an_action_conditioned_world_model(tmp_path, folders) -> None:
    """controllability from model.dit.pretrained: new action modules (absent from the Wan
    folder) train first under the freeze policy, then the KV-cached rollout takes actions."""
    from test_wan_workflow import _wan_folder

    wan = _wan_folder(tmp_path / "wan")
    cfg = compose_cfg(_overrides(
        tmp_path, "world", folders, "stage=controllability", "stage.init_from=null",
        f"model.dit.pretrained={wan}", "model.dit.frame_causal=true",
        "stage.conditions=[text,actions]", "stage.freeze_policy.steps=2",
        "stage.validation.every=0", "train.steps=3", "train.ckpt_every=3"))
    trainer = run_training(cfg)
    dit = trainer.module.dit
    assert type(dit).__name__ == "WanDiT" and dit.args.num_action_slots == 3
    early = trainer.find_hook(FreezePolicyHook).policy.early
    assert any(n.startswith("dit.control_") for n in early)  # new: trained from step 1
    pipe = WorldPipeline.from_pretrained(tmp_path / "world")
    actions = torch.zeros(1, 9, 3, dtype=torch.long)
    video = pipe.rollout(["a red circle moves left"], num_frames=2, actions=actions,
                         num_steps=2)
    assert video.shape[:2] == (1, 3) and torch.isfinite(video).all()


@pytest.mark.parametrize("family", ["AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo"])
def test_hunyuan_and_ltx_vaes_are_the_frozen_autoencoder_of_a_latent_stage(
        tmp_path, folders, family) -> None:
    torch.manual_seed(0)
    if family == "AutoencoderKLLTXVideo":  # 8x temporal, 32x spatial: 9x64x64 -> 2x2x2
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, scaling_factor=0.7)
        size, channels, patch = 64, 8, "[1,1,1]"
    else:  # 4x temporal, 8x spatial: 9x32x32 -> 3x4x4
        vae = diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1,
            norm_num_groups=4)
        size, channels, patch = 32, 4, "[1,2,2]"
    vae.save_pretrained(tmp_path / "vae")
    cfg = compose_cfg(smoke_overrides(
        tmp_path, "run", tmp_path / "data", "stage=pretrain", f"model.vae.pretrained={tmp_path / 'vae'}",
        f"model.dit.in_channels={channels}", f"model.dit.patch_size={patch}",
        f"data.resolution=[{size},{size}]", f"data.synthetic.height={size}",
        f"data.synthetic.width={size}", "train.steps=2", "train.log_every=1",
        "stage.validation.every=0"))
    trainer = run_training(cfg)
    assert cfg.model.autoencoder.temporal_downsample == (8 if "LTX" in family else 4)
    ae = trainer.pipeline.autoencoder
    assert ae.family == family
    batch = next(iter(trainer.loader))
    video = batch["video"][:1]
    raw, _ = ae.encode(video.float() / 127.5 - 1)
    # the latents the DiT trained on are the family's own normalisation of the VAE's output
    torch.testing.assert_close(trainer.pipeline.encode_video(video), ae.normalize(raw))
    if "LTX" in family:
        want = (raw - vae.latents_mean.view(1, -1, 1, 1, 1)) * 0.7 / vae.latents_std.view(
            1, -1, 1, 1, 1)
    else:
        want = raw * vae.config.scaling_factor
    torch.testing.assert_close(ae.normalize(raw), want, rtol=0, atol=1e-6)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_a_diffusers_vae_given_where_a_worldline_run_is_expected(tmp_path, folders) -> None:
    cfg = compose_cfg(smoke_overrides(tmp_path, "x", folders["datasets"], "stage=pretrain",
                                      f"stage.autoencoder_from={folders['vae']}"))
    with pytest.raises(ConfigError, match="diffusers VAE folder: pass it as model.vae.pretrained"):
        validate(cfg)
