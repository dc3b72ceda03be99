"""The training driver (`opgrpo train`): the work of one OP-GRPO iteration on the actor pools.

Per iteration (docs/algorithm.md sections 2, 4 and 5):
1. prompts: (1 - rho) from the dataset, rho from the replay buffer;
2. rollout actors draw fresh groups, and mixed trajectories for replayed prompts;
3. reward actors score each rollout chunk as soon as it is done (its images arrive by ref);
4. the driver computes advantages and offers each group's best to the buffer actor;
5. learner ranks train on whole groups; 6. rank 0's weights go to the rollout actors.
Trajectories stay in Ray's object store; the driver only handles rewards and metadata.
In async mode (`train.mode`) the rollout of later iterations is launched before the learner
trains this one; `opgrpo.train` keeps that pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from actors.reward import TOTAL
from buffer_service.rules import fresh_success_rate
from learner.advantages import group_advantages
from learner.stats import finite_mean
from opgrpo import metrics as M
from opgrpo.config import Config
from opgrpo.preflight import get_within, wait_within
from opgrpo.prompts import PromptRecord
from opgrpo.sampling import trajectory_seed

log = logging.getLogger(__name__)



@dataclass
class SampleInfo:
    """What the driver knows of one trajectory: where it lives and how it scored."""

    chunk: int
    index: int
    group: int
    prompt_key: str
    replayed: bool
    behaviour_version: int  # of the stored prefix for a replayed sample
    rollout_version: int = -1  # of the actor that drew the fresh steps (known once drawn)
    reward: float = float("nan")
    # a replayed sample: insert step of the buffer entry its prefix came from (its age counts
    # from there if it is admitted again, see buffer_service.rules); None for a fresh one
    prefix_insert_step: int | None = None


@dataclass
class Rollout:
    """One iteration's rollout: chunk refs, their rows, and per-chunk reward refs."""

    trajectories: list  # ObjectRef per chunk: list[Trajectory]
    images: list  # ObjectRef per chunk: (N, H, W, 3) uint8
    rewards: list  # ObjectRef per chunk: {name: (N,)}
    samples: list[SampleInfo]
    prompts: list[PromptRecord]
    meta: list = field(default_factory=list)  # ObjectRef per chunk: `chunk_meta` dict
    chunk_meta: list[dict] = field(default_factory=list)  # the meta values, after `score`
    step: int = -1
    actors: list[tuple[int, int]] = field(default_factory=list)  # per chunk: (rollout, reward)

    def drawing(self, c: int) -> str:
        """Who draws chunk `c` and what, for messages."""
        where = f"rollout actor {self.actors[c][0]}: " if c < len(self.actors) else ""
        return f"{where}chunk {c} of step {self.step}"

    def scoring(self, c: int) -> str:
        where = f"reward actor {self.actors[c][1]}: " if c < len(self.actors) else ""
        return f"{where}the rewards of chunk {c} of step {self.step}"

    def wait_drawn(self, timeout_s: float) -> None:
        """Wait until every chunk is drawn (or failed), at most `timeout_s`
        (train.step_timeout_s); WaitTimeout names the actor and the chunk."""
        wait_within(self.trajectories, timeout_s, self.drawing, "train.step_timeout_s")

    @property
    def busy_seconds(self) -> float:
        """Rollout-actor seconds spent on this batch's chunks (known after `score`)."""
        return sum(m["end"] - m["start"] for m in self.chunk_meta)


def choose_prompts(records: list[PromptRecord], n: int, seed: int, step: int,
                   exclude: set[str]) -> list[PromptRecord]:
    """n distinct dataset prompts for `step`, not among `exclude` (replayed ones)."""
    rng = np.random.default_rng([seed, step])
    pool = [r for r in records if r.key not in exclude]
    if n > len(pool):
        raise ValueError(f"train.prompts_file has {len(pool)} usable prompts; "
                         f"rollout.prompts_per_step needs {n}")
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def replay_count(rho: float, n_prompts: int, seed: int, step: int) -> int:
    """Prompts of this step drawn from the buffer: rho * n_prompts with stochastic rounding.

    The expected share is exactly rho even when rho * n_prompts is not whole (0.05 of 8 prompts
    replays one prompt in 40% of the steps instead of never); the draw depends on (seed, step)
    only. At least one prompt always stays fresh.
    """
    expected = rho * n_prompts
    whole = int(np.floor(expected + 1e-9))
    extra = np.random.default_rng([seed, step, 7]).random() < expected - whole
    return min(n_prompts - 1, whole + int(extra))


