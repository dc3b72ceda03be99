"""CPU tests of the learner math (docs/algorithm.md 2, 3, 6): group advantages and the OP-GRPO loss.

Every expected value is computed independently here (numpy or a hand-written torch expression),
never by calling the function under test a second time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.advantages import group_advantages
from learner.loss import kl_to_reference, op_grpo_loss, sequence_weights
from opgrpo import metrics as M

F64 = torch.float64
CLIP = 1e-4


def numpy_advantages(
    rewards: np.ndarray, group_ids: np.ndarray, global_std: bool = False, clip: float = 5.0
) -> np.ndarray:
    """Reference GRPO advantages, one group at a time, straight from the formula."""
    out = np.zeros_like(rewards, dtype=np.float64)
    batch_std = rewards.std()
    for g in np.unique(group_ids):
        members = group_ids == g
        r = rewards[members]
        std = batch_std if global_std else r.std()
        out[members] = (r - r.mean()) / (std + 1e-4)
    return np.clip(out, -clip, clip)


def loss_inputs(batch: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh (all on-policy) float64 batch: new == old == behaviour, seq_weight 1."""
    gen = torch.Generator().manual_seed(seed)
    old = -1.0 + 0.1 * torch.randn(batch, steps, generator=gen, dtype=F64)
    return {
        "new_logprobs": old.clone(),
        "old_logprobs": old,
        "behaviour_logprobs": old.clone(),
        "off_policy_mask": torch.zeros(batch, steps, dtype=torch.bool),
        "advantages": torch.randn(batch, generator=gen, dtype=F64),
        "seq_weight": torch.ones(batch, dtype=F64),
    }


