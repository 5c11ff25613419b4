"""Structured config schema for every Worldline entry point.

Hydra composes ``conf/`` on top of :class:`WorldlineConfig`; because the root is a structured
config, an unknown key or a value of the wrong type fails during composition, before any model,
data or worker exists, and the error names the full key (e.g. ``train.stepz``).

Cross-field rules that a type system cannot express (frame counts that the autoencoder cannot
compress, resolutions the patch size does not divide, ...) live in :func:`validate`, which every
entry point calls right after composition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from worldline.data.synthetic import SyntheticWorldConfig
from worldline.models.autoencoder import AutoencoderArgs
from worldline.models.dit import DiTArgs
from worldline.models.text import TextEncoderArgs

STAGES = ("autoencoder", "pretrain", "controllability", "finetune")
OBJECTIVES = ("autoencoder", "flow")
CONDITIONS = ("text", "actions", "camera")


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
class FlowConfig:
    """Flow-matching objective settings (rectified flow, t=0 data, t=1 noise)."""

    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    # None: derive the logit-normal shift from the latent token count (resolution/length aware).
    shift: Optional[float] = None
    text_dropout: float = 0.1
    action_dropout: float = 0.1


@dataclass
class StageConfig:
    """What a stage trains: objective, conditionings, and where its weights start from."""

    name: str = "pretrain"
    objective: str = "flow"
    # A run dir or checkpoint dir whose weights initialise the trained model (not a resume:
    # optimizer, step and data position start fresh).
    init_from: Optional[str] = None
    # Latent stages: the run dir or checkpoint dir of the trained (frozen) autoencoder.
    autoencoder_from: Optional[str] = None
    conditions: list[str] = field(default_factory=lambda: ["text", "actions", "camera"])
    # Parameter-name prefixes kept frozen during this stage (e.g. ["text_encoder."]).
    freeze: list[str] = field(default_factory=list)
    flow: FlowConfig = field(default_factory=FlowConfig)


@dataclass
class ModelConfig:
    """One model size: the autoencoder, the latent DiT and the built-in text encoder."""

    name: str = MISSING
    autoencoder: AutoencoderArgs = field(default_factory=AutoencoderArgs)
    dit: DiTArgs = field(default_factory=DiTArgs)
    text: TextEncoderArgs = field(default_factory=TextEncoderArgs)


@dataclass
class DataConfig:
    """Video shards and clip sampling. ``kind=synthetic`` generates the embedded world first."""

    kind: str = "synthetic"
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
    position: str = "start"
    shuffle_shards: bool = True
    synthetic: SyntheticWorldConfig = field(default_factory=SyntheticWorldConfig)


DIST_BACKENDS = ("single", "ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")


@dataclass
class DistConfig:
    """Parallelism backend and its knobs (``conf/dist/*.yaml``; see train/parallel/)."""

    backend: str = "single"
    # Collective timeout: a dead or stalled rank fails the others instead of hanging them.
    timeout_s: float = 600.0
    # Activation checkpointing of transformer blocks / autoencoder stages: none | full | every_k
    activation_checkpointing: str = "none"
    ac_every: int = 2
    # torch.compile each block separately (after AC, before wrapping).
    compile_blocks: bool = False
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


@dataclass
class LoggerConfig:
    """Experiment tracking. W&B runs offline unless ``mode=online`` is asked for."""

    kind: str = "wandb"
    project: str = "worldline"
    entity: Optional[str] = None
    mode: str = "offline"
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
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    """The loop: length, accumulation, clipping, EMA, precision, and how often to log/save."""

    steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 1.0
    # 0 disables EMA.
    ema_decay: float = 0.999
    precision: str = "fp32"
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3
    # 0: sample only at the end of the run.
    sample_every: int = 0
    progress_bar: bool = True


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


@dataclass
class EvalConfig:
    """``worldline-eval``: validation metrics of a checkpoint on a data spec."""

    checkpoint: Optional[str] = None
    num_batches: int = 4
    # Fixed flow-matching timesteps make the validation loss deterministic across runs.
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    out: Optional[str] = None
    use_ema: bool = True


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
    # "auto": continue from <run dir>/checkpoints/latest when it exists; a path: resume from
    # that run dir or checkpoint; null: always start fresh (refuses a run dir with checkpoints).
    resume: Optional[str] = "auto"


class ConfigError(ValueError):
    """A config that cannot run. The message names the offending key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}: {msg}")


def _one_of(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"{value!r} is not one of {list(allowed)}")


def _check_known_keys(node: Any, prefix: str) -> None:
    # Struct mode rejects unknown keys in YAML and plain overrides, but Hydra's "+key=value"
    # opens the struct on purpose; catch such additions against the dataclass fields here.
    if not isinstance(node, DictConfig):
        return
    typ = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typ):
        known = {f.name for f in dataclasses.fields(typ)}
        for key in node.keys():
            if key not in known:
                raise ConfigError(f"invalid config: {prefix}{key}: unknown key "
                                  f"(valid: {', '.join(sorted(known))})")
    for key in node.keys():
        _check_known_keys(node._get_node(key), f"{prefix}{key}.")


def validate(cfg: DictConfig | WorldlineConfig) -> None:
    """Cross-field checks that types cannot express. Raises :class:`ConfigError` naming the key."""
    _check_known_keys(cfg, "")
    _one_of(cfg.stage.name, "stage.name", STAGES)
    _one_of(cfg.stage.objective, "stage.objective", OBJECTIVES)
    for c in cfg.stage.conditions:
        _one_of(c, "stage.conditions", CONDITIONS)
    _one_of(cfg.data.kind, "data.kind", ("synthetic", "webdataset"))
    _one_of(cfg.data.position, "data.position", ("start", "center", "random"))
    _one_of(cfg.dist.backend, "dist.backend", DIST_BACKENDS)
    _one_of(cfg.dist.activation_checkpointing, "dist.activation_checkpointing",
            ("none", "full", "every_k"))
    _check(cfg.dist.ac_every >= 1, "dist.ac_every", "must be >= 1")
    _check(cfg.dist.replicate >= 1, "dist.replicate", "must be >= 1")
    _check(cfg.dist.cp >= 1, "dist.cp", "must be >= 1")
    _check(cfg.dist.replicate == 1 or cfg.dist.backend == "fsdp", "dist.replicate",
           "HSDP (replicate > 1) needs dist.backend=fsdp")
    _check(not cfg.dist.cpu_offload or cfg.dist.backend == "fsdp", "dist.cpu_offload",
           "CPU offload of FSDP parameters needs dist.backend=fsdp (DeepSpeed: "
           "dist.offload_optimizer / dist.offload_params)")
    ds = cfg.dist.backend.startswith("deepspeed")
    _check(not (cfg.dist.offload_optimizer or cfg.dist.ds_config) or ds, "dist.offload_optimizer",
           "offload_optimizer / ds_config need a deepspeed_zero* backend")
    _check(not cfg.dist.offload_params or cfg.dist.backend == "deepspeed_zero3",
           "dist.offload_params", "parameter offload needs dist.backend=deepspeed_zero3")
    _check(cfg.dist.cp == 1 or cfg.dist.backend in ("single", "ddp", "fsdp"), "dist.cp",
           "context parallelism composes with ddp/fsdp only")
    _check(cfg.dist.cp == 1 or cfg.dist.replicate == 1, "dist.cp",
           "context parallelism with HSDP (dist.replicate > 1) is not supported yet")
    _check(cfg.dist.cp == 1 or cfg.stage.objective == "flow", "dist.cp",
           "context parallelism shards DiT tokens: flow stages only")
    _check(not (ds and cfg.dist.async_save), "dist.async_save",
           "DeepSpeed writes its own checkpoints synchronously")
    if cfg.dist.cp > 1:
        _check(cfg.model.dit.num_heads % cfg.dist.cp == 0, "dist.cp",
               f"must divide model.dit.num_heads ({cfg.model.dit.num_heads})")
    _one_of(cfg.logger.kind, "logger.kind", ("wandb", "none"))
    _one_of(cfg.logger.mode, "logger.mode", ("offline", "online", "disabled"))
    _one_of(cfg.train.precision, "train.precision", ("fp32", "bf16"))
    _one_of(cfg.optim.schedule, "optim.schedule", ("cosine", "constant"))
    _check(cfg.train.steps > 0, "train.steps", "must be > 0")
    _check(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    _check(cfg.train.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    _check(cfg.train.keep_last >= 1, "train.keep_last", "must be >= 1")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _check(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(len(cfg.data.resolution) == 2, "data.resolution", "must be [height, width]")
    _check(len(cfg.optim.betas) == 2, "optim.betas", "must be [beta1, beta2]")
    if cfg.data.kind == "webdataset":
        _check(bool(cfg.data.shards), "data.shards", "required when data.kind=webdataset")

    ae = cfg.model.autoencoder
    tf, sf = ae.temporal_downsample, ae.spatial_downsample
    _check(
        (cfg.data.num_frames - 1) % tf == 0,
        "data.num_frames",
        f"{cfg.data.num_frames} frames cannot be compressed causally by "
        f"model.autoencoder.temporal_downsample={tf}: need 1 + k*{tf} frames",
    )
    h, w = cfg.data.resolution
    dit = cfg.model.dit
    ph, pw = dit.patch_size[1], dit.patch_size[2]
    for name, size, p in (("height", h, ph), ("width", w, pw)):
        _check(
            size % (sf * p) == 0,
            "data.resolution",
            f"{name} {size} must be divisible by model.autoencoder.spatial_downsample ({sf}) "
            f"x model.dit.patch_size ({p})",
        )
    latent_t = 1 + (cfg.data.num_frames - 1) // tf
    _check(
        latent_t % dit.patch_size[0] == 0,
        "model.dit.patch_size",
        f"temporal patch {dit.patch_size[0]} does not divide {latent_t} latent frames",
    )
    _check(
        dit.in_channels == ae.latent_channels,
        "model.dit.in_channels",
        f"{dit.in_channels} != model.autoencoder.latent_channels ({ae.latent_channels})",
    )
    _check(dit.text_dim == cfg.model.text.dim, "model.dit.text_dim",
           f"{dit.text_dim} != model.text.dim ({cfg.model.text.dim})")
    _check(dit.hidden_size % dit.num_heads == 0, "model.dit.num_heads",
           f"does not divide model.dit.hidden_size ({dit.hidden_size})")
    if cfg.stage.objective == "flow" and cfg.stage.name != "autoencoder":
        _check(
            cfg.stage.autoencoder_from is not None or cfg.stage.init_from is not None,
            "stage.autoencoder_from",
            "a latent stage needs a trained autoencoder: set stage.autoencoder_from=<run dir> "
            "(train one with stage=autoencoder), or run worldline-quickstart",
        )
    if cfg.stage.name == "autoencoder":
        _check(cfg.stage.objective == "autoencoder", "stage.objective",
               "stage=autoencoder trains with objective=autoencoder")


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain-dict view of a config (for config.yaml, W&B and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
