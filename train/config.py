"""Structured config schema for every Worldline entry point.

Hydra composes ``conf/`` on top of :class:`WorldlineConfig`; because the root is a structured
config, an unknown key or a value of the wrong type fails during composition, before any model,
data or worker exists, and the error names the full key (e.g. ``train.stepz``).

Every field with a fixed set of values is an :class:`enum.Enum` (``ConfigEnum``: a ``str``
subclass, so ``cfg.train.precision == "bf16"`` and JSON dumps keep working); OmegaConf itself
rejects any other value during composition, naming the key (``full_key: train.precision``).
Member names equal their values because OmegaConf converts a YAML string by member *name*.

Cross-field rules that a type system cannot express (frame counts that the autoencoder cannot
compress, resolutions the patch size does not divide, ...) live in
:func:`worldline.train.validate.validate`, which every entry point calls right after
composition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from worldline.data.synthetic import SyntheticWorldConfig
from worldline.models.autoencoder import AutoencoderArgs
from worldline.models.dit import DiTArgs
from worldline.models.text import TextEncoderArgs

from worldline.train.config_enums import (
    DistBackend,
    ActivationCheckpointing,
    LoggerKind,
    LoggerMode,
    Precision,
    LRSchedule,
    OnSaveError,
    DataKind,
    ClipPosition,
    Crop,
    DataInput,
    SlurmMode,
)
from worldline.train.config_infer import EvalConfig, LongHorizonConfig, SampleConfig
from worldline.train.config_stage import StageConfig



@dataclass
class RunConfig:
    """Where a run lives and how it is seeded. The run directory is ``<root>/<name>``."""

    name: str = "default"
    root: str = "runs"
    seed: int = 0
    # Deterministic CPU kernels make resumed runs bitwise equal to uninterrupted ones.
    deterministic: bool = True
    # torch intra-op threads; None keeps torch's default (all cores).
    threads: Optional[int] = None


@dataclass
class PretrainedVAEConfig:
    """A frozen diffusers video VAE from a local folder instead of Worldline's autoencoder
    (AutoencoderKLWan, AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo: class, latent
    normalisation and compression are read from the folder)."""

    pretrained: Optional[str] = None
    tiling: bool = False  # diffusers' tiled encode/decode: large frames in bounded memory
    slicing: bool = False  # encode/decode one clip of the batch at a time
    # Weights dtype; null: bf16 on GPU, fp32 on CPU.
    dtype: Optional[str] = None


@dataclass
class PretrainedTextConfig:
    """A frozen transformers text encoder (T5/UMT5 encoder, CLIP text) from a local folder
    instead of the built-in byte-level encoder; model.dit.text_dim follows its width."""

    pretrained: Optional[str] = None
    tokenizer: Optional[str] = None  # folder with the tokenizer files; null: `pretrained`
    max_len: Optional[int] = None  # tokens per prompt; null: model.text.max_len
    hidden_state: int = -1  # which layer's output: -1 last, -2 penultimate, ...
    dtype: Optional[str] = None  # null: bf16 on GPU, fp32 on CPU


@dataclass
class AudioFrontConfig:
    """The audio front end of an audio-conditioned world model (stage.conditions has audio):
    clip audio resampled to ``sample_rate`` (mono) by the data loader, then log-mel features
    (``n_mels`` bands) per pixel frame on the device (models/audio.py ``LogMelFrames``);
    model.dit.audio_dim follows n_mels."""

    sample_rate: int = 16000
    n_mels: int = 32


@dataclass
class ModelConfig:
    """One model size: the autoencoder, the latent DiT and the built-in text encoder, or
    pretrained components from local folders (vae, text_encoder)."""

    name: str = MISSING
    autoencoder: AutoencoderArgs = field(default_factory=AutoencoderArgs)
    dit: DiTArgs = field(default_factory=DiTArgs)
    text: TextEncoderArgs = field(default_factory=TextEncoderArgs)
    vae: PretrainedVAEConfig = field(default_factory=PretrainedVAEConfig)
    text_encoder: PretrainedTextConfig = field(default_factory=PretrainedTextConfig)
    audio: AudioFrontConfig = field(default_factory=AudioFrontConfig)
    # The largest clip this model is meant for ([height, width] in pixels, frames): the DiT's
    # RoPE has no hard limit, but attention memory and the position range a checkpoint was
    # trained on do. Data shapes and buckets above it are rejected. null: no limit.
    max_resolution: Optional[list[int]] = None
    max_frames: Optional[int] = None


@dataclass
class BucketConfig:
    """One resolution x length bucket and its batch size (see data/buckets.py)."""

    height: int = MISSING
    width: int = MISSING
    num_frames: int = MISSING
    batch_size: int = MISSING


@dataclass
class DataConfig:
    """Video shards and clip sampling. ``kind=synthetic`` generates the embedded world first."""

    kind: DataKind = DataKind.synthetic
    # A directory holding manifest.json, a brace pattern (shard-{000000..000009}.tar) or a
    # comma-separated list. Unused for kind=synthetic (the generated dir is used).
    shards: Optional[str] = None
    # Where generated datasets are cached (shared by runs, keyed by generator settings).
    root: str = "${run.root}/_datasets"
    num_frames: int = 17
    frame_stride: int = 1
    resolution: list[int] = field(default_factory=lambda: [64, 64])
    batch_size: int = 4
    num_workers: int = 1
    position: ClipPosition = ClipPosition.start
    shuffle_shards: bool = True
    # Samples held back and drawn at random (across shards); 0 = stream order.
    shuffle_buffer: int = 0
    # Infinite resampled streaming (pretraining): shards drawn with replacement, no epochs.
    resample: bool = False
    # pixel: decode mp4s; latent: stream shards written by encode_latents (frozen AE skipped).
    input: DataInput = DataInput.pixel
    # Target fps resampled from the source timestamps (instead of frame_stride).
    fps: Optional[float] = None
    crop: Crop = Crop.center
    # Most a crop may remove of a frame's resized width/height; beyond it the clip is
    # letterboxed (black bars), so a portrait clip in a square bucket keeps its top and
    # bottom. 1.0 = resize to cover + crop (content at the edges is lost); 0 = always fit.
    max_crop: float = 0.25
    # Resolution x length buckets, each with its own batch size ({height, width, num_frames,
    # batch_size}); empty = one bucket (resolution, num_frames, batch_size).
    buckets: list[BucketConfig] = field(default_factory=list)
    # Let videos smaller than a bucket be upscaled into it (default: single bucket only).
    upscale: Optional[bool] = None
    # Abort when more than this fraction of a stream's samples are bad (after skip_check_after).
    max_skip_fraction: float = 0.5
    skip_check_after: int = 100
    # Opt-out list (content sha256s, source paths/URLs or keys; data/provenance.py): matching
    # samples are skipped as opted_out, also in shards written before the opt-out arrived.
    exclude: Optional[str] = None
    decode_threads: int = 1
    # Decode size limit: videos whose header declares more pixels per frame are skipped
    # (absurd_dimensions) before any decoder allocates frames. null: 8192*8192.
    max_pixels: Optional[int] = None
    # A shard member larger than this is never read; its sample is a too_large skip.
    max_member_bytes: int = 2 << 30
    # Batches keep decord's [B, T, H, W, 3] memory (same [B, 3, T, H, W] shape, channels-last
    # strides): the worker skips a uint8 transpose that costs 10-20 % of a clip's decode
    # (BENCHMARKS.md "Data pipeline"); the Trainer makes the batch contiguous after moving it
    # to the device, where that transpose is nearly free.
    channels_last: bool = True
    # Also decode each sample's reference images (<key>.ref<i>.*, e.g. a studio mood board)
    # into batch["refs"]; reference-conditioned stages draw from them before own-frame crops.
    # null: when stage.conditions has refs.
    with_refs: Optional[bool] = None
    # Also decode each clip's audio window (the samples that play during its frames) into
    # batch["audio"] / batch["audio_mask"] at model.audio.sample_rate. null: when
    # stage.conditions has audio.
    audio: Optional[bool] = None
    synthetic: SyntheticWorldConfig = field(default_factory=SyntheticWorldConfig)


@dataclass
class DistConfig:
    """Parallelism backend and its knobs (``conf/dist/*.yaml``; see train/parallel/)."""

    backend: DistBackend = DistBackend.single
    # Collective timeout: a dead or stalled rank fails the others instead of hanging them.
    timeout_s: float = 600.0
    # Activation checkpointing of transformer blocks / autoencoder stages: none | full (every
    # block) | every_k (every ac_every-th block) | attention (only the self-attention of every
    # ac_every-th DiT block; MLP activations kept) | selective (every ac_every-th block, saving
    # matmul/attention outputs, recomputing the rest). See train/parallel/base.py.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    ac_every: int = 2
    # torch.compile each block separately (after AC, before wrapping). null = auto: on when
    # training on CUDA, off elsewhere; true forces it (also on CPU); false keeps eager.
    compile_blocks: Optional[bool] = None
    # DDP
    find_unused_parameters: bool = False
    bucket_mb: int = 25
    # FSDP2: reshard parameters after forward (ZeRO-3-like) or keep them (ZeRO-2-like).
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    # HSDP: replicate x shard 2-D mesh; 1 = plain FSDP over all data-parallel ranks.
    replicate: int = 1
    # Context parallelism (Ulysses over heads in the DiT self-attention); composes with
    # ddp/fsdp on a (dp, cp) mesh. Must divide the world size and the DiT heads and frames.
    cp: int = 1
    # DeepSpeed: optimizer-state / parameter offload to CPU, and a user ds_config.json merged
    # over the generated config (the user's keys win).
    offload_optimizer: bool = False
    offload_params: bool = False
    ds_config: Optional[str] = None
    # DCP async save: the step blocks only for the state copy; the write finishes in the
    # background and the checkpoint becomes visible (rename + latest) once it completes.
    async_save: bool = False
    # Watchdog (train/watchdog.py): every rank logs a heartbeat line every heartbeat_s and
    # publishes its step; a rank that sees a peer fall behind (or its heartbeat stop) for
    # stall_timeout_s exits with an error naming that rank. 0 disables. Keep it below
    # timeout_s so the named error comes before the collective's anonymous timeout.
    heartbeat_s: float = 60.0
    stall_timeout_s: float = 300.0


@dataclass
class LoggerConfig:
    """Experiment tracking. W&B runs offline unless ``mode=online`` is asked for."""

    kind: LoggerKind = LoggerKind.wandb
    project: str = "worldline"
    entity: Optional[str] = None
    mode: LoggerMode = LoggerMode.offline
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: LRSchedule = LRSchedule.cosine
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    """The loop: length, accumulation, clipping, EMA, precision, and how often to log/save."""

    steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 1.0
    # 0 disables EMA.
    ema_decay: float = 0.999
    # Update the EMA every k optimizer steps (1: every step). k > 1 trades a k-times
    # coarser average for k-times less EMA traffic (one read+write of the weights per update).
    ema_every: int = 1
    # bf16: autocast + bf16 collectives where the backend has them (train/precision.py).
    precision: Precision = Precision.fp32
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3
    # 0: sample only at the end of the run.
    sample_every: int = 0
    progress_bar: bool = True
    # Steps with non-finite loss/gradients are skipped (no parameter, optimizer or EMA
    # update); this many in a row abort the run. See train/guard.py.
    max_nonfinite_skips: int = 10
    # Check the skip counters after every step (one host sync per step) instead of at
    # log/checkpoint steps only.
    sync_nonfinite_check: bool = False
    # A checkpoint write that fails (full or read-only disk): "continue" training (the next
    # save retries; the previous checkpoint stays the latest) or "exit" cleanly.
    on_save_error: OnSaveError = OnSaveError["exit"]
    # Profile this many steps (after a short warm-up) with torch.profiler into
    # <run dir>/profile/ (Chrome trace + key-averages table; train/profiling.py). 0: off.
    profile: int = 0


@dataclass
class PreemptConfig:
    """Graceful stop on a signal (train/preempt.py): finish the step, agree across ranks,
    checkpoint, exit with status ``stopped`` so the SLURM batch script requeues the job."""

    enabled: bool = True
    # SLURM's time-limit warning (--signal=B:USR1@N, forwarded by the batch script) and its
    # preemption / scancel signal.
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    # Steps between the ranks' collective stop checks (a CPU all-reduce of one integer): the
    # stop comes up to this many steps after the signal.
    check_every: int = 1


@dataclass
class SlurmConfig:
    """What ``worldline-submit`` renders into the sbatch script (slurm/templates/)."""

    # torchrun: one task per node running torchrun (c10d rendezvous on the first node);
    # srun: one task per GPU started by srun (rank/world from SLURM_PROCID/SLURM_NTASKS).
    mode: SlurmMode = SlurmMode.torchrun
    nodes: int = 1
    # 0: CPU-only ranks (one per node, gloo), as on the local test cluster.
    gpus_per_node: int = 8
    # Per task; None: 8 per rank (torchrun mode: 8 x ranks on the node).
    cpus_per_task: Optional[int] = None
    # sbatch --time: MM, HH:MM:SS or D-HH:MM:SS.
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # --signal=B:USR1@<signal_s>: warning before the time limit (it may come up to 60 s early).
    signal_s: int = 300
    # Never requeue more often than this (a run that keeps being stopped stays stopped).
    max_restarts: int = 50
    # Env-setup hook sourced by the batch script before launch (modules, venv, caches);
    # None: slurm/env.sh (activates the repository's .venv).
    setup: Optional[str] = None
    # Export the recommended NCCL settings (slurm/nccl.sh) in GPU jobs.
    nccl: bool = True
    # Extra "#SBATCH" options, e.g. ["--exclusive", "--mem=0"].
    extra: list[str] = field(default_factory=list)


@dataclass
class WorldlineConfig:
    """The root of every composed config."""

    run: RunConfig = field(default_factory=RunConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # "auto": continue from <run dir>/checkpoints/latest when it exists; a path: resume from
    # that run dir or checkpoint; null: always start fresh (refuses a run dir with checkpoints).
    resume: Optional[str] = "auto"


class ConfigError(ValueError):
    """A config that cannot run. The message names the offending key."""


def composition_error(exc: BaseException) -> ConfigError:
    """A failed Hydra composition (e.g. a value outside an enum field) as one ConfigError that
    names the key, for entry points that compose the config themselves."""
    cause = exc.__cause__ or exc
    key = getattr(cause, "full_key", None) or "config"
    return ConfigError(f"invalid config: {key}: {str(cause).splitlines()[0]}")


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain-dict view of a config (for config.yaml, W&B and checkpoints).

    Enum values become their strings: the dict holds only builtins, so YAML safe_dump, JSON and
    ``torch.load(weights_only=True)`` take it, and it never refers to this module's classes.
    """
    return OmegaConf.to_container(  # type: ignore[return-value]
        cfg, resolve=True, throw_on_missing=True, enum_to_str=True)


def model_config_names() -> list[str]:
    """The named model sizes: the files of conf/model/ (tiny, small, base, 1B, 3B, 7B)."""
    return sorted(p.stem for p in _model_conf_dir().glob("*.yaml"))


def load_model_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml on the :class:`ModelConfig` schema (typed and checked), without
    composing a whole run config: the one definition of each model size.

    ``OmegaConf.to_object(load_model_config("7B").dit)`` is that size's ``DiTArgs``.
    """
    path = _model_conf_dir() / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown model size {name!r}; choose from {model_config_names()}")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))  # type: ignore[return-value]


def _model_conf_dir() -> Path:
    # conf/ installs as the worldline.conf package; its model group holds one file per size.
    return Path(str(resources.files("worldline.conf"))) / "model"


def command_line_keys() -> Optional[set[str]]:
    """The config keys set on the running Hydra app's command line (``data.resolution`` for
    ``data.resolution=[96,80]``; a group such as ``experiment=smoke`` counts as
    ``experiment``); None outside a Hydra app (programmatic callers: their config is taken
    as given)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # HydraConfig was not set: not under @hydra.main
        return None
    return {str(o).split("=", 1)[0].lstrip("+~") for o in task}
