"""``data.*`` config → data loaders: the one recipe for every loader a run builds (training,
its resolution phases and prior-preservation mix, validation, probe clips for samples,
evaluation), so a new data option reaches all of them at once."""
from __future__ import annotations

from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from worldline.data.loader import ShardLoader
from worldline.data.probe import VideoLimits
from worldline.data.stage_loader import StageLoader
from worldline.data.synthetic import HELDOUT_SEED_OFFSET

__all__ = ["LoaderFactory"]


class LoaderFactory:
    """Builds ShardLoaders from ``cfg.data`` (+ overrides) for one data-parallel rank.

    Args:
        cfg: the composed run config (data.*, stage.* for schedule/prior/validation).
        dp_rank, dp_world: this rank's data-parallel coordinates (CP ranks share data).
        pin_memory: pin batches for a CUDA device.
    """

    def __init__(self, cfg: DictConfig, dp_rank: int = 0, dp_world: int = 1,
                 pin_memory: bool = False) -> None:
        self.cfg, self.dp_rank, self.dp_world, self.pin_memory = cfg, dp_rank, dp_world, \
            pin_memory
        d = cfg.data
        #: (num_frames, height, width) of the current resolution phase.
        self.clip_shape: tuple[int, int, int] = (d.num_frames, *d.resolution)

    def text_cached(self) -> bool:
        """Whether the training data are latent shards with cached text embeddings."""
        from worldline.train.components import latent_manifest

        return bool((latent_manifest(self.cfg) or {}).get("text_encoder"))

    def data(self, over: Optional[dict] = None) -> DictConfig:
        """``data.*`` with ``over`` merged in (phase sizes, validation or prior shards)."""
        return OmegaConf.merge(self.cfg.data, over or {}) if over else self.cfg.data

    def shards(self, d: DictConfig) -> str:
        """Shard spec for ``d`` (generates the synthetic world on first use)."""
        if d.kind == "synthetic":
            from worldline.data.shards import ensure_synthetic_dataset
            from worldline.data.synthetic import SyntheticWorldConfig

            syn = SyntheticWorldConfig(**OmegaConf.to_container(d.synthetic, resolve=True))
            return ensure_synthetic_dataset(d.root, syn)
        return d.shards

    def make(self, over: Optional[dict] = None, shuffle: Optional[bool] = None,
             seed_offset: int = 0) -> ShardLoader:
        """A loader for ``data.*`` + ``over``; ``shuffle=False``: every sample once, in order
        (evaluation passes)."""
        d = self.data(over)
        with_refs = ("refs" in self.cfg.stage.conditions) if d.with_refs is None else d.with_refs
        audio = ("audio" in self.cfg.stage.conditions) if d.get("audio") is None else d.audio
        return ShardLoader(
            self.shards(d),
            batch_size=d.batch_size,
            num_frames=d.num_frames,
            frame_stride=d.frame_stride,
            resolution=tuple(d.resolution),
            rank=self.dp_rank,
            world_size=self.dp_world,
            num_workers=d.num_workers,
            seed=self.cfg.run.seed + seed_offset,
            position=d.position,
            shuffle_shards=d.shuffle_shards if shuffle is None else shuffle,
            shuffle_buffer=d.shuffle_buffer if shuffle is None else 0,
            resample=d.resample if shuffle is None else False,
            input=d.input,
            fps=d.fps,
            crop=d.crop,
            max_crop=d.max_crop,
            buckets=[OmegaConf.to_container(b) for b in d.buckets] or None,
            upscale=d.upscale,
            max_skip_fraction=d.max_skip_fraction,
            skip_check_after=d.skip_check_after,
            decode_threads=d.decode_threads,
            channels_last=d.channels_last,
            with_refs=with_refs,
            audio_rate=int(self.cfg.model.audio.sample_rate) if audio else 0,
            # Action ids outside the model's vocabulary are skipped (bad_actions) before they
            # can index another slot's embedding rows.
            num_actions=int(self.cfg.model.dit.num_actions)
            if "actions" in self.cfg.stage.conditions and self.cfg.model.dit.num_action_slots
            else 0,
            pin_memory=self.pin_memory,
            exclude=d.get("exclude") or None,
            limits=VideoLimits(max_pixels=d.max_pixels) if d.get("max_pixels") else None,
            max_member_bytes=d.get("max_member_bytes", 2 << 30),
        )

    def phases(self) -> list[tuple[int, dict]]:
        """(start step, data overrides) of ``stage.schedule``; phase 0 is data.* unless the
        schedule starts at step 0."""
        d = self.cfg.data
        out = [(0, {"num_frames": d.num_frames, "resolution": list(d.resolution)})]
        for ph in self.cfg.stage.get("schedule") or []:
            o = {"num_frames": ph.num_frames, "resolution": list(ph.resolution)}
            if ph.batch_size is not None:
                o["batch_size"] = ph.batch_size
            if ph.step == 0:
                out[0] = (0, o)
            else:
                out.append((ph.step, o))
        return out

    def _set_phase(self, over: dict) -> None:
        self.clip_shape = (over["num_frames"], *over["resolution"])

    def training(self, step: Callable[[], int]) -> Any:
        """The training loader: one ShardLoader, or a StageLoader over the resolution
        schedule and the prior-preservation mix. ``step`` returns the optimizer step."""
        st = self.cfg.stage
        prior_ratio = st.prior.ratio if "prior" in st else 0.0
        if not st.get("schedule") and prior_ratio <= 0:
            return self.make()
        prior = None
        if prior_ratio > 0:
            prior = self.make({"kind": "webdataset", "shards": st.prior.shards}, seed_offset=17)
        phases = self.phases()
        return StageLoader(lambda i: self.make(phases[i][1]), [s for s, _ in phases], step,
                           prior=prior, ratio=prior_ratio,
                           on_phase=lambda i: self._set_phase(phases[i][1]))

    def current_shape(self) -> dict:
        """Overrides giving the current phase's clip size."""
        t, h, w = self.clip_shape
        return {"num_frames": t, "resolution": [h, w]}

    def validation(self) -> ShardLoader:
        """Held-out data for ``stage.validation`` (see :meth:`heldout`)."""
        d = self.cfg.data
        return self.heldout(d.batch_size * self.cfg.stage.validation.num_batches)

    def heldout_split(self) -> str:
        """"heldout" when :meth:`heldout` serves unseen clips, "train" when it falls back to
        data.shards (webdataset data without stage.validation.shards)."""
        held = self.cfg.stage.validation.shards or self.cfg.data.kind == "synthetic"
        return "heldout" if held else "train"

    def heldout_data(self, min_clips: int) -> dict:
        """``data`` overrides that select held-out clips: stage.validation.shards, else for
        the synthetic world a differently seeded world of at least ``min_clips`` unseen clips
        for every data-parallel rank and a shard per sub-stream (the loader refuses to leave
        one empty), else none (data.shards)."""
        v, d = self.cfg.stage.validation, self.cfg.data
        if v.shards:
            return {"kind": "webdataset", "shards": v.shards}
        if d.kind == "synthetic":
            syn = d.synthetic
            streams = self.dp_world * max(1, int(d.num_workers))
            return {"synthetic": {"seed": syn.seed + HELDOUT_SEED_OFFSET,
                                  "num_clips": max(syn.clips_per_shard * streams,
                                                   min_clips * self.dp_world)}}
        return {}

    def heldout(self, min_clips: int) -> ShardLoader:
        """Held-out data (:meth:`heldout_data`) in fixed order at the current phase's size."""
        return self.make({**self.heldout_data(min_clips), **self.current_shape()}, shuffle=False)

    def probe(self) -> ShardLoader:
        """The data in fixed order at the current phase's size (the same clips every time)."""
        return self.make(self.current_shape(), shuffle=False)
