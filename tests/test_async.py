"""The asynchronous pipeline (`train.mode: async`): the learner's re-scoring of stale samples,
the rollout actors' version rule, and the service with s = 0 (equal to sync) and s = 1."""

import json

import numpy as np
import pytest
import ray
import torch
from test_faults import Saboteur
from test_service import _config, _learner_weights

from actors.rollout import RolloutWorker, StaleWeights
from learner.loss import sequence_weights
from learner.objective import LossSettings, rescore_stale, trained_steps
from opgrpo import metrics as M
from opgrpo.models import FlowPolicy
from opgrpo.sampling import (
    SamplingSpec,
    regenerate_from,
    rescore_transitions,
    sample_trajectories,
)
from opgrpo.train import Trainer

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


def test_trained_only_rescoring_and_replayed_samples(policies, drawn):
    old, new = policies
    # a replayed sample: prefix of 3 steps from the buffer, tail drawn by pi_0 (version 0)
    mixed = regenerate_from(old, drawn[:2], 3, [11, 12], SPEC, version=0)
    assert all(t.rollout_version == 0 and t.replayed for t in mixed)
    settings = LossSettings(timestep_fraction=0.4, stale_rescore="trained")
    out, n = rescore_stale(new, mixed, version=1, spec=SPEC, settings=settings, batch_size=4)
    assert n == 2
    steps = trained_steps(SPEC.num_steps, 0.4)
    assert steps == [0, 1]
    expected = rescore_transitions(new, mixed, steps, SPEC)
    for traj, before, row in zip(out, mixed, expected):
        np.testing.assert_allclose(traj.old_logprobs[steps], row, atol=1e-5)
        assert traj.off_policy_mask.tolist() == [True, True, False, False, False]
        assert np.array_equal(traj.behaviour_logprobs, before.behaviour_logprobs)


def test_rollout_actor_refuses_older_weights_only(tmp_path):
    config = _config(tmp_path, sampling={"num_steps": 2})
    worker = RolloutWorker(config.model_dump(mode="json"))
    worker.set_weights(worker.weights(), 3)
    trajs, images, meta = worker.generate(["a red circle"], ["k"], [5], min_version=2)
    assert meta["version"] == 3 and trajs[0].behaviour_version == 3 and meta["count"] == 1
    assert meta["end"] >= meta["start"] and images.shape == (1, 32, 32, 3)
    with pytest.raises(StaleWeights, match="holds weight version 3.*needs 4 or newer"):
        worker.generate(["a red circle"], ["k"], [5], min_version=4)


# ----- the service --------------------------------------------------------------------------
TIMING = ("time/", "images_per_s")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="opgrpo")
    yield
    ray.shutdown()


def _run(tmp_path, name: str, steps: int, kill: list | None = None,
         **train) -> tuple[list[dict], dict, dict]:
    """A whole run (with a `Saboteur` plan `kill`); returns its metric rows and the
    learner's and a rollout actor's weights after the last push has landed."""
    config = _config(tmp_path, learner={"num_ranks": 1, "micro_batch_size": 16},
                     train={"num_steps": steps, "checkpoint_every": 100, **train},
                     run={"name": name})
    trainer = Trainer(config, tmp_path / name)
    saboteur = Saboteur(trainer, kill) if kill else None
    if saboteur:
        saboteur.start()
    try:
        trainer.run()
        if saboteur:
            saboteur.join(timeout=60)
            assert saboteur.error is None, saboteur.error
            assert len(saboteur.killed) == len(kill)
            now = ray.get(trainer.rollout.workers[0].identity.remote())["pid"]
            assert now != saboteur.killed[0]["pid"]  # Ray restarted it
        learner = _learner_weights(trainer)
        held = ray.get(trainer.rollout.workers[0].weights.remote())
    finally:
        trainer.shutdown()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
            .splitlines()]
    return rows, learner, held


def _numbers(row: dict) -> str:
    """The row without timings, as JSON (NaN statistics compare equal)."""
    return json.dumps({k: v for k, v in row.items() if not k.startswith(TIMING)},
                      sort_keys=True)


@pytest.mark.slow
def test_async_with_staleness_0_equals_sync_step_for_step(ray_session, tmp_path):
    sync, _, _ = _run(tmp_path, "sync", 2, mode="sync")
    async0, _, _ = _run(tmp_path, "async0", 2, mode="async", max_staleness=0)
    assert sync[1][M.BUFFER_REPLAYED_FRACTION] > 0  # step 2 replays: all paths compared
    assert [_numbers(r) for r in async0] == [_numbers(r) for r in sync]
    assert all(r[M.POLICY_STALENESS_MAX] == 0 and r[M.POLICY_RESCORED_FRACTION] == 0
               for r in async0)


@pytest.mark.slow
def test_async_with_staleness_1(ray_session, tmp_path):
    rows, learner, held = _run(tmp_path, "async1", 3, mode="async", max_staleness=1)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["version"] for r in rows] == [1, 2, 3]
    # the logged lag of the fresh samples is never above 1; batch 1 and 2 were both drawn by
    # the initial weights (version 0), so from step 2 on every sample is one version behind
    # and the learner re-scores all of them
    assert [r[M.POLICY_STALENESS_MAX] for r in rows] == [0, 1, 1]
    assert [r[M.POLICY_RESCORED_FRACTION] for r in rows] == [0, 1, 1]
    for row in rows[1:]:  # stale samples carry a sequence weight (off-policy statistics)
        assert np.isfinite(row[M.LOSS_SEQ_WEIGHT_MEAN]) and row[M.LOSS_SEQ_WEIGHT_MEAN] > 0
        assert row["time/learner_rescore"] > 0
        assert row[M.POLICY_VERSION_LAG_MAX] >= 1
    # the rollout actors end with the last pushed weights (pushes were not waited for)
    assert held.keys() == learner.keys()
    assert all(np.array_equal(held[k], learner[k]) for k in learner)
    # A second run with the same seed, whose rollout actor 0 is killed (SIGKILL) while it
    # draws a batch ahead during step 2: Ray restarts it, it loads the newest weights from
    # the control actor and redoes its queued chunks. The first step's numbers are the first
    # run's, no step is lost or repeated, and the lag bound holds.
    again, learner, held = _run(tmp_path, "async1-killed", 3, kill=[(1, "rollout0")],
                                mode="async", max_staleness=1)
    assert [r["step"] for r in again] == [1, 2, 3]
    assert _numbers(again[0]) == _numbers(rows[0])
    assert all(r[M.POLICY_STALENESS_MAX] <= 1 for r in again)
    assert all(np.array_equal(held[k], learner[k]) for k in learner)
