"""Rectified flow / flow matching: timestep sampling, the linear path, targets and samplers.

Convention (SD3 / Wan): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) * x0 + t * noise,        v = dx_t/dt = noise - x0,

and sampling integrates dx/dt = v from t = 1 down to t = 0. All helpers accept a per-sample
time t [B] or, for diffusion forcing later, a per-frame time t [B, T] on videos
[B, C, T, H, W].

    >>> x0 = torch.randn(2, 4, 5, 8, 8); noise = torch.randn_like(x0)
    >>> t = sample_timesteps(2)
    >>> loss = flow_loss(model(interpolate(x0, noise, t), t), velocity_target(x0, noise))
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "shift_timesteps",
    "sample_timesteps",
    "resolution_shift",
    "interpolate",
    "velocity_target",
    "flow_loss",
    "sampling_schedule",
    "euler_sample",
    "heun_sample",
    "guided_velocity",
    "multi_cfg_velocity",
    "sample_frame_timesteps",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]

# Keeps t strictly inside (0, 1): sigmoid rounds to exactly 1.0 in fp32 for large logits.
_T_EPS = 1e-5


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """SD3 time shift t' = shift * t / (1 + (shift - 1) * t); shift > 1 moves mass to noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> Tensor:
    """Logit-normal training timesteps with an optional SD3 shift -> [n] float32 in (0, 1).

    Draws on the generator's own device (so a CPU generator stays reproducible whatever
    `device` is), then moves the result to `device`.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.randn(n, generator=generator, device=gen_device) * std + mean
    t = shift_timesteps(torch.sigmoid(u), shift).clamp(_T_EPS, 1.0 - _T_EPS)
    return t.to(device) if device is not None else t


def sample_frame_timesteps(
    n: int,
    frames: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    p_uniform: float = 0.0,
) -> Tensor:
    """Diffusion-forcing timesteps: an independent logit-normal level per latent frame,
    [n, frames] float32 in (0, 1).

    p_uniform: probability per sample of using one shared level for all its frames (plain
    full-sequence training), so the same model stays good at non-causal t2v sampling.
    """
    gen_device = generator.device if generator is not None else device
    t = sample_timesteps(n * frames, generator=generator, device=gen_device, mean=mean,
                         std=std, shift=shift).view(n, frames)
    if p_uniform > 0:
        same = torch.rand(n, 1, generator=generator, device=gen_device) < p_uniform
        t = torch.where(same, t[:, :1].expand_as(t), t)
    return t.to(device) if device is not None else t


def resolution_shift(
    num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0, max_shift: float = 3.0
) -> float:
    """Timestep shift for a sequence of `num_tokens` tokens (SD3 section 5.3.2).

    More tokens carry more redundant signal, so the same noise level destroys less
    information; shifting by sqrt(tokens / base) keeps the perceived noise level constant.
    Capped at `max_shift`.
    """
    return min(max_shift, base_shift * math.sqrt(num_tokens / base_tokens))


def _expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast t [B] (per sample) or [B, T] (per frame of x [B, C, T, ...]) against x."""
    if t.dim() == 1:
        return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    if t.dim() == 2 and x.dim() >= 3:
        return t.view(t.shape[0], 1, t.shape[1], *([1] * (x.dim() - 3))).to(x.dtype)
    raise ValueError(
        f"t must be [B] or [B, T] for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
    )


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise. x0, noise [B, C, T, H, W]; t [B] or [B, T]."""
    te = _expand_t(t, x0)
    return x0 + te * (noise - x0)


# x-prediction's velocity divides by t; JiT clips it at 0.05 so near-clean steps stay bounded.
X_PRED_T_MIN = 0.05


def velocity_from_x0(x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """The flow velocity implied by a clean-latent prediction (``DiTArgs.prediction="x"``):
    x_t = (1 - t) x0 + t noise, so v = noise - x0 = (x_t - x0) / t, t clipped at
    X_PRED_T_MIN. x_t [B, C(+mask), T, h, w]; t [B] or [B, T]; x0 [B, C, T, h, w]."""
    tt = t.float().clamp_min(X_PRED_T_MIN)
    tt = tt.view(-1, 1, 1, 1, 1) if tt.dim() == 1 else tt.view(tt.shape[0], 1, -1, 1, 1)
    return ((x_t[:, : x0.shape[1]].float() - x0.float()) / tt).to(x0.dtype)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity of the linear path, noise - x0 (independent of t)."""
    return noise - x0