def replayed_samples(chunk: int, replay_meta: list[dict]) -> list[SampleInfo]:
    """The replayed chunk's samples, one group each, from the buffer's sample metadata: each
    keeps the behaviour version and insert step of the entry its prefix was drawn from."""
    return [SampleInfo(chunk, i, i, m["prompt_key"], True, int(m["version"]),
                       prefix_insert_step=int(m["insert_step"]))
            for i, m in enumerate(replay_meta)]


class Iteration:
    """Launches the work of one iteration on the actor pools (no waiting on hot paths)."""

    def __init__(self, config: Config, rollout_pool, reward_pool, buffer) -> None:
        self.config, self.rollout, self.reward, self.buffer = (
            config, rollout_pool, reward_pool, buffer)

    def launch(self, step: int, dataset: list[PromptRecord], version: int) -> Rollout:
        cfg = self.config
        group, n_prompts = cfg.rollout.group_size, cfg.rollout.prompts_per_step
        n_replay = (0 if cfg.buffer.replay_draw == "rescue"  # chosen after scoring: `rescue`
                    else replay_count(cfg.buffer.off_policy_fraction, n_prompts, cfg.run.seed,
                                      step))
        replay_meta, payload_ref = [], None
        if n_replay:
            meta_ref, payload_ref = self.buffer.sample.options(num_returns=2).remote(
                n_replay, step, trajectory_seed(cfg.run.seed, "buffer", step))
            replay_meta = get_within(meta_ref, cfg.train.step_timeout_s,
                                     f"buffer actor: replay sample of step {step}",
                                     "train.step_timeout_s")
        replayed = [PromptRecord(m["prompt_key"], m["prompt"]) for m in replay_meta]
        fresh = choose_prompts(dataset, n_prompts - len(replayed), cfg.run.seed, step,
                               {r.key for r in replayed})
        prompts = replayed + fresh
        rows = []  # (group, record, j) of fresh trajectories to draw
        for g, record in enumerate(prompts):
            first_fresh = 1 if g < len(replayed) else 0
            rows += [(g, record, j) for j in range(first_fresh, group)]
        out = Rollout([], [], [], [], prompts, step=step)
        size = cfg.rollout.chunk_size
        for c, start in enumerate(range(0, len(rows), size)):
            part = rows[start : start + size]
            seeds = [trajectory_seed(cfg.run.seed, step, r.key, j) for _, r, j in part]
            worker = self.rollout.worker(c)
            refs = worker.generate.options(num_returns=3).remote(
                [r.text for _, r, _ in part], [r.key for _, r, _ in part], seeds, version)
            self._add_chunk(out, refs, [r.text for _, r, _ in part])
            out.samples += [SampleInfo(c, i, g, r.key, False, version)
                            for i, (g, r, _) in enumerate(part)]
        if replayed:
            c = len(out.trajectories)
            seeds = [trajectory_seed(cfg.run.seed, step, r.key, 0) for r in replayed]
            refs = self.rollout.worker(c).regenerate.options(num_returns=3).remote(
                payload_ref, cfg.truncate_step, seeds, version)
            self._add_chunk(out, refs, [r.text for r in replayed])
            out.samples += replayed_samples(c, replay_meta)
        return out

    def rescue(self, rollout: Rollout, step: int, version: int, timeout_s: float) -> int:
        """`buffer.replay_draw: rescue`, once the fresh groups are scored (`score`): each masked
        group (its finite fresh rewards all equal), in group order, asks the buffer for its own
        prompt's entry rewarded above that common reward; at most the step's replay budget
        (`replay_count`) get one. Its tail is redrawn by the current weights with the seed of
        the group's last fresh sample, which it replaces in `rollout.samples` (the group keeps
        its size; the replaced trajectory is not trained on). Returns the number of groups
        rescued; their chunk is launched, and `score` must run again."""
        cfg = self.config
        budget = replay_count(cfg.buffer.off_policy_fraction, cfg.rollout.prompts_per_step,
                              cfg.run.seed, step)
        fresh = _fresh_rewards(rollout.samples)
        wanted = [(record.key, fresh[g][0]) for g, record in enumerate(rollout.prompts)
                  if fresh.get(g) and max(fresh[g]) == min(fresh[g])]
        if not budget or not wanted:
            return 0
        meta_ref, payload_ref = self.buffer.lookup.options(num_returns=2).remote(
            wanted, budget, step)
        meta = get_within(meta_ref, timeout_s, f"buffer actor: rescue lookup of step {step}",
                          "train.step_timeout_s")
        if not meta:
            return 0
        group_of = {record.key: g for g, record in enumerate(rollout.prompts)}
        last = {}  # group -> position in rollout.samples of its last fresh sample
        for k, sample in enumerate(rollout.samples):
            if not sample.replayed:
                last[sample.group] = k
        groups = [group_of[m["prompt_key"]] for m in meta]
        seeds = [trajectory_seed(cfg.run.seed, step, m["prompt_key"], cfg.rollout.group_size - 1)
                 for m in meta]
        c = len(rollout.trajectories)
        refs = self.rollout.worker(c).regenerate.options(num_returns=3).remote(
            payload_ref, cfg.truncate_step, seeds, version)
        self._add_chunk(rollout, refs, [m["prompt"] for m in meta])
        replaced = {last[g] for g in groups}
        rollout.samples = [s for k, s in enumerate(rollout.samples) if k not in replaced] + [
            SampleInfo(c, i, g, m["prompt_key"], True, int(m["version"]),
                       prefix_insert_step=int(m["insert_step"]))
            for i, (g, m) in enumerate(zip(groups, meta))]
        return len(meta)

    def _add_chunk(self, out: Rollout, refs, texts: list[str]) -> None:
        trajs, images, meta = refs
        c = len(out.trajectories)
        out.trajectories.append(trajs)
        out.images.append(images)
        out.meta.append(meta)
        out.rewards.append(self.reward.worker(c).score.remote(images, texts))  # pipelined
        out.actors.append((c % len(self.rollout.workers), c % len(self.reward.workers)))


