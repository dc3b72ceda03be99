"""Trajectory sampling, re-scoring and truncated regeneration on a tiny real SD3 pipeline."""

import numpy as np
import pytest
import torch

from opgrpo.models import FlowPolicy
from opgrpo.sampling import (
    SamplingSpec,
    regenerate_from,
    rescore_transitions,
    sample_groups,
    sample_ode,
    sample_trajectories,
    trajectory_seed,
)

SPEC = SamplingSpec(num_steps=6, noise_level=0.7, guidance_scale=4.5, height=32, width=32)
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir):
    return FlowPolicy.from_pretrained(tiny_sd3_dir, lora_rank=4)


@pytest.fixture(scope="module")
def groups(policy):
    return sample_groups(policy, PROMPTS, ["k0", "k1"], 3, SPEC, base_seed=0, iteration=0,
                         version=0)


def test_groups_have_trajectories_with_logprobs(groups):
    assert [t.prompt_key for t in groups] == ["k0"] * 3 + ["k1"] * 3
    for traj in groups:
        assert traj.latents.shape == (7, 4, 16, 16)
        assert traj.behaviour_logprobs.shape == (6,)
        assert np.isfinite(traj.behaviour_logprobs).all()
        assert np.array_equal(traj.old_logprobs, traj.behaviour_logprobs)
        assert not traj.off_policy_mask.any() and not traj.replayed
    assert len({t.seed for t in groups}) == 6
    assert not np.allclose(groups[0].latents[-1], groups[1].latents[-1])


def test_same_seed_same_result(policy, groups):
    again = sample_groups(policy, PROMPTS, ["k0", "k1"], 3, SPEC, 0, 0, 0)
    for a, b in zip(groups, again):
        assert np.array_equal(a.latents, b.latents)
        assert np.array_equal(a.behaviour_logprobs, b.behaviour_logprobs)
    other = sample_groups(policy, PROMPTS, ["k0", "k1"], 3, SPEC, 1, 0, 0)
    assert not np.allclose(other[0].latents[-1], groups[0].latents[-1])


def test_a_trajectory_does_not_depend_on_its_batch(policy, groups):
    alone = sample_trajectories(policy, [groups[4].prompt], ["k1"], [groups[4].seed], SPEC, 0)[0]
    np.testing.assert_allclose(alone.latents, groups[4].latents, atol=1e-4)
    np.testing.assert_allclose(alone.behaviour_logprobs, groups[4].behaviour_logprobs, atol=1e-4)


def test_rescoring_reproduces_behaviour_logprobs_under_same_weights(policy, groups):
    scores = rescore_transitions(policy, groups, list(range(6)), SPEC)
    np.testing.assert_allclose(scores, np.stack([t.behaviour_logprobs for t in groups]),
                               atol=1e-4)


def test_regenerate_keeps_prefix_and_redraws_tail(policy, groups):
    k = 4
    stored = groups[:2]
    seeds = [trajectory_seed(9, "regen", i) for i in range(2)]
    # change pi_old, so the re-scored prefix must differ from the stored behaviour log-probs
    saved = policy.trainable_state_dict()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    try:
        mixed = regenerate_from(policy, stored, k, seeds, SPEC, version=5)
        rescored = rescore_transitions(policy, stored, list(range(k)), SPEC)
    finally:
        policy.load_trainable_state_dict(saved)
    for old, new, ref in zip(stored, mixed, rescored):
        assert np.array_equal(new.latents[: k + 1], old.latents[: k + 1])
        assert not np.allclose(new.latents[-1], old.latents[-1])
        assert new.off_policy_mask.tolist() == [True] * k + [False] * (6 - k)
        assert new.replayed and np.isnan(new.reward)
        assert new.behaviour_version == old.behaviour_version
        assert np.array_equal(new.behaviour_logprobs[:k], old.behaviour_logprobs[:k])
        np.testing.assert_allclose(new.old_logprobs[:k], ref, atol=1e-5)
        assert not np.allclose(new.old_logprobs[:k], old.behaviour_logprobs[:k], atol=1e-4)
        assert np.array_equal(new.old_logprobs[k:], new.behaviour_logprobs[k:])
        assert new.extras["rollout_version"] == 5.0


def test_regenerate_without_truncation_keeps_the_whole_trajectory(policy, groups):
    """K = T (the paper's "w/o truncation" ablation): every transition is replayed."""
    steps = SPEC.num_steps
    mixed = regenerate_from(policy, groups[:2], steps, [1, 2], SPEC, version=1)
    for old, new in zip(groups[:2], mixed):
        assert np.array_equal(new.latents, old.latents)
        assert new.off_policy_mask.all() and len(new.off_policy_mask) == steps
        assert np.array_equal(new.behaviour_logprobs, old.behaviour_logprobs)
        np.testing.assert_allclose(new.old_logprobs, old.behaviour_logprobs, atol=1e-5)


def test_regenerate_refuses_another_grid(policy, groups):
    spec = SamplingSpec(8, 0.7, 4.5, 32, 32)
    with pytest.raises(ValueError, match="another sigma grid"):
        regenerate_from(policy, groups[:1], 3, [1], spec, 0)


def test_ode_sampling_matches_the_diffusers_pipeline(policy):
    seeds = [3, 4]
    ours = sample_ode(policy, PROMPTS, seeds, num_steps=5, guidance_scale=4.5, height=32,
                      width=32)
    start = torch.stack([torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    with torch.no_grad():
        reference = policy.pipeline(
            PROMPTS, num_inference_steps=5, guidance_scale=4.5, height=32, width=32,
            latents=start.clone(), output_type="latent",
            max_sequence_length=policy.max_sequence_length,
        ).images
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_evaluation_shards_and_per_tag_means(tiny_sd3_dir):
    """Evaluation prompts split over actors give the images of one pass (seeds come from the
    prompt keys), quantised to uint8 batch by batch; shards are contiguous and balanced."""
    from opgrpo.evaluate import EvalSettings, generate
    from opgrpo.prompts import PromptRecord
    from opgrpo.train import eval_shards, per_tag_means

    assert eval_shards(5, 2) == [(0, 2), (2, 5)] or eval_shards(5, 2) == [(0, 3), (3, 5)]
    assert eval_shards(2, 4) == [(0, 1), (1, 2)] and eval_shards(7, 1) == [(0, 7)]
    assert sum(b - a for a, b in eval_shards(2000, 7)) == 2000
    assert per_tag_means(np.array([1.0, 0.0, 0.5]), ["a", None, "a"]) == {"a": 0.75}
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir)
    records = [PromptRecord(f"k{i}", t) for i, t in enumerate(["a red circle", "a square",
                                                               "two circles"])]
    settings = EvalSettings(2, 2, 1.0, 0, batch_size=4, height=32, width=32)
    whole = generate(policy, records, settings, quantise=True)
    assert whole.dtype == np.uint8 and whole.shape == (6, 32, 32, 3)
    parts = np.concatenate([generate(policy, records[a:b], settings, quantise=True)
                            for a, b in eval_shards(3, 2)])
    np.testing.assert_array_equal(parts, whole)
    floats = generate(policy, records, settings)
    np.testing.assert_array_equal(
        whole, (floats.movedim(1, -1).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
