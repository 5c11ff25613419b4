"""``WorldPipeline``: the models of one world model and what they do together.

A pipeline holds the video autoencoder (frozen, with its latent statistics), the world model
(text encoder + latent DiT + null text embedding) and the few settings that belong to the
trained model (which conditions it takes, the flow shift, its clip size). It encodes,
decodes, encodes text, generates whole clips (text-to-video, image-to-video, continuation)
and rolls the world forward frame by frame with the KV cache under actions and camera
moves. It is pure: no process group, no optimizer, no Hydra; device and dtype are handled
here only (:meth:`to`).

Training, validation, sampling, evaluation and ``worldline-sample`` all go through it; the
Trainer only points :attr:`forward_model` at the parallel-wrapped module it trains.

Load a trained run, a checkpoint, an export or a pipeline folder and roll out (CPU)::

    pipe = WorldPipeline.from_pretrained("runs/control")
    actions = torch.zeros(1, 17, 3, dtype=torch.long)           # [N, pixel frames, slots]
    video = pipe.rollout(["a red circle in a meadow"], num_frames=4, actions=actions)
    pipe.save_pretrained("exports/control")                     # model_index.json + folders
"""
from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from worldline.models.flow import (
    euler_sample,
    guided_velocity,
    heun_sample,
    multi_cfg_velocity,
    resolution_shift,
)
from worldline.train.pipeline_io import PipelineSettings
from worldline.train.tasks import clean_prefix_inputs

log = logging.getLogger(__name__)

__all__ = ["WorldPipeline", "PipelineSettings", "to_unit_range"]

def to_unit_range(video_u8: Tensor) -> Tensor:
    """uint8 [B, 3, T, H, W] → float [-1, 1]. Done on the device, after the transfer, so the
    host→device copy moves 1 byte per value instead of 4."""
    return video_u8.float().div_(127.5).sub_(1.0)


