"""The OP-GRPO objective evaluated on a micro-batch of trajectories under the current weights.

The loss is linear in the trained steps (a mean over t), so gradients are accumulated one
denoising step at a time, as Flow-GRPO does: each step's forward graph is freed by its backward
before the next step runs, and peak memory is one transformer forward per micro-batch, not S.
`backward` is `loss.backward` in plain PyTorch or a DeepSpeed engine's `backward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from learner.loss import Correction, kl_to_reference, op_grpo_loss, sequence_weights
from opgrpo.models import FlowPolicy
from opgrpo.sampling import SamplingSpec, rescore_transitions, step_logprob
from opgrpo.trajectory import Trajectory


@dataclass(frozen=True)
class LossSettings:
    """The learner knobs the objective needs (a view of the `learner` config section)."""

    clip_range: float = 1e-4
    correction: Correction = "sequence"
    kl_beta: float = 0.0
    seq_weight_max: float | None = None
    timestep_fraction: float = 0.9
    stale_rescore: str = "all"
    detach_uncond: bool = True

    @classmethod
    def from_config(cls, config) -> LossSettings:
        lc = config.learner
        return cls(lc.clip_range, lc.correction, lc.kl_beta, lc.seq_weight_max,
                   lc.timestep_fraction, lc.stale_rescore, lc.detach_uncond)


def trained_steps(num_steps: int, timestep_fraction: float) -> list[int]:
    """Grid indices of the trained transitions: the first int(fraction * T), at least one.

    Flow-GRPO's rule (`int`, not `ceil`): a fraction of 0.99 of 10 steps trains 9 and leaves
    out the last, most ill-conditioned transition. The 1e-9 only absorbs float error
    (0.3 * 10 = 3.0000000000000004, 0.7 * 10 = 7.000000000000001).
    """
    return list(range(max(1, int(timestep_fraction * num_steps + 1e-9))))


def rescore_stale(
    policy: FlowPolicy,
    trajectories: list[Trajectory],
    version: int,
    spec: SamplingSpec,
    settings: LossSettings,
    batch_size: int,
    forward_all: bool = False,
) -> tuple[list[Trajectory], int]:
    """Re-score the samples drawn by another weight version than `version` (pi_old: the
    learner's weights at the start of this update) with one no-grad forward per step.

    A stale sample's re-scored steps get old log-probs under pi_old and are marked off-policy,
    so that its sequence weight w_i = exp(sum(logp_old - logp_mu)) covers all of them
    (`stale_rescore: all`: every step, the exact ratio of the whole trajectory; `trained`:
    the trained steps only, while a replayed sample's buffer prefix keeps its off-policy flags
    and rollout-time old log-probs on the other steps). The behaviour log-probs (mu) stay those
    of the policy that drew each step. Returns the trajectories (fresh ones unchanged) and how
    many were re-scored.

    `forward_all`: run the forwards over every trajectory, fresh ones included (their scores
    are dropped). Learner ranks under ZeRO-3 gather parameters collectively in each forward,
    so they must all run the same forwards: a rank uses this when another rank has stale
    samples.
    """
    stale = [i for i, t in enumerate(trajectories) if t.rollout_version != version]
    if not trajectories or not (stale or forward_all):
        return trajectories, 0
    num_steps = trajectories[0].num_steps
    steps = (list(range(num_steps)) if settings.stale_rescore == "all"
             else trained_steps(num_steps, settings.timestep_fraction))
    scored = list(range(len(trajectories))) if forward_all else stale
    out = list(trajectories)
    for start in range(0, len(scored), batch_size):
        chunk = scored[start : start + batch_size]
        scores = rescore_transitions(policy, [trajectories[i] for i in chunk], steps, spec)
        for row, i in enumerate(chunk):
            traj = trajectories[i]
            if traj.rollout_version == version:
                continue  # fresh: its old log-probs are its behaviour log-probs
            old = (traj.old_logprobs if traj.old_logprobs is not None
                   else traj.behaviour_logprobs).copy()
            # from the trajectory's own flags: a replayed sample's buffer prefix stays
            # off-policy on the steps that are not re-scored (its mu is the buffer policy's)
            mask = traj.off_policy_mask.copy()
            old[steps], mask[steps] = scores[row], True
            out[i] = traj.with_updates(old_logprobs=old, off_policy_mask=mask)
    return out, len(stale)


@dataclass
class MicroBatch:
    """Tensors of B trajectories on one device: latents (B, T+1, ...), per-step (B, T),
    per-sample (B,)."""

    prompts: list[str]
    latents: torch.Tensor
    old_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor
    off_policy_mask: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_trajectories(
        cls, trajectories: list[Trajectory], advantages: torch.Tensor, valid: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> MicroBatch:
        """The batch on `device` (the policy's: `policy.device`)."""
        def stack(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(t, name) for t in trajectories])).to(device)

        missing = [t.prompt_key for t in trajectories if t.old_logprobs is None]
        if missing:
            raise ValueError(f"trajectories {missing[:3]} have no old log-probs (re-score first)")
        return cls(
            prompts=[t.prompt for t in trajectories],
            latents=stack("latents"),
            old_logprobs=stack("old_logprobs"),
            behaviour_logprobs=stack("behaviour_logprobs"),
            off_policy_mask=stack("off_policy_mask"),
            advantages=advantages.to(device, torch.float32),
            valid=valid.to(device, torch.bool),
        )


