"""The main job's action-following report: does the trained world model follow its actions?

``worldline-quickstart`` ends with this on the world-model run dir. It reuses
``worldline-eval``'s metric code (:class:`~worldline.train.evaluate.FlowEvaluator`: the rollout
PSNR next to the copy-last-frame baseline, the divergence under other actions against the
seed-to-seed noise floor, and the sprite-tracked position errors of the synthetic world) on
held-out clips, and writes

* ``<run dir>/action_report.json``: the flat report (fields explained in README "The main
  job") with the targets and a pass/fail per target;
* ``<run dir>/action_contact_sheet.png``: per clip three labelled rows, ``ground truth``,
  ``rollout, true actions`` and ``rollout, other actions`` (columns are frames); the row
  labels are also in the PNG's ``rows`` text chunk (JSON), so a test can read them.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["ROW_LABELS", "TARGETS", "action_report", "build_report", "format_report",
           "labelled_contact_sheet", "write_action_report"]

ROW_LABELS = ("ground truth", "rollout, true actions", "rollout, other actions")
# The benchmark the main job is held to (issue deliverable 5). Reported, never enforced: a
# miss is printed and recorded as pass 0, the job still succeeds.
TARGETS = {"psnr_moving_gain_over_copy_last_db": 3.0,   # at least
           "position_error_ratio_true_over_other": 1 / 3,  # at most
           "ratio_to_seed_noise": 10.0}                 # at least


def _mean(xs: list[float]) -> float:
    """Mean of the finite entries (a horizon step with no moving pixel is NaN)."""
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(vals) / len(vals) if vals else float("nan")


def build_report(roll: dict[str, Any], follow: dict[str, Any]) -> dict[str, Any]:
    """The flat ``action_report.json`` fields from ``FlowEvaluator.rollout_metrics`` (per
    horizon step lists) and ``FlowEvaluator.action_following`` outputs; pure, so it is
    unit-tested without a model."""
    def f(group: dict[str, Any], key: str) -> float:
        v = group.get(key)
        return float(v) if v is not None else float("nan")

    rep: dict[str, Any] = {
        "horizon_latent_frames": len(roll["rollout/psnr"]),
        "psnr_db": _mean(roll["rollout/psnr"]),
        "copy_last_psnr_db": _mean(roll["rollout/baseline_psnr"]),
        "psnr_moving_db": _mean(roll["rollout/psnr_moving"]),
        "copy_last_psnr_moving_db": _mean(roll["rollout/baseline_psnr_moving"]),
        "psnr_by_step_db": [float(x) for x in roll["rollout/psnr"]],
        "psnr_moving_by_step_db": [float(x) for x in roll["rollout/psnr_moving"]],
    }
    rep["psnr_gain_over_copy_last_db"] = rep["psnr_db"] - rep["copy_last_psnr_db"]
    rep["psnr_moving_gain_over_copy_last_db"] = (rep["psnr_moving_db"]
                                                 - rep["copy_last_psnr_moving_db"])
    af = "action_following/"
    rep.update({
        "position_error_true_actions": f(follow, af + "position_error_true_actions"),
        "position_error_other_actions": f(follow, af + "position_error_other_actions"),
        "position_error_ground_truth": f(follow, af + "position_error_ground_truth_video"),
        "detections_true_actions": int(follow.get(af + "detections_true_actions", 0)),
        "detections_other_actions": int(follow.get(af + "detections_other_actions", 0)),
        "detections_ground_truth": int(follow.get(af + "detections_ground_truth_video", 0)),
        "divergence_other_actions": f(follow, af + "divergence_other_actions"),
        "noise_floor": f(follow, af + "divergence_other_seed"),
        "ratio_to_seed_noise": f(follow, af + "ratio_to_seed_noise"),
    })
    rep["position_error_ratio_true_over_other"] = (
        rep["position_error_true_actions"] / rep["position_error_other_actions"]
        if rep["position_error_other_actions"] > 0 else float("nan"))
    # NaN compares False: an undetectable sprite or a missing group is a failed target.
    at_least = ("psnr_moving_gain_over_copy_last_db", "ratio_to_seed_noise")
    checks = {k: rep[k] >= v if k in at_least else rep[k] <= v for k, v in TARGETS.items()}
    rep["targets"] = dict(TARGETS)
    rep.update({f"pass_{k}": int(v) for k, v in checks.items()})
    rep["pass"] = int(all(checks.values()))
    return rep


def labelled_contact_sheet(path: Path, rows: dict[str, torch.Tensor], scale: int = 2,
                           max_clips: int = 4) -> Path:
    """PNG of ``max_clips`` clips, each as one row per entry of ``rows`` (label → video
    [N, 3, T, H, W] in [-1, 1]), the label drawn left of its row; frames upscaled ``scale``x
    (nearest) so 32-64 px sprites stay visible. The labels, row by row, go into the PNG's
    ``rows`` text chunk."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    from worldline.train.media import to_uint8_frames

    frames = {k: to_uint8_frames(v) for k, v in rows.items()}  # [N, T, H, W, 3]
    n, t, h, w, _ = next(iter(frames.values())).shape
    n = min(n, max_clips)
    fh, fw, label_w, gap = h * scale, w * scale, 150, 4
    img = Image.new("RGB", (label_w + t * fw, n * (len(rows) * fh + gap)), "white")
    draw = ImageDraw.Draw(img)
    order: list[str] = []
    y = 0
    for i in range(n):
        for label, v in frames.items():
            strip = np.concatenate(list(v[i, :t]), axis=1)  # [H, T*W, 3]
            tile = Image.fromarray(strip).resize((t * fw, fh), Image.NEAREST)
            img.paste(tile, (label_w, y))
            draw.text((4, y + fh // 2 - 12), f"clip {i}", fill="black")
            draw.text((4, y + fh // 2), label, fill="black")
            order.append(label)
            y += fh
        y += gap
    info = PngInfo()
    info.add_text("rows", json.dumps(order))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, pnginfo=info)
    return path


def action_report(cfg: DictConfig, world_dir: Path, num_clips: int = 4,
                  num_steps: int = 8) -> dict[str, Any]:
    """Evaluate the world model of ``world_dir`` (its latest checkpoint, EMA weights) on
    ``num_clips`` held-out clips with ``num_steps`` sampler steps per latent frame; ``cfg``
    is the training config of that stage (its data spec picks the held-out world). Returns
    the report (also written with the contact sheet into ``world_dir``)."""
    from worldline.train.evaluate import FlowEvaluator
    from worldline.train.inference import load_for_inference

    cfg = OmegaConf.merge(cfg, {"eval": {
        "checkpoint": str(world_dir), "split": "heldout", "num_clips": num_clips,
        "num_steps": num_steps,
        # FlowEvaluator warns loudly below this, the target the report is held to.
        "action_following_threshold": TARGETS["ratio_to_seed_noise"]}})
    run = load_for_inference(cfg, str(world_dir), use_ema=True)
    ev = FlowEvaluator(run, cfg.eval)
    roll, gen_true = ev.rollout_metrics()
    follow = ev.action_following(gen_true)
    if not follow:
        raise ValueError(f"{world_dir}: the model is not action-conditioned (conditions "
                         f"{list(run.pipeline.conditions)})")
    rep = {"checkpoint": str(run.path), "data_split": run.loaders.heldout_split(),
           "num_clips": num_clips, "sampler_steps": num_steps,
           "horizon_pixel_frames": int(gen_true.shape[2]) - 1,
           **build_report(roll, follow)}
    sheet = labelled_contact_sheet(
        world_dir / "action_contact_sheet.png",
        dict(zip(ROW_LABELS, (ev.video, gen_true, ev.gen_other))))
    rep["contact_sheet"] = str(sheet)
    write_action_report(world_dir / "action_report.json", rep)
    return rep


def write_action_report(path: Path, rep: dict[str, Any]) -> None:
    """JSON with NaN written as null (NaN is not JSON)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps({k: clean(v) for k, v in rep.items()}, indent=1))


def format_report(rep: dict[str, Any]) -> str:
    """The on-screen table: each measured figure next to its copy-last baseline or control,
    and the targets with PASS/MISS."""
    def g(k: str, unit: str = "") -> str:
        v = rep.get(k)
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
            else f"{v:.3g}{unit}"

    ok = {1: "PASS", 0: "MISS"}
    t = rep["targets"]
    lines = [
        f"action following on {rep.get('num_clips')} held-out clips "
        f"({rep.get('horizon_latent_frames')}-latent-frame rollouts, "
        f"{rep.get('horizon_pixel_frames')} pixel frames):",
        f"  PSNR rollout / copy-last       {g('psnr_db')} / {g('copy_last_psnr_db')} dB"
        f"   gain {g('psnr_gain_over_copy_last_db', ' dB')}",
        f"  moving-region PSNR / copy-last {g('psnr_moving_db')} / "
        f"{g('copy_last_psnr_moving_db')} dB   gain "
        f"{g('psnr_moving_gain_over_copy_last_db', ' dB')}  (target >= "
        f"{t['psnr_moving_gain_over_copy_last_db']:g}: "
        f"{ok[rep['pass_psnr_moving_gain_over_copy_last_db']]})",
        f"  sprite position error (px)     true actions {g('position_error_true_actions')}, "
        f"other actions {g('position_error_other_actions')}, ground truth "
        f"{g('position_error_ground_truth')}   true/other "
        f"{g('position_error_ratio_true_over_other')}"
        f"  (target <= {t['position_error_ratio_true_over_other']:.3g}: "
        f"{ok[rep['pass_position_error_ratio_true_over_other']]})",
        f"  divergence other actions / seed noise floor {g('divergence_other_actions')} / "
        f"{g('noise_floor')} = {g('ratio_to_seed_noise', 'x')}  (target >= "
        f"{t['ratio_to_seed_noise']:g}x: {ok[rep['pass_ratio_to_seed_noise']]})",
    ]
    return "\n".join(lines)
