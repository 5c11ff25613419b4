"""``worldline-eval``: every metric of a checkpoint (any backend, any world size, or an export
folder) on an eval data spec, written as ``report.json``, ``report.md`` and PNG plots into
``<run>/eval/step_<N>/`` (or ``eval.out``) and logged to W&B (offline by default).

Flow checkpoints (``eval.metrics`` picks the groups):

* ``val_loss``: flow-matching loss at fixed timesteps with fixed noise (deterministic).
* ``reconstruction``: the frozen autoencoder's PSNR/SSIM on the eval clips, and PSNR on the
  pixels that move (``psnr_moving``: whole-frame PSNR hides erased small moving objects).
* ``rollout``: world-model rollout from the first frame (KV-cached, block-causal models; else
  image-to-video sampling) with the clips' own actions/camera; PSNR/SSIM per horizon step
  (latent frame) against ground truth, next to the copy-last-frame baseline; both also on
  the moving pixels (``psnr_moving``, ``baseline_psnr_moving``).
* ``action_following``: the same rollout under another clip's actions must differ (mean
  absolute pixel difference, next to the difference two noise seeds make: the noise floor);
  ``ratio_to_seed_noise`` ≥ ``eval.action_following_threshold`` passes (``pass`` 1/0), a
  failure is warned about loudly; on the synthetic
  world, sprite positions found by colour in the generated frames are compared with where
  the actions put them (error with the true actions vs with other actions, and the detector's
  own error on the ground-truth video).
* ``reference``: similarity of generated frames to the reference image with it, without it
  and with another clip's reference as the condition (a local TorchScript feature
  extractor, or a built-in colour histogram); the seed-to-seed noise floor of that
  similarity; ``pass`` when both gains exceed 3x the noise floor. On the synthetic world the
  same again on the subject's region (``reference/subject_*``, train/subject_region.py).
* ``text``: the same paired measurement for the caption: similarity of samples to the clip
  their caption describes, with the caption, with an empty prompt and with another clip's
  caption (shuffled), the seed-to-seed noise floor, ``pass`` at 3x the floor.
* ``av_sync``: when the clips carry ``audio`` / ``audio_mask``, whether the rollout moves in
  sync with the audio (``av_sync/*``, models/av_sync.py) next to the same score of the real
  clips (``av_sync_real/*``); without audio, ``av_sync/skipped`` says so.
* FVD, only when ``eval.i3d`` names local I3D TorchScript weights.
* ``long_horizon/*``, only when ``eval.long_horizon.frames`` > 0: long rollouts with both
  copy-last baselines, drift and action accuracy by inverse dynamics (train/long_horizon.py).

Metrics use held-out clips by default (``eval.split``; ``report.json`` ``data_split``).
Autoencoder checkpoints report reconstruction PSNR/SSIM.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from worldline.models.av_sync import av_sync_metrics
from worldline.models.metrics import moving_mask, psnr, ssim
from worldline.train.dist import all_reduce_scalars
from worldline.train.pipeline import to_unit_range
from worldline.train.plots import line_plot
from worldline.train.subject_region import masked_colour_histogram, subject_region_steering

log = logging.getLogger(__name__)

__all__ = ["run_eval", "FlowEvaluator", "colour_histogram", "frechet_distance"]


def colour_histogram(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Built-in appearance statistic: joint RGB histogram, L2-normalised.
    images [N, 3, H, W] in [-1, 1] → [N, bins³]."""
    return masked_colour_histogram(images, None, bins)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a [N, D] and b [M, D]:
    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    tr((S1 S2)^1/2) is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (same spectrum as S1 S2); two float64 eigh calls in torch instead of
    scipy.linalg.sqrtm, which is not a Worldline dependency."""
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    mu1, mu2 = a64.mean(0), b64.mean(0)
    s1, s2 = torch.atleast_2d(torch.cov(a64.T)), torch.atleast_2d(torch.cov(b64.T))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    tr_sqrt = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def eval_data(run: Any, min_clips: int) -> Any:
    """``data`` of the clips ``eval.split`` names (see ``EvalConfig.split``): the data spec,
    or with the held-out overrides applied (e.g. the held-out synthetic world's seed)."""
    if str(run.cfg.eval.split) != "heldout":
        return run.cfg.data
    return OmegaConf.merge(run.cfg.data, run.loaders.heldout_data(min_clips))


def eval_loader(run: Any, min_clips: int) -> Any:
    """The clips ``eval.split`` names, in fixed order."""
    if str(run.cfg.eval.split) == "heldout":
        return run.loaders.heldout(min_clips)
    return run.loaders.make(shuffle=False)


class FlowEvaluator:
    """Generative metrics of a loaded world model on the first ``eval.num_clips`` clips."""

    def __init__(self, run: Any, ecfg: Any) -> None:
        self.run, self.e = run, ecfg
        self.pipe = run.pipeline
        self.device = self.pipe.device
        self.batch = self._clips(ecfg.num_clips)
        self.data = eval_data(run, ecfg.num_clips)  # the world the clips come from
        self.x0 = self.pipe.latents(self.batch)
        self.video = to_unit_range(self.batch["video"])

    def _clips(self, n: int) -> Any:
        from worldline.train.inference import first_clips

        return first_clips(eval_loader(self.run, n), n, self.device)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def rollout_video(self, actions: Optional[torch.Tensor], seed: int) -> torch.Tensor:
        """Videos [N, 3, T, H, W] continuing each clip's first frame under ``actions``."""
        pipe, dit = self.pipe, self.pipe.transformer
        batch = {**self.batch}
        if actions is not None:
            batch["actions"] = actions
        prompts = list(batch["caption"])
        ctx = self.x0[:, :, :1]
        n_new = self.x0.shape[2] - 1
        if dit.args.frame_causal and dit.args.patch_size[0] == 1 and n_new > 0:
            return pipe.rollout(prompts, n_new, context=ctx, num_steps=self.e.num_steps,
                                seed=seed, batch=batch)
        return pipe.generate(prompts, prefix=ctx, seed=seed, num_steps=self.e.num_steps,
                             latent_shape=tuple(self.x0.shape[1:]), batch=batch)

    # --------------------------------------------------------------------- metrics
    @torch.no_grad()
    def reconstruction(self) -> dict[str, float]:
        recon = self.pipe.decode(self.x0)
        return {"reconstruction/psnr": float(psnr(recon, self.video).mean()),
                "reconstruction/psnr_moving": float(
                    psnr(recon, self.video, mask=moving_mask(self.video)).nanmean()),
                "reconstruction/ssim": float(ssim(recon, self.video).mean())}

    def _horizon_groups(self) -> list[list[int]]:
        """Pixel frames of each generated latent frame (horizon step 1, 2, ...)."""
        tf = self.pipe.transformer.args.temporal_downsample
        n_lat = self.x0.shape[2]
        return [list(range(1 + (k - 1) * tf, 1 + k * tf)) for k in range(1, n_lat)]

    @torch.no_grad()
    def rollout_metrics(self) -> tuple[dict[str, Any], torch.Tensor]:
        gen = self.rollout_video(None, seed=0)
        gt = self.video
        copy = gt[:, :, :1].expand_as(gt)
        moving = moving_mask(gt)
        out: dict[str, Any] = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": [],
                               "psnr_moving": [], "baseline_psnr_moving": []}
        for frames in self._horizon_groups():
            g, c, y, m = gen[:, :, frames], copy[:, :, frames], gt[:, :, frames], moving[:, :, frames]
            out["psnr"].append(float(psnr(g, y).mean()))
            out["ssim"].append(float(ssim(g, y).mean()))
            out["baseline_psnr"].append(float(psnr(c, y).mean()))
            out["baseline_ssim"].append(float(ssim(c, y).mean()))
            out["psnr_moving"].append(float(psnr(g, y, mask=m).nanmean()))
            out["baseline_psnr_moving"].append(float(psnr(c, y, mask=m).nanmean()))
        return {f"rollout/{k}": v for k, v in out.items()}, gen

    @torch.no_grad()
    def action_following(self, gen_true: torch.Tensor) -> dict[str, float]:
        acts = self.batch.get("actions")
        if "actions" not in self.pipe.conditions or acts is None or acts.shape[-1] == 0:
            return {}
        n = acts.shape[0]
        other = acts.roll(1, 0) if n > 1 else (acts + 1) % self.pipe.transformer.args.num_actions
        gen_other = self.rollout_video(other, seed=0)
        self.gen_other = gen_other  # kept for the action report's contact sheet
        gen_seed = self.rollout_video(None, seed=1)
        other_actions = float((gen_true - gen_other).abs().mean())
        noise = float((gen_true - gen_seed).abs().mean())  # the seed-to-seed noise floor
        ratio = other_actions / max(noise, 1e-12)
        threshold = float(self.e.action_following_threshold)
        rep = {"action_following/divergence_other_actions": other_actions,
               "action_following/divergence_other_seed": noise,
               "action_following/ratio_to_seed_noise": ratio,
               "action_following/threshold": threshold,
               "action_following/pass": float(ratio >= threshold)}
        if ratio < threshold:
            log.warning("ACTION FOLLOWING FAILS: rollouts under other actions differ %.3gx as "
                        "much as under another noise seed (threshold %.3g): the model barely "
                        "responds to its actions (indistinguishable from one without them)",
                        ratio, threshold)
        if self.data.kind == "synthetic":
            rep.update(self._sprite_tracking(gen_true, gen_other))
        return rep

    def _sprite_tracking(self, gen_true: torch.Tensor, gen_other: torch.Tensor) -> dict[str, float]:
        """Mean distance (pixels) between each sprite's colour centroid in a video and where
        the synthetic world put it, over generated frames where the sprite is in view."""
        from worldline.data.synthetic import (
            COLOURS,
            SyntheticWorldConfig,
            _sprite_size,
            render_clip,
        )

        d = self.data
        syn = SyntheticWorldConfig(**{k: d.synthetic[k] for k in d.synthetic})
        sy, sx = d.resolution[0] / syn.height, d.resolution[1] / syn.width
        half = _sprite_size(syn) / 2
        errs: dict[str, list[float]] = {"true_actions": [], "other_actions": [],
                                        "ground_truth_video": []}
        videos = {"true_actions": gen_true, "other_actions": gen_other,
                  "ground_truth_video": self.video}
        for i, key in enumerate(self.batch["key"]):
            clip = render_clip(syn, int(key))
            cam = clip["camera"]
            for s in clip["sprites"]:
                colour = torch.tensor(COLOURS[s["colour"]], dtype=torch.float32,
                                      device=self.device) / 127.5 - 1
                for t in range(1, self.video.shape[2]):
                    ex = (s["positions"][t][0] - cam[t][0] + half) * sx
                    ey = (s["positions"][t][1] - cam[t][1] + half) * sy
                    if not (0 <= ex < d.resolution[1] and 0 <= ey < d.resolution[0]):
                        continue
                    for name, v in videos.items():
                        frame = v[i, :, t]  # [3, H, W]
                        close = (frame - colour[:, None, None]).abs().amax(0) < 0.25
                        if close.sum() < 2:
                            continue
                        yy, xx = torch.nonzero(close, as_tuple=True)
                        cx, cy = xx.float().mean().item() + 0.5, yy.float().mean().item() + 0.5
                        errs[name].append(math.hypot(cx - ex, cy - ey))
        return {f"action_following/position_error_{k}": (sum(v) / len(v) if v else float("nan"))
                for k, v in errs.items()} | {
            f"action_following/detections_{k}": len(v) for k, v in errs.items()}

    @torch.no_grad()
    def reference_consistency(self) -> dict[str, Any]:
        pipe = self.pipe
        if "refs" not in pipe.conditions:
            return {}
        # The reference is the clip's last frame (a view of the same subject the model must
        # carry into a text-only generation).
        ref_px = self.video[:, :, -1]
        refs = pipe.encode_images(self.batch["video"][:, :, -1])[:, None]
        prompts = list(self.batch["caption"])
        kw = dict(seed=0, num_steps=self.e.num_steps, latent_shape=tuple(self.x0.shape[1:]),
                  batch=self.batch)
        with_r = pipe.generate(prompts, refs=refs, **kw)
        without = pipe.generate(prompts, **kw)
        # Controls: another clip's reference (does it carry *this* subject, or any?), and the
        # same reference at another seed (the seed-to-seed noise floor of the similarity).
        other = pipe.generate(prompts, refs=refs.roll(1, 0), **kw) if len(prompts) > 1 else None
        reseeded = pipe.generate(prompts, refs=refs, **{**kw, "seed": 1})
        rep = _paired_steering("reference", self._similarity(self._features()(ref_px)),
                               with_r, without, other, reseeded, self.e.feature_extractor)
        # Next to the whole frame: the same on the subject's region (synthetic world).
        return rep | subject_region_steering(self, ref_px, self.video.shape[2] - 1,
                                             (with_r, without, other, reseeded), _paired_steering)

    @torch.no_grad()
    def text_adherence(self) -> dict[str, Any]:
        """Does the caption steer? Similarity of samples to the clip their caption describes
        (mean feature of its ground-truth frames), generated with the caption, with none
        (empty prompt) and with another clip's caption (shuffled); the seed-to-seed noise
        floor; ``pass`` when both gains exceed 3x the floor."""
        pipe = self.pipe
        if "text" not in pipe.conditions:
            return {}
        prompts = list(self.batch["caption"])
        kw = dict(seed=0, num_steps=self.e.num_steps, latent_shape=tuple(self.x0.shape[1:]),
                  batch=self.batch)
        own = pipe.generate(prompts, **kw)
        empty = pipe.generate([""] * len(prompts), **kw)
        shuffled = prompts[1:] + prompts[:1]
        # A shuffle that hands every clip its own caption back is no control.
        other = (pipe.generate(shuffled, **kw)
                 if any(a != b for a, b in zip(prompts, shuffled)) else None)
        reseeded = pipe.generate(prompts, **{**kw, "seed": 1})
        b, _, t, h, w = self.video.shape
        feat = self._features()
        target = feat(self.video.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w))
        target = target.view(b, t, -1).mean(1)
        return _paired_steering("text", self._similarity(target), own, empty, other,
                                reseeded, self.e.feature_extractor)

    def _similarity(self, target: torch.Tensor):
        """Per clip [B]: cosine similarity of each generated frame's feature to ``target``
        [B, D] (that clip's), averaged over frames."""
        feat = self._features()

        def sims(v: torch.Tensor) -> torch.Tensor:
            b, _, t, h, w = v.shape
            f = feat(v.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)).view(b, t, -1)
            return torch.nn.functional.cosine_similarity(f, target[:, None], dim=-1).mean(1)

        return sims

    def _features(self):
        if not self.e.feature_extractor:
            return colour_histogram
        net = torch.jit.load(self.e.feature_extractor, map_location=self.device).eval()
        return lambda x: torch.nn.functional.normalize(net(x).flatten(1).float(), dim=1)

    @torch.no_grad()
    def fvd(self, generated: torch.Tensor) -> dict[str, float]:
        if not self.e.i3d:
            return {}
        i3d = torch.jit.load(self.e.i3d, map_location=self.device).eval()
        real, fake = i3d(self.video).flatten(1), i3d(generated).flatten(1)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A Fréchet distance of per-rank statistics is not the distance of the whole set:
            # gather every rank's features (then every rank computes the same value).
            def gather(x: torch.Tensor) -> torch.Tensor:
                parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, x.contiguous())
                return torch.cat(parts)

            real, fake = gather(real), gather(fake)
        return {"fvd": frechet_distance(real, fake), "fvd/num_videos": real.shape[0]}


