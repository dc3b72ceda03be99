"""The OP-GRPO objective evaluated on a micro-batch of trajectories under the current weights.

The loss is linear in the trained steps (a mean over t), so gradients are accumulated one
denoising step at a time, as Flow-GRPO does: each step's forward graph is freed by its backward
before the next step runs, and peak memory is one transformer forward per micro-batch, not S.
`backward` is `loss.backward` in plain PyTorch or a DeepSpeed engine's `backward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from learner.loss import Correction, kl_to_reference, op_grpo_loss, sequence_weights
from opgrpo.models import FlowPolicy
from opgrpo.sampling import SamplingSpec, step_logprob
from opgrpo.trajectory import Trajectory


@dataclass(frozen=True)
class LossSettings:
    """The learner knobs the objective needs (a view of the `learner` config section)."""

    clip_range: float = 1e-4
    correction: Correction = "sequence"
    kl_beta: float = 0.0
    seq_weight_max: float | None = None
    timestep_fraction: float = 0.9

    @classmethod
    def from_config(cls, config) -> LossSettings:
        lc = config.learner
        return cls(lc.clip_range, lc.correction, lc.kl_beta, lc.seq_weight_max,
                   lc.timestep_fraction)


def trained_steps(num_steps: int, timestep_fraction: float) -> list[int]:
    """Grid indices of the trained transitions: the first ceil(fraction * T)."""
    return list(range(math.ceil(timestep_fraction * num_steps)))


@dataclass
class MicroBatch:
    """Tensors of B trajectories: latents (B, T+1, ...), per-step (B, T), per-sample (B,)."""

    prompts: list[str]
    latents: torch.Tensor
    old_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor
    off_policy_mask: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_trajectories(
        cls, trajectories: list[Trajectory], advantages: torch.Tensor, valid: torch.Tensor
    ) -> MicroBatch:
        def stack(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(t, name) for t in trajectories]))

        missing = [t.prompt_key for t in trajectories if t.old_logprobs is None]
        if missing:
            raise ValueError(f"trajectories {missing[:3]} have no old log-probs (re-score first)")
        return cls(
            prompts=[t.prompt for t in trajectories],
            latents=stack("latents"),
            old_logprobs=stack("old_logprobs"),
            behaviour_logprobs=stack("behaviour_logprobs"),
            off_policy_mask=stack("off_policy_mask"),
            advantages=advantages.to(torch.float32),
            valid=valid.to(torch.bool),
        )


def accumulate_gradients(
    policy: FlowPolicy,
    batch: MicroBatch,
    spec: SamplingSpec,
    settings: LossSettings,
    backward: Callable[[torch.Tensor], None],
    num_micro_batches: int = 1,
) -> dict[str, float]:
    """Run forward + `backward` step by step; return the loss statistics averaged over steps.

    Each step's loss is divided by S * num_micro_batches, so the gradients of all backward calls
    of one optimizer step (S per micro-batch) add up to the gradient of the mean over
    micro-batches of the full loss mean_i(L_pg) + L_kl of ALGORITHM.md section 3. A DeepSpeed
    `backward` must therefore not scale again (`scale_wrt_gas=False`).
    """
    steps = trained_steps(spec.num_steps, settings.timestep_fraction)
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    embeds = policy.encode_prompts(batch.prompts)
    seq_weight = sequence_weights(
        batch.old_logprobs, batch.behaviour_logprobs, batch.off_policy_mask,
        settings.seq_weight_max,
    )
    totals: dict[str, float] = {}
    for step in steps:
        x, x_next = batch.latents[:, step], batch.latents[:, step + 1]
        out = step_logprob(policy, x, x_next, step, sigmas, embeds, spec)
        kl = None
        if settings.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                ref = step_logprob(policy, x, x_next, step, sigmas, embeds, spec)
            kl = kl_to_reference(out.prev_sample_mean, ref.prev_sample_mean, out.std)[:, None]
        result = op_grpo_loss(
            new_logprobs=out.log_prob[:, None],
            old_logprobs=batch.old_logprobs[:, step : step + 1],
            behaviour_logprobs=batch.behaviour_logprobs[:, step : step + 1],
            off_policy_mask=batch.off_policy_mask[:, step : step + 1],
            advantages=batch.advantages,
            seq_weight=seq_weight,
            clip_range=settings.clip_range,
            correction=settings.correction,
            sample_mask=batch.valid,
            kl=kl,
            kl_beta=settings.kl_beta,
            off_policy_samples=batch.off_policy_mask.any(dim=1),
        )
        backward(result.loss / (len(steps) * num_micro_batches))
        for key, value in result.stats.items():
            totals[key] = totals.get(key, 0.0) + value / len(steps)
    return totals
