"""Per-iteration batch diagnostics of docs/algorithm.md section 6 that do not come from the loss.

Loss-side numbers (clip fractions, approx KL, sequence weights) come from `op_grpo_loss`; the
buffer's counters from the buffer. This module covers rewards (fresh vs replayed), masked groups,
the replayed-prompt fraction and the policy version lag of every sample.
"""

from __future__ import annotations

import math

import numpy as np

from learner.advantages import GroupAdvantages
from opgrpo import metrics as M
from opgrpo.trajectory import Trajectory


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a non-finite reward is a dropped sample), NaN if none."""
    kept = [v for v in values if math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def batch_statistics(
    trajectories: list[Trajectory], advantages: GroupAdvantages, current_version: int
) -> dict[str, float]:
    """Reward, masking, replay and staleness statistics of one iteration's batch.

    `current_version` is the weight version of pi_old (the learner's weights at the start of
    the update); a sample's lag is current_version - behaviour_version (the version that drew
    its oldest steps), its staleness current_version - rollout_version (the version that drew
    its fresh steps: 0 in sync mode). Samples may be `Trajectory`s or the driver's records.
    """
    if len(trajectories) != advantages.advantages.shape[0]:
        raise ValueError("one advantage per trajectory is needed")
    rewards = [t.reward for t in trajectories]
    fresh = [t.reward for t in trajectories if not t.replayed]
    replayed = [t.reward for t in trajectories if t.replayed]
    lags = [current_version - t.behaviour_version for t in trajectories]
    stale = [current_version - t.rollout_version for t in trajectories]
    prompts = {t.prompt_key for t in trajectories}
    replayed_prompts = {t.prompt_key for t in trajectories if t.replayed}
    dataset = [t.reward for t in trajectories if t.prompt_key not in replayed_prompts]
    return {
        M.REWARD_MEAN: finite_mean(rewards),
        M.REWARD_STD: (float(np.std([r for r in rewards if math.isfinite(r)]))
                       if any(math.isfinite(r) for r in rewards) else math.nan),
        M.REWARD_DROPPED: float(advantages.num_dropped),
        M.REWARD_FRESH_MEAN: finite_mean(fresh),
        M.REWARD_REPLAYED_MEAN: finite_mean(replayed),
        M.REWARD_DATASET_MEAN: finite_mean(dataset),
        M.ADV_MASKED_GROUPS: float(advantages.num_masked_groups),
        M.ADV_MASKED_FRACTION: advantages.num_masked_groups / max(1, advantages.num_groups),
        M.BUFFER_REPLAYED_FRACTION: len(replayed_prompts) / max(1, len(prompts)),
        M.POLICY_VERSION_LAG_MEAN: finite_mean([float(x) for x in lags]),
        M.POLICY_VERSION_LAG_MAX: float(max(lags)) if lags else math.nan,
        M.POLICY_STALENESS_MEAN: finite_mean([float(x) for x in stale]),
        M.POLICY_STALENESS_MAX: float(max(stale)) if stale else math.nan,
    }