def _paired_steering(group: str, sims: Any, with_c: torch.Tensor, without: torch.Tensor,
                     other: Optional[torch.Tensor], reseeded: torch.Tensor,
                     feature: Optional[str]) -> dict[str, Any]:
    """One conditioning signal measured with paired seeds: similarity to the target with the
    condition, without it and with another clip's condition, and the noise floor (the same
    condition at another seed). ``<group>/pass`` when the condition pulls the samples
    towards their target by more than 3x what a second seed moves them, against both
    controls."""
    s_with, s_without = sims(with_c), sims(without)
    noise = float((s_with - sims(reseeded)).abs().mean())
    name = "ref" if group == "reference" else group
    rep: dict[str, Any] = {
        f"{group}/similarity_with_{name}": float(s_with.mean()),
        f"{group}/similarity_without_{name}": float(s_without.mean()),
        f"{group}/noise_floor": noise,
        f"{group}/gain_over_no_{name}": float((s_with - s_without).mean()),
        f"{group}/feature": feature or "colour_histogram"}
    gains = [rep[f"{group}/gain_over_no_{name}"]]
    if other is not None:
        s_other = sims(other)
        rep[f"{group}/similarity_other_{name}"] = float(s_other.mean())
        rep[f"{group}/gain_over_other_{name}"] = float((s_with - s_other).mean())
        gains.append(rep[f"{group}/gain_over_other_{name}"])
    rep[f"{group}/pass"] = float(all(g >= 3 * noise for g in gains))
    return rep


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{report['checkpoint']}`", "", "| metric | value |", "|---|---|"]
    for k, v in report.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lines.append(f"| {k} | {v:.5g} |" if isinstance(v, float) else f"| {k} | {v} |")
        elif isinstance(v, str) and k != "checkpoint":
            lines.append(f"| {k} | {v} |")
    roll = report.get("rollout/psnr")
    if roll:
        lines += ["", "## Rollout by horizon step", "",
                  "| step | PSNR | copy-last PSNR | SSIM | copy-last SSIM |",
                  "|---|---|---|---|---|"]
        cols = [report[f"rollout/{k}"] for k in ("psnr", "baseline_psnr", "ssim", "baseline_ssim")]
        for i in range(len(roll)):
            lines.append(f"| {i + 1} | {cols[0][i]:.3f} | {cols[1][i]:.3f} | {cols[2][i]:.4f} | "
                         f"{cols[3][i]:.4f} |")
    return "\n".join(lines) + "\n"


_COUNTS = ("num_clips", "detections_")  # fvd/num_videos is already the gathered total


def _reduce_over_ranks(run: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Average every number (and every element of a per-horizon list) over the ranks, each of
    which evaluated its own shards; counts are summed. One process: unchanged."""
    if run.world_size == 1:
        return report
    flat: dict[str, torch.Tensor] = {}
    for k, v in report.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[k] = torch.tensor(float(v))
        elif isinstance(v, list):
            flat.update({f"{k}#{i}": torch.tensor(float(x)) for i, x in enumerate(v)})
    mean = all_reduce_scalars(flat, run.device)
    out = dict(report)
    for k, v in report.items():
        if isinstance(v, list):
            out[k] = [mean[f"{k}#{i}"] for i in range(len(v))]
        elif k in mean:
            is_count = any(c in k for c in _COUNTS)
            out[k] = mean[k] * run.world_size if is_count else mean[k]
    out["num_ranks"] = run.world_size
    return out


def run_eval(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """Load ``eval.checkpoint``, compute the metrics, write the report; returns it (None on
    ranks other than 0 of a multi-process evaluation)."""
    from worldline.train.checkpoint import read_meta
    from worldline.train.config import ConfigError, to_container
    from worldline.train.inference import load_for_inference
    from worldline.train.media import save_samples
    from worldline.train.tracking import Tracker

    e = cfg.eval
    if not e.checkpoint:
        raise ConfigError("invalid config: eval.checkpoint: required (a run or checkpoint dir)")
    for key in ("feature_extractor", "i3d"):
        if e[key] and not Path(e[key]).is_file():
            raise FileNotFoundError(f"eval.{key}: no TorchScript file at {e[key]}")
    run = load_for_inference(cfg, e.checkpoint, e.use_ema)
    path, pipe = run.path, run.pipeline
    step = read_meta(path).get("step")
    report: dict[str, Any] = {"checkpoint": str(path), "step": step}
    out = Path(e.out) if e.out else path.parent.parent / "eval" / path.name
    out.mkdir(parents=True, exist_ok=True)
    media: dict[str, torch.Tensor] = {}
    metrics = set(e.metrics)
    split = run.loaders.heldout_split() if str(e.split) == "heldout" else "train"
    report["data_split"] = split
    if split == "train":
        log.warning("worldline-eval: metrics on clips the model may have trained on (%s)",
                    "eval.split=train" if str(e.split) == "train" else
                    "no held-out data: set stage.validation.shards")
    if pipe.world_model is None or "val_loss" in metrics:  # an autoencoder: PSNR/SSIM
        batch = int(run.cfg.data.batch_size)
        report.update(run.objective.evaluate(pipe, eval_loader(run, e.num_batches * batch),
                                             e.num_batches, list(e.timesteps)))
    if pipe.world_model is not None:
        ev = FlowEvaluator(run, e)
        if "reconstruction" in metrics:
            report.update(ev.reconstruction())
        gen = None
        av = "av_sync" in metrics and "audio" in ev.batch  # no rollout just to skip
        if metrics & {"rollout", "action_following"} or e.i3d or av:
            roll, gen = ev.rollout_metrics()
            if "rollout" in metrics:
                report.update(roll)
            media = {"ground_truth": ev.video, "rollout": gen}
        if "action_following" in metrics:
            report.update(ev.action_following(gen))
        if "reference" in metrics:
            report.update(ev.reference_consistency())
        if "text" in metrics:
            report.update(ev.text_adherence())
        if "av_sync" in metrics:
            report.update(av_sync_metrics(ev.batch, gen, ev.video))  # says if it skipped
        report.update(ev.fvd(gen) if gen is not None else {})
        if int(e.long_horizon.frames) > 0:  # off by default: minutes of rollout on a CPU
            from worldline.train.long_horizon import long_horizon_metrics

            report.update(long_horizon_metrics(ev))
    report = _reduce_over_ranks(run, report)
    if run.rank != 0:
        return None
    # NaN (e.g. a sprite never detected) is not JSON: write null.
    report = {k: (None if isinstance(v, float) and math.isnan(v) else v)
              for k, v in report.items()}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    images: dict[str, Path] = {}
    if "rollout/psnr" in report:
        images["eval/rollout_psnr"] = line_plot(
            out / "rollout_psnr.png", {"model": report["rollout/psnr"],
                                       "copy last frame": report["rollout/baseline_psnr"]},
            "rollout PSNR by horizon", "horizon (latent frames)", "PSNR dB")
        images["eval/rollout_ssim"] = line_plot(
            out / "rollout_ssim.png", {"model": report["rollout/ssim"],
                                       "copy last frame": report["rollout/baseline_ssim"]},
            "rollout SSIM by horizon", "horizon (latent frames)", "SSIM")
    videos: dict[str, Path] = {}
    if media:
        files = save_samples(out / "videos", media, fps=8.0)
        videos, images = files["videos"], {**images, **files["images"]}
    if cfg.logger.kind == "wandb" and cfg.logger.mode != "disabled":
        tracker = Tracker(out, cfg.logger, f"eval-{path.parent.parent.name}-{path.name}",
                          to_container(cfg), resume_step=None, run_id=None)
        scalars = {f"eval/{k}": v for k, v in report.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log(scalars, int(step or 0))
        tracker.log_media(int(step or 0), videos, images)
        if tracker.wandb is not None:
            import wandb

            rows = [[k, str(v)] for k, v in report.items()]
            tables = {"eval/report": wandb.Table(columns=["metric", "value"], data=rows)}
            if "rollout/psnr" in report:
                tables["eval/rollout"] = wandb.Table(
                    columns=["horizon", "psnr", "baseline_psnr", "ssim", "baseline_ssim"],
                    data=[[i + 1, *(report[f"rollout/{k}"][i] for k in
                                    ("psnr", "baseline_psnr", "ssim", "baseline_ssim"))]
                          for i in range(len(report["rollout/psnr"]))])
            tracker.wandb.log(tables, step=int(step or 0))
        tracker.finish()
    log.info("eval report → %s", out)
    return report