def reference_per_sample(
    new: torch.Tensor, anchor: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """-w_i * mean_t min(r A, clip(r) A), written out independently with numpy (B,)."""
    r = np.exp(new.detach().numpy() - anchor.detach().numpy())
    a = adv.detach().numpy()[:, None]
    surrogate = np.minimum(r * a, np.clip(r, 1 - eps, 1 + eps) * a)
    return torch.from_numpy(-weight.detach().numpy() * surrogate.mean(axis=1))


# ----- group_advantages ------------------------------------------------------------------------


def test_group_advantages_match_numpy_with_unsorted_non_contiguous_ids():
    rng = np.random.default_rng(1)
    group_ids = np.array([7, 3, 7, 42, 3, 42, 7, 3, 42, 7])
    rewards = rng.normal(size=group_ids.size)
    out = group_advantages(torch.from_numpy(rewards), torch.from_numpy(group_ids))
    expected = numpy_advantages(rewards, group_ids)
    np.testing.assert_allclose(out.advantages.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert out.valid.all()
    assert out.num_groups == 3
    assert out.num_masked_groups == 0
    # each group's advantages are centred and (population-std) normalised
    for g in (3, 7, 42):
        a = expected[group_ids == g]
        assert abs(a.mean()) < 1e-9
        assert a.std() == pytest.approx(1.0, rel=1e-3)


def test_group_advantages_global_std_divides_by_batch_std():
    rng = np.random.default_rng(2)
    group_ids = np.array([0, 0, 0, 5, 5, 5, 9, 9])
    rewards = rng.normal(size=8) * np.array([1, 1, 1, 10, 10, 10, 0.1, 0.1])
    out = group_advantages(
        torch.from_numpy(rewards), torch.from_numpy(group_ids), global_std=True, adv_clip_max=100
    )
    expected = numpy_advantages(rewards, group_ids, global_std=True, clip=100)
    np.testing.assert_allclose(out.advantages.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    per_group = numpy_advantages(rewards, group_ids, global_std=False, clip=100)
    assert not np.allclose(expected, per_group, rtol=1e-2)  # the option changes the result


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(
        st.floats(-10, 10, allow_nan=False, allow_infinity=False), min_size=2, max_size=8
    ),
    data=st.data(),
    global_std=st.booleans(),
)
def test_group_advantages_property_matches_numpy(rewards, data, global_std):
    n = len(rewards)
    ids = data.draw(st.lists(st.sampled_from([-4, 0, 11, 1000]), min_size=n, max_size=n))
    r = np.array(rewards, dtype=np.float64)
    g = np.array(ids, dtype=np.int64)
    out = group_advantages(torch.from_numpy(r), torch.from_numpy(g), global_std=global_std)
    expected = numpy_advantages(r, g, global_std=global_std)
    zero_var = {k for k in np.unique(g) if np.all(r[g == k] == r[g == k][0])}
    masked = np.isin(g, list(zero_var))
    expected[masked] = 0.0
    np.testing.assert_allclose(out.advantages.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.valid.numpy(), ~masked)
    assert out.num_masked_groups == len(zero_var)
    assert out.num_groups == len(np.unique(g))
    assert np.all(np.abs(out.advantages.numpy()) <= 5.0)


def test_group_advantages_clip_only_touches_values_beyond_the_bound():
    # group [0, 0, 0, 1]: population std sqrt(3)/4, outlier A = 0.75/0.433 = 1.73, others -0.577
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64)
    ids = torch.zeros(4, dtype=torch.long)
    out = group_advantages(rewards, ids, adv_clip_max=1.0)
    raw = numpy_advantages(rewards.numpy(), ids.numpy(), clip=np.inf)
    assert raw[3] > 1.5
    assert out.advantages[3].item() == 1.0
    np.testing.assert_allclose(out.advantages[:3].double().numpy(), raw[:3], rtol=1e-6)
    negative = group_advantages(-rewards, ids, adv_clip_max=1.0)
    assert negative.advantages[3].item() == -1.0


def test_group_advantages_default_clip_is_five():
    # a lone success among 30: A = (1 - 1/30) / sqrt(p (1 - p)) = 5.39 > 5
    rewards = torch.zeros(30, dtype=F64)
    rewards[4] = 1.0
    out = group_advantages(rewards, torch.zeros(30, dtype=torch.long))
    assert numpy_advantages(rewards.numpy(), np.zeros(30), clip=np.inf)[4] > 5.2
    assert out.advantages[4].item() == 5.0


def test_zero_variance_groups_are_masked_and_counted():
    # group 8: all 0.1 (mean is not exactly 0.1 in floats); group 2: a singleton; group 5: signal
    rewards = torch.tensor([0.1, 0.3, 0.1, 0.7, 0.1, 2.0], dtype=F64)
    ids = torch.tensor([8, 5, 8, 2, 8, 5])
    for global_std in (False, True):
        out = group_advantages(rewards, ids, global_std=global_std)
        assert out.valid.tolist() == [False, True, False, False, False, True]
        assert out.advantages[~out.valid].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert out.num_masked_groups == 2
        assert out.num_groups == 3
        assert out.advantages[1].item() < 0 < out.advantages[5].item()


def test_all_groups_zero_variance_masks_everything():
    out = group_advantages(torch.full((4,), 3.0), torch.tensor([1, 1, 2, 2]))
    assert not out.valid.any()
    assert torch.count_nonzero(out.advantages) == 0
    assert out.num_masked_groups == 2


@pytest.mark.parametrize(
    ("rewards", "ids"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)),
        (torch.zeros(4), torch.zeros(3, dtype=torch.long)),
        (torch.zeros(4), torch.zeros(4, 1, dtype=torch.long)),
    ],
)
def test_group_advantages_shape_errors_raise(rewards, ids):
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, ids)


# ----- on-policy: ratio 1 and the plain policy gradient ----------------------------------------