class WorldPipeline:
    """Autoencoder + world model of one trained run (see the module docstring).

    ``world_model`` is None for an autoencoder-only pipeline (the autoencoder stage)."""

    def __init__(self, autoencoder: nn.Module, world_model: Optional[nn.Module] = None,
                 settings: Optional[PipelineSettings] = None,
                 text_encoder: Optional[nn.Module] = None) -> None:
        self.autoencoder = autoencoder
        self.world_model = world_model
        #: A frozen pretrained text encoder (models.adapters.HFTextEncoder) when the world
        #: model has no built-in one; kept outside it, so never trained or sharded.
        self.external_text_encoder = text_encoder
        #: Loads the pretrained text encoder on first use, when a run keeps it out of memory
        #: (text embeddings cached in the data; only sampling needs it).
        self.text_encoder_loader: Optional[Callable[[], nn.Module]] = None
        self.settings = settings or PipelineSettings()
        #: The module forward passes of the world model go through: the world model itself,
        #: or the DDP/FSDP/DeepSpeed wrapper the Trainer trains it in (set by the Trainer).
        self.forward_model: Optional[Callable[..., Tensor]] = world_model
        #: Where from_pretrained read it (a checkpoint or folder), if anywhere.
        self.source: Optional[Path] = None
        self._audio_frontend: Optional[nn.Module] = None

    # ------------------------------------------------------------------ components
    @property
    def transformer(self) -> nn.Module:
        """The latent video DiT."""
        return self.world_model.dit

    @property
    def text_encoder(self) -> nn.Module:
        """The pretrained text encoder if there is one, else the world model's built-in."""
        return self.external_text_encoder or self.world_model.text_encoder

    @property
    def device(self) -> torch.device:
        # Buffers too: the pixel codec has no parameters, only its latent statistics.
        return next(chain(self.autoencoder.parameters(), self.autoencoder.buffers())).device

    @property
    def conditions(self) -> set[str]:
        return set(self.settings.conditions)

    def components(self) -> dict[str, nn.Module]:
        """Every module by name (what save_pretrained writes)."""
        out = {"vae": self.autoencoder}
        if self.world_model is not None:
            out["world_model"] = self.world_model
        if self.external_text_encoder is not None:
            out["text_encoder"] = self.external_text_encoder
        return out

    def to(self, device: torch.device | str | None = None,
           dtype: Optional[torch.dtype] = None) -> "WorldPipeline":
        """Move every model (weights in ``dtype`` when given; latent statistics stay fp32)."""
        for m in self.components().values():
            m.to(device=device)
            if dtype is not None:
                m.to(dtype=dtype)
                for name, b in m.named_buffers():
                    if name.endswith(("latent_mean", "latent_std")):
                        b.data = b.data.float()
        return self

    def eval(self) -> "WorldPipeline":
        for m in self.components().values():
            m.eval()
        return self

    # ------------------------------------------------------------------ shapes
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """(C, t, h, w) of a clip of ``num_frames`` frames at height x width."""
        return tuple(self.autoencoder.latent_shape(num_frames, height, width))

    def num_tokens(self, latent_shape: tuple[int, ...] | list[int]) -> int:
        """DiT tokens of one latent [C, t, h, w]."""
        _, t, h, w = latent_shape
        pt, ph, pw = self.transformer.args.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames of a clip of ``latent_frames`` latent frames (causal grouping: the
        first alone, then ``temporal_downsample`` each)."""
        return 1 + (latent_frames - 1) * self.transformer.args.temporal_downsample

    def shift_for(self, latent_shape: tuple[int, ...] | list[int]) -> float:
        """The flow time shift for latents of this shape."""
        s = self.settings.shift
        return s if s is not None else resolution_shift(self.num_tokens(latent_shape))

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_video(self, video: Tensor) -> Tensor:
        """Video (uint8 [B, 3, T, H, W], or float in [-1, 1]) → normalised latents
        [B, C, t, h, w] (posterior mean: deterministic)."""
        x = video.to(self.device)
        x = to_unit_range(x) if x.dtype == torch.uint8 else x
        mean, _ = self.autoencoder.encode(x)
        return self.autoencoder.normalize(mean)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] (uint8 or [-1, 1]) → normalised 1-frame latents [N, C, h, w]."""
        return self.encode_video(images[:, :, None])[:, :, 0]

    @torch.no_grad()
    def latents(self, batch: Mapping[str, Any], expected: Optional[tuple] = None) -> Tensor:
        """Normalised latents [B, C, t, h, w] of a batch: the cached posterior means of a
        latent-shard batch (stored unnormalised, so this model's statistics apply; the
        autoencoder never runs), or the encoding of ``video``. ``expected``: the latent
        shape the run is configured for; cached latents of another shape are an error."""
        if "latents" not in batch:
            return self.encode_video(batch["video"])
        lat = batch["latents"].to(self.device).float()
        if expected is not None and tuple(lat.shape[1:]) != tuple(expected):
            raise ValueError(
                f"latent shards hold {list(lat.shape[1:])} latents but data.num_frames / "
                f"data.resolution give {list(expected)}: re-encode with "
                f"worldline-encode-latents or match the data config (keys {batch['key'][:2]})")
        return self.autoencoder.normalize(lat)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, t, h, w] → video [B, 3, T, H, W] in [-1, 1]."""
        ae = self.autoencoder
        return ae.decode(ae.denormalize(latents)).clamp(-1, 1)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts → token ids and mask [N, L] on the pipeline's device (built-in encoder)."""
        if self.world_model.tokenizer is None:
            raise ValueError("this pipeline's text encoder is a pretrained one: use "
                             "encode_text (it tokenises with its own tokenizer)")
        ids, mask = self.world_model.tokenizer(list(prompts), self.settings.text_max_len)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts → text features [N, L, text_dim] and mask [N, L]."""
        if self.external_text_encoder is None and self.text_encoder_loader is not None:
            self.external_text_encoder = self.text_encoder_loader()
        if self.external_text_encoder is not None:
            emb, mask = self.external_text_encoder(list(prompts))
            return emb.to(self.device), mask.to(self.device)
        ids, mask = self.tokenize(prompts)
        return self.world_model.encode_text(ids, mask), mask

    # ------------------------------------------------------------------ conditions
    def condition_inputs(self, batch: Mapping[str, Any], n: int,
                         frames: Optional[int] = None) -> dict[str, Any]:
        """Text ids/mask (or cached embeddings), actions, camera and audio features of the
        first ``n`` samples of ``batch`` for the conditions this model takes (others None).
        ``frames``: pixel frames of the clip (audio is cut into one segment per frame;
        default: the batch's ``clip_shape``)."""
        active = self.conditions
        dev = self.device
        out: dict[str, Any] = {"text_ids": None, "text_mask": None, "text_emb": None}
        if "text" in active:
            if batch.get("text_emb") is not None:
                out["text_emb"] = batch["text_emb"][:n].to(dev)
                out["text_mask"] = batch["text_mask"][:n].to(dev).bool()
            elif self.external_text_encoder is not None or self.text_encoder_loader:
                out["text_emb"], out["text_mask"] = self.encode_text(
                    list(batch["caption"])[:n])
            else:
                out["text_ids"], out["text_mask"] = self.tokenize(list(batch["caption"])[:n])
        acts = batch.get("actions")
        out["actions"] = acts[:n].to(dev) if ("actions" in active and acts is not None
                                              and acts.shape[-1] > 0) else None
        cam = batch.get("camera")
        out["camera"] = cam[:n].to(dev).float() if ("camera" in active and cam is not None) \
            else None
        out["audio"] = out["audio_valid"] = None
        audio = batch.get("audio")
        if "audio" in active and audio is not None:
            clip = getattr(batch, "clip_shape", (None,))[0]
            frames = frames or clip
            if frames is None:
                raise ValueError("audio conditioning needs the clip's pixel frame count")
            audio, mask = audio[:n].to(dev).float(), batch.get("audio_mask")
            mask = torch.ones_like(audio, dtype=torch.bool) if mask is None \
                else mask[:n].to(dev).bool()
            if clip is not None and clip != frames:  # a rollout longer/shorter than the clip
                want = round(audio.shape[1] * frames / clip)
                pad = max(0, want - audio.shape[1])
                audio = torch.nn.functional.pad(audio, (0, pad))[:, :want]
                mask = torch.nn.functional.pad(mask, (0, pad))[:, :want]
            out["audio"], out["audio_valid"] = self.audio_frontend(audio, mask, frames)
        return out

    # ------------------------------------------------------------------ audio
    @property
    def audio_frontend(self) -> nn.Module:
        """The log-mel front end (no weights): audio [B, N] at ``settings.audio_rate`` →
        per-pixel-frame features [B, T, audio_dim] and their validity [B, T]."""
        if self._audio_frontend is None:
            from worldline.models.audio import LogMelFrames

            self._audio_frontend = LogMelFrames(self.settings.audio_rate,
                                                self.transformer.args.audio_dim).to(self.device)
        return self._audio_frontend

    def audio_samples(self, frames: int) -> int:
        """Audio samples that play during ``frames`` pixel frames at the trained frame rate
        (``settings.fps``; 8 fps, the synthetic world's, when the run did not fix one)."""
        return round(frames * self.settings.audio_rate / (self.settings.fps or 8.0))

    def audio_features(self, audio: Tensor, frames: int) -> tuple[Tensor, Tensor]:
        """A waveform [S] → features [1, frames, audio_dim] and valid [1, frames] exactly as
        :meth:`rollout` / :meth:`generate` compute them for a clip of ``frames`` pixel frames
        (so a stepwise player that slices these replays bitwise; see train/play/session.py)."""
        f = self._audio_fields(1, audio, frames)
        return self.audio_frontend(f["audio"].to(self.device).float(),
                                   f["audio_mask"].to(self.device).bool(), frames)

    def _audio_fields(self, n: int, audio: Optional[Tensor], frames: int) -> dict[str, Any]:
        """A user's waveform ([N] or [n, N] at ``settings.audio_rate``) → the batch fields
        ``audio``/``audio_mask`` covering ``frames`` pixel frames (silence-padded, masked)."""
        if audio is None:
            return {}
        wav = torch.as_tensor(audio, dtype=torch.float32)
        wav = wav[None].expand(n, -1) if wav.dim() == 1 else wav
        want = self.audio_samples(frames)
        out = torch.zeros((n, want))
        mask = torch.zeros((n, want), dtype=torch.bool)
        k = min(want, wav.shape[1])
        out[:, :k], mask[:, :k] = wav[:, :k], True
        return {"audio": out, "audio_mask": mask}

    def ref_input(self, refs: Optional[Tensor]) -> Optional[Tensor]:
        """Reference latents [B, K, C, h, w] as the DiT takes them: with the mask channel set
        to 1 (given, clean) when the model has one."""
        if refs is None or not self.transformer.args.mask_channel:
            return refs
        return torch.cat([refs, torch.ones_like(refs[:, :, :1])], dim=2)

    def velocity(self, x_in: Tensor, t_in: Tensor, cond: Mapping[str, Any], **kw: Any) -> Tensor:
        """One world-model forward (through :attr:`forward_model`) with ``cond`` from
        :meth:`condition_inputs`; ``kw``: drop_text, drop_actions, drop_audio, refs
        (DiT-ready)."""
        if cond.get("audio") is not None:
            kw = {**kw, "audio": cond["audio"], "audio_valid": cond["audio_valid"]}
        else:
            kw.pop("drop_audio", None)
        return self.forward_model(x_in, t_in, cond["text_ids"], cond["text_mask"],
                                  actions=cond["actions"], camera=cond["camera"],
                                  text_emb=cond["text_emb"], **kw)

    # ------------------------------------------------------------------ generation
    def _controls(self, n: int, actions: Optional[Tensor], camera: Optional[Tensor],
                  frames: int) -> dict[str, Any]:
        """User controls [T, S] or [N, T, S] → the batch fields for ``frames`` pixel frames."""
        out: dict[str, Any] = {}
        for key, v, dtype in (("actions", actions, torch.long), ("camera", camera, None)):
            if v is None:
                continue
            v = torch.as_tensor(v)
            v = v[None].expand(n, *v.shape) if v.dim() == 2 else v
            if v.shape[1] < frames:
                raise ValueError(f"{key}: {v.shape[1]} rows given, this video needs {frames} "
                                 f"(one per pixel frame)")
            out[key] = v[:, :frames].to(self.device, dtype or torch.float32)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_frames: Optional[int] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 actions: Optional[Tensor] = None, camera: Optional[Tensor] = None,
                 first_frame: Optional[Tensor] = None, prefix: Optional[Tensor] = None,
                 refs: Optional[Tensor] = None, seed: int = 0, num_steps: int = 8,
                 cfg_scale: float = 1.0, action_cfg_scale: float = 1.0,
                 solver: str = "euler", latent_shape: Optional[tuple] = None,
                 batch: Optional[Mapping[str, Any]] = None, audio: Optional[Tensor] = None,
                 audio_cfg_scale: float = 1.0) -> Tensor:
        """Whole clips [N, 3, T, H, W] in [-1, 1] for ``prompts``.

        Text-to-video by default; ``first_frame`` (images [N, 3, H, W] or one [3, H, W])
        makes it image-to-video and ``prefix`` (clean latents [N, C, n0, h, w]) a
        continuation. ``actions`` [T, S] / [N, T, S] and ``camera`` [T, 2] / [N, T, 2] give
        one control row per pixel frame; ``refs`` are reference latents [N, K, C, h, w]
        (see :meth:`encode_images`). Separate guidance scales for text and for
        actions/camera. ``audio``: a waveform [S] / [N, S] at ``settings.audio_rate`` whose
        first samples play during the clip (audio-conditioned models), guided by
        ``audio_cfg_scale``: v = v_guided + (s_audio - 1) * (v_full - v_no_audio).
        ``batch`` (data-loader fields) supplies controls not given."""
        n = len(prompts)
        f0, h0, w0 = self.settings.sample_size
        shape = tuple(latent_shape or self.latent_shape(num_frames or f0, height or h0,
                                                        width or w0))
        frames = self.pixel_frames(shape[1])
        fields = {**(batch or {}), **self._controls(n, actions, camera, frames),
                  **self._audio_fields(n, audio, frames), "caption": list(prompts),
                  "text_emb": None}
        cond = self.condition_inputs(fields, n, frames)
        if first_frame is not None:
            img = first_frame[None] if first_frame.dim() == 3 else first_frame
            prefix = self.encode_images(img.expand(n, -1, -1, -1))[:, :, None]
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(seed)
        noise = torch.randn((n, *shape), generator=g, device=dev)
        x0 = torch.zeros_like(noise)
        n0 = 0 if prefix is None else prefix.shape[2]
        if prefix is not None:
            x0[:, :, :n0] = prefix
        n_pre = torch.full((n,), n0, dtype=torch.long, device=dev)
        refs = self.ref_input(refs)
        none = torch.zeros(n, dtype=torch.bool, device=dev)
        mask_channel = self.transformer.args.mask_channel

        def velocity(x: Tensor, t: Tensor, drop_text: Tensor, drop_act: Tensor,
                     drop_audio: Tensor = none) -> Tensor:
            x_in, t_in, _ = clean_prefix_inputs(x0, x, t, n_pre, mask_channel)
            return self.velocity(x_in, t_in, cond, drop_text=drop_text, drop_actions=drop_act,
                                 drop_audio=drop_audio, refs=refs)

        guided = multi_cfg_velocity(lambda x, t: velocity(x, t, none, none),
                                    lambda x, t: velocity(x, t, ~none, none),
                                    lambda x, t: velocity(x, t, ~none, ~none, ~none),
                                    cfg_scale, action_cfg_scale)
        fn = guided
        if audio_cfg_scale != 1.0 and cond["audio"] is not None:
            def fn(x: Tensor, t: Tensor) -> Tensor:
                v_full = velocity(x, t, none, none)  # once: the text/action guidance uses it
                v = v_full if cfg_scale == 1.0 and action_cfg_scale == 1.0 else \
                    guided_velocity(v_full, velocity(x, t, ~none, none),
                                    velocity(x, t, ~none, ~none, ~none), cfg_scale,
                                    action_cfg_scale)
                return v + (audio_cfg_scale - 1.0) * (v_full - velocity(x, t, none, none, ~none))
        sampler = heun_sample if solver == "heun" else euler_sample
        z = sampler(fn, noise, num_steps, shift=self.shift_for(shape))
        if prefix is not None:
            z[:, :, :n0] = prefix
        return self.decode(z)

    @torch.no_grad()
    def rollout(self, prompts: list[str], num_frames: int, *,
                first_frame: Optional[Tensor] = None, context: Optional[Tensor] = None,
                actions: Optional[Tensor] = None, camera: Optional[Tensor] = None,
                refs: Optional[Tensor] = None, window: Optional[int] = None,
                sink_frames: int = 0, num_steps: int = 8, cfg_scale: float = 1.0,
                action_cfg_scale: float = 1.0, seed: int = 0,
                height: Optional[int] = None, width: Optional[int] = None,
                batch: Optional[Mapping[str, Any]] = None,
                return_latents: bool = False, audio: Optional[Tensor] = None) -> Tensor:
        """Roll the world forward ``num_frames`` latent frames, one at a time with the KV
        cache (block-causal models), and decode: video [N, 3, T, H, W] in [-1, 1] with
        T = 1 + (n0 + num_frames - 1) * temporal_downsample.

        The start is ``context`` (clean latents [N, C, n0, h, w]), else ``first_frame``
        (images), else a first frame generated from the prompts. ``actions``/``camera``:
        one row per pixel frame of the whole video ([T, S] or [N, T, S]); ``audio``: a
        waveform of the whole video ([S] / [N, S] at ``settings.audio_rate``), streamed
        to the model frame by frame (each latent frame hears only its own and earlier
        audio). ``window``/``sink_frames``: the KV cache keeps the ``window`` most recent past
        frames plus the first ``sink_frames`` for good (None: everything); a self-forcing
        student rolls out with ``num_steps`` 1-4."""
        from worldline.models.rollout import rollout as kv_rollout

        dit = self.transformer
        if not dit.args.frame_causal:
            raise ValueError("rollout needs a block-causal model (model.dit.frame_causal=true)")
        n = len(prompts)
        if context is None and first_frame is not None:
            img = first_frame[None] if first_frame.dim() == 3 else first_frame
            context = self.encode_images(img.expand(n, -1, -1, -1))[:, :, None]
        if context is None:
            _, h0, w0 = self.settings.sample_size
            first = self.generate(prompts, num_frames=1, height=height or h0,
                                  width=width or w0, actions=actions, camera=camera,
                                  refs=refs, seed=seed, num_steps=num_steps,
                                  cfg_scale=cfg_scale, action_cfg_scale=action_cfg_scale,
                                  batch=batch, audio=audio)
            context = self.encode_images(first[:, :, 0])[:, :, None]
        frames = self.pixel_frames(context.shape[2] + num_frames)
        fields = {**(batch or {}), **self._controls(n, actions, camera, frames),
                  **self._audio_fields(n, audio, frames), "caption": list(prompts),
                  "text_emb": None}
        cond = self.condition_inputs(fields, n, frames)
        for k in ("actions", "camera"):
            if cond[k] is not None and cond[k].shape[1] < frames:
                raise ValueError(f"{k}: a rollout of {num_frames} latent frames after "
                                 f"{context.shape[2]} needs {frames} rows (one per pixel "
                                 f"frame), got {cond[k].shape[1]}")
            if cond[k] is not None:
                cond[k] = cond[k][:, :frames]
        text = cond["text_emb"]
        if text is None and cond["text_ids"] is not None:
            text = self.world_model.encode_text(cond["text_ids"], cond["text_mask"])
        g = torch.Generator(device=self.device).manual_seed(seed)
        latent_shape = (context.shape[1], context.shape[2] + num_frames, *context.shape[3:])
        gen = kv_rollout(dit, context, num_frames, text=text, text_mask=cond["text_mask"],
                         null_text=self.world_model.null_text, actions=cond["actions"],
                         camera=cond["camera"], audio=cond["audio"],
                         audio_valid=cond["audio_valid"], refs=refs, window=window,
                         sink=sink_frames, num_steps=num_steps,
                         shift=self.shift_for(latent_shape), text_scale=cfg_scale,
                         action_scale=action_cfg_scale, generator=g)
        z = torch.cat([context, gen], 2)
        return z if return_latents else self.decode(z)

    @staticmethod
    def save_video(video: Tensor, path: str | Path, fps: float = 8.0) -> list[Path]:
        """Write videos [N, 3, T, H, W] in [-1, 1] as mp4 files (``path``, or ``<stem>_<i>``
        for several). Returns the paths."""
        from worldline.data.video import write_mp4
        from worldline.train.media import to_uint8_frames

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = []
        for i, frames in enumerate(to_uint8_frames(video)):
            p = path if len(video) == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")
            write_mp4(p, frames, fps)
            out.append(p)
        return out

    # ------------------------------------------------------------------ folders
    @classmethod
    def from_pretrained(cls, path: str | Path, *, use_ema: bool = True,
                        device: torch.device | str | None = None,
                        dtype: Optional[torch.dtype] = None) -> "WorldPipeline":
        """Load a pipeline folder (``model_index.json``), an export folder, a checkpoint
        (DCP or DeepSpeed, any backend and world size), a run dir (its latest checkpoint) or
        a ``worldline-lora`` folder (its ``base/`` with the PEFT adapter applied as live LoRA
        layers, after checking the base is the one it was trained on: the adapter stays
        separable and a wrong base fails loudly; ``<dir>/merged`` is the same model merged).
        EMA weights when the checkpoint has them and ``use_ema``. One process, no process
        group."""
        from worldline.train.lora_export import is_lora_export, load_lora_export
        from worldline.train.pipeline_io import load_pipeline

        path = Path(path)
        parts = (load_lora_export(path) if is_lora_export(path)
                 else load_pipeline(path, use_ema=use_ema))
        pipe = cls(parts.autoencoder, parts.world_model, parts.settings, parts.text_encoder)
        pipe.source = parts.source
        pipe.eval()
        if device is not None or dtype is not None:
            pipe.to(device, dtype)
        return pipe

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``model_index.json`` + one folder per component (``config.json`` +
        ``model.safetensors``); LoRA adapters are merged into the saved weights."""
        from worldline.train.pipeline_io import save_pipeline

        return save_pipeline(self.autoencoder, self.world_model, self.settings, Path(path),
                             self.external_text_encoder)
