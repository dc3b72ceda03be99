"""The objective on real trajectories of a tiny SD3 model: on-policy ratio 1, exact gradients."""

import numpy as np
import pytest
import torch

from learner.advantages import group_advantages
from learner.loss import op_grpo_loss, sequence_weights
from learner.objective import (
    LossSettings,
    MicroBatch,
    UpdateSize,
    accumulate_gradients,
    trained_steps,
    update_micro_batches,
)
from opgrpo import metrics as M
from opgrpo.models import FlowPolicy
from opgrpo.sampling import SamplingSpec, regenerate_from, sample_groups, step_logprob

SPEC = SamplingSpec(num_steps=5, noise_level=0.7, guidance_scale=1.0, height=32, width=32)


@pytest.fixture(scope="module")
def setup(tiny_sd3_dir):
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)
    trajs = sample_groups(policy, ["a red circle", "a blue square"], ["a", "b"], 3, SPEC, 0, 0, 0)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.8, 0.2])
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    return policy, trajs, adv


def _grads(policy):
    return [p.grad.detach().clone() for p in policy.trainable_parameters()]


def test_trained_steps():
    assert trained_steps(10, 0.9) == list(range(9))
    assert trained_steps(5, 1.0) == list(range(5))
    # Flow-GRPO's int(fraction x T): 0.99 of 10 trains 9 and skips the last step; FLUX's 6
    # steps train 5; float error does not lose a step (0.3 x 10 = 3.0000000000000004)
    assert trained_steps(10, 0.99) == list(range(9))
    assert trained_steps(6, 0.99) == list(range(5))
    assert trained_steps(10, 0.3) == list(range(3)) and trained_steps(10, 0.7) == list(range(7))
    assert trained_steps(10, 0.05) == [0]  # at least one


def test_on_policy_first_forward_reproduces_old_logprobs(setup):
    policy, trajs, adv = setup
    batch = MicroBatch.from_trajectories(trajs, adv.advantages, adv.valid)
    policy.transformer.zero_grad()
    stats = accumulate_gradients(policy, batch, SPEC, LossSettings(), lambda loss: loss.backward())
    assert abs(stats[M.LOSS_RATIO_MEAN] - 1.0) < 1e-5
    assert stats[M.LOSS_CLIPFRAC] == 0.0 and stats[M.LOSS_APPROX_KL] < 1e-10
    # LoRA starts with B = 0, so only the B matrices get a gradient at the first step
    assert sum(float(g.abs().sum()) for g in _grads(policy) if g is not None) > 0