def score(rollout: Rollout, timeout_s: float | None = None) -> dict[str, float]:
    """Wait for the rewards (at most `timeout_s`, train.step_timeout_s: WaitTimeout names the
    actor and the chunk); fill them and the weight version that drew each chunk into the
    samples; return per-reward means (of the finite values: a NaN or infinite reward drops its
    sample, see `group_advantages`)."""
    if timeout_s is None:
        results, rollout.chunk_meta = ray.get(rollout.rewards), ray.get(rollout.meta)
    else:
        results = get_within(rollout.rewards, timeout_s, rollout.scoring,
                             "train.step_timeout_s")
        rollout.chunk_meta = get_within(rollout.meta, timeout_s, rollout.drawing,
                                        "train.step_timeout_s")
    per_name: dict[str, list[float]] = {}
    for sample in rollout.samples:
        sample.rollout_version = int(rollout.chunk_meta[sample.chunk]["version"])
        if not sample.replayed:
            sample.behaviour_version = sample.rollout_version
        result = results[sample.chunk]
        sample.reward = float(result[TOTAL][sample.index])
        for name, values in result.items():
            value = float(values[sample.index])
            per_name.setdefault(name, []).append(value)
            if name != TOTAL and not np.isfinite(value):
                log.warning("reward %r is %s for prompt %r: the sample is dropped from its "
                            "group", name, value, sample.prompt_key)
    return {f"reward/{name}": finite_mean(v) for name, v in per_name.items() if name != TOTAL}


def advantages_of(config: Config, samples: list[SampleInfo]):
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    groups = torch.tensor([s.group for s in samples])
    return group_advantages(rewards, groups, config.learner.global_std,
                            config.learner.adv_clip_max)


