"""SDE/ODE step math against diffusers' scheduler and an independent float64 Gaussian."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from opgrpo.sde import ode_step, sde_std, sde_step_with_logprob, sigma_grid


def _grid(num_steps=10, shift=3.0):
    return sigma_grid(FlowMatchEulerDiscreteScheduler(shift=shift), num_steps)


def _gaussian_logp_float64(x_next, x, v, sigma, sigma_next, sigma_1, a):
    """Independent reference: the transition density written out in float64."""
    x, v, x_next = x.double(), v.double(), x_next.double()
    sigma, sigma_next = float(sigma), float(sigma_next)
    denom = sigma_1 if sigma == 1.0 else sigma
    std = a * math.sqrt(sigma / (1 - denom))
    dt = sigma_next - sigma
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    dist = torch.distributions.Normal(mean, torch.full_like(mean, scale))
    return dist.log_prob(x_next).flatten(1).mean(1), mean


def test_grid_starts_at_one_and_ends_at_zero():
    sigmas = _grid()
    assert sigmas.shape == (11,)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_noise_level_zero_equals_scheduler_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sigmas = _grid(6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ours = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        out = sde_step_with_logprob(v, ours, sigmas[i], sigmas[i + 1], float(sigmas[1]), 0.0)
        assert out.log_prob is None
        ode = ode_step(v, ours, sigmas[i], sigmas[i + 1])
        ours = out.prev_sample
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)
        torch.testing.assert_close(ode, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_logprob_matches_float64_gaussian_on_every_step(a):
    sigmas = _grid(10)
    gen = torch.Generator().manual_seed(1)
    for i in range(10):
        x = torch.randn(3, 4, 6, 6, generator=gen)
        v = torch.randn(3, 4, 6, 6, generator=gen)
        out = sde_step_with_logprob(
            v, x, sigmas[i], sigmas[i + 1], float(sigmas[1]), a, generator=gen
        )
        ref, ref_mean = _gaussian_logp_float64(
            out.prev_sample, x, v, sigmas[i], sigmas[i + 1], float(sigmas[1]), a
        )
        assert torch.isfinite(out.log_prob).all(), f"step {i} (sigma {float(sigmas[i])})"
        torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.prev_sample_mean.double(), ref_mean, rtol=1e-5, atol=1e-5)


def test_scoring_a_given_next_latent_uses_it():
    sigmas = _grid(4)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    given = torch.randn(2, 3, 4, 4)
    out = sde_step_with_logprob(v, x, sigmas[1], sigmas[2], float(sigmas[1]), 0.7, given)
    assert torch.equal(out.prev_sample, given)
    ref, _ = _gaussian_logp_float64(given, x, v, sigmas[1], sigmas[2], float(sigmas[1]), 0.7)
    torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-5, atol=1e-5)


def test_sigma_one_uses_sigma_1_in_the_denominator():
    std = sde_std(torch.tensor(1.0), sigma_1=0.9, noise_level=0.7)
    assert math.isclose(float(std), 0.7 * math.sqrt(1 / 0.1), rel_tol=1e-6)


def test_sum_reduction_is_mean_times_elements():
    sigmas = _grid(4)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    given = torch.randn(2, 3, 4, 4)
    mean = sde_step_with_logprob(v, x, sigmas[0], sigmas[1], float(sigmas[1]), 0.7, given)
    total = sde_step_with_logprob(
        v, x, sigmas[0], sigmas[1], float(sigmas[1]), 0.7, given, reduce="sum"
    )
    torch.testing.assert_close(total.log_prob, mean.log_prob * 48, rtol=1e-5, atol=1e-4)


def test_bf16_model_output_is_upcast_to_float32():
    sigmas = _grid(4)
    x = torch.randn(2, 3, 4, 4).bfloat16()
    v = torch.randn(2, 3, 4, 4).bfloat16()
    given = torch.randn(2, 3, 4, 4)
    out = sde_step_with_logprob(v, x, sigmas[1], sigmas[2], float(sigmas[1]), 0.7, given)
    ref = sde_step_with_logprob(v.float(), x.float(), sigmas[1], sigmas[2], float(sigmas[1]),
                                0.7, given)
    assert out.log_prob.dtype == torch.float32 and out.prev_sample.dtype == torch.float32
    assert torch.equal(out.log_prob, ref.log_prob)


def test_per_row_generators_make_rows_independent_of_batch():
    sigmas = _grid(4)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    both = sde_step_with_logprob(
        v, x, sigmas[0], sigmas[1], float(sigmas[1]), 0.7,
        generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
    )
    second = sde_step_with_logprob(
        v[1:], x[1:], sigmas[0], sigmas[1], float(sigmas[1]), 0.7,
        generator=[torch.Generator().manual_seed(6)],
    )
    assert torch.equal(both.prev_sample[1:], second.prev_sample)


def test_bad_step_direction_is_refused():
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="must be below sigma"):
        sde_step_with_logprob(x, x, 0.3, 0.5, 0.9, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step_with_logprob(x, x, 0.5, 0.3, 0.9, -0.1)
