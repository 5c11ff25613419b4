"""The whole workflow through the installed console scripts, on tiny CPU configs: autoencoder
→ pretrain → controllability (actions + references) → resume → LoRA fine-tune on a studio
folder → LoRA export → eval reports → rollout sampling. Every stage starts from the previous
stage's checkpoint through config alone.

The commands are the README's ("Pretrain" ... "Evaluate"), read from README.md and scaled
down with smoke overrides (experiment=smoke, few steps), so the documented commands are the
tested ones. ~3 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from _runs import cli
from worldline.train.checkpoint import list_checkpoints
from worldline.train.tracking import read_metrics

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("Pretrain", "Add control", "Fine-tune on your studio's style", "Resume", "Evaluate",
            "Real-time world model")

# Smoke scale-down per (tool, stage); these replace the README's values of the same keys.
SMOKE = ["experiment=smoke", "logger=none"]
STEPS = {"autoencoder": 20, "pretrain_progressive": 16, "controllability": 12, "finetune": 12,
         "self_forcing": 4}
EXTRA = {
    # Step up 5 -> 9 frames at step 8 (the default schedule steps up at 200).
    "pretrain_progressive": ["stage.schedule=[{step: 0, resolution: [32, 32], num_frames: 5}, "
                 "{step: 8, resolution: [32, 32], num_frames: 9}]"],
    "controllability": ["stage.freeze_policy.steps=6"],
    "self_forcing": ["stage.self_forcing.ode_init_steps=2", "stage.self_forcing.teacher_steps=4"],
    # Validate every 4 steps; with min_delta 100 nothing after the first validation counts
    # as an improvement, so patience 1 stops the run right after the step-8 validation.
    "finetune": ["stage.validation.every=4", "stage.validation.patience=1",
                 "stage.validation.min_delta=100", "stage.validation.num_batches=1",
                 "data.buckets=[{height: 32, width: 32, num_frames: 9, batch_size: 2}, "
                 "{height: 32, width: 32, num_frames: 1, batch_size: 2}]"],
}


def readme_commands() -> dict[str, list[list[str]]]:
    """Shell commands (``worldline-*``) of each tested README section, split like a shell."""
    text = README.read_text()
    out = {}
    for name in SECTIONS:
        m = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## )", text, re.S | re.M)
        assert m, f"README.md has no section '## {name}'"
        blocks = re.findall(r"```bash\n(.*?)```", m.group(1), re.S)
        cmds = [shlex.split(line) for b in blocks for line in b.splitlines()
                if line.startswith("worldline-")]
        assert cmds, f"README section {name!r} has no worldline- command"
        out[name] = cmds
    return out


def scaled(cmd: list[str], extra: list[str]) -> list[str]:
    """``cmd`` with the smoke overrides; an override replaces the README's value of its key."""
    args = list(cmd[1:])
    stage = next((a.split("=", 1)[1] for a in args if a.startswith("stage=")), None)
    if cmd[0] == "worldline-train":
        extra = [f"train.steps={STEPS[stage]}", *EXTRA.get(stage, []), *extra]
    last = {e.split("=", 1)[0]: e for e in extra}  # the caller's extra wins
    return [a for a in args if a.split("=", 1)[0] not in last] + list(last.values())


