"""Trajectory sampling as pure functions of (policy, prompts, seeds): no Ray, no global state.

- `sample_groups`/`sample_trajectories`: fresh SDE trajectories with per-step log-probs.
- `rescore_transitions`: log pi(x_{t+1} | x_t) of stored transitions under the current weights.
- `regenerate_from`: keep a replayed trajectory's first K transitions, re-score them under
  pi_old, and regenerate the rest with fresh noise (docs/algorithm.md section 5, truncation).
- `sample_ode`: deterministic evaluation sampling (noise level 0).

Every trajectory draws its noise from its own generator seeded by `trajectory_seed`, so a
trajectory is the same whatever batch or actor produced it.

Device discipline: generators live on the CPU (the same noise on any device); every tensor of
the computation (noise, latents, log-probs, embeddings) lives on `policy.device`, and tensors
cross to numpy once, in `host` at the `Trajectory` boundary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from opgrpo.models import FlowPolicy, PromptEmbeds
from opgrpo.sde import Reduce, SDEStepOutput, ode_step, sde_step_with_logprob
from opgrpo.trajectory import Trajectory


@dataclass(frozen=True)
class SamplingSpec:
    """How trajectories are drawn; mirrors the `sampling` and `model` config sections."""

    num_steps: int
    noise_level: float
    guidance_scale: float
    height: int
    width: int
    reduce: Reduce = "mean"

    @classmethod
    def from_config(cls, config) -> SamplingSpec:
        return cls(
            num_steps=config.sampling.num_steps,
            noise_level=config.sampling.noise_level,
            guidance_scale=config.sampling.guidance_scale,
            height=config.model.height,
            width=config.model.width,
            reduce=config.sampling.logprob_reduce,
        )


def trajectory_seed(base_seed: int, *parts: object) -> int:
    """A stable 63-bit seed from a base seed and identifying parts (step, prompt key, index)."""
    text = "/".join(str(p) for p in (base_seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _generators(seeds: list[int]) -> list[torch.Generator]:
    """CPU generators: noise drawn from them is the same on every device."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    """x_0 ~ N(0, I) per row (B, *shape), drawn on the CPU from each row's generator, on
    `device`."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def host(tensor: torch.Tensor) -> np.ndarray:
    """The one crossing from the policy's device to numpy (the `Trajectory` boundary)."""
    return tensor.detach().to("cpu", torch.float32).numpy()


def device_stack(policy: FlowPolicy, arrays: list[np.ndarray]) -> torch.Tensor:
    """Stored numpy arrays (from trajectories) as one float32 batch on the policy's device."""
    return torch.from_numpy(np.stack(arrays)).to(policy.device, torch.float32)


def step_logprob(
    policy: FlowPolicy,
    latents: torch.Tensor,
    next_latents: torch.Tensor | None,
    step: int,
    sigmas: torch.Tensor,
    embeds: PromptEmbeds,
    spec: SamplingSpec,
    generators: list[torch.Generator] | None = None,
    detach_uncond: bool = False,
) -> SDEStepOutput:
    """One SDE transition at grid index `step` under the policy's current weights.

    latents: (B, C, h, w) x_t; next_latents: (B, C, h, w) x_{t+1} to score, or None to draw it
    with `generators`. Gradients flow into the velocity when grad mode is on (the learner),
    except through CFG's unconditional half with `detach_uncond`.
    """
    velocity = policy.velocity(latents, sigmas[step], embeds, spec.guidance_scale,
                               detach_uncond=detach_uncond)
    return sde_step_with_logprob(
        velocity,
        latents,
        sigmas[step],
        sigmas[step + 1],
        sigma_1=float(sigmas[1]),
        noise_level=spec.noise_level,
        prev_sample=next_latents,
        generator=generators,
        reduce=spec.reduce,
    )