@dataclass(frozen=True)
class UpdateSize:
    """How many samples one optimizer update averages over (all ranks' micro-batches of it,
    divided by the number of data-parallel ranks, which average their gradients): `valid` for
    the policy term (samples of zero-variance groups carry none), `total` for the KL term
    (it covers every sample)."""

    valid: float
    total: float

    @classmethod
    def of(cls, valid: torch.Tensor) -> UpdateSize:
        """The size of an update made of the rows flagged by `valid` (B,) alone."""
        return cls(float(valid.sum()), float(valid.numel()))


def update_micro_batches(order: list[int], micro_batch_size: int,
                         optimizer_steps: int) -> list[list[list[int]]]:
    """Row indices of each micro-batch of each optimizer update of one pass: the shuffled
    `order` cut into micro-batches, then into `optimizer_steps` consecutive groups."""
    batches = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if len(batches) % optimizer_steps:
        raise ValueError(f"{len(batches)} micro-batches do not split into {optimizer_steps} "
                         "optimizer steps (learner.optimizer_steps_per_pass)")
    per_update = len(batches) // optimizer_steps
    return [batches[u * per_update : (u + 1) * per_update] for u in range(optimizer_steps)]


def accumulate_gradients(
    policy: FlowPolicy,
    batch: MicroBatch,
    spec: SamplingSpec,
    settings: LossSettings,
    backward: Callable[[torch.Tensor], None],
    update: UpdateSize | None = None,
) -> dict[str, torch.Tensor]:
    """Run forward + `backward` step by step; return the loss statistics averaged over steps
    (0-dim tensors on the policy's device).

    The loss of docs/algorithm.md section 3 is a mean over the update's valid samples (policy
    term) and over all its samples (KL term) of a mean over the S trained steps. Each step's
    backward gets this batch's share of it (`op_grpo_loss` with the update's sizes, divided
    by S), so the gradients of all backward calls of one optimizer step add up to the gradient
    of the update's loss, whatever the micro-batch size and wherever masked rows fall.
    `update` None: the batch is the whole update. A DeepSpeed `backward` must not scale
    again (`scale_wrt_gas=False`).
    """
    update = update or UpdateSize.of(batch.valid)
    steps = trained_steps(spec.num_steps, settings.timestep_fraction)
    sigmas = policy.sigmas(spec.num_steps, spec.height, spec.width)
    embeds = policy.encode_prompts(batch.prompts)
    seq_weight = sequence_weights(
        batch.old_logprobs, batch.behaviour_logprobs, batch.off_policy_mask,
        settings.seq_weight_max,
    )
    totals: dict[str, torch.Tensor] = {}
    if batch.latents.device != policy.device:
        raise ValueError(f"the micro-batch is on {batch.latents.device}, the policy on "
                         f"{policy.device}: build it with MicroBatch.from_trajectories(..., "
                         "device=policy.device)")
    for step in steps:
        x, x_next = batch.latents[:, step], batch.latents[:, step + 1]
        out = step_logprob(policy, x, x_next, step, sigmas, embeds, spec,
                           detach_uncond=settings.detach_uncond)
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
            policy_normaliser=update.valid,
            kl_normaliser=update.total,
        )
        backward(result.loss / len(steps))
        for key, value in result.stats.items():
            totals[key] = totals.get(key, 0.0) + value / len(steps)
    return totals  # device tensors: `learner.loss.stats_to_floats` reads them in one sync