@pytest.mark.parametrize("correction", ["sequence", "naive", "none"])
def test_on_policy_gradient_equals_policy_gradient(correction):
    batch, steps, params = 5, 4, 3
    gen = torch.Generator().manual_seed(3)
    inputs = loss_inputs(batch, steps, seed=3)
    base = inputs["old_logprobs"]
    features = torch.randn(batch, steps, params, generator=gen, dtype=F64)
    advantages = torch.tensor([1.3, -0.4, 0.0, 2.1, -3.0], dtype=F64)

    theta = torch.zeros(params, dtype=F64, requires_grad=True)
    new = base + features @ theta
    out = op_grpo_loss(
        **{**inputs, "new_logprobs": new, "advantages": advantages},
        clip_range=CLIP,
        correction=correction,
    )
    assert torch.equal(out.ratio, torch.ones(batch, steps, dtype=F64))
    (grad,) = torch.autograd.grad(out.loss, theta)

    theta_ref = torch.zeros(params, dtype=F64, requires_grad=True)
    new_ref = base + features @ theta_ref
    objective = -(advantages * new_ref.mean(dim=1)).mean()
    (grad_ref,) = torch.autograd.grad(objective, theta_ref)

    assert grad_ref.abs().max() > 1e-2  # the comparison is not between two zeros
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-6)
    assert out.loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-12)
    assert out.stats[M.LOSS_CLIPFRAC] == 0.0
    assert out.stats[M.LOSS_APPROX_KL] == 0.0


# ----- clipped samples have zero gradient; unclipped ones scale with w_i ------------------------


def clipping_batch() -> dict[str, torch.Tensor]:
    """Sample 0: r > 1+eps, A > 0.  Sample 1: r < 1-eps, A < 0 (both clipped).
    Sample 2: inside the trust region, A > 0.  Sample 3: r > 1+eps but A < 0 (not clipped)."""
    inputs = loss_inputs(4, 3, seed=4)
    old = inputs["old_logprobs"]
    delta = torch.tensor([[0.01], [-0.01], [3e-5], [0.01]], dtype=F64)
    inputs["new_logprobs"] = (old + delta).requires_grad_(True)
    inputs["advantages"] = torch.tensor([1.5, -0.7, 0.9, -1.1], dtype=F64)
    return inputs


def new_logprob_grad(inputs: dict[str, torch.Tensor], correction: str) -> torch.Tensor:
    new = inputs["new_logprobs"].detach().clone().requires_grad_(True)
    out = op_grpo_loss(**{**inputs, "new_logprobs": new}, clip_range=CLIP, correction=correction)
    (grad,) = torch.autograd.grad(out.loss, new)
    return grad


@pytest.mark.parametrize("correction", ["sequence", "naive", "none"])
@pytest.mark.parametrize("weight", [0.1, 1.0, 10.0, 1000.0])
def test_clipped_samples_have_zero_gradient_whatever_their_weight(correction, weight):
    inputs = clipping_batch()
    inputs["seq_weight"] = torch.full((4,), weight, dtype=F64)
    grad = new_logprob_grad(inputs, correction)
    assert torch.all(grad[0] == 0.0)
    assert torch.all(grad[1] == 0.0)
    assert torch.all(grad[2] != 0.0)
    # pessimistic bound: r > 1+eps with A < 0 is *not* clipped and keeps its gradient
    assert torch.all(grad[3] != 0.0)


def test_unclipped_gradient_scales_linearly_with_seq_weight_under_sequence():
    inputs = clipping_batch()
    batch, steps = inputs["old_logprobs"].shape
    grads = {}
    for w in (0.1, 1.0, 10.0, 1000.0):
        inputs["seq_weight"] = torch.tensor([1.0, 1.0, w, 1.0], dtype=F64)
        grads[w] = new_logprob_grad(inputs, "sequence")
    ratio = torch.exp(inputs["new_logprobs"].detach() - inputs["old_logprobs"])
    expected_unit = -inputs["advantages"][2] * ratio[2] / (batch * steps)
    for w, grad in grads.items():
        torch.testing.assert_close(grad[2], w * expected_unit, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad[3], grads[1.0][3], rtol=0, atol=0)  # others untouched


@pytest.mark.parametrize("correction", ["naive", "none"])
def test_seq_weight_is_ignored_without_sequence_correction(correction):
    inputs = clipping_batch()
    inputs["seq_weight"] = torch.ones(4, dtype=F64)
    reference = new_logprob_grad(inputs, correction)
    for w in (0.1, 10.0, 1000.0):
        inputs["seq_weight"] = torch.full((4,), w, dtype=F64)
        torch.testing.assert_close(new_logprob_grad(inputs, correction), reference, rtol=0, atol=0)
    assert torch.all(reference[2] != 0.0)


