"""The ``stage.*`` part of the config schema (train/config.py): objective, conditions, flow and
task mix, resolution schedule, init/freeze policy, LoRA, validation, prior preservation and the
autoencoder's loss terms."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from worldline.train.config_enums import Condition, Objective, StageName

__all__ = ['FlowConfig', 'TaskMixConfig', 'PhaseConfig', 'FreezePolicyConfig', 'LoraConfig', 'ValidationConfig', 'PriorConfig', 'AutoencoderLossConfig', 'SelfForcingConfig', 'StageConfig']


@dataclass
class FlowConfig:
    """Flow-matching objective settings (rectified flow, t=0 data, t=1 noise)."""

    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    # None: derive the logit-normal shift from the latent token count (resolution/length aware).
    shift: Optional[float] = None
    text_dropout: float = 0.1
    # Drops actions and camera together (the DiT's null control vectors).
    action_dropout: float = 0.1
    # Probability that a whole batch trains without its reference images.
    ref_dropout: float = 0.1
    # Per-sample audio dropout (its own mask: "no audio" stays a valid input at sampling).
    audio_dropout: float = 0.1
    # Extra loss weight on latent positions whose pixels move (1 + moving_weight there, as
    # stage.ae.moving_weight does for the autoencoder): moving objects are a few percent of
    # a world's pixels but all of its dynamics. 0: off. Needs pixel batches (not latent caches).
    moving_weight: float = 0.0


@dataclass
class TaskMixConfig:
    """Per-sample task probabilities of a flow stage (normalised to sum 1). i2v gives latent
    frame 0 clean, continuation a clean prefix of 2.. frames (marked by the mask channel)."""

    t2v: float = 1.0
    i2v: float = 0.0
    continuation: float = 0.0
    # Diffusion forcing: an independent noise level per latent frame instead of one per clip.
    diffusion_forcing: bool = False
    # With diffusion forcing: fraction of samples that still share one level over all frames.
    uniform_prob: float = 0.25


@dataclass
class PhaseConfig:
    """One step of a resolution/length schedule, active from ``step`` on."""

    step: int = 0
    resolution: list[int] = field(default_factory=lambda: [64, 64])
    num_frames: int = 17
    # None keeps data.batch_size.
    batch_size: Optional[int] = None


@dataclass
class FreezePolicyConfig:
    """Train only the new modules (absent from stage.init_from) and ``train_first`` prefixes for
    the first ``steps`` steps, then everything. steps=0 disables the policy."""

    steps: int = 0
    new_modules: bool = True
    train_first: list[str] = field(default_factory=list)


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the DiT's attention/MLP projections; the base stays frozen."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # Linear-layer names inside each DiT block (matched as ``dit.blocks.<i>.<target>``).
    targets: list[str] = field(default_factory=lambda: [
        "attn.qkv", "attn.proj", "cross.q", "cross.kv", "cross.proj",
        "mlp.w_gate", "mlp.w_up", "mlp.w_down"])


@dataclass
class ValidationConfig:
    """Periodic validation flow loss during training, and early stopping on it."""

    # Held-out shards; None: synthetic data uses a held-out world (another seed), other data
    # validates on data.shards (not a held-out split: set this for real data).
    shards: Optional[str] = None
    every: int = 0
    num_batches: int = 2
    timesteps: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Stop after this many validations without an improvement of min_delta; 0 = never.
    patience: int = 0
    min_delta: float = 0.0


@dataclass
class PriorConfig:
    """Prior preservation: this fraction of batches comes from other (pretraining) data."""

    shards: Optional[str] = None
    ratio: float = 0.0


@dataclass
class AutoencoderLossConfig:
    """Optional perceptual and adversarial terms of the autoencoder stage (models/losses.py);
    KL and L1/L2 weights are model.autoencoder.*_weight."""

    # A local TorchScript file or pickled nn.Module (e.g. an exported LPIPS/VGG) mapping
    # images in [-1, 1] to features; weighted by model.autoencoder.perceptual_weight.
    perceptual_path: Optional[str] = None
    # Pixels that move (ground-truth frame differences, models/ae_losses.py) count
    # 1 + moving_weight times in L1/L2: keeps small moving objects that plain means erase.
    moving_weight: float = 0.0
    # Evaluation calls the autoencoder good (moving_ok) only at this moving-region PSNR (dB).
    moving_psnr_min: float = 30.0
    # 3D PatchGAN discriminator, switched on at this optimizer step (-1: no GAN); its own
    # AdamW at disc_lr, replicated (DDP) across ranks.
    gan_start: int = -1
    gan_weight: float = 0.1
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class SelfForcingConfig:
    """Stage ``self_forcing`` (train/self_forcing.py): a few-step causal student distilled from
    the frozen ``stage.init_from`` teacher by rolling out on its own KV cache (Self-Forcing)
    with distribution-matching distillation (DMD) against a trained fake score."""

    # Euler steps per latent frame of the student (its sampler: rollout num_steps).
    student_steps: int = 4
    # Teacher steps for the CausVid ODE pairs of the warm-up (and the benchmark's teacher).
    teacher_steps: int = 16
    # Classifier-free guidance of the real (teacher) score over text + actions (1 = off).
    guidance_scale: float = 1.0
    # The fake score's own AdamW and its updates per student update.
    fake_lr: float = 1e-4
    fake_updates: int = 1
    # Optimizer steps of ODE-pair regression (student x0 from the teacher's trajectory)
    # before DMD starts; 0 = DMD from the first step.
    ode_init_steps: int = 0
    # Clean latent frames of each training clip the student continues from (real frames).
    context_frames: int = 1
    # DMD noise levels are drawn uniformly in [min_t, max_t] (then resolution-shifted).
    min_t: float = 0.02
    max_t: float = 0.98
    # Rollout cache for long rollouts: past frames kept (null: all) and the oldest frames
    # kept for good as an attention sink.
    kv_window: Optional[int] = None
    sink_frames: int = 0


@dataclass
class StageConfig:
    """What a stage trains: objective, conditionings, and where its weights start from."""

    name: StageName = StageName.pretrain
    objective: Objective = Objective.flow
    # A run dir or checkpoint dir whose weights initialise the trained model (not a resume:
    # optimizer, step and data position start fresh).
    init_from: Optional[str] = None
    # Latent stages: the run dir or checkpoint dir of the trained (frozen) autoencoder.
    autoencoder_from: Optional[str] = None
    conditions: list[Condition] = field(default_factory=lambda: [
        Condition.text, Condition.actions, Condition.camera])
    # Parameter-name prefixes kept frozen during this stage (e.g. ["text_encoder."]).
    freeze: list[str] = field(default_factory=list)
    flow: FlowConfig = field(default_factory=FlowConfig)
    ae: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    tasks: TaskMixConfig = field(default_factory=TaskMixConfig)
    # Resolution/length schedule (phases by start step); empty: data.* throughout.
    schedule: list[PhaseConfig] = field(default_factory=list)
    freeze_policy: FreezePolicyConfig = field(default_factory=FreezePolicyConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    # Reference images per training sample (conditions contains "refs").
    num_refs: int = 1
    # Set train.steps from passes over the training data (small studio sets); None: steps.
    epochs: Optional[int] = None
    self_forcing: SelfForcingConfig = field(default_factory=SelfForcingConfig)