@torch.no_grad()
def _run_sde(
    policy: FlowPolicy,
    start: torch.Tensor,
    start_step: int,
    sigmas: torch.Tensor,
    embeds: PromptEmbeds,
    generators: list[torch.Generator],
    spec: SamplingSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps start_step..T-1 from `start`; returns latents (B, T-start+1, ...) and logp (B, .)."""
    x = start.to(policy.device, torch.float32)
    latents, logps = [x], []
    for step in range(start_step, spec.num_steps):
        out = step_logprob(policy, x, None, step, sigmas, embeds, spec, generators)
        x = out.prev_sample
        latents.append(x)
        logps.append(out.log_prob)
    if not logps:  # start_step == T (no truncation): nothing to draw
        return torch.stack(latents, dim=1), x.new_zeros((x.shape[0], 0))
    return torch.stack(latents, dim=1), torch.stack(logps, dim=1)


@torch.no_grad()
def sample_tensors(
    policy: FlowPolicy, prompts: list[str], seeds: list[int], spec: SamplingSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device half of `sample_trajectories`: latents (B, T+1, ...) and behaviour
    log-probs (B, T), on the policy's device."""
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    generators = _generators(seeds)
    noise = initial_noise(generators, policy.latent_shape(spec.height, spec.width),
                          policy.device)
    embeds = policy.encode_prompts(prompts)
    return _run_sde(policy, noise, 0, sigmas, embeds, generators, spec)


@torch.no_grad()
def sample_trajectories(
    policy: FlowPolicy,
    prompts: list[str],
    prompt_keys: list[str],
    seeds: list[int],
    spec: SamplingSpec,
    version: int,
) -> list[Trajectory]:
    """One fresh SDE trajectory per (prompt, key, seed) row, drawn as one batch."""
    if not len(prompts) == len(prompt_keys) == len(seeds):
        raise ValueError("prompts, prompt_keys and seeds must have the same length")
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    latents, logps = (host(t) for t in sample_tensors(policy, prompts, seeds, spec))
    return [
        Trajectory(
            prompt_key=key,
            prompt=prompt,
            latents=latents[i],
            sigmas=sigmas.numpy(),
            behaviour_logprobs=logps[i],
            old_logprobs=logps[i],
            behaviour_version=version,
            noise_level=spec.noise_level,
            seed=int(seeds[i]),
        )
        for i, (prompt, key) in enumerate(zip(prompts, prompt_keys))
    ]


def sample_groups(
    policy: FlowPolicy,
    prompts: list[str],
    prompt_keys: list[str],
    group_size: int,
    spec: SamplingSpec,
    base_seed: int,
    iteration: int,
    version: int,
) -> list[Trajectory]:
    """G fresh trajectories for each prompt; seeds derive from (base_seed, iteration, key, j)."""
    rows = [(p, k, j) for p, k in zip(prompts, prompt_keys) for j in range(group_size)]
    seeds = [trajectory_seed(base_seed, iteration, k, j) for _, k, j in rows]
    return sample_trajectories(
        policy, [r[0] for r in rows], [r[1] for r in rows], seeds, spec, version
    )


def _check_grid(trajectories: list[Trajectory], sigmas: torch.Tensor) -> None:
    grid = sigmas.numpy()
    for traj in trajectories:
        if traj.sigmas.shape != grid.shape or not np.allclose(traj.sigmas, grid, atol=1e-6):
            raise ValueError(
                f"trajectory {traj.prompt_key!r} was sampled on another sigma grid "
                f"({traj.num_steps} steps); sampling.num_steps or the scheduler shift changed"
            )


@torch.no_grad()
def rescore_transitions(
    policy: FlowPolicy,
    trajectories: list[Trajectory],
    steps: list[int],
    spec: SamplingSpec,
) -> np.ndarray:
    """log pi(x_{t+1} | x_t) for each trajectory and each grid index in `steps`: (B, len(steps))."""
    return host(rescore_tensors(policy, trajectories, steps, spec))


@torch.no_grad()
def rescore_tensors(
    policy: FlowPolicy,
    trajectories: list[Trajectory],
    steps: list[int],
    spec: SamplingSpec,
) -> torch.Tensor:
    """`rescore_transitions` on the policy's device: (B, len(steps)) float32."""
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    _check_grid(trajectories, sigmas)
    if not steps:
        return torch.zeros((len(trajectories), 0), device=policy.device)
    embeds = policy.encode_prompts([t.prompt for t in trajectories])
    latents = device_stack(policy, [t.latents for t in trajectories])
    scores = [
        step_logprob(policy, latents[:, s], latents[:, s + 1], s, sigmas, embeds, spec).log_prob
        for s in steps
    ]
    return torch.stack(scores, dim=1)


@torch.no_grad()
def regenerate_from(
    policy: FlowPolicy,
    trajectories: list[Trajectory],
    truncate_step: int,
    seeds: list[int],
    spec: SamplingSpec,
    version: int,
) -> list[Trajectory]:
    """Mixed trajectories: the stored prefix x_0..x_K, then a fresh tail drawn by pi_old.

    Steps 0..K-1 keep their behaviour log-probs (mu) and get old log-probs re-scored under the
    current weights; they are marked off-policy. Steps K..T-1 are regenerated with fresh noise
    from `seeds`, so their behaviour and old log-probs coincide. The reward is reset (NaN): the
    new final sample must be scored again.
    """
    k = truncate_step
    if not 0 <= k <= spec.num_steps:
        raise ValueError(f"truncate_step must be in [0, {spec.num_steps}], got {k}")
    if len(seeds) != len(trajectories):
        raise ValueError("one seed per trajectory is needed")
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    _check_grid(trajectories, sigmas)
    tail_latents, tail_logps, prefix_old = (host(t) for t in regenerate_tensors(
        policy, trajectories, k, seeds, spec))
    out = []
    for i, traj in enumerate(trajectories):
        latents = np.concatenate([traj.latents[:k], tail_latents[i]])
        tail = tail_logps[i]
        mask = np.zeros(spec.num_steps, dtype=bool)
        mask[:k] = True
        out.append(
            Trajectory(
                prompt_key=traj.prompt_key,
                prompt=traj.prompt,
                latents=latents,
                sigmas=sigmas.numpy(),
                behaviour_logprobs=np.concatenate([traj.behaviour_logprobs[:k], tail]),
                old_logprobs=np.concatenate([prefix_old[i], tail]).astype(np.float32),
                off_policy_mask=mask,
                behaviour_version=traj.behaviour_version,
                noise_level=spec.noise_level,
                seed=int(seeds[i]),
                replayed=True,
                extras={"rollout_version": float(version)},
            )
        )
    return out


@torch.no_grad()
def regenerate_tensors(
    policy: FlowPolicy,
    trajectories: list[Trajectory],
    truncate_step: int,
    seeds: list[int],
    spec: SamplingSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device half of `regenerate_from`: tail latents (B, T-K+1, ...), tail log-probs
    (B, T-K) and the prefix's old log-probs (B, K), all on the policy's device."""
    k = truncate_step
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    prefix_old = rescore_tensors(policy, trajectories, list(range(k)), spec)
    embeds = policy.encode_prompts([t.prompt for t in trajectories])
    start = device_stack(policy, [t.latents[k] for t in trajectories])
    tail_latents, tail_logps = _run_sde(policy, start, k, sigmas, embeds, _generators(seeds), spec)
    return tail_latents, tail_logps, prefix_old


@torch.no_grad()
def sample_ode(
    policy: FlowPolicy,
    prompts: list[str],
    seeds: list[int],
    num_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
) -> torch.Tensor:
    """Deterministic Euler sampling (evaluation); returns final latents (B, *latent_shape) on
    the policy's device."""
    sigmas = policy.sigmas(num_steps, height, width)
    shape = policy.latent_shape(height, width)
    x = initial_noise(_generators(seeds), shape, policy.device)
    embeds = policy.encode_prompts(prompts)
    for step in range(num_steps):
        v = policy.velocity(x, sigmas[step], embeds, guidance_scale)
        x = ode_step(v, x, sigmas[step], sigmas[step + 1])
    return x