# ----- sequence_weights -------------------------------------------------------------------------


def test_sequence_weights_sum_only_off_policy_steps():
    old = torch.tensor(
        [
            [0.00, 0.00, 0.00, 0.00, 0.00],
            [0.00, 0.00, 0.00, 0.00, 0.00],
            [0.00, 0.00, 0.00, 0.00, 0.00],
        ],
        dtype=F64,
    )
    behaviour = torch.tensor(
        [
            [0.02, -0.05, 0.01, 4.0, -6.0],  # prefix of 3 off-policy steps, large on-policy diffs
            [3.00, -2.00, 5.0, 1.0, 7.0],  # fresh: nothing counts
            [0.10, 0.20, -0.05, 0.3, 0.01],  # fully off-policy
        ],
        dtype=F64,
    )
    mask = torch.tensor(
        [
            [True, True, True, False, False],
            [False] * 5,
            [True] * 5,
        ]
    )
    weights = sequence_weights(old, behaviour, mask)
    expected = np.exp([-(0.02 - 0.05 + 0.01), 0.0, -(0.10 + 0.20 - 0.05 + 0.3 + 0.01)])
    np.testing.assert_allclose(weights.double().numpy(), expected, rtol=1e-6)
    assert weights[1].item() == 1.0
    assert weights.shape == (3,)


def test_sequence_weights_fresh_batch_is_exactly_one():
    gen = torch.Generator().manual_seed(5)
    old = torch.randn(6, 5, generator=gen, dtype=F64)
    behaviour = old + torch.randn(6, 5, generator=gen, dtype=F64)
    weights = sequence_weights(old, behaviour, torch.zeros(6, 5, dtype=torch.bool))
    assert torch.all(weights == 1.0)


def test_sequence_weights_clamp_to_seq_weight_max():
    old = torch.tensor([[2.0, 0.0], [0.1, 0.0], [-3.0, 0.0]], dtype=F64)
    behaviour = torch.zeros(3, 2, dtype=F64)
    mask = torch.tensor([[True, False]] * 3)
    unclamped = sequence_weights(old, behaviour, mask)
    clamped = sequence_weights(old, behaviour, mask, seq_weight_max=1.5)
    assert unclamped[0].item() == pytest.approx(np.exp(2.0), rel=1e-6)
    assert clamped[0].item() == 1.5
    assert clamped[1].item() == pytest.approx(np.exp(0.1), rel=1e-6)
    assert clamped[2].item() == pytest.approx(np.exp(-3.0), rel=1e-6)


def test_sequence_weights_carry_no_gradient():
    old = torch.full((2, 3), -1.0, dtype=F64, requires_grad=True)
    behaviour = torch.full((2, 3), -1.2, dtype=F64, requires_grad=True)
    weights = sequence_weights(old, behaviour, torch.ones(2, 3, dtype=torch.bool))
    assert not weights.requires_grad
    assert weights.grad_fn is None
    assert weights[0].item() == pytest.approx(np.exp(0.6), rel=1e-6)


# ----- a stale batch: naive vs sequence vs none -------------------------------------------------


def stale_batch(seed: int = 6) -> dict[str, torch.Tensor]:
    """B=8, S=6: samples 0-3 replayed with a 4-step off-policy prefix, 4-7 fresh.

    mu differs from pi_old by 0.01..0.05 per off-policy step; theta is within 5e-5 of pi_old."""
    batch, steps, prefix = 8, 6, 4
    gen = torch.Generator().manual_seed(seed)
    old = -1.0 + 0.1 * torch.randn(batch, steps, generator=gen, dtype=F64)
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    mask[:4, :prefix] = True
    magnitude = 0.01 + 0.04 * torch.rand(batch, steps, generator=gen, dtype=F64)
    sign = torch.where(torch.rand(batch, steps, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    behaviour = torch.where(mask, old + sign * magnitude, old)
    drift = 5e-5 * (2 * torch.rand(batch, steps, generator=gen, dtype=F64) - 1)
    return {
        "new_logprobs": old + drift,
        "old_logprobs": old,
        "behaviour_logprobs": behaviour,
        "off_policy_mask": mask,
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.9, 1.7, 0.2], dtype=F64),
        "seq_weight": sequence_weights(old, behaviour, mask).to(F64),
    }


