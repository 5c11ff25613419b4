"""Rectified-flow helpers: timesteps, path, samplers, guidance."""

from __future__ import annotations

import pytest
import torch

from worldline.models.flow import (
    euler_sample,
    flow_loss,
    heun_sample,
    interpolate,
    resolution_shift,
    sample_timesteps,
    sampling_schedule,
    shift_timesteps,
    velocity_target,
)

# Zero-init nets produce denormals on CPU: flushing them avoids a ~20x slowdown.
torch.set_flush_denormal(True)


def test_sample_timesteps_range_reproducibility_and_shift():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4096, generator=g)
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric around 0.5
    t_again = sample_timesteps(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t_again)
    shifted = sample_timesteps(4096, generator=torch.Generator().manual_seed(0), shift=3.0)
    assert (shifted >= t).all() and shifted.mean() > t.mean() + 0.1
    torch.testing.assert_close(shifted, shift_timesteps(t, 3.0).clamp(1e-5, 1 - 1e-5))
    extreme = sample_timesteps(1000, generator=g, mean=0.0, std=20.0)
    assert (extreme > 0).all() and (extreme < 1).all()


def test_resolution_shift_grows_with_tokens_and_caps():
    assert resolution_shift(256) == pytest.approx(1.0)
    assert resolution_shift(1024) == pytest.approx(2.0)
    assert resolution_shift(10**6) == pytest.approx(3.0)
    assert resolution_shift(64) < resolution_shift(256) < resolution_shift(1024)


def test_interpolate_endpoints_and_per_frame_time():
    x0, noise = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)
    t = torch.tensor([[0.0, 1.0, 0.5, 0.0], [1.0, 1.0, 0.0, 0.25]])
    xt = interpolate(x0, noise, t)
    torch.testing.assert_close(xt[0, :, 1], noise[0, :, 1])
    torch.testing.assert_close(xt[1, :, 3], 0.75 * x0[1, :, 3] + 0.25 * noise[1, :, 3])
    # The velocity is the time derivative of the path.
    eps = 1e-3
    dx = (
        interpolate(x0, noise, torch.full((2,), 0.3 + eps))
        - interpolate(x0, noise, torch.full((2,), 0.3))
    ) / eps
    torch.testing.assert_close(dx, velocity_target(x0, noise), atol=2e-3, rtol=1e-3)
    assert flow_loss(noise, noise) == 0


@pytest.mark.parametrize("sampler", [euler_sample, heun_sample])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_recover_x0_of_a_linear_path(sampler, shift):
    x0 = torch.randn(3, 4, 2, 6, 6)
    noise = torch.randn_like(x0)
    calls = []

    def velocity(x_t, t):  # exact velocity of the straight path through x0, as a field of x_t
        calls.append(t)
        assert t.shape == (3,) and (t > 0).all()
        return (x_t - x0) / t.view(-1, 1, 1, 1, 1)

    out = sampler(velocity, noise, num_steps=7, shift=shift)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(calls) == (7 if sampler is euler_sample else 13)


def test_sampling_schedule_is_decreasing_from_one_to_zero():
    ts = sampling_schedule(10, shift=2.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
