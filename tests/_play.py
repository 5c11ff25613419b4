"""A tiny trained action-conditioned world model for the ``worldline-play`` tests (~10 s).

An autoencoder run (2 steps) and a world-model run with ``stage.conditions=[text,actions]``
(4 steps) on the smoke data, then a pipeline folder of that run. Four steps teach the
zero-initialised control path almost nothing (actions change frames by ~1e-7), so the folder's
world model gets the small parameters (adaLN gates, the action embedder) perturbed, as if
trained much longer: a key must visibly change the frames after JPEG. The run dir itself is
left as trained (tests load both).

``audio=True``: the same on the synthetic world with sound (``data.synthetic.audio=true``)
with ``stage.conditions=[text,actions,audio]``: the DiT grows its audio modules (modulation)
because the stage lists audio, and their parameters are perturbed too, so the sound visibly
changes the frames."""
from __future__ import annotations

from pathlib import Path

from _runs import compose_cfg, smoke_overrides


def make_play_model(root: Path, audio: bool = False) -> dict[str, Path]:
    """Train the run under ``root`` and write ``root/play_pipeline``; returns the paths
    (``run``, ``pipeline``, ``shards``: the synthetic shard folder)."""
    import torch

    threads = torch.get_num_threads()  # the runs use 1 (run.threads); restored below
    try:
        return _make(root, audio)
    finally:
        torch.set_num_threads(threads)


def _make(root: Path, audio: bool) -> dict[str, Path]:
    import torch

    from worldline.train.main import run_training
    from worldline.train.pipeline import WorldPipeline

    data = root / "_datasets"
    # One thread: on the shared 2-core VM two ran these tiny steps several times slower.
    extra = ["run.threads=1", *(["data.synthetic.audio=true"] if audio else [])]
    conditions = "[text,actions,audio]" if audio else "[text,actions]"
    run_training(compose_cfg(smoke_overrides(root, "ae", data, "stage=autoencoder",
                                             "train.steps=2", *extra)))
    run_training(compose_cfg(smoke_overrides(
        root, "play", data, "stage=pretrain", f"stage.conditions={conditions}",
        f"stage.autoencoder_from={root / 'ae'}", "train.steps=4", "train.ckpt_every=4",
        "sample.num_steps=1", *extra)))
    pipe = WorldPipeline.from_pretrained(root / "play")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.world_model.named_parameters():
            if p.abs().max() < 0.02 or "action" in name or "audio" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pipe.save_pretrained(root / "play_pipeline")
    shards = sorted(data.glob("synthetic-*/manifest.json"))[0].parent
    return {"run": root / "play", "pipeline": root / "play_pipeline", "shards": shards,
            "root": root}


def replay_matches(doc: dict, folder: Path, mp4: Path, model: dict[str, Path]) -> None:
    """Run a recording's own ``worldline-sample`` replay command (``doc`` = its actions.json,
    ``folder`` holds actions.json + first.png) and assert it gives ``mp4``'s frames."""
    import json

    import decord
    import numpy as np

    from _runs import cli

    assert doc["replay"]["exact"]
    res = cli("worldline-sample", *doc["replay"]["args"], "experiment=smoke",
              f"run.root={model['root']}", f"data.root={model['root'] / '_datasets'}",
              f"sample.out={folder / 'out'}", cwd=folder, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    def frames(p: Path) -> np.ndarray:
        vr = decord.VideoReader(str(p))
        return vr.get_batch(list(range(len(vr)))).asnumpy()

    # Bitwise: the generated pixels (their digest; same latents, same decode). The mp4s are
    # only close: libx264 does not always encode the same frames to the same bytes.
    config = json.loads((folder / "out" / "sample_config.json").read_text())
    assert config["frames_sha256"][0] == doc["replay"]["frames_sha256"]
    mine, theirs = frames(mp4), frames(folder / "out" / "generated_0.mp4")
    assert mine.shape[1:] == (32, 32, 3) and mine.shape == theirs.shape
    assert np.abs(mine.astype(int) - theirs).mean() < 2
