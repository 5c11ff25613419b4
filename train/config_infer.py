"""The inference side of the config schema (train/config.py): ``sample.*`` (periodic samples,
``worldline-sample``) and ``eval.*`` (``worldline-eval``, its long-horizon group)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from worldline.train.config_enums import EvalSplit, SampleMode, Solver

__all__ = ['SampleConfig', 'LongHorizonConfig', 'EvalConfig']


@dataclass
class SampleConfig:
    """Generation settings used by periodic samples and ``worldline-sample``."""

    # A run dir or checkpoint dir (worldline-sample); periodic samples use the live model.
    checkpoint: Optional[str] = None
    prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle, a blue square and a yellow triangle in a meadow",
            "a green diamond and a white circle in a desert",
        ]
    )
    num_steps: int = 20
    cfg_scale: float = 3.0
    seed: int = 1234
    # Where worldline-sample writes; None: <checkpoint's run dir>/samples/manual.
    out: Optional[str] = None
    use_ema: bool = True
    # Separate guidance on actions/camera (1 = none); cfg_scale guides the text.
    action_cfg_scale: float = 1.0
    # Guidance on the audio (1 = none; audio-conditioned models).
    audio_cfg_scale: float = 1.0
    # An audio file (wav/flac/mp3/m4a) that drives an audio-conditioned model; its first
    # seconds cover the generated clip, and the written mp4s carry it. None: the data's.
    audio: Optional[str] = None
    solver: Solver = Solver.euler
    # worldline-sample inputs (None: taken from the first clips of the data spec).
    first_image: Optional[str] = None
    refs: list[str] = field(default_factory=list)
    # JSON {"actions": [[...] per frame], "camera": [[dx, dy] per frame]} or .npy actions.
    actions: Optional[str] = None
    # full: whole clip at once; rollout: KV-cached autoregressive world-model rollout.
    mode: SampleMode = SampleMode.full
    # rollout: latent frames to generate after the first image, and the KV-cache window.
    rollout_frames: int = 4
    window: Optional[int] = None
    # rollout: the first latent frames kept in the cache for good besides the window (an
    # attention sink for rollouts longer than training; see models/rollout.py).
    sink_frames: int = 0


@dataclass
class LongHorizonConfig:
    """``eval.long_horizon`` (train/long_horizon.py): long rollouts on the synthetic world."""

    frames: int = 0  # latent frames to roll out (>= 64 for the real test); 0: off
    window: Optional[int] = None  # KV-cache window; None: the training clip's latent frames - 1
    num_clips: int = 2
    idm_steps: int = 300  # inverse-dynamics model training steps
    idm_train_clips: int = 64


@dataclass
class EvalConfig:
    """``worldline-eval``: validation metrics of a checkpoint on a data spec."""

    checkpoint: Optional[str] = None
    # Which clips: "heldout" = stage.validation.shards, else for the synthetic world a
    # differently seeded world (clips the model never saw), else (no held-out shards known)
    # data.shards, reported as "train"; "train" = the data spec as given.
    split: EvalSplit = EvalSplit.heldout
    num_batches: int = 4
    # Fixed flow-matching timesteps make the validation loss deterministic across runs.
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    out: Optional[str] = None
    use_ema: bool = True
    # Which metric groups to compute (flow checkpoints); the autoencoder always reports its
    # reconstruction PSNR/SSIM. ``av_sync`` needs audio in the eval data (else it reports
    # ``av_sync/skipped``).
    metrics: list[str] = field(default_factory=lambda: [
        "val_loss", "reconstruction", "rollout", "action_following", "reference", "text",
        "av_sync"])
    # Clips used by the generative metrics, and sampler steps for them.
    num_clips: int = 4
    num_steps: int = 8
    # Optional local TorchScript feature extractor for reference consistency ([N,3,H,W] ->
    # [N,D]); None: a built-in colour-histogram statistic.
    feature_extractor: Optional[str] = None
    # Local I3D TorchScript weights ([N,3,T,H,W] in [-1,1] -> [N,D]); FVD only when given.
    i3d: Optional[str] = None
    # action_following passes when rollouts under other actions differ from the true-action
    # rollout (same seed) at least this many times as much as a second seed changes it (the
    # noise floor). 1: actions move the video as much as a new noise draw does.
    action_following_threshold: float = 1.0
    long_horizon: LongHorizonConfig = field(default_factory=LongHorizonConfig)
