"""CPU tests of the buffer rules (docs/algorithm.md 4): admission, decay, eviction, sampling."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer_service.rules import (
    AdmissionOutcome,
    BufferEntry,
    ReplayBufferRules,
    decayed_priority,
    decide_admission,
    priority_order_key,
)

Outcome = AdmissionOutcome


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    """True when a and b are equal up to float rounding (or the same infinity)."""
    if a == b:
        return True
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


# ----- decayed_priority and priority_order_key -----------------------------------------------


def test_decayed_priority_positive_shrinks_towards_zero():
    assert decayed_priority(2.0, 0, 0.5) == 2.0
    assert decayed_priority(2.0, 3, 0.5) == pytest.approx(0.25)


def test_decayed_priority_negative_grows_more_negative():
    assert decayed_priority(-2.0, 0, 0.5) == -2.0
    assert decayed_priority(-2.0, 3, 0.5) == pytest.approx(-16.0)


def test_decayed_priority_zero_reward_stays_zero():
    assert decayed_priority(0.0, 0, 0.9) == 0.0
    assert decayed_priority(0.0, 10_000, 0.9) == 0.0


def test_decayed_priority_gamma_one_means_no_decay():
    assert decayed_priority(1.5, 1000, 1.0) == 1.5
    assert decayed_priority(-1.5, 1000, 1.0) == -1.5


def test_decayed_priority_huge_age_does_not_raise():
    assert decayed_priority(1.0, 10**12, 0.99) == 0.0
    assert decayed_priority(-1.0, 10**12, 0.99) == -math.inf


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.01, float("nan")])
def test_decayed_priority_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        decayed_priority(1.0, 1, gamma)


def test_decayed_priority_rejects_negative_age():
    with pytest.raises(ValueError, match="age"):
        decayed_priority(1.0, -1, 0.9)


def test_order_key_sign_classes():
    assert priority_order_key(-5.0, 0, 0.9) < priority_order_key(0.0, 0, 0.9)
    assert priority_order_key(0.0, 0, 0.9) < priority_order_key(1e-9, 0, 0.9)


def test_order_key_gamma_one_orders_by_reward_only():
    assert priority_order_key(1.0, 0, 1.0) > priority_order_key(0.5, 10**6, 1.0)
    assert priority_order_key(-1.0, 0, 1.0) < priority_order_key(-0.5, 10**6, 1.0)


def test_order_key_finite_and_ordered_at_huge_steps():
    old, new = priority_order_key(1.0, 10**12, 0.99), priority_order_key(1.0, 10**12 + 1, 0.99)
    assert math.isfinite(old[1]) and math.isfinite(new[1])
    assert old < new  # same reward, older entry has decayed more
    old_neg = priority_order_key(-1.0, 10**12, 0.99)
    new_neg = priority_order_key(-1.0, 10**12 + 1, 0.99)
    assert math.isfinite(old_neg[1]) and old_neg < new_neg


def test_order_key_rejects_non_finite_reward():
    with pytest.raises(ValueError, match="reward"):
        priority_order_key(float("inf"), 0, 0.9)


# ----- admission paths -----------------------------------------------------------------------


def test_insert_into_empty_buffer():
    buf = ReplayBufferRules(capacity=2)
    assert buf.admit("a", 1.0, 0.5, step=0, weight_version=3, payload="traj") is Outcome.INSERTED
    assert "a" in buf and len(buf) == 1
    assert buf.get("a") == BufferEntry("a", 1.0, 0, 3)
    assert buf.get("a").payload == "traj"


@pytest.mark.parametrize("advantage", [0.0, -0.1])
def test_reject_when_advantage_does_not_beat_group(advantage):
    buf = ReplayBufferRules(capacity=2)
    assert buf.admit("a", 1.0, advantage, 0, 0) is Outcome.REJECTED_LOW_ADVANTAGE
    assert len(buf) == 0


def test_admit_min_advantage_threshold_is_strict():
    buf = ReplayBufferRules(capacity=2, admit_min_advantage=0.5)
    assert buf.admit("a", 1.0, 0.5, 0, 0) is Outcome.REJECTED_LOW_ADVANTAGE
    assert buf.admit("a", 1.0, 0.51, 0, 0) is Outcome.INSERTED


def test_replace_same_prompt_iff_reward_beats_decayed_priority():
    buf = ReplayBufferRules(capacity=2, gamma=0.5)
    buf.admit("a", 1.0, 1.0, step=0, weight_version=0)
    assert buf.priority("a", 1) == pytest.approx(0.5)
    # Equal to the decayed priority is not enough: the rule is strict.
    assert buf.admit("a", 0.5, 1.0, step=1, weight_version=1) is Outcome.REJECTED_NOT_BETTER
    assert buf.get("a") == BufferEntry("a", 1.0, 0, 0)
    # Lower than the stored reward but above its decayed priority: replaces.
    out = buf.admit("a", 0.6, 1.0, step=1, weight_version=1, payload="new")
    assert out is Outcome.REPLACED_SAME_PROMPT
    assert buf.get("a") == BufferEntry("a", 0.6, 1, 1)
    assert buf.get("a").payload == "new"
    assert len(buf) == 1


def test_replace_same_prompt_with_negative_rewards():
    buf = ReplayBufferRules(capacity=1, gamma=0.5)
    buf.admit("a", -1.0, 1.0, 0, 0)
    assert buf.priority("a", 1) == pytest.approx(-2.0)
    assert buf.admit("a", -1.5, 1.0, 1, 0) is Outcome.REPLACED_SAME_PROMPT
    assert buf.admit("a", -1.6, 1.0, 1, 0) is Outcome.REJECTED_NOT_BETTER


def test_full_buffer_replaces_lowest_decayed_priority_not_lowest_reward():
    buf = ReplayBufferRules(capacity=2, gamma=0.9)
    buf.admit("old", 1.0, 1.0, step=0, weight_version=0)
    buf.admit("new", 0.9, 1.0, step=5, weight_version=0)
    # At step 5: old = 0.9**5 = 0.59 < new = 0.9, so "old" is lowest despite its higher reward.
    assert buf.lowest_entry().prompt_key == "old"
    assert buf.admit("c", 0.5, 1.0, 5, 1) is Outcome.REJECTED_FULL
    assert buf.admit("c", 0.7, 1.0, 5, 1) is Outcome.REPLACED_LOWEST
    assert set(e.prompt_key for e in buf.entries()) == {"new", "c"}


def test_lowest_entry_skips_a_replaced_entrys_old_priority():
    buf = ReplayBufferRules(capacity=2, gamma=1.0)
    buf.admit("a", 0.1, 1.0, 0, 0)
    buf.admit("b", 0.5, 1.0, 0, 0)
    buf.admit("a", 1.0, 1.0, 1, 0)  # a's old 0.1 item is still in the heap, but stale
    assert buf.lowest_entry().prompt_key == "b"
    assert buf.admit("c", 0.6, 1.0, 1, 0) is Outcome.REPLACED_LOWEST
    assert "a" in buf and "b" not in buf


def test_full_buffer_rejects_reward_equal_to_lowest_priority():
    buf = ReplayBufferRules(capacity=1, gamma=1.0)
    buf.admit("a", 0.5, 1.0, 0, 0)
    assert buf.admit("b", 0.5, 1.0, 1, 0) is Outcome.REJECTED_FULL
    assert "b" not in buf and "a" in buf


def test_stats_and_admitted_flag():
    buf = ReplayBufferRules(capacity=1, gamma=1.0, max_age=1)
    outcomes = [
        buf.admit("a", 1.0, 1.0, 0, 0),  # inserted
        buf.admit("a", 2.0, 1.0, 0, 0),  # replaced same prompt
        buf.admit("b", 3.0, 1.0, 0, 0),  # replaced lowest
        buf.admit("c", 1.0, 1.0, 0, 0),  # rejected full
        buf.admit("c", 9.0, 0.0, 0, 0),  # rejected low advantage
    ]
    assert [o.admitted for o in outcomes] == [True, True, True, False, False]
    assert buf.evict_expired(5) == ["b"]
    assert buf.stats == {"admissions": 3, "replacements": 2, "evictions": 1, "rejections": 2}
    assert len({o.value for o in Outcome}) == len(Outcome) == 8


def test_entry_is_frozen_and_payload_not_compared():
    entry = BufferEntry("a", 1.0, 0, 0, payload=[1, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.reward = 2.0  # type: ignore[misc]
    assert entry == BufferEntry("a", 1.0, 0, 0, payload=None)
    assert "payload" not in repr(entry)


# ----- max_age, step order, validation -------------------------------------------------------


def test_max_age_excludes_from_sampling_then_evicts():
    buf = ReplayBufferRules(capacity=4, gamma=1.0, max_age=2)
    buf.admit("a", 1.0, 1.0, 0, 0)
    buf.admit("b", 1.0, 1.0, 1, 0)
    sampled = buf.sample(10, step=3, rng=random.Random(0))  # a is 3 > max_age steps old
    assert [e.prompt_key for e in sampled] == ["b"]
    assert "a" in buf  # sampling does not evict
    assert buf.evict_expired(3) == ["a"]
    assert "a" not in buf and "b" in buf


def test_replacement_resets_age_for_eviction():
    buf = ReplayBufferRules(capacity=4, gamma=1.0, max_age=2)
    buf.admit("a", 1.0, 1.0, 0, 0)
    buf.admit("b", 1.0, 1.0, 1, 0)
    buf.admit("a", 2.0, 1.0, 2, 0)  # a now inserted at step 2
    assert buf.evict_expired(4) == ["b"]
    assert [e.prompt_key for e in buf.entries()] == ["a"]


def test_admit_evicts_expired_first_making_room():
    buf = ReplayBufferRules(capacity=1, gamma=1.0, max_age=1)
    buf.admit("a", 10.0, 1.0, 0, 0)
    assert buf.admit("b", 0.1, 1.0, 1, 0) is Outcome.REJECTED_FULL  # a is 1 step old: alive
    assert buf.admit("b", 0.1, 1.0, 2, 0) is Outcome.INSERTED  # a expired at step 2
    assert "a" not in buf


def test_max_age_zero_keeps_entries_only_for_their_step():
    buf = ReplayBufferRules(capacity=2, max_age=0)
    buf.admit("a", 1.0, 1.0, 4, 0)
    assert len(buf.sample(1, 4, random.Random(0))) == 1
    assert buf.sample(1, 5, random.Random(0)) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.admit("x", 1.0, 1.0, 4, 0),
        lambda b: b.evict_expired(4),
        lambda b: b.sample(1, 4, random.Random(0)),
    ],
)
def test_step_going_backwards_raises_and_changes_nothing(call):
    buf = ReplayBufferRules(capacity=2)
    buf.admit("a", 1.0, 1.0, 5, 0)
    with pytest.raises(ValueError, match="step went backwards"):
        call(buf)
    assert [e.prompt_key for e in buf.entries()] == ["a"]
    assert buf.admit("b", 1.0, 1.0, 5, 0) is Outcome.INSERTED  # same step is allowed


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"capacity": 0}, "buffer.capacity"),
        ({"capacity": -3}, "buffer.capacity"),
        ({"capacity": 2.5}, "buffer.capacity"),
        ({"capacity": 2, "gamma": 0.0}, "buffer.gamma"),
        ({"capacity": 2, "gamma": 1.5}, "buffer.gamma"),
        ({"capacity": 2, "max_age": -1}, "buffer.max_age"),
        ({"capacity": 2, "admit_min_advantage": float("nan")}, "buffer.admit_min_advantage"),
    ],
)
def test_bad_constructor_args_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ReplayBufferRules(**kwargs)


def test_admit_rejects_non_finite_reward_without_side_effects():
    buf = ReplayBufferRules(capacity=2)
    with pytest.raises(ValueError, match="reward"):
        buf.admit("a", float("nan"), 1.0, 0, 0)
    assert len(buf) == 0 and buf.stats["rejections"] == 0


# ----- sampling ------------------------------------------------------------------------------


def _filled(keys: list[str]) -> ReplayBufferRules:
    buf = ReplayBufferRules(capacity=len(keys), gamma=1.0)
    for key in keys:
        buf.admit(key, 1.0, 1.0, 0, 0)
    return buf


def test_sample_is_deterministic_and_independent_of_insertion_order():
    keys = [f"p{i}" for i in range(10)]
    forward, backward = _filled(keys), _filled(keys[::-1])
    draw_a = [e.prompt_key for e in forward.sample(4, 0, random.Random(7))]
    draw_b = [e.prompt_key for e in backward.sample(4, 0, random.Random(7))]
    assert draw_a == draw_b
    assert len(set(draw_a)) == 4


def test_sample_sizes():
    buf = _filled(["a", "b", "c"])
    assert buf.sample(0, 0, random.Random(0)) == []
    assert {e.prompt_key for e in buf.sample(10, 0, random.Random(0))} == {"a", "b", "c"}
    with pytest.raises(ValueError, match="n must be"):
        buf.sample(-1, 0, random.Random(0))


def test_sample_is_roughly_uniform():
    buf = _filled(["a", "b", "c", "d"])
    rng = random.Random(123)
    counts = dict.fromkeys("abcd", 0)
    for _ in range(4000):
        counts[buf.sample(1, 0, rng)[0].prompt_key] += 1
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_lazy_heap_stays_bounded_under_many_replacements():
    buf = ReplayBufferRules(capacity=3, gamma=1.0)
    for i in range(1000):
        buf.admit(f"p{i % 3}", float(i), 1.0, i, 0)
    assert len(buf) == 3
    assert len(buf._heap) <= 2 * 3 + 32 + 1  # internal bound; stale items get compacted


# ----- properties ----------------------------------------------------------------------------

rewards = st.floats(-1e3, 1e3, allow_nan=False).filter(lambda r: r == 0 or abs(r) >= 1e-3)


@settings(max_examples=200, deadline=None)
@given(
    reward=rewards,
    age=st.integers(0, 1000),
    gamma=st.one_of(st.just(1.0), st.floats(0.5, 0.9999)),
)
def test_priority_falls_with_age(reward, age, gamma):
    now, later = decayed_priority(reward, age, gamma), decayed_priority(reward, age + 1, gamma)
    assert later <= now
    if reward != 0 and gamma < 1:
        assert later < now


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(rewards, st.integers(0, 2000)), min_size=2, max_size=6),
    extra=st.integers(0, 500),
    gamma=st.one_of(st.just(1.0), st.floats(0.9, 1.0)),
)
def test_order_key_agrees_with_decayed_priority(pairs, extra, gamma):
    step = max(t for _, t in pairs) + extra
    for r_a, t_a in pairs:
        for r_b, t_b in pairs:
            p_a = decayed_priority(r_a, step - t_a, gamma)
            p_b = decayed_priority(r_b, step - t_b, gamma)
            if close(p_a, p_b):
                continue  # equal up to rounding: either order is acceptable
            key_a, key_b = priority_order_key(r_a, t_a, gamma), priority_order_key(r_b, t_b, gamma)
            assert (key_a < key_b) == (p_a < p_b), (r_a, t_a, r_b, t_b, p_a, p_b)


operations = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "admit", "replay", "evict", "sample"]),
        st.integers(0, 6),  # prompt index: few prompts so the same-prompt path is common
        st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), st.floats(-3, 3)),
        st.sampled_from([-0.5, 0.0, 0.2, 1.0]),  # advantage
        st.integers(0, 3),  # step increment
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=operations,
    capacity=st.integers(1, 4),
    gamma=st.one_of(st.sampled_from([1.0, 0.9, 0.5]), st.floats(0.3, 1.0)),
    max_age=st.one_of(st.none(), st.integers(0, 5)),
    admit_min_advantage=st.sampled_from([0.0, -0.5, 0.3]),
)
def test_random_operation_sequences_keep_the_rules(
    ops, capacity, gamma, max_age, admit_min_advantage
):
    buf = ReplayBufferRules(capacity, gamma, max_age, admit_min_advantage)
    step = 0
    for op, prompt_idx, reward, advantage, step_increment in ops:
        step += step_increment
        before = {e.prompt_key: e for e in buf.entries()}
        alive = {
            k: e for k, e in before.items() if max_age is None or step - e.insert_step <= max_age
        }
        prio = {
            k: decayed_priority(e.reward, step - e.insert_step, gamma) for k, e in alive.items()
        }

        if op == "evict":
            assert sorted(buf.evict_expired(step)) == sorted(set(before) - set(alive))
        elif op == "sample":
            drawn = [e.prompt_key for e in buf.sample(prompt_idx, step, random.Random(step))]
            assert len(drawn) == len(set(drawn)) == min(prompt_idx, len(alive))
            assert set(drawn) <= set(alive)
        else:
            key = f"p{prompt_idx}"
            prefix_step = None
            if op == "replay":  # a mixed trajectory from the stored entry, or from one since gone
                prefix_step = before[key].insert_step if key in before else max(0, step - 4)
            out = buf.admit(key, reward, advantage, step, step, prefix_step=prefix_step)
            _check_admission(buf, key, reward, advantage, step, out, alive, prio, prefix_step)

        # Invariants after every operation.
        keys = [e.prompt_key for e in buf.entries()]
        assert len(keys) == len(set(keys)) == len(buf) <= capacity
        if op != "sample":
            assert set(keys) <= set(alive) | {f"p{prompt_idx}"}
        lowest = buf.lowest_entry()
        if lowest is not None:
            now = {
                e.prompt_key: decayed_priority(e.reward, step - e.insert_step, gamma)
                for e in buf.entries()
            }
            assert now[lowest.prompt_key] <= min(now.values()) or close(
                now[lowest.prompt_key], min(now.values()), 1e-9
            )


def _check_admission(buf, key, reward, advantage, step, out, alive, prio, prefix_step=None):
    """Check one admit() against a brute-force reading of docs/algorithm.md 4: a replayed candidate
    (prefix_step given) is as old as its prefix."""
    inserted = step if prefix_step is None else prefix_step
    reward_now = decayed_priority(reward, step - inserted, buf.gamma)
    after = {e.prompt_key: e for e in buf.entries()}
    if not out.admitted:
        assert after == alive, "a rejection must leave the (unexpired) buffer unchanged"
    else:
        assert after[key] == BufferEntry(key, reward, inserted, step)
        # Anything that vanished (other than by expiry) lost to a strictly higher priority.
        for lost in set(alive) - (set(after) - {key}):
            assert reward_now > prio[lost]
    reward = reward_now  # what the candidate competes with

    if buf.max_age is not None and step - inserted > buf.max_age:
        assert out is Outcome.REJECTED_EXPIRED
    elif advantage <= buf.admit_min_advantage:
        assert out is Outcome.REJECTED_LOW_ADVANTAGE
    elif key in alive:
        expected = (
            Outcome.REPLACED_SAME_PROMPT if reward > prio[key] else Outcome.REJECTED_NOT_BETTER
        )
        assert out is expected
    elif len(alive) < buf.capacity:
        assert out is Outcome.INSERTED
    else:
        brute_min = min(prio.values())
        tol = 1e-9 * max(1.0, abs(brute_min))
        if out is Outcome.REPLACED_LOWEST:
            (removed,) = set(alive) - set(after)
            assert prio[removed] <= brute_min + tol, "replaced an entry that was not the lowest"
            assert reward > prio[removed]
        else:
            assert out is Outcome.REJECTED_FULL
            assert reward <= brute_min + tol


# ----- replayed winners: age is the age of the oldest transition ----------------------------


def test_a_replayed_candidate_competes_with_its_reward_decayed_from_its_prefix():
    stored = BufferEntry("a", 0.8, 5, 0)  # at step 10: 0.8 * 0.9**5 = 0.472
    fresh = decide_admission(0.9, 1.0, 10, stored, None, False, 0.9)
    replayed = decide_admission(0.9, 1.0, 10, stored, None, False, 0.9, prefix_step=0)
    assert fresh is Outcome.REPLACED_SAME_PROMPT
    assert replayed is Outcome.REJECTED_NOT_BETTER  # 0.9 * 0.9**10 = 0.314 < 0.472
    lowest = BufferEntry("b", 0.4, 10, 0)
    assert decide_admission(0.9, 1.0, 10, None, lowest, True, 0.9) is Outcome.REPLACED_LOWEST
    assert (decide_admission(0.9, 1.0, 10, None, lowest, True, 0.9, prefix_step=0)
            is Outcome.REJECTED_FULL)
    assert (decide_admission(0.9, 1.0, 10, None, None, False, 0.9, prefix_step=6, max_age=3)
            is Outcome.REJECTED_EXPIRED)
    assert (decide_admission(0.9, 1.0, 10, None, None, False, 0.9, prefix_step=7, max_age=3)
            is Outcome.INSERTED)
    assert (decide_admission(0.9, 1.0, 10, None, None, False, 0.9, prefix_step=7,
                             replayed_winners="exclude") is Outcome.REJECTED_REPLAYED)
    with pytest.raises(ValueError, match="prefix_step"):
        decide_admission(0.9, 1.0, 10, None, None, False, 0.9, prefix_step=11)


def test_a_replayed_winner_keeps_its_prefixs_insert_step_decay_and_max_age():
    buf = ReplayBufferRules(capacity=4, gamma=0.9, max_age=6)
    buf.admit("a", 0.5, 1.0, 2, weight_version=2)
    buf.admit("b", 0.9, 1.0, 4, weight_version=4)
    assert buf.admit("a", 1.0, 1.0, 5, 3, prefix_step=2) is Outcome.REPLACED_SAME_PROMPT
    assert buf.get("a") == BufferEntry("a", 1.0, 2, 3)  # stored as old as its prefix
    assert close(buf.priority("a", 7), 1.0 * 0.9**5)
    # the order key counts from step 2 too. At step 7: a 0.59, b 0.66, c 0.6 (stored at step 5,
    # a would be 0.81 and c the lowest)
    buf.admit("c", 0.6, 1.0, 7, 7)
    assert buf.lowest_entry().prompt_key == "a"
    assert [e.prompt_key for e in buf.entries()] == ["a", "b", "c"]  # oldest insert first
    assert buf.evict_expired(8) == []
    assert buf.evict_expired(9) == ["a"]  # 7 > max_age steps after step 2 (4 after step 5)
    # a prefix already past max_age (from an entry since replaced) is not stored again
    assert buf.admit("c", 2.0, 1.0, 10, 9, prefix_step=3) is Outcome.REJECTED_EXPIRED
    assert buf.get("c") == BufferEntry("c", 0.6, 7, 7) and buf.stats["rejections"] == 1


def test_repeated_replays_cannot_keep_a_prompt_for_ever():
    """Every time "p" is replayed its mixed trajectory wins and is offered again; it must still
    leave the buffer max_age steps after its first insertion."""
    buf = ReplayBufferRules(capacity=8, gamma=0.99, max_age=5)
    buf.admit("p", 0.2, 1.0, 0, 0)
    present = []
    for step in range(1, 30):
        buf.evict_expired(step)
        (entry,) = buf.sample(1, step, random.Random(step)) or (None,)
        if entry is not None:  # the replayed trajectory scores better than before
            buf.admit("p", entry.reward + 0.1, 1.0, step, step, prefix_step=entry.insert_step)
        present.append("p" in buf)
        assert "p" not in buf or buf.get("p").insert_step == 0
    assert present == [True] * 5 + [False] * 24


def test_exclude_never_admits_a_replayed_winner():
    buf = ReplayBufferRules(capacity=2, gamma=0.9, replayed_winners="exclude")
    buf.admit("a", 0.1, 1.0, 0, 0)
    assert buf.admit("a", 5.0, 1.0, 3, 0, prefix_step=0) is Outcome.REJECTED_REPLAYED
    assert buf.admit("b", 5.0, 1.0, 3, 0, prefix_step=1) is Outcome.REJECTED_REPLAYED
    assert buf.entries() == [BufferEntry("a", 0.1, 0, 0)] and buf.stats["rejections"] == 2
    assert buf.admit("a", 5.0, 1.0, 3, 3) is Outcome.REPLACED_SAME_PROMPT  # fresh: as before
    with pytest.raises(ValueError, match="buffer.replayed_winners"):
        ReplayBufferRules(capacity=2, replayed_winners="drop")
