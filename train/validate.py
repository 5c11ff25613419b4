"""Cross-field config rules that types cannot express, checked right after composition and
before any worker, model or data exists. Each failure is one :class:`ConfigError` naming the key.

Types, unknown keys and the allowed values of enum fields (``train.precision``,
``dist.backend``, ...) are the schema's job (train/config.py): OmegaConf rejects them while
composing, before this runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from worldline.models.pixel_codec import pixel_latent_channels
from worldline.train.config import ConfigError, WorldlineConfig
from worldline.train.config_enums import ActivationCheckpointing

__all__ = ["ConfigError", "data_controls", "validate"]

log = logging.getLogger(__name__)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key}: {msg}")


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
    if isinstance(cfg, DictConfig):
        from worldline.train.components import resolve_pretrained

        resolve_pretrained(cfg)
    _check(cfg.dist.ac_every >= 1, "dist.ac_every", "must be >= 1")
    # Hydra composition already rejects other values of the enum; a config built in code
    # (WorldlineConfig(...)) is not type-checked, so the rule is repeated here.
    ac_modes = [m.value for m in ActivationCheckpointing]
    _check(str(cfg.dist.activation_checkpointing) in ac_modes, "dist.activation_checkpointing",
           f"{cfg.dist.activation_checkpointing!r} is not one of {', '.join(ac_modes)}")
    # Ulysses CP replaces each block's attn.forward after AC: it would drop attention-only AC.
    _check(cfg.dist.cp == 1 or cfg.dist.activation_checkpointing != "attention",
           "dist.activation_checkpointing",
           "attention-only checkpointing with context parallelism (dist.cp > 1) is not "
           "supported yet; use full, every_k or selective")
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
    _check(cfg.train.steps > 0, "train.steps", "must be > 0")
    _check(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    _check(cfg.train.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    _check(cfg.train.keep_last >= 1, "train.keep_last", "must be >= 1")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _check(cfg.train.ema_every >= 1, "train.ema_every", "must be >= 1")
    _check(cfg.train.profile >= 0, "train.profile", "must be >= 0 (0: off)")
    _validate_faults(cfg)
    _check(len(cfg.optim.betas) == 2, "optim.betas", "must be [beta1, beta2]")

    _validate_data(cfg)
    _validate_launch(cfg)
    ae, dit = cfg.model.autoencoder, cfg.model.dit
    _check(
        dit.in_channels == ae.latent_channels,
        "model.dit.in_channels",
        f"{dit.in_channels} != model.autoencoder.latent_channels ({ae.latent_channels})",
    )
    _check(dit.text_dim == cfg.model.text.dim or bool(cfg.model.text_encoder.pretrained),
           "model.dit.text_dim", f"{dit.text_dim} != model.text.dim ({cfg.model.text.dim})")
    _check(dit.get("prediction", "v") in ("v", "x"), "model.dit.prediction",
           f"must be v (velocity) or x (clean latents), got {dit.get('prediction')!r}")
    _check(dit.get("prediction", "v") == "v" or dit.get("arch", "worldline") == "worldline",
           "model.dit.prediction", "x-prediction is built into Worldline's own DiT only "
           "(model.dit.arch=worldline)")
    _check(dit.hidden_size % dit.num_heads == 0, "model.dit.num_heads",
           f"does not divide model.dit.hidden_size ({dit.hidden_size})")
    pixel = ae.get("kind", "conv") == "pixel"
    _check(ae.get("kind", "conv") in ("conv", "pixel"), "model.autoencoder.kind",
           f"must be conv or pixel, got {ae.get('kind')!r}")
    _check(not (pixel and cfg.stage.objective == "autoencoder"), "model.autoencoder.kind",
           "the pixel codec has no weights to train: skip the autoencoder stage and train a "
           "latent stage directly (no stage.autoencoder_from needed)")
    if pixel:
        want = pixel_latent_channels(ae.in_channels, ae.temporal_downsample,
                                     ae.spatial_downsample)
        _check(ae.latent_channels == want, "model.autoencoder.latent_channels",
               f"the pixel codec's latents have in_channels x temporal_downsample x "
               f"spatial_downsample^2 = {want} channels, got {ae.latent_channels}")
    if cfg.stage.objective == "flow" and cfg.stage.name != "autoencoder":
        _check(
            cfg.stage.autoencoder_from is not None or cfg.stage.init_from is not None
            or bool(cfg.model.vae.pretrained) or pixel,
            "stage.autoencoder_from",
            "a latent stage needs a trained autoencoder: set stage.autoencoder_from=<run dir> "
            "(train one with stage=autoencoder), or run worldline-quickstart",
        )
    _check(not (cfg.model.vae.pretrained and cfg.stage.objective == "autoencoder"),
           "model.vae.pretrained", "a pretrained VAE is frozen: the autoencoder stage trains "
           "Worldline's own autoencoder (drop model.vae.pretrained, or train a latent stage)")
    a = cfg.stage.ae
    if a.gan_start >= 0 or a.perceptual_path:
        _check(cfg.stage.objective == "autoencoder", "stage.ae",
               "perceptual / GAN terms belong to the autoencoder stage")
        _check(cfg.dist.backend in ("single", "ddp", "fsdp"), "stage.ae.gan_start",
               "the discriminator is trained beside the model with DCP checkpoints: "
               "dist.backend must be single, ddp or fsdp")
    if a.perceptual_path:
        _check(cfg.model.autoencoder.perceptual_weight > 0, "model.autoencoder.perceptual_weight",
               "must be > 0 when stage.ae.perceptual_path is set")
    _check(a.disc_layers >= 1 and a.disc_channels >= 4, "stage.ae.disc_layers",
           "the discriminator needs >= 1 layer of >= 4 channels")
    if cfg.stage.name == "autoencoder":
        _check(cfg.stage.objective == "autoencoder", "stage.objective",
               "stage=autoencoder trains with objective=autoencoder")
    _validate_stage(cfg)
    _validate_controls(cfg)


def _frames_and_size(cfg: Any, key: str, num_frames: int, resolution: list[int]) -> None:
    tf = cfg.model.autoencoder.temporal_downsample
    sf = cfg.model.autoencoder.spatial_downsample
    p = cfg.model.dit.patch_size
    _check((num_frames - 1) % tf == 0, key, f"{num_frames} frames: need 1 + k*{tf}")
    _check(len(resolution) == 2 and all(r % (sf * p[1]) == 0 for r in resolution), key,
           f"resolution {list(resolution)} must be [h, w] divisible by {sf * p[1]}")


def _validate_stage(cfg: Any) -> None:
    """Rules of the stage features (task mix, schedule, freeze policy, LoRA, validation)."""
    st, dit = cfg.stage, cfg.model.dit
    active = set(st.conditions)
    if st.objective != "flow":
        return
    tk = st.tasks
    probs = (tk.t2v, tk.i2v, tk.continuation)
    _check(min(probs) >= 0 and sum(probs) > 0, "stage.tasks",
           "probabilities must be >= 0 with a positive sum")
    _check(0.0 <= tk.uniform_prob <= 1.0, "stage.tasks.uniform_prob", "must be in [0, 1]")
    _check(tk.i2v + tk.continuation == 0 or dit.mask_channel, "stage.tasks",
           "image-to-video / continuation mark their clean frames with the mask channel: set "
           "model.dit.mask_channel=true")
    f = st.flow
    for k in ("text_dropout", "action_dropout", "ref_dropout", "audio_dropout"):
        _check(0.0 <= f[k] <= 1.0, f"stage.flow.{k}", "must be in [0, 1]")
    _check(f.moving_weight >= 0, "stage.flow.moving_weight", "must be >= 0 (0: off)")
    _check("actions" not in active or dit.num_action_slots > 0 or dit.action_dim > 0,
           "stage.conditions", "actions need model.dit.num_action_slots or model.dit.action_dim")
    _check("camera" not in active or dit.camera_dim > 0, "stage.conditions",
           "camera needs model.dit.camera_dim > 0")
    if "audio" in active:
        au = cfg.model.audio
        _check(au.sample_rate >= 1000 and au.n_mels >= 1, "model.audio",
               "sample_rate >= 1000 and n_mels >= 1")
        _check(dit.get("audio_mode", "modulation") in ("modulation", "cross_attn"),
               "model.dit.audio_mode", "modulation or cross_attn")
        _check(cfg.data.get("audio") is not False, "data.audio",
               "stage.conditions has audio: the loader must decode it (data.audio=null/true)")
    if "refs" in active:
        _check(1 <= st.num_refs <= dit.max_refs, "stage.num_refs",
               f"must be in [1, model.dit.max_refs={dit.max_refs}] when conditions has refs")
    last = -1
    for i, ph in enumerate(st.schedule):
        _check(ph.step > last, f"stage.schedule[{i}].step", "phase steps must increase")
        last = ph.step
        _frames_and_size(cfg, f"stage.schedule[{i}]", ph.num_frames, list(ph.resolution))
        _check(ph.batch_size is None or ph.batch_size >= 1, f"stage.schedule[{i}].batch_size",
               "must be >= 1")
    fp = st.freeze_policy
    _check(fp.steps >= 0, "stage.freeze_policy.steps", "must be >= 0")
    _check(fp.steps == 0 or st.init_from is not None or bool(cfg.model.dit.pretrained)
           or not fp.new_modules or fp.train_first,
           "stage.freeze_policy", "new modules are found relative to stage.init_from; set it "
           "or list stage.freeze_policy.train_first")
    _check(fp.steps == 0 or cfg.dist.backend != "ddp" or cfg.dist.find_unused_parameters,
           "stage.freeze_policy", "DDP with parameters frozen mid-run needs "
           "dist.find_unused_parameters=true")
    lo = st.lora
    if lo.enabled:
        _check(lo.rank >= 1, "stage.lora.rank", "must be >= 1")
        _check(bool(lo.targets), "stage.lora.targets", "list at least one projection")
        _check(fp.steps == 0, "stage.lora", "LoRA trains adapters only; drop the freeze policy")
    v = st.validation
    _check(v.every >= 0 and v.num_batches >= 1, "stage.validation", "every >= 0, num_batches >= 1")
    _check(v.patience == 0 or v.every > 0, "stage.validation.patience",
           "early stopping needs periodic validation (stage.validation.every > 0)")
    _check(0.0 <= st.prior.ratio < 1.0, "stage.prior.ratio", "must be in [0, 1)")
    _check(st.prior.ratio == 0 or bool(st.prior.shards), "stage.prior.shards",
           "required when stage.prior.ratio > 0 (the pretraining shards to mix in)")
    _check(st.epochs is None or st.epochs >= 1, "stage.epochs", "must be >= 1")
    if st.name == "self_forcing":
        _validate_self_forcing(cfg)


def _validate_self_forcing(cfg: Any) -> None:
    """Rules of stage=self_forcing (train/self_forcing.py)."""
    # stage.init_from (the teacher) is mandatory in conf/stage/self_forcing.yaml (???), and
    # checked when the teacher is loaded: worldline-sample/-eval validate a finished run's
    # config with init_from cleared, since sampling the student needs no teacher.
    st, sf = cfg.stage, cfg.stage.self_forcing
    _check(bool(cfg.model.dit.frame_causal) and cfg.model.dit.patch_size[0] == 1,
           "model.dit.frame_causal", "the student rolls out on a KV cache: needs "
           "frame_causal=true and patch_size[0]=1")
    _check(1 <= sf.student_steps <= 4, "stage.self_forcing.student_steps", "must be in 1..4")
    _check(sf.teacher_steps >= sf.student_steps and sf.teacher_steps % sf.student_steps == 0,
           "stage.self_forcing.teacher_steps",
           "must be a multiple of student_steps (the ODE pairs are read at the student's times)")
    _check(sf.guidance_scale >= 0 and sf.fake_lr > 0 and sf.fake_updates >= 1,
           "stage.self_forcing", "guidance_scale >= 0, fake_lr > 0, fake_updates >= 1")
    _check(sf.ode_init_steps >= 0 and sf.context_frames >= 0, "stage.self_forcing",
           "ode_init_steps and context_frames must be >= 0")
    _check(0.0 < sf.min_t < sf.max_t < 1.0, "stage.self_forcing.min_t",
           "need 0 < min_t < max_t < 1")
    _check((sf.kv_window is None or sf.kv_window >= 1) and sf.sink_frames >= 0,
           "stage.self_forcing.kv_window", "kv_window >= 1 (or null), sink_frames >= 0")
    _check(str(cfg.dist.backend) in ("single", "ddp", "fsdp"), "dist.backend",
           "the fake score is trained beside the student with DCP checkpoints: single, ddp "
           "or fsdp")
    _check(st.lora.enabled is False, "stage.lora", "self-forcing trains the whole student")


def _validate_faults(cfg: Any) -> None:
    """Fault-handling knobs (train/guard.py, train/watchdog.py, checkpoint write errors)."""
    t, d = cfg.train, cfg.dist
    _check(t.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", "must be >= 1")
    _check(d.timeout_s > 0, "dist.timeout_s", "must be > 0")
    _check(d.heartbeat_s >= 0 and d.stall_timeout_s >= 0, "dist.heartbeat_s",
           "heartbeat_s and stall_timeout_s must be >= 0 (0 disables the watchdog)")
    _check(d.heartbeat_s == 0 or d.stall_timeout_s < d.timeout_s, "dist.stall_timeout_s",
           f"{d.stall_timeout_s} must be below dist.timeout_s ({d.timeout_s}) so a stalled "
           "rank is named before the collective times out anonymously")
    _check(d.heartbeat_s == 0 or d.heartbeat_s <= d.stall_timeout_s, "dist.heartbeat_s",
           f"{d.heartbeat_s} must be <= dist.stall_timeout_s ({d.stall_timeout_s})")
    if d.backend == "deepspeed_zero3":
        # ZeRO-3 re-partitions parameters after every forward: keeping them gathered is
        # ZeRO-2's behaviour, and per-block torch.compile would run before DeepSpeed installs
        # its parameter-gathering hooks on those blocks.
        _check(d.reshard_after_forward, "dist.reshard_after_forward",
               "false cannot be combined with dist.backend=deepspeed_zero3 (ZeRO-3 always "
               "re-partitions after forward); use deepspeed_zero2 to keep parameters whole")
        # Only an explicit true: auto (null) resolves to off there (train/parallel/compile.py).
        _check(d.compile_blocks is not True, "dist.compile_blocks",
               "per-block torch.compile is not supported with dist.backend=deepspeed_zero3; "
               "use dist=fsdp for compiled blocks")
    m = cfg.model
    if m.max_resolution is not None or m.max_frames is not None:
        _check(m.max_resolution is None or len(m.max_resolution) == 2, "model.max_resolution",
               "must be [height, width]")
        max_h, max_w = m.max_resolution or (None, None)
        shapes = [("data.resolution", *cfg.data.resolution, cfg.data.num_frames)]
        shapes += [(f"data.buckets[{i}]", b.height, b.width, b.num_frames)
                   for i, b in enumerate(cfg.data.buckets)]
        for key, h, w, t in shapes:
            _check(max_h is None or (h <= max_h and w <= max_w), key,
                   f"{h}x{w} is larger than model.max_resolution [{max_h}, {max_w}]")
            _check(m.max_frames is None or t <= m.max_frames, key,
                   f"{t} frames exceed model.max_frames ({m.max_frames})")


def _check_clip_shape(cfg: Any, h: int, w: int, t: int, key: str, t_key: str) -> None:
    """A clip of ``t`` frames at ``h x w`` must compress causally and patchify exactly."""
    ae, dit = cfg.model.autoencoder, cfg.model.dit
    tf, sf = ae.temporal_downsample, ae.spatial_downsample
    _check((t - 1) % tf == 0, t_key,
           f"{t} frames cannot be compressed causally by model.autoencoder.temporal_downsample="
           f"{tf}: need 1 + k*{tf} frames")
    for name, size, p in (("height", h, dit.patch_size[1]), ("width", w, dit.patch_size[2])):
        _check(size % (sf * p) == 0, key,
               f"{name} {size} must be divisible by model.autoencoder.spatial_downsample ({sf}) "
               f"x model.dit.patch_size ({p})")
    latent_t = 1 + (t - 1) // tf
    _check(latent_t % dit.patch_size[0] == 0, "model.dit.patch_size",
           f"temporal patch {dit.patch_size[0]} does not divide {latent_t} latent frames "
           f"({key})")


def data_controls(cfg: Any) -> tuple[dict | None, str]:
    """The controls the training data carries (``data.controls``) and where that was read:
    the synthetic world's from its config, shards' from their manifest; None when unknown
    (no manifest, or one written before controls were recorded)."""
    d = cfg.data
    if d.kind == "synthetic":
        from worldline.data.synthetic import NUM_ACTIONS

        n, slots = int(d.synthetic.num_clips), int(d.synthetic.num_sprites)
        return ({"samples": n, "camera": n, "refs": 0,
                 "actions": {"samples": n, "slots": [slots], "min": 0, "max": NUM_ACTIONS - 1}},
                "data.synthetic")
    path = Path(str(d.shards or ""))
    manifest = path / "manifest.json" if path.is_dir() else path
    if manifest.name != "manifest.json" or not manifest.is_file():
        return None, ""
    try:
        return json.loads(manifest.read_text()).get("controls"), str(manifest)
    except (OSError, ValueError):  # unreadable here: the loader reports it, naming the file
        return None, ""


def _validate_controls(cfg: Any) -> None:
    """The model's action table against the actions the data carries, and the conditions
    against the controls present, before any worker starts."""
    st, dit = cfg.stage, cfg.model.dit
    active = set(st.conditions)
    if st.objective != "flow" or not active & {"actions", "camera"}:
        return
    ctl, where = data_controls(cfg)
    if not ctl or not ctl.get("samples"):
        return
    acts = ctl.get("actions")
    # A condition the data lacks is legal (fine-tuning a controllable model on style clips
    # keeps its action modules), but worth saying: those modules only see the null path.
    missing = [name for name, present in (("actions", acts is not None),
                                          ("camera", bool(ctl.get("camera"))))
               if name in active and not present]
    if missing:
        keep = ",".join(c for c in st.conditions if c not in missing)
        log.warning("stage.conditions has %s, but no sample of %s carries them: their "
                    "modules are added and will only ever see the null path (set "
                    "stage.conditions=[%s] to leave them out)", " and ".join(missing), where,
                    keep)
    if "actions" in active and acts is not None:
        if dit.action_dim == 0 and dit.num_action_slots > 0:
            slots = acts["slots"]
            _check(slots == [dit.num_action_slots], "model.dit.num_action_slots",
                   f"is {dit.num_action_slots}, but the data's actions have {slots} slots per "
                   f"frame ({where}); set model.dit.num_action_slots={slots[0]}")
            _check(acts["min"] >= 0 and acts["max"] < dit.num_actions, "model.dit.num_actions",
                   f"is {dit.num_actions}, but the data's action ids span [{acts['min']}, "
                   f"{acts['max']}] ({where}); ids must lie in [0, model.dit.num_actions): set "
                   f"model.dit.num_actions={max(acts['max'] + 1, dit.num_actions)}")


def _validate_data(cfg: Any) -> None:
    d = cfg.data
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(len(d.resolution) == 2, "data.resolution", "must be [height, width]")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _check(d.fps is None or (d.fps > 0 and d.frame_stride == 1), "data.fps",
           "must be > 0 and cannot be combined with data.frame_stride != 1")
    _check(0.0 <= d.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in [0, 1]")
    _check(0.0 <= d.max_crop <= 1.0, "data.max_crop",
           "must be in [0, 1]: the most a crop may remove of a resized side (1 = crop to cover)")
    _check(d.decode_threads >= 1, "data.decode_threads", "must be >= 1")
    _check(not d.get("exclude") or os.path.isfile(d.exclude), "data.exclude",
           f"opt-out list {d.get('exclude')!r} is not a file")
    _check(d.max_pixels is None or d.max_pixels >= 1, "data.max_pixels", "must be >= 1 (or null)")
    _check(d.max_member_bytes >= 1, "data.max_member_bytes", "must be >= 1")
    if d.kind == "webdataset":
        _check(bool(d.shards), "data.shards", "required when data.kind=webdataset")
        folder = Path(str(d.shards))
        _check(not folder.is_dir() or (folder / "manifest.json").is_file(), "data.shards",
               f"{folder} is a folder without manifest.json (not a finished worldline-shards "
               f"output); name its shards instead: '\"{folder}/shard-{{000000..000009}}.tar\"'")
    _check(d.input == "pixel" or d.kind == "webdataset", "data.input",
           "latent input streams latent shards: set data.kind=webdataset and data.shards to "
           "the output of scripts/encode_latents.py")
    _check(d.input == "pixel" or cfg.stage.objective == "flow", "data.input",
           "the autoencoder stage trains on pixels")
    h, w = d.resolution
    _check_clip_shape(cfg, h, w, d.num_frames, "data.resolution", "data.num_frames")
    for i, b in enumerate(d.buckets):
        key = f"data.buckets[{i}]"
        _check(min(b.height, b.width, b.num_frames, b.batch_size) >= 1, key,
               "height, width, num_frames and batch_size must be >= 1")
        _check_clip_shape(cfg, b.height, b.width, b.num_frames, key, key)


def _validate_launch(cfg: Any) -> None:
    """preempt.* and slurm.* (what worldline-submit renders and the Trainer's stop handling)."""
    import re
    import signal

    for name in cfg.preempt.signals:
        _check(name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"),
               "preempt.signals", f"{name!r} is not a catchable signal name (e.g. SIGUSR1)")
    _check(cfg.preempt.check_every >= 1, "preempt.check_every", "must be >= 1")
    s = cfg.slurm
    _check(s.nodes >= 1, "slurm.nodes", "must be >= 1")
    _check(s.gpus_per_node >= 0, "slurm.gpus_per_node", "must be >= 0")
    _check(s.cpus_per_task is None or s.cpus_per_task >= 1, "slurm.cpus_per_task", "must be >= 1")
    # sbatch's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
    _check(re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", str(s.time)) is not None, "slurm.time",
           f"{s.time!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    _check(s.signal_s >= 0, "slurm.signal_s", "must be >= 0")
    _check(s.max_restarts >= 0, "slurm.max_restarts", "must be >= 0")
    for opt in s.extra:
        _check(str(opt).startswith("-"), "slurm.extra", f"{opt!r} is not an sbatch option")


def override_hints(argv: list[str]) -> list[str]:
    """Hints for command-line overrides Hydra will refuse with a bare grammar error: a
    ``shards`` value with an unquoted brace pattern (Hydra reads ``{`` as a dict)."""
    hints = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~").endswith("shards") and "{" in value and value[:1] not in ("'", '"'):
            hints.append(f"hint: {key}={value} has an unquoted brace pattern, which Hydra parses as a "
                         f"dict; quote the value inside the argument: '{key}=\"{value}\"'")
    return hints
