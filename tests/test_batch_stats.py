"""Batch diagnostics: fresh vs replayed rewards, masked groups, replay fraction, version lag."""

import math

import numpy as np
import torch

from learner.advantages import group_advantages
from learner.stats import batch_statistics
from opgrpo import metrics as M
from opgrpo.trajectory import Trajectory


def _traj(key, reward, version, replayed=False):
    return Trajectory(key, key, np.zeros((3, 1)), np.array([1.0, 0.5, 0.0]), np.zeros(2),
                      version, 0.7, 0, reward=reward, replayed=replayed)


def test_statistics_of_a_mixed_batch():
    trajs = [_traj("a", 1.0, 4), _traj("a", 0.0, 4), _traj("a", 0.5, 1, replayed=True),
             _traj("b", 0.2, 4), _traj("b", 0.2, 4), _traj("b", 0.2, 4)]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(torch.tensor([t.reward for t in trajs]), groups)
    stats = batch_statistics(trajs, adv, current_version=4)
    assert math.isclose(stats[M.REWARD_MEAN], np.mean([1, 0, 0.5, 0.2, 0.2, 0.2]))
    assert math.isclose(stats[M.REWARD_FRESH_MEAN], np.mean([1, 0, 0.2, 0.2, 0.2]))
    assert stats[M.REWARD_REPLAYED_MEAN] == 0.5
    assert math.isclose(stats[M.REWARD_DATASET_MEAN], 0.2)  # group "a" was a buffer prompt
    assert stats[M.ADV_MASKED_GROUPS] == 1 and stats[M.ADV_MASKED_FRACTION] == 0.5
    assert stats[M.BUFFER_REPLAYED_FRACTION] == 0.5
    assert stats[M.POLICY_VERSION_LAG_MAX] == 3
    assert math.isclose(stats[M.POLICY_VERSION_LAG_MEAN], 0.5)


def test_no_replayed_samples_gives_nan_replayed_reward():
    trajs = [_traj("a", 1.0, 2), _traj("a", 0.0, 2)]
    adv = group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    stats = batch_statistics(trajs, adv, current_version=2)
    assert math.isnan(stats[M.REWARD_REPLAYED_MEAN])
    assert stats[M.REWARD_DATASET_MEAN] == stats[M.REWARD_MEAN] == 0.5
    assert stats[M.POLICY_VERSION_LAG_MAX] == 0 and stats[M.BUFFER_REPLAYED_FRACTION] == 0


def test_replay_count_keeps_the_expected_fraction():
    from opgrpo.driver import replay_count

    assert [replay_count(0.125, 8, 0, step) for step in range(50)] == [1] * 50
    assert all(replay_count(0.0, 8, 0, step) == 0 for step in range(50))
    draws = [replay_count(0.05, 8, 3, step) for step in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(np.mean(draws) - 0.4) < 0.03  # 0.05 * 8 prompts per step on average
    assert replay_count(0.05, 8, 3, 17) == replay_count(0.05, 8, 3, 17)  # a function of the step
    assert replay_count(0.99, 4, 0, 1) == 3  # one prompt always stays fresh


def test_a_non_finite_reward_is_counted_and_left_out_of_the_means():
    trajs = [_traj("a", 1.0, 0), _traj("a", float("nan"), 0), _traj("a", 0.0, 0)]
    adv = group_advantages(torch.tensor([t.reward for t in trajs]), torch.tensor([0, 0, 0]))
    stats = batch_statistics(trajs, adv, current_version=0)
    assert stats[M.REWARD_DROPPED] == 1
    assert stats[M.REWARD_MEAN] == 0.5 and stats[M.REWARD_STD] == 0.5


def test_a_dropped_sample_never_wins_its_group():
    from opgrpo.driver import Rollout, SampleInfo, admit_winners

    class Recorder:  # the buffer actor's handle: records what would be sent
        def __init__(self):
            self.sent = []
            self.admit = self

        def remote(self, trajectories, candidates):
            self.sent.append(candidates)
            return len(self.sent)

    samples = [SampleInfo(0, 0, 0, "a", False, 0, reward=float("nan")),
               SampleInfo(0, 1, 0, "a", False, 0, reward=0.3),
               SampleInfo(0, 2, 1, "b", False, 0, reward=float("inf")),
               SampleInfo(0, 3, 1, "b", False, 0, reward=float("nan"))]
    adv = group_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([0, 0, 1, 1]))
    buffer = Recorder()
    admit_winners(buffer, Rollout(["chunk"], [], [], samples, []), samples, adv, step=1)
    assert buffer.sent == [[{"index": 1, "reward": 0.3, "advantage": 0.0, "step": 1,
                         "fresh_rate": 1.0}]]