def test_stepwise_accumulation_equals_the_full_loss_gradient(setup):
    policy, trajs, adv = setup
    batch = MicroBatch.from_trajectories(trajs, adv.advantages, adv.valid)
    settings = LossSettings(kl_beta=0.0)
    policy.transformer.zero_grad()
    accumulate_gradients(policy, batch, SPEC, settings, lambda loss: loss.backward())
    stepwise = _grads(policy)

    policy.transformer.zero_grad()
    steps = trained_steps(SPEC.num_steps, settings.timestep_fraction)
    sigmas = policy.sigmas(SPEC.num_steps)
    embeds = policy.encode_prompts(batch.prompts)
    new = torch.stack([
        step_logprob(policy, batch.latents[:, s], batch.latents[:, s + 1], s, sigmas, embeds,
                     SPEC).log_prob
        for s in steps
    ], dim=1)
    full = op_grpo_loss(new, batch.old_logprobs[:, steps], batch.behaviour_logprobs[:, steps],
                        batch.off_policy_mask[:, steps], batch.advantages,
                        torch.ones(len(trajs)), 1e-4, sample_mask=batch.valid)
    full.loss.backward()
    for a, b in zip(stepwise, _grads(policy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    # on-policy, that gradient is the plain policy gradient -mean_i A_i mean_t grad logp
    policy.transformer.zero_grad()
    new = torch.stack([
        step_logprob(policy, batch.latents[:, s], batch.latents[:, s + 1], s, sigmas, embeds,
                     SPEC).log_prob
        for s in steps
    ], dim=1)
    (-(batch.advantages[:, None] * new).mean(dim=1).mean()).backward()
    for a, b in zip(stepwise, _grads(policy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_replayed_trajectories_carry_sequence_weights_and_kl(setup):
    policy, trajs, adv = setup
    saved = policy.trainable_state_dict()
    with torch.no_grad():  # pi_old moves away from the policy that drew the stored prefix
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p, generator=None))
    try:
        mixed = regenerate_from(policy, trajs[:2], 3, [11, 12], SPEC, version=1)
        batch = MicroBatch.from_trajectories(trajs[2:] + mixed, adv.advantages, adv.valid)
        expected_w = sequence_weights(batch.old_logprobs, batch.behaviour_logprobs,
                                      batch.off_policy_mask)
        assert torch.all(expected_w[:4] == 1) and not torch.allclose(
            expected_w[4:], torch.ones(2))
        policy.transformer.zero_grad()
        settings = LossSettings(kl_beta=0.04)
        stats = accumulate_gradients(policy, batch, SPEC, settings, lambda loss: loss.backward())
    finally:
        policy.load_trainable_state_dict(saved)
    torch.testing.assert_close(torch.tensor(stats[M.LOSS_SEQ_WEIGHT_MAX]), expected_w[4:].max())
    assert stats[M.LOSS_KL] > 0  # LoRA moved theta away from the reference
    assert not np.isnan(stats[M.LOSS_CLIPFRAC_OFFPOLICY])


def _update_gradients(policy, trajs, advantages, valid, order, micro_batch_size, settings):
    """One optimizer update's gradient, accumulated as the learner does (the shuffled order
    cut into micro-batches, each backward scaled by the update's sizes)."""
    policy.transformer.zero_grad()
    (update,) = update_micro_batches(order, micro_batch_size, 1)
    size = UpdateSize.of(valid[[i for idx in update for i in idx]])
    for idx in update:
        batch = MicroBatch.from_trajectories([trajs[i] for i in idx], advantages[idx],
                                             valid[idx])
        accumulate_gradients(policy, batch, SPEC, settings, lambda loss: loss.backward(),
                             update=size)
    return _grads(policy)


def test_update_gradient_is_independent_of_micro_batches_and_masked_rows(setup):
    """The loss is the mean over the update's valid samples (and the KL term over all of
    them): micro-batches of 2, 3 or 6 rows, and any order of the rows, give one gradient.
    (A mean per micro-batch, then over micro-batches, would weight a sample by how many valid
    rows share its micro-batch.)"""
    policy, trajs, adv = setup
    valid = torch.tensor([True, True, True, False, True, False])  # masked rows 3 and 5
    saved = policy.trainable_state_dict()
    with torch.no_grad():  # away from the reference, so that the KL term has a gradient
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    settings = LossSettings(kl_beta=0.04)
    try:
        reference = _update_gradients(policy, trajs, adv.advantages, valid, list(range(6)), 6,
                                      settings)
        for order, size in [(list(range(6)), 2), ([3, 0, 5, 1, 4, 2], 2),
                            ([5, 3, 0, 1, 2, 4], 3), ([1, 3, 5, 0, 2, 4], 4)]:
            grads = _update_gradients(policy, trajs, adv.advantages, valid, order, size,
                                      settings)
            for a, b in zip(reference, grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    finally:
        policy.load_trainable_state_dict(saved)
    assert sum(float(g.abs().sum()) for g in reference) > 0


def test_update_micro_batches_cuts_the_pass_into_updates():
    assert update_micro_batches([4, 2, 0, 1, 3, 5], 2, 3) == [[[4, 2]], [[0, 1]], [[3, 5]]]
    assert update_micro_batches(list(range(5)), 2, 1) == [[[0, 1], [2, 3], [4]]]
    with pytest.raises(ValueError, match="optimizer_steps_per_pass"):
        update_micro_batches(list(range(6)), 2, 2)


def test_micro_batch_needs_old_logprobs(setup):
    _, trajs, adv = setup
    stale = [t.with_updates(old_logprobs=None) for t in trajs]
    with pytest.raises(ValueError, match="old log-probs"):
        MicroBatch.from_trajectories(stale, adv.advantages, adv.valid)