def run(cwd: Path, cmd: list[str], extra: list[str], timeout: int = 400):
    r = cli(cmd[0], *scaled(cmd, extra), cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def write_studio_folder(folder: Path, seed: int, n: int) -> None:
    """A studio's folder: clips (mp4 + caption), stills (png + caption) and a mood board."""
    from PIL import Image

    from worldline.data.synthetic import SyntheticWorldConfig, render_clip
    from worldline.data.video import encode_mp4

    cfg = SyntheticWorldConfig(num_clips=n, num_frames=9, height=32, width=32, seed=seed)
    (folder / "moodboard").mkdir(parents=True)
    for i in range(n):
        clip = render_clip(cfg, i)
        if i % 3 == 2:  # every third sample is a still
            Image.fromarray(clip["frames"][0]).save(folder / f"still_{i:02d}.png")
            (folder / f"still_{i:02d}.txt").write_text(clip["caption"])
        else:
            (folder / f"shot_{i:02d}.mp4").write_bytes(encode_mp4(clip["frames"], cfg.fps))
            (folder / f"shot_{i:02d}.txt").write_text(clip["caption"])
    Image.fromarray(render_clip(cfg, n)["frames"][4]).save(folder / "moodboard" / "look.png")


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("workflow")
    cmds = readme_commands()
    for cmd in cmds["Pretrain"]:
        run(cwd, cmd, SMOKE)
    for cmd in cmds["Add control"]:
        run(cwd, cmd, SMOKE)
    for cmd in cmds["Resume"]:
        run(cwd, cmd, SMOKE + ["train.steps=16"])
    write_studio_folder(cwd / "studio", seed=7, n=12)
    # Prior preservation mixes in the shards the world model was pretrained on.
    pre = sorted((cwd / "runs" / "_datasets").glob("synthetic-*/manifest.json"))[0].parent
    (cwd / "runs" / "_datasets" / "pretrain-shards").symlink_to(pre)
    for cmd in cmds["Fine-tune on your studio's style"]:
        run(cwd, cmd, SMOKE if cmd[0] == "worldline-train" else [])
    for cmd in cmds["Evaluate"]:
        extra = ["experiment=smoke"]
        if cmd[0] == "worldline-eval":
            extra += ["eval.num_batches=2", "eval.num_clips=2", "eval.num_steps=3"]
        else:
            extra += ["sample.num_steps=3", "sample.rollout_frames=1"]
        run(cwd, cmd, extra)
    for cmd in cmds["Real-time world model"]:  # distil runs/control, roll out past its window
        run(cwd, cmd, SMOKE if cmd[0] == "worldline-train" else
            ["experiment=smoke", "sample.rollout_frames=2", "sample.window=1"])
    return cwd / "runs"


def test_pretrain_steps_up_resolution_schedule(workflow: Path) -> None:
    rows = [r for r in read_metrics(workflow / "world") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 16]
    # 5 frames -> 2 latent frames x 2 x 2 tokens = 8; 9 frames -> 3 x 2 x 2 = 12 tokens.
    per_sample = [r["tokens_per_s"] / r["samples_per_s"] for r in rows]
    assert per_sample[0] == pytest.approx(8) and per_sample[-1] == pytest.approx(12)
    assert {"task_frac/t2v", "task_frac/i2v", "task_frac/continuation"} <= set(rows[0])
    assert (workflow / "world" / "samples" / "step_16" / "image_to_video_0.mp4").is_file()


def test_controllability_grows_and_resumes(workflow: Path) -> None:
    run_dir = workflow / "control"
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == 16
    from worldline.train.weights import saved_param_names

    ctl = saved_param_names(run_dir / "checkpoints" / "step_16")
    pre = saved_param_names(workflow / "world" / "checkpoints" / "step_16")
    new = ctl - pre
    assert "dit.ref_embed" in new and "dit.cond_embed.action_emb.weight" in new
    assert "dit.cond_embed.camera_in.weight" in new and pre <= ctl
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [5, 10, 12, 15, 16]  # 12 steps, then resumed to 16


def test_studio_shards_hold_stills_refs_and_trigger(workflow: Path) -> None:
    import tarfile

    train = json.loads((workflow / "_datasets" / "studio" / "train" / "manifest.json").read_text())
    val = json.loads((workflow / "_datasets" / "studio" / "val" / "manifest.json").read_text())
    assert train["num_samples"] + val["num_samples"] == 12 and val["num_samples"] >= 1
    assert not train["skipped"] and not val["skipped"]
    frames = sorted({s["num_frames"] for s in train["samples"]})
    assert frames == [1, 9]  # stills became 1-frame videos
    with tarfile.open(workflow / "_datasets" / "studio" / "train" / train["shards"][0]) as tar:
        names = tar.getnames()
        txt = [tar.extractfile(n).read().decode() for n in names if n.endswith(".txt")]
    assert any(n.endswith(".ref0.png") for n in names)  # the mood board, on every sample
    assert txt and all(t.startswith("wl-studio style, ") for t in txt)


def test_lora_finetune_stops_early_and_exports(workflow: Path, monkeypatch) -> None:
    run_dir = workflow / "studio"
    stop = json.loads((run_dir / "early_stopping.json").read_text())
    assert stop == {"stopped_at_step": 9, "best_step": 4,
                    "best_val_loss": stop["best_val_loss"], "patience": 1}
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == 9
    vals = [r for r in read_metrics(run_dir) if "val/val_loss" in r]
    assert [r["step"] for r in vals] == [4, 8, 9]  # 9: the last step is validated too
    export = run_dir / "export"
    import torch
    from safetensors.torch import load_file

    adapter = load_file(str(export / "adapter_model.safetensors"))
    assert adapter and all(k.startswith("base_model.model.blocks.") and
                           ("lora_A" in k or "lora_B" in k) for k in adapter)
    conf = json.loads((export / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["peft_type"] == "LORA"
    assert Path(conf["base_model_name_or_path"]) == (export / "base").resolve()
    merged = load_file(str(export / "merged" / "transformer" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    assert "blocks.0.attn.qkv.weight" in merged

    # The README's Python lines of this section, exactly, from the README's working dir.
    section = re.search(r"^## Fine-tune on your studio's style\n(.*?)(?=^## )",
                        README.read_text(), re.S | re.M).group(1)
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(workflow.parent)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    from worldline.train.pipeline import WorldPipeline

    merged_dit = WorldPipeline.from_pretrained(export / "merged").transformer
    base_dit = WorldPipeline.from_pretrained(export / "base").transformer
    a = merged_dit.args
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, a.in_channels + int(a.mask_channel), 2, 4, 4, generator=g),
         torch.rand(1, generator=g), torch.randn(1, 3, a.text_dim, generator=g), None)
    with torch.no_grad():
        y_peft, y_pipe = scope["dit"](*x), scope["pipe"].transformer(*x)
        y_merged, y_base = merged_dit(*x), base_dit(*x)
    assert (y_peft - y_merged).abs().max() <= 1e-5 and (y_pipe - y_merged).abs().max() <= 1e-5
    assert (y_peft - y_base).abs().max() > 0  # the trained adapter changes the output


def test_eval_reports_every_metric(workflow: Path) -> None:
    out = workflow / "control" / "eval" / "step_16"
    rep = json.loads((out / "report.json").read_text())
    assert rep["step"] == 16 and rep["val_loss"] > 0
    for k in ("reconstruction/psnr", "reconstruction/ssim", "reference/similarity_with_ref",
              "action_following/divergence_other_actions",
              "action_following/position_error_ground_truth_video"):
        assert k in rep, k
    assert len(rep["rollout/psnr"]) == len(rep["rollout/baseline_psnr"]) == 2  # 3 latent frames
    assert len(rep["rollout/psnr_moving"]) == len(rep["rollout/baseline_psnr_moving"]) == 2
    assert rep["reconstruction/psnr_moving"] < rep["reconstruction/psnr"]
    # References: against no reference and another clip's, with the seed noise floor.
    assert rep["reference/noise_floor"] >= 0 and rep["reference/pass"] in (0.0, 1.0)
    assert rep["reference/gain_over_other_ref"] == pytest.approx(
        rep["reference/similarity_with_ref"] - rep["reference/similarity_other_ref"], abs=1e-6)
    # The same on the subject's region (the sprite boxes the synthetic world drew).
    assert rep["reference/subject_noise_floor"] >= 0 and rep["reference/subject_pass"] in (0.0, 1.0)
    assert 0 <= rep["reference/subject_similarity_with_ref"] <= 1 + 1e-6
    assert rep["reference/subject_feature"] == "colour_histogram on sprite boxes"
    # Text: the caption against an empty prompt and a shuffled caption, same noise floor.
    assert rep["text/noise_floor"] >= 0 and rep["text/pass"] in (0.0, 1.0)
    assert rep["text/gain_over_no_text"] == pytest.approx(
        rep["text/similarity_with_text"] - rep["text/similarity_without_text"], abs=1e-6)
    # The colour detector finds the sprites in the real clips to within a few pixels.
    assert rep["action_following/position_error_ground_truth_video"] < 3
    assert rep["data_split"] == "heldout"
    assert rep["action_following/pass"] in (0.0, 1.0) and rep["action_following/threshold"] == 1.0
    assert rep["action_following/ratio_to_seed_noise"] == pytest.approx(
        rep["action_following/divergence_other_actions"]
        / rep["action_following/divergence_other_seed"], rel=1e-6)
    for f in ("report.md", "rollout_psnr.png", "rollout_ssim.png", "videos/contact_sheet.png"):
        assert (out / f).is_file(), f
    assert (out / "rollout_psnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    # An export folder's report lands next to it: <run>/eval/<folder name>/.
    merged = workflow / "studio" / "eval" / "merged" / "report.json"
    assert json.loads(merged.read_text())["val_loss"] > 0


def test_action_following_fails_for_a_model_blind_to_its_actions(workflow: Path) -> None:
    """The same trained model with its action embedding zeroed (it computes exactly what it
    would without actions): rollouts under other actions are identical, so the metric fails
    it; the trained model's own divergence is above zero."""
    import torch

    from _runs import compose_cfg
    from worldline.train.evaluate import FlowEvaluator
    from worldline.train.inference import load_for_inference

    cfg = compose_cfg([*SMOKE, f"run.root={workflow}", "eval.num_clips=2", "eval.num_steps=2"])
    run = load_for_inference(cfg, str(workflow / "control"), use_ema=True)
    ev = FlowEvaluator(run, run.cfg.eval)
    gen = ev.rollout_video(None, seed=0)
    live = ev.action_following(gen)
    assert live["action_following/divergence_other_actions"] > 0
    with torch.no_grad():
        for name, p in run.pipeline.transformer.named_parameters():
            if "action" in name:
                p.zero_()
    blind = ev.action_following(ev.rollout_video(None, seed=0))
    assert blind["action_following/divergence_other_actions"] == 0.0
    assert blind["action_following/pass"] == 0.0 and blind["action_following/divergence_other_seed"] > 0


def test_self_forcing_student_trains_and_rolls_out(workflow: Path) -> None:
    rows = [r for r in read_metrics(workflow / "realtime") if "loss" in r]
    assert rows and rows[-1]["step"] == 4 and rows[-1]["fake_loss"] > 0
    assert list((workflow / "realtime" / "samples" / "manual").glob("*.mp4"))


def test_rollout_sample_writes_video(workflow: Path) -> None:
    out = workflow / "control" / "samples" / "manual"
    assert (out / "generated_0.mp4").is_file() and (out / "contact_sheet.png").is_file()
    assert json.loads((out / "sample_config.json").read_text())["mode"] == "rollout"


@pytest.mark.dist
def test_eval_spreads_over_ranks(workflow: Path, tmp_path: Path) -> None:
    """torchrun x 2 (gloo): each rank evaluates its own shards; rank 0 writes the averaged
    report, with FVD over the features gathered from both ranks (a user TorchScript file)."""
    import subprocess
    import sys

    # TorchScript needs the module's source file: write it, script it in a subprocess.
    script = tmp_path / "pool.py"
    script.write_text(
        "import torch\n"
        "class Pool(torch.nn.Module):\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)\n"
        f"torch.jit.script(Pool()).save({str(tmp_path / 'i3d.pt')!r})\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    out = tmp_path / "eval"
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--no-python", "worldline-eval",
         f"eval.checkpoint={workflow / 'control'}", "experiment=smoke", "dist=ddp",
         f"run.root={workflow}", "logger=none", "eval.num_batches=1", "eval.num_clips=2",
         "eval.num_steps=2", f"eval.i3d={tmp_path / 'i3d.pt'}", f"eval.out={out}"],
        cwd=workflow.parent, capture_output=True, text=True, timeout=400,
        env={**os.environ, "PATH": f"{torchrun.parent}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["num_ranks"] == 2 and rep["fvd/num_videos"] == 4 and rep["fvd"] >= 0
    assert rep["val_loss"] > 0 and len(rep["rollout/psnr"]) == 2


def test_sample_from_first_image_references_and_action_file(workflow: Path,
                                                            tmp_path: Path) -> None:
    """Full-clip sampling with every input given by the user: the first image is kept (its
    latent is the clean prefix), references and a per-frame action/camera file condition the
    rest; Heun steps with separate text and action guidance."""
    import decord
    import numpy as np
    from PIL import Image

    from worldline.data.synthetic import SyntheticWorldConfig, render_clip

    clip = render_clip(SyntheticWorldConfig(num_frames=9, height=32, width=32, seed=3), 0)
    Image.fromarray(clip["frames"][0]).save(tmp_path / "first.png")
    Image.fromarray(clip["frames"][8]).save(tmp_path / "ref.png")
    (tmp_path / "actions.json").write_text(json.dumps(
        {"actions": clip["actions"].tolist(), "camera": [[1.0, 0.0]] * 9}))
    out = tmp_path / "out"
    r = cli("worldline-sample", f"sample.checkpoint={workflow / 'control'}", "experiment=smoke",
            f"run.root={workflow}", f"sample.out={out}", "sample.prompts=[a red circle]",
            f"sample.first_image={tmp_path / 'first.png'}", f"sample.refs=[{tmp_path / 'ref.png'}]",
            f"sample.actions={tmp_path / 'actions.json'}", "sample.solver=heun",
            "sample.num_steps=2", "sample.cfg_scale=2.0", "sample.action_cfg_scale=1.5",
            timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    frames = decord.VideoReader(str(out / "generated_0.mp4"))
    video = frames.get_batch(list(range(len(frames)))).asnumpy()
    assert video.shape == (9, 32, 32, 3)
    # Frame 0 is the given image: the clean prefix, decoded by the checkpoint's autoencoder,
    # whatever the sampler does with the other frames (checked before the lossy mp4 step).
    import torch

    from _runs import compose_cfg
    from worldline.train.inference import load_for_inference, probe_batch
    from worldline.train.sampling import load_image

    run = load_for_inference(compose_cfg(["experiment=smoke", f"run.root={workflow}",
                                          "logger=none"]), str(workflow / "control"), True)
    pipe = run.pipeline
    img = load_image(tmp_path / "first.png", (32, 32))
    assert np.array_equal(img.permute(1, 2, 0).numpy(), clip["frames"][0])
    with torch.no_grad():
        z = pipe.encode_images(img[None])[:, :, None]
        alone = pipe.decode(z)
        gen = pipe.generate(["a red circle"], batch=probe_batch(run, 1), seed=0, num_steps=2,
                            cfg_scale=2.0, prefix=z, solver="heun", action_cfg_scale=1.5)
    assert gen.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(gen[:, :, 0], alone[:, :, 0], rtol=0, atol=1e-5)
    assert (gen[:, :, 1:] - alone[:, :, :1]).abs().mean() > 1e-3  # later frames are generated
    bad = cli("worldline-sample", f"sample.checkpoint={workflow / 'world'}", "experiment=smoke",
              f"run.root={workflow}", f"sample.refs=[{tmp_path / 'ref.png'}]", timeout=300)
    assert bad.returncode == 2 and "sample.refs" in bad.stderr  # pretrain has no references


def test_readme_python_lines_roll_out_a_trained_run(workflow: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    """The README's Python lines ("Use a trained model in Python"), exactly, on the trained
    control run: WorldPipeline.from_pretrained + a KV-cached rollout under actions."""
    import torch

    text = README.read_text()
    m = re.search(r"^## Use a trained model in Python\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no section '## Use a trained model in Python'"
    code = re.findall(r"```python\n(.*?)```", m.group(1), re.S)[0]
    assert len(code.strip().splitlines()) <= 6
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(workflow)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    video = scope["video"]
    assert video.shape == (1, 3, 17, 32, 32) and torch.isfinite(video).all()
    assert (tmp_path / "rollout.mp4").stat().st_size > 0
    # The actions reach the model: the same call is bitwise repeatable (noise floor 0), another
    # action sequence is not. (Only 12 steps after zero-initialised control outputs, the
    # effect is small: ~4e-6 mean absolute difference here.)
    pipe = scope["pipe"]
    again = pipe.rollout(["a red circle in a meadow"], num_frames=4, actions=scope["actions"])
    other = pipe.rollout(["a red circle in a meadow"], num_frames=4,
                         actions=(scope["actions"] + 1) % 5)
    assert torch.equal(again, video)
    assert not torch.equal(other, video)
