"""The asynchronous pipeline (`train.mode: async`): the learner's re-scoring of stale samples
and the rollout actors' version rule. The service in async mode (s = 0 equals sync step for
step; s = 1 with a rollout actor killed) is tested in tests/test_faults.py, against the same
undisturbed synchronous reference run as the fault tests."""


import numpy as np
import pytest
import torch
from test_service import _config

from actors.rollout import RolloutWorker, StaleWeights
from learner.loss import sequence_weights
from learner.objective import LossSettings, rescore_stale, trained_steps
from opgrpo.models import FlowPolicy
from opgrpo.sampling import (
    SamplingSpec,
    regenerate_from,
    rescore_transitions,
    sample_trajectories,
)

SPEC = SamplingSpec(num_steps=5, noise_level=0.7, guidance_scale=4.5, height=32, width=32)
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def policies(tiny_sd3_dir):
    """pi_0 (the weights that drew the samples) and pi_1 (the learner's, one update later)."""
    old = FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)
    new = FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)
    generator = torch.Generator().manual_seed(0)
    new.load_trainable_state_dict({
        name: value + 0.3 * torch.randn(value.shape, generator=generator)
        for name, value in old.trainable_state_dict().items()})
    return old, new


@pytest.fixture(scope="module")
def drawn(policies):
    return sample_trajectories(policies[0], PROMPTS, ["a", "b", "c"], [1, 2, 3], SPEC, version=0)


def test_stale_samples_get_old_logprobs_under_the_learner_weights(policies, drawn):
    old, new = policies
    settings = LossSettings(timestep_fraction=0.4, stale_rescore="all")
    out, n = rescore_stale(new, drawn, version=1, spec=SPEC, settings=settings, batch_size=2)
    assert n == 3
    expected = rescore_transitions(new, drawn, list(range(SPEC.num_steps)), SPEC)
    for traj, before, row in zip(out, drawn, expected):
        np.testing.assert_allclose(traj.old_logprobs, row, rtol=0, atol=1e-5)
        assert traj.off_policy_mask.all()  # every step is stale: all of them enter w_i
        assert np.array_equal(traj.behaviour_logprobs, before.behaviour_logprobs)  # mu kept
        assert np.array_equal(traj.latents, before.latents)
    # w_i is the ratio pi_1 / pi_0 of the whole trajectory
    w = sequence_weights(*(torch.from_numpy(np.stack([getattr(t, k) for t in out]))
                           for k in ("old_logprobs", "behaviour_logprobs", "off_policy_mask")))
    log_ratio = (expected - np.stack([t.behaviour_logprobs for t in drawn])).sum(axis=1)
    np.testing.assert_allclose(w.numpy(), np.exp(log_ratio), rtol=1e-4)
    assert np.abs(log_ratio).max() > 1e-4  # pi_1 differs from pi_0: the weight is not 1


def test_the_learner_forward_reproduces_the_rollout_logprobs(policies, drawn):
    """Same weights, but a version label that differs: the re-scored log-probs equal the
    behaviour ones (ratio 1), so w_i = 1. A fresh sample of the learner's version is left as
    it is, without any forward."""
    old, _ = policies
    settings = LossSettings(stale_rescore="all")
    out, n = rescore_stale(old, drawn, version=7, spec=SPEC, settings=settings, batch_size=3)
    assert n == 3
    for traj in out:
        np.testing.assert_allclose(traj.old_logprobs, traj.behaviour_logprobs, atol=2e-5)
    same, n = rescore_stale(old, drawn, version=0, spec=SPEC, settings=settings, batch_size=3)
    assert n == 0 and all(a is b for a, b in zip(same, drawn))
    # another rank has stale samples: the forwards run over all, only stale ones change
    mixed = [drawn[0], drawn[1].with_updates(behaviour_version=9), drawn[2]]
    out, n = rescore_stale(old, mixed, version=0, spec=SPEC, settings=settings, batch_size=2,
                           forward_all=True)
    assert n == 1 and out[0] is mixed[0] and out[2] is mixed[2]
    assert out[1].off_policy_mask.all()


def test_trained_only_rescoring_keeps_a_replayed_prefix_in_the_weight(policies, tiny_sd3_dir):
    """A stale replayed sample under `stale_rescore: trained`: its trained steps are re-scored
    under the learner's pi_old, and the steps of its buffer prefix that are not trained keep
    their off-policy flags, so w_i still covers the buffer policy's steps."""
    old, new = policies
    buffer_policy = FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)  # mu of the prefix
    generator = torch.Generator().manual_seed(1)
    buffer_policy.load_trainable_state_dict({
        name: value - 0.3 * torch.randn(value.shape, generator=generator)
        for name, value in old.trainable_state_dict().items()})
    stored = sample_trajectories(buffer_policy, PROMPTS[:2], ["a", "b"], [1, 2], SPEC, 0)
    # replayed at version 0: prefix of K = 3 steps from the buffer, tail drawn by pi_0
    mixed = regenerate_from(old, stored, 3, [11, 12], SPEC, version=0)
    assert all(t.rollout_version == 0 and t.replayed for t in mixed)
    settings = LossSettings(timestep_fraction=0.4, stale_rescore="trained")
    out, n = rescore_stale(new, mixed, version=1, spec=SPEC, settings=settings, batch_size=4)
    assert n == 2
    steps = trained_steps(SPEC.num_steps, 0.4)
    assert steps == [0, 1]
    expected = rescore_transitions(new, mixed, steps, SPEC)
    for traj, before, row in zip(out, mixed, expected):
        np.testing.assert_allclose(traj.old_logprobs[steps], row, atol=1e-5)
        # step 2 is in the buffer prefix (K = 3) but not trained: still off-policy
        assert traj.off_policy_mask.tolist() == [True, True, True, False, False]
        assert np.array_equal(traj.old_logprobs[2:], before.old_logprobs[2:])
        assert np.array_equal(traj.behaviour_logprobs, before.behaviour_logprobs)
    w = sequence_weights(*(torch.from_numpy(np.stack([getattr(t, k) for t in out]))
                           for k in ("old_logprobs", "behaviour_logprobs", "off_policy_mask")))
    mu = np.stack([t.behaviour_logprobs for t in mixed])
    old_prefix = np.concatenate([expected, np.stack([t.old_logprobs[2:3] for t in mixed])], 1)
    log_w = (old_prefix - mu[:, :3]).sum(axis=1)
    np.testing.assert_allclose(w.numpy(), np.exp(log_w), rtol=1e-4)
    step2 = np.stack([t.old_logprobs[2] - t.behaviour_logprobs[2] for t in mixed])
    assert np.abs(step2).max() > 1e-4  # the prefix's policy differs: leaving it out shows


def test_rollout_actor_refuses_older_weights_only(tmp_path):
    config = _config(tmp_path, sampling={"num_steps": 2})
    worker = RolloutWorker(config.model_dump(mode="json"))
    worker.set_weights(worker.weights(), 3)
    trajs, images, meta = worker.generate(["a red circle"], ["k"], [5], min_version=2)
    assert meta["version"] == 3 and trajs[0].behaviour_version == 3 and meta["count"] == 1
    assert meta["end"] >= meta["start"] and images.shape == (1, 32, 32, 3)
    with pytest.raises(StaleWeights, match="holds weight version 3.*needs 4 or newer"):
        worker.generate(["a red circle"], ["k"], [5], min_version=4)