def test_naive_clips_stale_samples_more_than_sequence():
    inputs = stale_batch()
    seq = op_grpo_loss(**inputs, clip_range=CLIP, correction="sequence")
    naive = op_grpo_loss(**inputs, clip_range=CLIP, correction="naive")
    key = M.LOSS_CLIPFRAC_OFFPOLICY
    assert seq.stats[key] == 0.0
    assert naive.stats[key] == pytest.approx(16 / 24)  # every off-policy step of 4 samples x 6
    assert naive.stats[key] > seq.stats[key]
    assert naive.stats[M.LOSS_CLIPFRAC] == pytest.approx(16 / 48)
    # naive measures the ratio against mu on off-policy steps and against pi_old elsewhere
    anchor = torch.where(
        inputs["off_policy_mask"], inputs["behaviour_logprobs"], inputs["old_logprobs"]
    )
    torch.testing.assert_close(naive.ratio, torch.exp(inputs["new_logprobs"] - anchor))


def test_none_correction_uses_pi_old_anchor_without_weight():
    inputs = stale_batch()
    assert (inputs["seq_weight"][:4] - 1).abs().min() > 1e-3  # the weights are not trivially 1
    seq = op_grpo_loss(**inputs, clip_range=CLIP, correction="sequence")
    none = op_grpo_loss(**inputs, clip_range=CLIP, correction="none")
    torch.testing.assert_close(none.ratio, seq.ratio, rtol=0, atol=0)
    torch.testing.assert_close(
        none.ratio, torch.exp(inputs["new_logprobs"] - inputs["old_logprobs"]), rtol=0, atol=0
    )
    unit = torch.ones(8, dtype=F64)
    expected_none = reference_per_sample(
        inputs["new_logprobs"], inputs["old_logprobs"], inputs["advantages"], unit, CLIP
    ).mean()
    expected_seq = reference_per_sample(
        inputs["new_logprobs"],
        inputs["old_logprobs"],
        inputs["advantages"],
        inputs["seq_weight"],
        CLIP,
    ).mean()
    assert none.policy_loss.item() == pytest.approx(expected_none.item(), rel=1e-12)
    assert seq.policy_loss.item() == pytest.approx(expected_seq.item(), rel=1e-12)
    assert abs(none.policy_loss.item() - seq.policy_loss.item()) > 1e-3
    assert none.stats[M.LOSS_CLIPFRAC_OFFPOLICY] == seq.stats[M.LOSS_CLIPFRAC_OFFPOLICY]


# ----- sample_mask and the KL term --------------------------------------------------------------


def test_masked_samples_contribute_nothing_and_mean_is_over_valid_samples():
    inputs = stale_batch()
    inputs["new_logprobs"] = inputs["new_logprobs"] + torch.linspace(-3e-4, 3e-4, 6, dtype=F64)
    sample_mask = torch.tensor([True, False, True, True, False, True, False, True])
    new = inputs["new_logprobs"].clone().requires_grad_(True)
    out = op_grpo_loss(**{**inputs, "new_logprobs": new}, clip_range=CLIP, sample_mask=sample_mask)
    per_sample = reference_per_sample(
        inputs["new_logprobs"],
        inputs["old_logprobs"],
        inputs["advantages"],
        inputs["seq_weight"],
        CLIP,
    )
    expected = per_sample[sample_mask].sum() / 5
    assert out.policy_loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert abs(per_sample[~sample_mask].sum().item()) > 1e-6  # masking changes the answer
    (grad,) = torch.autograd.grad(out.loss, new)
    assert torch.all(grad[~sample_mask] == 0.0)
    assert torch.any(grad[sample_mask] != 0.0)

    # perturbing a masked sample's inputs leaves the loss unchanged
    perturbed = dict(inputs)
    for key in ("new_logprobs", "advantages", "seq_weight"):
        perturbed[key] = inputs[key].clone()
    perturbed["new_logprobs"][1] += 0.3
    perturbed["advantages"][4] = 40.0
    perturbed["seq_weight"][6] = 1e6
    again = op_grpo_loss(**perturbed, clip_range=CLIP, sample_mask=sample_mask)
    assert again.policy_loss.item() == out.policy_loss.item()