def flow_loss(
    pred: Tensor, target: Tensor, weight: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """Mean squared error between predicted and target velocity (fp32 reduction).

    weight: optional per-sample [B] weights (e.g. for loss weighting schemes); mean over all.
    mask: optional 0/1 tensor broadcastable to pred (e.g. the i2v loss mask [B, 1, t, 1, 1]
        that excludes given frames); the mean runs over the masked-in elements only.
    """
    err = (pred.float() - target.float()).pow(2)
    if mask is not None:
        m = mask.float().expand_as(err)
        if weight is not None:
            m = m * weight.float().view(-1, *([1] * (err.dim() - 1)))
        return (err * m).sum() / m.sum().clamp_min(1.0)
    if weight is None:
        return err.mean()
    return (err.flatten(1).mean(1) * weight.float()).mean()


def sampling_schedule(num_steps: int, shift: float = 1.0, device=None) -> Tensor:
    """Decreasing times [num_steps + 1] from 1 to 0, shifted like training timesteps."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64)
    return shift_timesteps(t, shift).float()


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn, noise: Tensor, num_steps: int, shift: float = 1.0
) -> Tensor:
    """Integrate dx/dt = v from t=1 (noise [B, ...]) to t=0 with Euler steps -> x0 estimate.

    velocity_fn(x_t, t) receives t as [B] float32 and returns v shaped like x_t.
    """
    ts = sampling_schedule(num_steps, shift, device=noise.device)
    x = noise
    b = noise.shape[0]
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, t.expand(b))
        x = x + (t_next - t).to(x.dtype) * v
    return x


@torch.no_grad()
def heun_sample(
    velocity_fn: VelocityFn, noise: Tensor, num_steps: int, shift: float = 1.0
) -> Tensor:
    """Second-order Heun integration from t=1 to t=0 (2 * num_steps - 1 evaluations).

    The last step (to t = 0) is plain Euler, as in EDM: it saves an evaluation and never
    queries the model at exactly t = 0, where it was not trained.
    """
    ts = sampling_schedule(num_steps, shift, device=noise.device)
    x = noise
    b = noise.shape[0]
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        dt = (t_next - t).to(x.dtype)
        v = velocity_fn(x, t.expand(b))
        x_euler = x + dt * v
        if i == num_steps - 1:
            x = x_euler
        else:
            v_next = velocity_fn(x_euler, t_next.expand(b))
            x = x + dt * 0.5 * (v + v_next)
    return x


def guided_velocity(
    v_full: Tensor, v_no_text: Tensor, v_uncond: Tensor, text_scale: float, action_scale: float
) -> Tensor:
    """Per-condition classifier-free guidance (InstructPix2Pix-style composition):

        v = v_uncond + s_a * (v_no_text - v_uncond) + s_t * (v_full - v_no_text)

    v_full: text + actions; v_no_text: actions only (text dropped); v_uncond: both dropped.
    s_t = s_a = 1 returns v_full.
    """
    return (v_uncond + action_scale * (v_no_text - v_uncond)
            + text_scale * (v_full - v_no_text))


def multi_cfg_velocity(
    full_fn: VelocityFn,
    no_text_fn: VelocityFn,
    uncond_fn: VelocityFn,
    text_scale: float,
    action_scale: float,
) -> VelocityFn:
    """Velocity function with separate text and action guidance scales for the samplers
    (see guided_velocity); both scales 1 makes one call per step."""

    def fn(x: Tensor, t: Tensor) -> Tensor:
        if text_scale == 1.0 and action_scale == 1.0:
            return full_fn(x, t)
        return guided_velocity(full_fn(x, t), no_text_fn(x, t), uncond_fn(x, t), text_scale,
                               action_scale)

    return fn
