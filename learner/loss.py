"""The OP-GRPO objective: clipped GRPO with the sequence-level importance correction (s3).

Pure tensor functions, no Ray and no DeepSpeed, so every property of the loss is tested on CPU.
Shapes: B trajectories in a micro-batch, S trained steps per trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from opgrpo import metrics as M

Correction = Literal["sequence", "naive", "none"]


def sequence_weights(
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    off_policy_mask: torch.Tensor,
    seq_weight_max: float | None = None,
) -> torch.Tensor:
    """w_i = exp(sum over off-policy steps of (logp_old - logp_mu)); 1 for fresh trajectories.

    Args:
        old_logprobs, behaviour_logprobs: (B, T) per-step log-probs under pi_old and mu.
        off_policy_mask: (B, T) True where the step was drawn by an older policy than pi_old.
        seq_weight_max: optional clamp of w_i to [0, seq_weight_max] (truncated IS).

    Returns (B,) float32 weights carrying no gradient.
    """
    log_diff = (old_logprobs.detach() - behaviour_logprobs.detach()).to(torch.float64)
    log_w = torch.where(off_policy_mask, log_diff, torch.zeros_like(log_diff)).sum(dim=1)
    weights = log_w.exp()
    if seq_weight_max is not None:
        weights = weights.clamp(0.0, seq_weight_max)
    return weights.to(torch.float32)


def kl_to_reference(
    mean_theta: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Per-trajectory KL term mean_elements((mean_theta - mean_ref)^2) / (2 std^2), shape (B,).

    `std` is the SDE std of the step (docs/algorithm.md 3 as written). Dividing by the transition
    variance std^2 * |dt| instead would give the exact Gaussian KL; the two differ by the step's
    constant factor |dt|, which only rescales beta per step.
    """
    dims = tuple(range(1, mean_theta.ndim))
    sq = (mean_theta.to(torch.float32) - mean_ref.to(torch.float32).detach()) ** 2
    return sq.mean(dim=dims) / (2 * std.to(torch.float32) ** 2)


@dataclass
class LossOutput:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl_loss: torch.Tensor
    ratio: torch.Tensor
    stats: dict[str, float]


def op_grpo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    off_policy_mask: torch.Tensor,
    advantages: torch.Tensor,
    seq_weight: torch.Tensor,
    clip_range: float,
    correction: Correction = "sequence",
    sample_mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    off_policy_samples: torch.Tensor | None = None,
    policy_normaliser: float | None = None,
    kl_normaliser: float | None = None,
) -> LossOutput:
    """Clipped GRPO loss with the chosen off-policy correction.

    Args:
        new_logprobs: (B, S) log pi_theta of the trained transitions (carries the gradient).
        old_logprobs: (B, S) log pi_old of the same transitions.
        behaviour_logprobs: (B, S) log mu (the policy that drew each transition).
        off_policy_mask: (B, S) True for transitions drawn by an older policy than pi_old.
        advantages: (B,) group advantages.
        seq_weight: (B,) w_i from `sequence_weights` (used by correction="sequence" only).
        clip_range: epsilon of the trust region.
        correction: "sequence" (ratio vs pi_old, times w_i), "naive" (ratio vs mu on
            off-policy steps, no w_i), "none" (ratio vs pi_old, no w_i).
        sample_mask: (B,) False for samples of zero-variance groups (left out of the mean).
        kl: (B, S) per-step KL terms, or None when kl_beta == 0.
        off_policy_samples: (B,) which samples count as off-policy in the statistics
            (default: those with an off-policy step among the S given).
        policy_normaliser, kl_normaliser: when this micro-batch is part of a larger update,
            the number of valid samples (policy term) and of all samples (KL term) of the
            whole update: `loss` is then this batch's share of the update's means, so that
            the summed gradients equal the gradient of the means over the update whatever
            the micro-batch size and wherever masked rows fall. Default: this batch alone.
            `policy_loss` and `kl_loss` stay this batch's own means (statistics).
    """
    if correction not in ("sequence", "naive", "none"):
        raise ValueError(f"learner.correction must be sequence|naive|none, got {correction!r}")
    old_logprobs = old_logprobs.detach()
    seq_weight = seq_weight.detach()
    if correction == "naive":
        anchor = torch.where(off_policy_mask, behaviour_logprobs.detach(), old_logprobs)
    else:
        anchor = old_logprobs
    weight = seq_weight if correction == "sequence" else torch.ones_like(seq_weight)
    if sample_mask is None:
        sample_mask = torch.ones_like(advantages, dtype=torch.bool)

    # Masked rows are replaced by zeros before any arithmetic: a masked row with an infinite
    # weight or log-prob would otherwise turn the sum (inf * 0) and its gradient into NaN.
    # (torch.where, not boolean indexing: shapes stay data-independent and nothing waits for
    # the device.)
    valid = sample_mask
    rows = valid[:, None]
    new_v = torch.where(rows, new_logprobs, 0.0)
    anchor_v = torch.where(rows, anchor, 0.0)
    adv = torch.where(valid, advantages.detach(), 0.0)[:, None]
    ratio = torch.exp(new_v - anchor_v)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    per_sample = -torch.where(valid, weight, 0.0) * torch.minimum(unclipped, clipped).mean(dim=1)
    policy_loss = per_sample.sum() / valid.sum().clamp(min=1)

    # The KL regulariser applies to every sample, masked groups included: it does not depend
    # on the advantage, and zero-variance groups still show how far theta drifted from ref.
    use_kl = kl is not None and kl_beta > 0
    kl_loss = kl_beta * kl.mean() if use_kl else policy_loss.new_zeros(())
    loss = policy_loss + kl_loss
    if policy_normaliser is not None or kl_normaliser is not None:
        loss = per_sample.sum() / max(1.0, float(policy_normaliser or valid.numel()))
        if use_kl:
            loss = loss + kl_beta * kl.mean(dim=1).sum() / float(kl_normaliser or len(kl))

    if off_policy_samples is None:
        off_policy_samples = off_policy_mask.any(dim=1)
    full_ratio = torch.exp(new_logprobs.detach() - anchor)
    stats = _loss_stats(full_ratio, anchor, new_logprobs, off_policy_samples, valid, seq_weight,
                        clip_range)
    stats.update({
        M.LOSS_TOTAL: loss.detach(),
        M.LOSS_POLICY: policy_loss.detach(),
        M.LOSS_KL: kl.mean().detach() if kl is not None else policy_loss.new_zeros(()),
    })
    return LossOutput(loss, policy_loss, kl_loss, full_ratio, stats)