def test_kl_to_reference_matches_independent_computation():
    gen = torch.Generator().manual_seed(7)
    mean_theta = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    mean_ref = torch.randn(3, 2, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    std = torch.tensor([0.5, 1.3, 0.05], dtype=F64)
    kl = kl_to_reference(mean_theta, mean_ref, std)
    diff = mean_theta.detach().numpy() - mean_ref.detach().numpy()
    expected = (diff**2).reshape(3, -1).mean(axis=1) / (2 * std.numpy() ** 2)
    assert kl.shape == (3,)
    np.testing.assert_allclose(kl.detach().double().numpy(), expected, rtol=1e-5)
    kl.sum().backward()
    assert mean_theta.grad is not None and mean_theta.grad.abs().max() > 0
    assert mean_ref.grad is None  # the reference policy is not trained


def test_kl_beta_adds_beta_times_mean_kl():
    inputs = loss_inputs(4, 3, seed=8)
    gen = torch.Generator().manual_seed(8)
    kl = torch.rand(4, 3, generator=gen, dtype=F64).requires_grad_(True)
    beta = 0.04
    out = op_grpo_loss(**inputs, clip_range=CLIP, kl=kl, kl_beta=beta)
    assert out.kl_loss.item() == pytest.approx(beta * kl.detach().numpy().mean(), rel=1e-12)
    assert out.loss.item() == pytest.approx(
        out.policy_loss.item() + beta * kl.detach().numpy().mean(), rel=1e-12
    )
    (grad,) = torch.autograd.grad(out.loss, kl)
    torch.testing.assert_close(grad, torch.full((4, 3), beta / 12, dtype=F64))


def test_kl_beta_zero_gives_zero_kl_loss():
    inputs = loss_inputs(4, 3, seed=9)
    kl = torch.full((4, 3), 2.5, dtype=F64)
    out = op_grpo_loss(**inputs, clip_range=CLIP, kl=kl, kl_beta=0.0)
    assert out.kl_loss.item() == 0.0
    assert out.loss.item() == out.policy_loss.item()
    assert out.policy_loss.item() == pytest.approx(-inputs["advantages"].mean().item(), rel=1e-12)


# ----- stats ------------------------------------------------------------------------------------


def test_clipfrac_is_fraction_of_valid_entries_outside_trust_region():
    batch, steps = 6, 5
    gen = torch.Generator().manual_seed(10)
    inputs = loss_inputs(batch, steps, seed=10)
    # log-ratio magnitudes either well inside (<= 0.5 eps) or well outside (>= 2 eps)
    outside = torch.rand(batch, steps, generator=gen) < 0.4
    outside[[2, 4]] = True  # masked rows are all clipped, so counting them would raise the stat
    small = 0.5 * CLIP * (2 * torch.rand(batch, steps, generator=gen, dtype=F64) - 1)
    large = CLIP * (2 + 10 * torch.rand(batch, steps, generator=gen, dtype=F64))
    sign = torch.where(torch.rand(batch, steps, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    log_ratio = torch.where(outside, sign * large, small)
    inputs["new_logprobs"] = inputs["old_logprobs"] + log_ratio
    sample_mask = torch.tensor([True, True, False, True, False, True])
    out = op_grpo_loss(**inputs, clip_range=CLIP, sample_mask=sample_mask)

    ratio = np.exp(log_ratio.numpy())
    valid = np.broadcast_to(sample_mask.numpy()[:, None], (batch, steps))
    expected = (np.abs(ratio - 1) > CLIP)[valid].mean()
    assert 0 < expected < 1
    assert out.stats[M.LOSS_CLIPFRAC] == pytest.approx(expected, abs=1e-6)  # float32 stat
    unmasked_fraction = (np.abs(ratio - 1) > CLIP).mean()
    assert unmasked_fraction > expected + 0.1  # the mask matters for this batch
    assert out.stats[M.LOSS_APPROX_KL] == pytest.approx(
        (0.5 * log_ratio.numpy() ** 2)[valid].mean(), rel=1e-9
    )


def test_seq_weight_stats_cover_off_policy_samples_only():
    inputs = stale_batch()
    inputs["seq_weight"] = torch.tensor([0.5, 2.0, 1.5, 3.0, 9.0, 9.0, 9.0, 9.0], dtype=F64)
    seq = op_grpo_loss(**inputs, clip_range=CLIP, correction="sequence")
    assert seq.stats[M.LOSS_SEQ_WEIGHT_MEAN] == pytest.approx((0.5 + 2.0 + 1.5 + 3.0) / 4)
    assert seq.stats[M.LOSS_SEQ_WEIGHT_MAX] == 3.0

    fresh = loss_inputs(4, 3, seed=11)
    fresh["seq_weight"] = torch.full((4,), 7.0, dtype=F64)
    out = op_grpo_loss(**fresh, clip_range=CLIP)
    assert np.isnan(out.stats[M.LOSS_SEQ_WEIGHT_MEAN])  # no off-policy sample: nothing to log
    assert np.isnan(out.stats[M.LOSS_SEQ_WEIGHT_MAX])
    assert np.isnan(out.stats[M.LOSS_CLIPFRAC_OFFPOLICY])

    # masked (zero-variance) off-policy samples still report their w_i
    masked = stale_batch()
    masked["seq_weight"] = torch.tensor([0.5, 2.0, 1.5, 3.0, 9.0, 9.0, 9.0, 9.0], dtype=F64)
    masked["sample_mask"] = torch.tensor([False, True, True, True, True, True, True, True])
    out = op_grpo_loss(**masked, clip_range=CLIP, correction="sequence")
    assert out.stats[M.LOSS_SEQ_WEIGHT_MEAN] == pytest.approx((0.5 + 2.0 + 1.5 + 3.0) / 4)


@pytest.mark.parametrize("bad", ["Sequence", "is", ""])
def test_invalid_correction_raises_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"learner\.correction"):
        op_grpo_loss(**loss_inputs(2, 2), clip_range=CLIP, correction=bad)


def test_non_finite_masked_sample_does_not_poison_the_loss():
    inputs = loss_inputs(3, 2, seed=12)
    inputs["seq_weight"] = torch.tensor([1.0, float("inf"), 1.0], dtype=F64)
    inputs["advantages"] = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    sample_mask = torch.tensor([True, False, True])
    new = inputs["new_logprobs"].clone().requires_grad_(True)
    out = op_grpo_loss(**{**inputs, "new_logprobs": new}, clip_range=CLIP, sample_mask=sample_mask)
    assert torch.isfinite(out.loss)
    assert out.policy_loss.item() == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(out.stats[M.LOSS_RATIO_MEAN])
    # torch.where alone is not enough: backward would give 0 * inf = NaN on the masked row
    (grad,) = torch.autograd.grad(out.loss, new)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[1] == 0.0)


def test_non_finite_rewards_are_dropped_from_their_groups():
    nan, inf = float("nan"), float("inf")
    rewards = torch.tensor([0.2, nan, 0.8, 0.5, inf, 0.1, -inf, 0.3], dtype=F64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    out = group_advantages(rewards, ids)
    # the same as the groups without the dropped samples
    kept = torch.tensor([True, False, True, True, False, True, False, True])
    ref = group_advantages(rewards[kept], ids[kept])
    assert torch.equal(out.advantages[kept], ref.advantages)
    assert out.valid.tolist() == [True, False, True, False, False, True, False, True]
    assert out.advantages[~kept].tolist() == [0.0, 0.0, 0.0]
    assert out.num_dropped == 3
    assert out.num_masked_groups == 1  # group 1 has one finite reward left: no signal
    assert torch.isfinite(out.advantages).all()
    everything = group_advantages(torch.full((4,), nan, dtype=F64), torch.zeros(4, dtype=int),
                                  global_std=True)
    assert not everything.valid.any() and everything.num_dropped == 4
