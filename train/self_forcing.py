"""Stage ``self_forcing``: few-step causal distillation for real-time rollouts.

The student (the trained module, initialised from the ``stage.init_from`` teacher) is trained
on its *own* rollouts, as it will be used (Self-Forcing, Huang et al. 2025): each clip is
continued from its first ``context_frames`` real latent frames one latent frame at a time on
the student's KV cache, each frame denoised in ``student_steps`` Euler steps exactly as
``models.rollout.rollout`` samples. Only the last denoising step of each frame carries a
gradient; the earlier steps and the clean pass that writes the frame's K/V into the cache run
under ``no_grad`` (memory stays one forward per frame; the past is what the student made).

The rollout is scored by distribution-matching distillation (DMD, Yin et al. 2024): at a
random noise level the frozen teacher ("real" score, optionally guided) and a trained "fake"
score (initialised from the teacher, fitted by the flow loss to the student's detached
samples after every student update: :class:`FakeScoreStep`, the loop's ``auxiliary``
optimizer like the PatchGAN's) predict the clean clip; the student's frames are pushed along
``x0_real - x0_fake`` (normalised, DMD2). Before DMD, ``ode_init_steps`` steps regress the
student onto teacher ODE pairs (CausVid): the teacher integrates the whole clip in
``teacher_steps`` steps and the student predicts its end point from the trajectory's states
at the student's times, a random time per frame.

The student keeps the teacher's conditions (text, actions, camera, references, audio): every
forward passes the batch's. Checkpoints hold the student (model/optimizer/EMA), the fake score
and its optimizer; the teacher is re-read from ``stage.init_from`` (frozen), so a resume is
exact. ``worldline-sample sample.mode=rollout sample.num_steps=4`` samples the student.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from worldline.models.flow import (
    flow_loss,
    interpolate,
    sample_timesteps,
    sampling_schedule,
    shift_timesteps,
    velocity_target,
)
from worldline.models.rollout import KVCache, _controls, audio_kwargs
from worldline.train.objectives import FlowObjective, MicroBatchRNG
from worldline.train.pipeline import WorldPipeline
from worldline.train.tasks import clean_prefix_inputs

log = logging.getLogger(__name__)

__all__ = ["SelfForcingObjective", "FakeScoreStep", "FrameModel", "self_rollout",
           "dmd_loss", "teacher_trajectory", "load_score_models", "unused_nulls"]

#: The DiT's model call for one span of latent frames (see :class:`FrameModel`).
FrameFn = Callable[..., Any]


class FrameModel:
    """Frame-wise calls of one world model (student, teacher or fake score) with one batch's
    conditions: ``fn(x, t, start, past, refs, return_kv=False)`` on latent frames
    ``start..`` of ``x`` [B, C, n, h, w] at times ``t`` [B, n], attending to the cached
    ``past``. It goes through ``model`` (for the student the DDP/FSDP wrapper the engine
    trains), so gradients are synchronised like any other forward."""

    def __init__(self, model: Callable[..., Any], pipe: WorldPipeline,
                 cond: Mapping[str, Any], drop: Optional[Tensor] = None) -> None:
        self.model, self.pipe, self.cond, self.drop = model, pipe, cond, drop
        self.args = pipe.transformer.args

    def __call__(self, x: Tensor, t: Tensor, start: int, past: Any, refs: Optional[Tensor],
                 return_kv: bool = False, cached: int = 0) -> Any:
        c, tf, n = self.cond, self.args.temporal_downsample, x.shape[2]
        if self.args.mask_channel:  # clean (t = 0) frames are given ones: mask 1
            m = (t == 0).to(x.dtype)[:, None, :, None, None].expand(-1, 1, -1, *x.shape[3:])
            x = torch.cat([x, m], 1)
        aud = audio_kwargs(self.pipe.transformer, c.get("audio"), c.get("audio_valid"), start,
                           n, cached, tf)
        return self.model(x, t, c["text_ids"], c["text_mask"],
                          actions=_controls(c["actions"], start, n, tf),
                          camera=_controls(c["camera"], start, n, tf), drop_text=self.drop,
                          drop_actions=self.drop, text_emb=c["text_emb"],
                          refs=self.pipe.ref_input(refs), frame_causal=True,
                          frame_start=start, past_kv=past, return_kv=return_kv, **aud)


def _tokens_per_frame(fn: FrameModel, x: Tensor) -> int:
    _, gh, gw = fn.pipe.transformer.grid(1, *x.shape[3:])
    return gh * gw


def self_rollout(fn: FrameModel, context: Optional[Tensor], noise: Tensor, ts: Tensor, *,
                 refs: Optional[Tensor] = None, window: Optional[int] = None, sink: int = 0,
                 grad_last: bool = True) -> Tensor:
    """The student's own rollout: latent frames [B, C, n, h, w] generated one at a time
    after ``context`` (clean [B, C, n0, h, w] or None) from ``noise`` [B, C, n, h, w] by
    Euler steps over ``ts`` (``sampling_schedule``: the sampler ``rollout`` runs), on a KV
    cache that keeps ``window`` recent frames plus ``sink`` first ones.

    With ``grad_last`` (and grad mode on) only the final denoising step of each frame is
    differentiable: its input and the cached past are detached (Self-Forcing's gradient
    truncation), so backward costs one forward per frame whatever the step count."""
    b, dev = noise.shape[0], noise.device
    want_grad = grad_last and torch.is_grad_enabled()
    cache = KVCache(window, sink)
    n0 = 0

    def commit(x: Tensor, start: int) -> None:
        """Append the clean frames' K/V (time 0), references with the first commit."""
        first_refs = refs if cache.past() is None else None
        with torch.no_grad():
            _, kvs = fn(x, torch.zeros(b, x.shape[2], device=dev), start, cache.past(),
                        first_refs, return_kv=True, cached=cache.num_frames)
        tpf = _tokens_per_frame(fn, x)
        extra = kvs[0][0].shape[2] - x.shape[2] * tpf if first_refs is not None else 0
        cache.append(kvs, x.shape[2], tpf, extra)

    if context is not None and context.shape[2]:
        n0 = context.shape[2]
        commit(context, 0)
    out = []
    steps = len(ts) - 1
    for i in range(noise.shape[2]):
        idx = n0 + i
        x = noise[:, :, i:i + 1]
        for s in range(steps):
            grad = want_grad and s == steps - 1
            first_refs = refs if cache.past() is None else None
            past = cache.past()
            if grad and past is not None:
                # (k, v) views of the committed tokens: torch.cat in the attention copies
                # them, so later in-place commits never touch what backward reads.
                past = [(blk.k[:, :, :blk.length], blk.v[:, :, :blk.length]) for blk in past]
            with torch.set_grad_enabled(grad):
                v = fn(x, ts[s].expand(b, 1), idx, past, first_refs, cached=cache.num_frames)
                x = x + (ts[s + 1] - ts[s]).to(x.dtype) * v
        out.append(x)
        commit(x.detach(), idx)
    return torch.cat(out, 2)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Distribution-matching loss of samples ``x`` given the real and fake scores' clean
    predictions at one noise level (DMD2's normalisation: per sample by mean |x - x0_real|).
    Its gradient w.r.t. ``x`` is ``(x0_fake - x0_real) / norm`` / numel: descending moves
    the samples from where the fake score sees them towards where the real one does."""
    with torch.no_grad():
        dims = list(range(1, x.dim()))
        norm = (x.float() - x0_real.float()).abs().mean(dims, keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake.float() - x0_real.float()) / norm)
        target = x.float() - grad
    return 0.5 * torch.nn.functional.mse_loss(x.float(), target)


@torch.no_grad()
def teacher_trajectory(velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor,
                       noise: Tensor, prefix: Tensor, ts: Tensor) -> list[Tensor]:
    """The teacher's Euler trajectory over ``ts`` for whole clips continuing the clean
    ``prefix`` frames of ``x0`` (CausVid's ODE pairs): states [len(ts)] of [B, C, n, h, w],
    from the noise to the end point. ``velocity(x_in, t_in)`` takes latents with the clean
    prefix in place and per-frame times (:class:`FrameModel` adds the mask channel)."""
    b = x0.shape[0]
    x, states = noise, [noise]
    for s in range(len(ts) - 1):
        x_in, t_in, _ = clean_prefix_inputs(x0, x, ts[s].expand(b), prefix, False)
        x = x + (ts[s + 1] - ts[s]).to(x.dtype) * velocity(x_in, t_in)
        states.append(x)
    return states


def _x0(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Clean prediction x_t - t v from latents, per-frame times [B, n] and velocity."""
    return x_t - t[:, None, :, None, None].to(v.dtype) * v


def unused_nulls(module: nn.Module) -> Tensor:
    """0 times the sum of ``module``'s null embeddings (text, action, camera, audio,
    references): the student always sees its conditions, so they would get no gradient, no
    optimizer state and a checkpoint whose keys differ from a fresh optimizer's (which DCP
    fills for every parameter); under DDP the term also keeps the reducer fed."""
    terms = [getattr(p, "to_local", lambda: p)().sum() for n, p in module.named_parameters()
             if p.requires_grad and n.rsplit(".", 1)[-1].startswith(("null_", "ref_embed"))]
    return 0.0 * torch.stack(terms).sum() if terms else torch.zeros(())


def load_score_models(cfg: Any, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(teacher, fake score): two copies of the ``stage.init_from`` world model on
    ``device``, the teacher frozen in eval mode. Their conditions must be the teacher's:
    a module the teacher lacks would start uninitialised, so it is an error."""
    from worldline.train import checkpoint as ckpt_lib
    from worldline.train.config import to_container
    from worldline.train.pipeline_io import build_models
    from worldline.train.stages import load_init_weights

    if not cfg.stage.init_from:
        from worldline.train.config import ConfigError

        raise ConfigError("invalid config: stage.init_from: self-forcing distils a trained "
                          "teacher: set it to a pretrain/controllability run")
    plain = to_container(cfg)
    _, wm = build_models({**plain, "stage": {**plain["stage"], "lora": {"enabled": False}}},
                         autoencoder=False)
    wm = wm.to_empty(device=device)  # every weight is loaded next
    src = ckpt_lib.resolve_checkpoint(cfg.stage.init_from)
    new = load_init_weights(wm, Path(src))
    if new:
        raise ValueError(f"stage.init_from: the teacher {src} lacks {sorted(new)[:4]}: "
                         f"stage.conditions must be the teacher's (self-forcing distils what "
                         f"the teacher does, it cannot add a condition)")
    fake = copy.deepcopy(wm)
    return wm.requires_grad_(False).eval(), fake


class FakeScoreStep:
    """The fake score's own AdamW: after each student update, ``updates`` flow-loss steps on
    the student's (detached) last rollout, so it tracks the student's distribution. The
    randomness is a function of (seed, step): a resumed run draws the same. With gradient
    accumulation it fits the last micro-batch's samples (as the PatchGAN does). Replicated
    with DDP across ranks (not sharded under FSDP); saved as ``fake_score``/``fake_optim``."""

    def __init__(self, score: nn.Module, lr: float, updates: int, flow: Any, seed: int,
                 distributed: bool) -> None:
        self.score, self.model, self.updates = score, score, updates
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(score)
        self.optimizer = torch.optim.AdamW(score.parameters(), lr=lr, betas=(0.0, 0.999),
                                           weight_decay=0.0)
        self.flow, self.seed = flow, seed
        #: (clean clip with context, conditions, refs, prefix lengths, pipeline) of the last
        #: DMD micro-batch; None during the ODE warm-up.
        self.pending: Optional[tuple] = None

    def after_step(self, step: int) -> dict[str, Tensor]:
        """``updates`` fake-score updates on the pending samples (0 logged without any)."""
        dev = next(self.score.parameters()).device
        if self.pending is None:
            return {"fake_loss": torch.zeros((), device=dev)}
        clip, cond, refs, prefix, pipe = self.pending
        self.pending = None
        g = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + step)
        fn = FrameModel(self.model, pipe, cond)
        total = torch.zeros((), device=dev)
        for _ in range(self.updates):
            t = sample_timesteps(clip.shape[0], generator=g, device=dev,
                                 mean=self.flow.timestep_mean, std=self.flow.timestep_std,
                                 shift=pipe.shift_for(clip.shape[1:]))
            noise = torch.randn(clip.shape, generator=g, device=dev)
            x_in, t_in, mask = clean_prefix_inputs(clip, interpolate(clip, noise, t), t,
                                                   prefix, False)
            self.optimizer.zero_grad(set_to_none=True)
            loss = flow_loss(fn(x_in, t_in, 0, None, refs), velocity_target(clip, noise),
                             mask=mask)
            # the null embeddings join the graph: DDP's reducer expects every parameter
            (loss + unused_nulls(self.score).to(dev)).backward()
            for p in self.score.parameters():
                if p.grad is None:
                    # Unused here (e.g. the null text): a zero gradient gives it optimizer
                    # state that stays zero, so every checkpoint has the same keys as a
                    # fresh optimizer's DCP state (which initialises all of them).
                    p.grad = torch.zeros_like(p)
            self.optimizer.step()
            total = total + loss.detach() / self.updates
        return {"fake_loss": total}

    def state_dict(self) -> dict[str, Any]:
        """DCP state (keys ``fake_score``, ``fake_optim``)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        score, optim = get_state_dict(self.score, self.optimizer)
        return {"fake_score": score, "fake_optim": optim}

    def load_state_dict(self, tensors: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.score, self.optimizer, model_state_dict=tensors["fake_score"],
                       optim_state_dict=tensors["fake_optim"])


class SelfForcingObjective(FlowObjective):
    """Stage ``self_forcing`` (module docstring): ODE-pair warm-up, then the student's own
    rollout scored by DMD. Evaluation and samples are the flow objective's; so are
    ``tokens``/``flops`` (one flow step's worth: the logged MFU undercounts this stage's
    rollout, teacher and fake-score passes)."""

    def __init__(self, stage: Any, seed: int, teacher: nn.Module, fake: FakeScoreStep,
                 configured_clip: Optional[Callable[[], tuple[int, int, int]]] = None) -> None:
        super().__init__(stage, seed, configured_clip)
        self.sf, self.teacher, self.fake = stage.self_forcing, teacher, fake

    @classmethod
    def build(cls, cfg: Any, device: torch.device, distributed: bool,
              configured_clip: Optional[Callable[[], tuple[int, int, int]]] = None
              ) -> "SelfForcingObjective":
        """Teacher and fake score from ``stage.init_from``, the fake score's optimizer."""
        teacher, fake = load_score_models(cfg, device)
        sf = cfg.stage.self_forcing
        step = FakeScoreStep(fake, sf.fake_lr, sf.fake_updates, cfg.stage.flow, cfg.run.seed,
                             distributed)
        return cls(cfg.stage, cfg.run.seed, teacher, step, configured_clip)

    @property
    def auxiliary(self) -> dict[str, FakeScoreStep]:
        """The fake score's optimizer, stepped by the loop after each student update."""
        return {"fake_score": self.fake}

    def _teacher_velocity(self, pipe: WorldPipeline, cond: Mapping[str, Any],
                          refs: Optional[Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """The real score's velocity on whole clips, guided over text + actions when
        ``guidance_scale`` != 1 (both branches in one batch)."""
        scale = float(self.sf.guidance_scale)

        def v(x_in: Tensor, t_in: Tensor) -> Tensor:
            b = x_in.shape[0]
            if scale == 1.0:
                return FrameModel(self.teacher, pipe, cond)(x_in, t_in, 0, None, refs)
            two = {k: (None if val is None or not torch.is_tensor(val) else
                       torch.cat([val, val])) for k, val in cond.items()}
            drop = torch.arange(2 * b, device=x_in.device) >= b
            x2 = torch.cat([x_in, x_in])
            r2 = None if refs is None else torch.cat([refs, refs])
            vc, vu = FrameModel(self.teacher, pipe, two, drop)(
                x2, torch.cat([t_in, t_in]), 0, None, r2).chunk(2)
            return vu + scale * (vc - vu)
        return v

    def loss(self, pipe: WorldPipeline, batch: Mapping[str, Any],
             rng: MicroBatchRNG) -> tuple[Tensor, dict[str, Tensor]]:
        """ODE-pair regression for the first ``ode_init_steps`` steps, then DMD on the
        student's own rollout. Logs both terms every step (0 when not used)."""
        sf, g, dev = self.sf, rng.generator, pipe.device
        x0 = self.latents(pipe, batch)
        b, n = x0.shape[0], x0.shape[2]
        n0 = min(int(sf.context_frames), n - 1)
        prefix = torch.full((b,), n0, dtype=torch.long, device=dev)
        shift = pipe.shift_for(x0.shape[1:])
        cond = pipe.condition_inputs(batch, b, pipe.pixel_frames(n))
        refs = (self.reference_latents(pipe, batch, x0, g) if "refs" in self.conditions
                else None)
        zero = torch.zeros((), device=dev)
        if rng.step < sf.ode_init_steps:
            noise = torch.randn(x0.shape, generator=g, device=dev)
            ts_t = sampling_schedule(sf.teacher_steps, shift, device=dev)
            states = teacher_trajectory(self._teacher_velocity(pipe, cond, refs), x0, noise,
                                        prefix, ts_t)
            r = sf.teacher_steps // sf.student_steps
            k = torch.randint(0, sf.student_steps, (b, n), generator=g, device=dev)
            stack = torch.stack(states[:-1:r])  # [S, B, C, n, h, w] at the student's times
            x_k = stack.gather(0, k[None, :, None, :, None, None].expand(
                1, b, *stack.shape[2:]))[0]
            t_k = ts_t[::r][k]
            x_in, t_in, mask = clean_prefix_inputs(x0, x_k, t_k, prefix, False)
            v = FrameModel(pipe.forward_model, pipe, cond)(x_in, t_in, 0, None, refs)
            loss = flow_loss(_x0(x_in, t_in, v), states[-1], mask=mask)
            loss = loss + unused_nulls(pipe.world_model).to(dev)
            return loss, {"sf/ode": loss.detach(), "sf/dmd": zero}
        ctx = x0[:, :, :n0]
        noise = torch.randn((b, x0.shape[1], n - n0, *x0.shape[3:]), generator=g, device=dev)
        ts = sampling_schedule(sf.student_steps, shift, device=dev)
        gen = self_rollout(FrameModel(pipe.forward_model, pipe, cond), ctx, noise, ts,
                           refs=refs, window=sf.kv_window, sink=sf.sink_frames)
        clip = torch.cat([ctx, gen.detach()], 2)
        u = torch.rand(b, generator=g, device=dev) * (sf.max_t - sf.min_t) + sf.min_t
        t = shift_timesteps(u, shift)
        eps = torch.randn(clip.shape, generator=g, device=dev)
        x_in, t_in, _ = clean_prefix_inputs(clip, interpolate(clip, eps, t), t, prefix, False)
        with torch.no_grad():
            v_real = self._teacher_velocity(pipe, cond, refs)(x_in, t_in)
            v_fake = FrameModel(self.fake.score, pipe, cond)(x_in, t_in, 0, None, refs)
        x0_real, x0_fake = _x0(x_in, t_in, v_real), _x0(x_in, t_in, v_fake)
        loss = dmd_loss(gen, x0_real[:, :, n0:], x0_fake[:, :, n0:])
        loss = loss + unused_nulls(pipe.world_model).to(dev)
        self.fake.pending = (clip, cond, refs, prefix, pipe)
        return loss, {"sf/ode": zero, "sf/dmd": loss.detach()}