def admit_winners(buffer, rollout: Rollout, samples, adv, step: int) -> list:
    """Offer each group's highest-reward trajectory to the buffer (refs, not waited on).

    A replayed winner is offered with `prefix_step`, the insert step of the entry it came from:
    the buffer then keeps its age (or, under `buffer.replayed_winners = exclude`, rejects it).
    Every candidate of a group with finite fresh rewards carries `fresh_rate`, the group's fresh
    success rate (`group_fresh_rates`), which the buffer records for the prompt, admitted or not.
    """
    best: dict[int, int] = {}
    for i, s in enumerate(samples):
        if not np.isfinite(s.reward):
            continue  # a dropped sample is never a group's winner
        if s.group not in best or s.reward > samples[best[s.group]].reward:
            best[s.group] = i
    rates = group_fresh_rates(samples, best)
    by_chunk: dict[int, list[dict]] = {}
    for g, i in best.items():
        s = samples[i]
        candidate = {"index": s.index, "reward": s.reward, "advantage": float(adv.advantages[i]),
                     "step": step}
        if g in rates:
            candidate["fresh_rate"] = rates[g]
        if s.replayed:
            if s.prefix_insert_step is None:  # offered as fresh, its old prefix would look new
                raise ValueError(f"replayed sample of prompt {s.prompt_key!r} has no "
                                 "prefix_insert_step; set it from the buffer's sample metadata")
            candidate["prefix_step"] = s.prefix_insert_step
        by_chunk.setdefault(s.chunk, []).append(candidate)
    return [buffer.admit.remote(rollout.trajectories[c], cands)
            for c, cands in sorted(by_chunk.items())]


def _fresh_rewards(samples) -> dict[int, list[float]]:
    """Finite rewards of the fresh (not replayed) samples, per group."""
    fresh: dict[int, list[float]] = {}
    for s in samples:
        if not s.replayed and np.isfinite(s.reward):
            fresh.setdefault(s.group, []).append(float(s.reward))
    return fresh


def group_fresh_rates(samples, best: dict[int, int]) -> dict[int, float]:
    """Fresh success rate `s` of each group with a winner (`best`: group -> index in
    `samples`) and at least one finite fresh reward: mean fresh reward / winner reward,
    clipped to [0, 1] (`buffer_service.rules.fresh_success_rate`). A group whose samples are
    all replayed, or whose fresh rewards are all dropped, has none."""
    fresh = _fresh_rewards(samples)
    return {g: fresh_success_rate(float(np.mean(fresh[g])), float(samples[i].reward))
            for g, i in best.items() if fresh.get(g)}


def replay_group_metrics(samples) -> dict[str, float]:
    """Where this step's replays landed (NaN when nothing was replayed): the share of replayed
    groups whose fresh samples alone would be masked, and the share the replay un-masks, its
    sample scoring above equal fresh ones (metric keys in `opgrpo.metrics`)."""
    fresh = _fresh_rewards(samples)
    replayed = {s.group: float(s.reward) for s in samples if s.replayed}
    masked = rescued = 0
    for g, reward in replayed.items():
        rewards = fresh.get(g, [])
        if len(rewards) >= 2 and max(rewards) != min(rewards):
            continue  # the fresh samples carry signal on their own
        masked += 1
        rescued += int(bool(rewards) and math.isfinite(reward) and reward > max(rewards))
    n = len(replayed)
    return {M.BUFFER_REPLAY_FRESH_MASKED_FRACTION: masked / n if n else float("nan"),
            M.BUFFER_REPLAY_RESCUED_FRACTION: rescued / n if n else float("nan")}


def learner_shards(config: Config, samples, adv) -> list[list[dict]]:
    from learner.group import split_groups

    shards = []
    for groups in split_groups(config.rollout.prompts_per_step, config.learner.num_ranks):
        chosen = set(groups)
        shards.append([{"chunk": s.chunk, "index": s.index,
                        "advantage": float(adv.advantages[i]), "valid": bool(adv.valid[i])}
                       for i, s in enumerate(samples) if s.group in chosen])
    return shards


@contextlib.contextmanager
def timed(name: str, timings: dict[str, float]):
    """Record the seconds spent in the block as timings['time/<name>']."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[f"time/{name}"] = time.perf_counter() - start
