"""Group-relative advantages of GRPO (docs/algorithm.md section 2), as a pure function."""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4


@dataclass
class GroupAdvantages:
    """advantages: (N,) clipped normalised rewards; valid: (N,) False for zero-variance groups
    and for samples whose reward is not finite (dropped from their group)."""

    advantages: torch.Tensor
    valid: torch.Tensor
    num_masked_groups: int
    num_groups: int
    num_dropped: int = 0


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    global_std: bool = False,
    adv_clip_max: float = 5.0,
) -> GroupAdvantages:
    """A_i = (R_i - mean_group(R)) / (std + 1e-4), clipped to +-adv_clip_max.

    Args:
        rewards: (N,) one reward per trajectory.
        group_ids: (N,) integer group of each trajectory (same prompt = same group).
        global_std: divide by the std over the whole batch instead of the group's.
        adv_clip_max: clip bound for advantages.

    Groups whose rewards are all equal carry no learning signal: their advantages are set to 0
    and `valid` is False for their members, so the loss can leave them out and count them.
    A NaN or infinite reward (a failed scorer) drops its sample: the group's statistics use
    the other members, the sample is invalid, and `num_dropped` counts it; a group left with
    fewer than two finite rewards is masked.
    Stds are population stds (unbiased=False), as numpy's default in Flow-GRPO's tracker.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids must both be (N,)")
    rewards = rewards.to(torch.float64)
    finite = torch.isfinite(rewards)
    weight = finite.to(torch.float64)
    rewards = torch.where(finite, rewards, torch.zeros_like(rewards))
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = unique.numel()
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, weight)
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards)
    means = sums / counts.clamp(min=1)
    centred = (rewards - means[inverse]) * weight
    group_var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centred**2)
    group_std = (group_var / counts.clamp(min=1)).sqrt()

    group_max = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse, torch.where(finite, rewards, -torch.inf), reduce="amax"
    )
    group_min = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse, torch.where(finite, rewards, torch.inf), reduce="amin"
    )
    zero_variance = (group_max == group_min) | (counts < 2)

    if global_std:
        kept = rewards[finite]
        std = kept.std(unbiased=False) if kept.numel() else torch.tensor(0.0, dtype=torch.float64)
    else:
        std = group_std[inverse]
    advantages = (centred / (std + STD_EPS)).clamp(-adv_clip_max, adv_clip_max)
    valid = ~zero_variance[inverse] & finite
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    return GroupAdvantages(
        advantages=advantages.to(torch.float32),
        valid=valid,
        num_masked_groups=int(zero_variance.sum()),
        num_groups=int(num_groups),
        num_dropped=int((~finite).sum()),
    )
