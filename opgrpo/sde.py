"""The flow-matching SDE step with its Gaussian log-density, and the ODE step (docs/algorithm.md 1).

Every function takes the step's sigmas explicitly (no hidden scheduler step index) and computes
in float32 whatever the dtype of the model output, because log-probability ratios of 1e-4 are
lost in bf16 rounding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch

Reduce = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStepOutput:
    """One SDE transition x -> x'.

    prev_sample:     (B, ...) x', drawn or the given one, float32.
    log_prob:        (B,) log N(x'; mean, std_transition^2) reduced over elements; None when
                     the noise level is 0 (the step is then the deterministic Euler step).
    prev_sample_mean:(B, ...) the Gaussian mean (used by the KL term).
    std:             scalar tensor, the SDE std a*sqrt(sigma/(1-sigma)) (before sqrt(-dt)).
    std_transition:  scalar tensor, std * sqrt(-dt): the std of x' given x.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    prev_sample_mean: torch.Tensor
    std: torch.Tensor
    std_transition: torch.Tensor


def sigma_grid(scheduler, num_steps: int) -> torch.Tensor:
    """The scheduler's shifted sigma grid `1 >= sigma_0 > ... > sigma_T = 0`, shape (T+1,).

    Uses the diffusers scheduler's own `set_timesteps` so that shift settings match the model.
    A deep copy is used so the caller's scheduler state is not touched.
    """
    sched = copy.deepcopy(scheduler)
    if getattr(sched.config, "use_dynamic_shifting", False):
        raise ValueError(
            "scheduler uses dynamic (resolution-dependent) shifting; pass a static `shift` in "
            "the scheduler config or set use_dynamic_shifting=false"
        )
    sched.set_timesteps(num_steps)
    return sched.sigmas.to(torch.float32).clone()


def _reduce(values: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    dims = tuple(range(1, values.ndim))
    if reduce == "mean":
        return values.mean(dim=dims)
    if reduce == "sum":
        return values.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sde_std(sigma: torch.Tensor, sigma_1: float, noise_level: float) -> torch.Tensor:
    """a * sqrt(sigma / (1 - sigma)), with sigma_1 in the denominator where sigma == 1."""
    denom_sigma = torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_1), sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sigma_1: float,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduce: Reduce = "mean",
) -> SDEStepOutput:
    """One stochastic step sigma -> sigma_next of the flow SDE, and log p(x' | x).

    Args:
        model_output: (B, ...) predicted velocity v at (sample, sigma); any float dtype.
        sample: (B, ...) current latent x.
        sigma, sigma_next: noise levels of this step, sigma_next < sigma.
        sigma_1: the grid's second sigma, used in place of sigma where sigma == 1.
        noise_level: a >= 0; with a = 0 the step is the scheduler's Euler step and has no
            log-density (log_prob is None).
        prev_sample: (B, ...) score this given x' instead of drawing one (re-scoring).
        generator: one generator, or one per batch row (so each trajectory is reproducible
            whatever batch it is drawn in).
        reduce: "mean" or "sum" over the non-batch elements.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    v = model_output.to(torch.float32)
    x = sample.to(torch.float32)
    if not float(sigma_next) < float(sigma):  # the grid is host data: no device sync
        raise ValueError(f"sigma_next ({float(sigma_next)}) must be below sigma ({float(sigma)})")
    sigma = torch.as_tensor(sigma, dtype=torch.float32).to(x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32).to(x.device)
    dt = sigma_next - sigma

    std = sde_std(sigma, sigma_1, noise_level)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    std_transition = std * torch.sqrt(-dt)
    if noise_level == 0:
        if prev_sample is not None:
            raise ValueError("a given next latent cannot be scored with noise_level 0")
        return SDEStepOutput(mean, None, mean, std, std_transition)

    if prev_sample is None:
        eps = _standard_normal(x.shape, generator, x.device)
        prev_sample = mean + std_transition * eps
    else:
        prev_sample = prev_sample.to(torch.float32)

    log_density = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std_transition**2)
        - torch.log(std_transition)
        - _LOG_SQRT_2PI
    )
    return SDEStepOutput(prev_sample, _reduce(log_density, reduce), mean, std, std_transition)


def ode_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """Euler step of the flow ODE, x' = x + (sigma_next - sigma) * v, in float32."""
    dt = float(sigma_next) - float(sigma)
    return sample.to(torch.float32) + dt * model_output.to(torch.float32)


def _standard_normal(
    shape: torch.Size, generator: torch.Generator | list[torch.Generator] | None, device
) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    if generator is None:
        return torch.randn(shape, device=device)
    # a CPU generator (as opgrpo's are, so that noise is the same on every device) draws on
    # the CPU; the noise then moves to the sample's device
    return torch.randn(shape, generator=generator, device=generator.device).to(device)