def _loss_stats(
    ratio: torch.Tensor,
    anchor: torch.Tensor,
    new_logprobs: torch.Tensor,
    off_policy_samples: torch.Tensor,
    valid: torch.Tensor,
    seq_weight: torch.Tensor,
    clip_range: float,
) -> dict[str, torch.Tensor]:
    """The paper's diagnostics as 0-dim tensors on the loss's device (read them with
    `stats_to_floats`, one device sync for all): clip fractions (all, off-policy) and approx
    KL over valid samples; the sequence weights w_i of every off-policy sample (NaN when there
    is none), logged under every correction so that the ablations show the w_i they ignore."""
    clipped = ((ratio - 1.0).abs() > clip_range).float()
    off_valid = off_policy_samples & valid
    log_ratio = new_logprobs.detach() - anchor
    off = off_policy_samples  # masked groups too: w_i is a diagnostic
    nan = torch.full_like(seq_weight, math.nan)
    return {
        M.LOSS_CLIPFRAC: _masked_mean(clipped, valid),
        M.LOSS_CLIPFRAC_OFFPOLICY: _masked_mean(clipped, off_valid),
        M.LOSS_APPROX_KL: _masked_mean(0.5 * log_ratio**2, valid),
        M.LOSS_RATIO_MEAN: _masked_mean(ratio, valid),
        M.LOSS_RATIO_DEV_MAX: torch.where(valid[:, None], (ratio - 1.0).abs(), 0.0).max()
        .where(valid.any(), math.nan),
        M.LOSS_SEQ_WEIGHT_MEAN: _masked_mean(seq_weight[:, None], off),
        M.LOSS_SEQ_WEIGHT_MAX: torch.where(off, seq_weight, nan).nan_to_num(nan=-math.inf)
        .max().where(off.any(), math.nan),
    }


def _masked_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, S) over the selected rows (B,) bool; NaN when none is selected."""
    picked = torch.where(rows[:, None], values, 0.0)
    return picked.sum() / (rows.sum() * values.shape[1])


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim statistic tensors of one device as Python floats, with one transfer."""
    keys = list(stats)
    values = torch.stack([stats[k].detach().to(torch.float64) for k in keys])
    return dict(zip(keys, values.cpu().tolist()))
