"""Few-step student vs its teacher on held-out clips of the synthetic world (CPU or GPU).

Each model continues the first frame of held-out clips (a differently seeded world than the
one trained on) under the clips' own actions and camera, KV-cached frame by frame
(``WorldPipeline.rollout``), and is scored by PSNR of the decoded frames after the first
against the real ones: the teacher at ``--teacher-steps`` (16) and at the student's step
count, the self-forcing student at ``--student-steps`` (4). The target of stage=self_forcing:
the student within 0.5 dB of the 16-step teacher and above the teacher at 4 steps. Also
reports the rollout's seconds per latent frame.

    python -m worldline.scripts.bench_self_forcing --teacher runs/control --student runs/realtime
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def _world(run: Path, seed_offset: int) -> Any:
    """The run's synthetic-world settings, reseeded: clips it never trained on."""
    from omegaconf import OmegaConf

    run_dir = run if (run / "config.yaml").is_file() else run.parent.parent
    cfg = OmegaConf.load(run_dir / "config.yaml")
    world = OmegaConf.to_container(cfg.data.synthetic, resolve=True)
    world["seed"] = int(world.get("seed", 0)) + seed_offset
    return world, (int(cfg.data.num_frames), tuple(cfg.data.resolution))


def score(pipe: Any, clips: dict[str, Any], latent_frames: int, steps: int, seed: int,
          window: int | None, sink: int) -> dict[str, float]:
    """Mean PSNR (dB) of the rollout's frames after the first against the real clip, and
    seconds per generated latent frame."""
    from worldline.models.metrics import psnr

    video = clips["video"].to(pipe.device)
    t0 = time.perf_counter()
    out = pipe.rollout(list(clips["caption"]), latent_frames - 1, first_frame=video[:, :, 0],
                       actions=clips["actions"], camera=clips["camera"], num_steps=steps,
                       seed=seed, window=window, sink_frames=sink)
    dt = time.perf_counter() - t0
    t = min(out.shape[2], video.shape[2])
    return {"psnr": float(psnr(out[:, :, 1:t], video[:, :, 1:t]).mean()),
            "s_per_frame": dt / (latent_frames - 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the stage.init_from run (or checkpoint)")
    p.add_argument("--student", required=True, help="the stage=self_forcing run")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--latent-frames", type=int, default=None,
                   help="frames per rollout incl. the first (default: the training clip's)")
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2, help="noise seeds averaged per model")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    from worldline.data.synthetic import HELDOUT_SEED_OFFSET
    from worldline.train.inverse_dynamics import synthetic_clips
    from worldline.train.pipeline import WorldPipeline

    torch.manual_seed(0)
    world, (frames, res) = _world(Path(a.teacher), HELDOUT_SEED_OFFSET)
    teacher = WorldPipeline.from_pretrained(a.teacher)
    student = WorldPipeline.from_pretrained(a.student)
    tf = teacher.transformer.args.temporal_downsample
    n_lat = a.latent_frames or (1 + (frames - 1) // tf)
    clips = synthetic_clips(world, range(a.clips), 1 + (n_lat - 1) * tf, res)
    runs = {f"teacher@{a.teacher_steps}": (teacher, a.teacher_steps),
            f"teacher@{a.student_steps}": (teacher, a.student_steps),
            f"student@{a.student_steps}": (student, a.student_steps)}
    out: dict[str, Any] = {"clips": a.clips, "latent_frames": n_lat, "seeds": a.seeds}
    with torch.no_grad():
        for name, (pipe, steps) in runs.items():
            rows = [score(pipe, clips, n_lat, steps, s, a.window, a.sink)
                    for s in range(a.seeds)]
            out[name] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    s, t_hi, t_lo = (out[f"student@{a.student_steps}"]["psnr"],
                     out[f"teacher@{a.teacher_steps}"]["psnr"],
                     out[f"teacher@{a.student_steps}"]["psnr"])
    out["student_minus_teacher_db"] = s - t_hi
    out["target_met"] = bool(s >= t_hi - 0.5 and s > t_lo)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
