"""The main job's action-following report (train/action_report.py) without a model: the
fields and verdicts built from FlowEvaluator outputs, the JSON, the labelled contact sheet."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from worldline.train.action_report import (
    ROW_LABELS,
    build_report,
    format_report,
    labelled_contact_sheet,
    write_action_report,
)

ROLL = {"rollout/psnr": [24.0, 22.0], "rollout/baseline_psnr": [21.0, 19.0],
        "rollout/psnr_moving": [20.0, float("nan")], "rollout/baseline_psnr_moving": [15.0, 14.0],
        "rollout/ssim": [0.9, 0.8], "rollout/baseline_ssim": [0.8, 0.7]}


def follow(true_err: float, other_err: float, ratio: float) -> dict[str, float]:
    af = "action_following/"
    return {af + "divergence_other_actions": ratio * 0.01, af + "divergence_other_seed": 0.01,
            af + "ratio_to_seed_noise": ratio, af + "position_error_true_actions": true_err,
            af + "position_error_other_actions": other_err,
            af + "position_error_ground_truth_video": 0.5, af + "detections_true_actions": 10,
            af + "detections_other_actions": 9, af + "detections_ground_truth_video": 12}


def test_a_model_that_follows_its_actions_passes() -> None:
    rep = build_report(ROLL, follow(true_err=2.0, other_err=9.0, ratio=25.0))
    assert rep["psnr_gain_over_copy_last_db"] == 3.0  # (24+22)/2 - (21+19)/2
    # A horizon step without moving pixels (NaN) is left out of the moving-region mean.
    assert rep["psnr_moving_db"] == 20.0 and rep["copy_last_psnr_moving_db"] == 14.5
    assert rep["psnr_moving_gain_over_copy_last_db"] == 5.5
    assert rep["position_error_ratio_true_over_other"] == 2.0 / 9.0
    assert rep["pass"] == 1 and rep["horizon_latent_frames"] == 2
    assert "PASS" in format_report(rep) and "MISS" not in format_report(rep)


def test_each_target_can_fail() -> None:
    rep = build_report(ROLL, follow(true_err=4.0, other_err=9.0, ratio=5.0))
    assert rep["pass_position_error_ratio_true_over_other"] == 0  # 4/9 > 1/3
    assert rep["pass_ratio_to_seed_noise"] == 0 and rep["pass"] == 0
    flat = dict(ROLL, **{"rollout/psnr_moving": [15.0, 15.0]})
    rep = build_report(flat, follow(1.0, 9.0, 50.0))
    assert rep["pass_psnr_moving_gain_over_copy_last_db"] == 0 and rep["pass"] == 0


def test_an_undetected_sprite_fails_and_is_null_in_json(tmp_path: Path) -> None:
    """A rollout in which no sprite is found has no position error: NaN → fail, null in JSON."""
    rep = build_report(ROLL, follow(float("nan"), float("nan"), 50.0))
    assert math.isnan(rep["position_error_ratio_true_over_other"])
    assert rep["pass_position_error_ratio_true_over_other"] == 0 and rep["pass"] == 0
    write_action_report(tmp_path / "r.json", rep)
    back = json.loads((tmp_path / "r.json").read_text())  # strict JSON: no NaN tokens
    assert back["position_error_true_actions"] is None and back["noise_floor"] == 0.01
    assert "n/a" in format_report(rep)


def test_contact_sheet_has_three_labelled_rows_per_clip(tmp_path: Path) -> None:
    videos = [torch.rand(3, 3, 5, 8, 8) * 2 - 1 for _ in ROW_LABELS]
    path = labelled_contact_sheet(tmp_path / "s.png", dict(zip(ROW_LABELS, videos)), scale=2,
                                  max_clips=2)
    img = Image.open(path)
    assert json.loads(img.text["rows"]) == list(ROW_LABELS) * 2
    assert img.height == 2 * (3 * 16 + 4) and img.width > 5 * 16
    # The label column carries drawn (dark) text, not just the white background.
    label_col = torch.tensor(list(img.crop((0, 0, 150, 16)).convert("L").getdata()))
    assert (label_col < 128).any()
