"""The studio workflow on a pretrained Wan, end to end with the installed command lines: a
diffusers Wan transformer + Wan VAE + T5 folder (tiny, random, written here as a user's
download would be) → latent + text-embedding cache → LoRA fine-tune on a folder of clips and
stills → ``worldline-lora`` (PEFT and diffusers layouts, loaded by PEFT and by WanPipeline)
→ ``worldline-export --format diffusers`` (a WanPipeline that generates with Worldline's
first-step velocity) → sample, eval and resume of the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _runs import cli
from test_pretrained_components import _t5_folder, _wan_vae_folder
from test_workflow_e2e import write_studio_folder

diffusers = pytest.importorskip("diffusers", reason="the hf extra is not installed")
peft = pytest.importorskip("peft", reason="the hf extra is not installed")

from worldline.train.pipeline import WorldPipeline  # noqa: E402

pytestmark = pytest.mark.slow


def _wan_folder(path: Path) -> Path:
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2,
        rope_max_seq_len=64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    f = {"root": root, "wan": _wan_folder(root / "Wan-tiny" / "transformer"),
         "vae": _wan_vae_folder(root / "Wan-tiny" / "vae"),
         "t5": _t5_folder(root / "Wan-tiny" / "text_encoder", 0)}
    write_studio_folder(root / "studio", seed=3, n=9)
    r = cli("worldline-studio-shards", str(root / "studio"), str(root / "shards"),
            "--trigger", "red", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    r = cli("worldline-encode-latents", str(root / "shards" / "train"), str(root / "cache"),
            "--vae", str(f["vae"]), "--text-encoder", str(f["t5"]), "--text-max-len", "16",
            "--num-frames", "9", "--resolution", "32", "32", "--dtype", "float32",
            "--device", "cpu", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    f["cache"] = root / "cache"
    # LoRA fine-tune of the pretrained Wan on the cache: the text encoder and the VAE come
    # from the cache's manifest and model.vae.pretrained; the DiT from model.dit.pretrained.
    f["run_args"] = ["stage=finetune", "stage.init_from=null", f"run.root={root}",
                     "run.name=wan-lora", "logger=none", "experiment=smoke",
                     f"model.dit.pretrained={f['wan']}", f"model.vae.pretrained={f['vae']}",
                     "data=latent", f"data.shards={f['cache']}", "data.num_frames=9",
                     "data.resolution=[32,32]", "data.batch_size=2", "data.num_workers=0",
                     "model.dit.frame_causal=false", "stage.validation.every=0",
                     "stage.validation.patience=0",
                     "stage.lora.rank=4", "stage.lora.alpha=8", "optim.lr=5e-2",
                     "train.ckpt_every=3", "train.log_every=1"]
    r = cli("worldline-train", *f["run_args"], "train.steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    f["run"] = root / "wan-lora"
    return f


def _velocity(pipe: WorldPipeline, x: torch.Tensor, t: torch.Tensor,
              text: torch.Tensor) -> torch.Tensor:
    """Worldline's velocity for noisy latents x (no clean frames: mask channel 0)."""
    dit = pipe.transformer
    if dit.args.mask_channel:
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    with torch.no_grad():
        return dit(x, t, text, None, frame_causal=False)


def test_lora_export_loads_in_peft_and_in_diffusers_wan_pipeline(studio, tmp_path) -> None:
    lora = tmp_path / "lora"
    r = cli("worldline-lora", str(studio["run"]), "--out", str(lora), "--format", "both")
    assert r.returncode == 0, r.stderr[-2000:]
    base = WorldPipeline.from_pretrained(lora / "base")
    merged = WorldPipeline.from_pretrained(lora / "merged")
    assert base.transformer.args.arch == "wan"
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 3, 4, 4, generator=g), torch.tensor([0.7])
    text, _ = merged.encode_text(["red a red circle moves left"])
    want = _velocity(merged, x, t, text)
    assert (want - _velocity(base, x, t, text)).abs().max() > 1e-4  # the adapter matters
    # PEFT: the adapter folder on the base transformer reproduces the merged model.
    peft_model = peft.PeftModel.from_pretrained(base.transformer, str(lora))
    with torch.no_grad():
        xin = torch.cat([x, torch.zeros_like(x[:, :1])], 1) if base.transformer.args.mask_channel \
            else x
        got = peft_model(xin, t, text, None, frame_causal=False)
    assert (got - want).abs().max() <= 1e-5
    # diffusers: the base as a WanPipeline + the diffusers LoRA file = the merged velocity.
    wanbase = tmp_path / "wan-base"
    r = cli("worldline-export", str(lora / "base"), "--out", str(wanbase), "--format", "diffusers")
    assert r.returncode == 0, r.stderr[-2000:]
    wp = diffusers.WanPipeline.from_pretrained(str(wanbase))
    wp.load_lora_weights(str(lora))
    with torch.no_grad():
        out = wp.transformer(x, timestep=t * 1000, encoder_hidden_states=text).sample
    assert (out - want).abs().max() <= 1e-5


def test_diffusers_export_generates_with_worldlines_first_step_velocity(studio,
                                                                        tmp_path) -> None:
    out = tmp_path / "wan-pipeline"
    r = cli("worldline-export", str(studio["run"]), "--out", str(out), "--format", "diffusers")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    assert (out / "transformer" / "worldline_extra.json").is_file()
    wp = diffusers.WanPipeline.from_pretrained(str(out))
    seen: list = []
    wp.transformer.register_forward_hook(
        lambda m, args, kw, res: seen.append((kw["hidden_states"], kw["timestep"],
                                              kw["encoder_hidden_states"], res[0])),
        with_kwargs=True)
    video = wp("red a red circle moves left", height=32, width=32, num_frames=9,
               num_inference_steps=2, guidance_scale=1.0, output_type="np",
               max_sequence_length=16).frames[0]
    assert video.shape == (9, 32, 32, 3) and float(video.std()) > 0
    x, timestep, text, v = seen[0]
    ours = WorldPipeline.from_pretrained(studio["run"])
    assert (_velocity(ours, x.float(), timestep.float() / 1000, text.float())
            - v.float()).abs().max() <= 1e-5
    # WorldPipeline reads the WanPipeline folder back (DiT, VAE, T5, null text, settings).
    back = WorldPipeline.from_pretrained(out)
    assert back.transformer.args.arch == "wan" and back.settings == ours.settings
    assert torch.equal(back.world_model.null_text, ours.world_model.null_text)
    assert (_velocity(back, x.float(), timestep.float() / 1000, text.float())
            - v.float()).abs().max() <= 1e-5
    assert back.generate(["red a red circle"], num_steps=1).shape == (1, 3, 9, 32, 32)


def test_sample_eval_and_resume_on_a_run_built_from_folders(studio, tmp_path) -> None:
    r = cli("worldline-sample", f"sample.checkpoint={studio['run']}", f"sample.out={tmp_path}",
            "sample.prompts=[red a red circle moves up]", "sample.num_steps=2", "logger=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(tmp_path.glob("*.mp4"))
    r = cli("worldline-eval", f"eval.checkpoint={studio['run']}", f"eval.out={tmp_path / 'ev'}",
            "eval.num_clips=2", "eval.metrics=[val_loss]", "data=webdataset",
            f"data.shards={studio['root'] / 'shards' / 'val'}", "data.num_frames=9",
            "data.resolution=[32,32]",
            "data.batch_size=2", "data.num_workers=0", "logger=none")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report
    r = cli("worldline-train", *studio["run_args"], "train.steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((studio["run"] / "checkpoints" / "step_5" / "train_state.json")
                       .read_text())
    assert state["step"] == 5
