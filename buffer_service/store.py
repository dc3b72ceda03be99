"""The replay buffer kept in Redis, deciding with the pure rules of `buffer_service.rules`.

Layout under a namespace `ns` (one per run):
- `ns:entry:<prompt key>`: hash {reward, insert_step, version, payload}; payload is the
  trajectory as Arrow IPC bytes (never pickle: nothing read back can run code).
- `ns:order`: sorted set, member = prompt key, score = `order_score` (time-invariant, so decay
  costs no writes: the lowest-priority entry is always the first member).
- `ns:age`: sorted set, member = prompt key, score = insert step (max_age eviction).
- `ns:stats`: hash of counters (admissions, replacements, evictions, rejections).
- `ns:config`: hash of capacity and gamma; reopening with another gamma is refused because the
  stored order scores depend on it.

Every admission is one optimistic transaction (WATCH / MULTI / EXEC): the entry, both sorted
sets and the counters change together or not at all, so a run that dies mid-admission leaves a
consistent buffer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import redis

from buffer_service.rules import (
    AdmissionOutcome,
    BufferEntry,
    decide_admission,
    priority_order_key,
)

_CLASS_SPACING = 1e9  # order keys stay far below this for any realistic step count


def order_score(reward: float, insert_step: int, gamma: float) -> float:
    """`priority_order_key` folded into one float for a Redis sorted set."""
    sign_class, key = priority_order_key(reward, insert_step, gamma)
    if abs(key) >= _CLASS_SPACING / 2:
        raise ValueError(f"order key {key} is out of range (step {insert_step} too large)")
    return sign_class * _CLASS_SPACING + key


@dataclass(frozen=True)
class StoredEntry:
    """An entry read back from Redis, payload as bytes."""

    prompt_key: str
    reward: float
    insert_step: int
    weight_version: int
    payload: bytes
    prompt: str | None = None  # stored beside the payload so readers need not decode it


class RedisBufferStore:
    """Replay buffer entries in Redis; same decisions as `ReplayBufferRules`."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        capacity: int,
        gamma: float = 0.99,
        max_age: int | None = None,
        admit_min_advantage: float = 0.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"buffer.capacity must be > 0, got {capacity}")
        self.client = client
        self.ns = namespace
        self.capacity = capacity
        self.gamma = gamma
        self.max_age = max_age
        self.admit_min_advantage = admit_min_advantage
        self._order, self._age = f"{namespace}:order", f"{namespace}:age"
        self._stats, self._config = f"{namespace}:stats", f"{namespace}:config"
        self._check_config()

    def _entry_key(self, prompt_key: str) -> str:
        return f"{self.ns}:entry:{prompt_key}"

    def _check_config(self) -> None:
        stored = self.client.hgetall(self._config)
        if stored and float(stored[b"gamma"]) != self.gamma:
            raise ValueError(
                f"the Redis buffer {self.ns!r} was built with buffer.decay_gamma="
                f"{float(stored[b'gamma'])}, not {self.gamma}; use that value or a new run name"
            )
        self.client.hset(self._config, mapping={"gamma": repr(self.gamma),
                                                "capacity": self.capacity})

    # ----- reads ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.client.zcard(self._order))

    def stats(self) -> dict[str, int]:
        raw = self.client.hgetall(self._stats)
        names = ("admissions", "replacements", "evictions", "rejections")
        return {name: int(raw.get(name.encode(), 0)) for name in names}

    def _meta(self, reader, prompt_key: str) -> BufferEntry | None:
        reward, step, version = reader.hmget(
            self._entry_key(prompt_key), "reward", "insert_step", "version"
        )
        if reward is None:
            return None
        return BufferEntry(prompt_key, float(reward), int(step), int(version))

    def get(self, prompt_key: str) -> StoredEntry | None:
        raw = self.client.hgetall(self._entry_key(prompt_key))
        if not raw:
            return None
        prompt = raw.get(b"prompt")
        return StoredEntry(prompt_key, float(raw[b"reward"]), int(raw[b"insert_step"]),
                           int(raw[b"version"]), raw[b"payload"],
                           prompt.decode() if prompt is not None else None)

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self.client.zrange(self._order, 0, -1))

    # ----- writes --------------------------------------------------------------------------
    def evict_expired(self, step: int) -> list[str]:
        """Remove entries older than max_age at `step` (touches only the expired ones)."""
        if self.max_age is None:
            return []
        expired = [k.decode() for k in
                   self.client.zrangebyscore(self._age, "-inf", f"({step - self.max_age}")]
        self._remove_many(expired, count_as="evictions")
        return expired

    def _remove_many(self, keys: list[str], count_as: str | None = None) -> None:
        """Delete entries and their index members in one transaction."""
        if not keys:
            return
        with self.client.pipeline(transaction=True) as tx:
            for key in keys:
                tx.delete(self._entry_key(key))
            tx.zrem(self._order, *keys)
            tx.zrem(self._age, *keys)
            if count_as:
                tx.hincrby(self._stats, count_as, len(keys))
            tx.execute()

    def remove_inserted_after(self, step: int) -> list[str]:
        """Remove entries inserted after `step`: on resume from a checkpoint at `step`, they
        belong to steps that will be run again (their ages would be negative)."""
        later = [k.decode() for k in self.client.zrangebyscore(self._age, f"({step}", "+inf")]
        self._remove_many(later)
        return later

    def admit(
        self,
        prompt_key: str,
        reward: float,
        advantage: float,
        step: int,
        weight_version: int,
        payload: bytes,
        prompt: str | None = None,
    ) -> AdmissionOutcome:
        """Offer a group's best trajectory (ALGORITHM.md 4), atomically."""
        if not math.isfinite(reward) or math.isnan(advantage):
            raise ValueError(f"prompt {prompt_key!r}: reward and advantage must be finite")
        self.evict_expired(step)
        entry_key = self._entry_key(prompt_key)
        with self.client.pipeline(transaction=True) as tx:
            while True:
                try:
                    tx.watch(entry_key, self._order)
                    outcome, victim = self._decide(tx, prompt_key, reward, advantage, step)
                    tx.multi()
                    if outcome.admitted:
                        if victim is not None:
                            tx.delete(self._entry_key(victim))
                            tx.zrem(self._order, victim)
                            tx.zrem(self._age, victim)
                        fields = {"reward": repr(float(reward)), "insert_step": step,
                                  "version": weight_version, "payload": payload}
                        if prompt is not None:
                            fields["prompt"] = prompt
                        tx.hset(entry_key, mapping=fields)
                        tx.zadd(self._order, {prompt_key: order_score(reward, step, self.gamma)})
                        tx.zadd(self._age, {prompt_key: step})
                        tx.hincrby(self._stats, "admissions", 1)
                        if outcome is not AdmissionOutcome.INSERTED:
                            tx.hincrby(self._stats, "replacements", 1)
                    else:
                        tx.hincrby(self._stats, "rejections", 1)
                    tx.execute()
                    return outcome
                except redis.WatchError:
                    continue  # another writer changed the watched keys: decide again

    def _decide(self, tx, prompt_key, reward, advantage, step):
        stored = self._meta(tx, prompt_key)
        full = int(tx.zcard(self._order)) >= self.capacity
        lowest = None
        if stored is None and full:
            (first,) = tx.zrange(self._order, 0, 0)
            lowest = self._meta(tx, first.decode())
        outcome = decide_admission(reward, advantage, step, stored, lowest, full, self.gamma,
                                   self.admit_min_advantage)
        victim = None
        if outcome is AdmissionOutcome.REPLACED_SAME_PROMPT:
            victim = prompt_key
        elif outcome is AdmissionOutcome.REPLACED_LOWEST:
            victim = lowest.prompt_key
        return outcome, victim

    def sample(self, n: int, step: int, rng: random.Random) -> list[StoredEntry]:
        """Up to n distinct entries, uniformly among those not expired at `step`."""
        low = "-inf" if self.max_age is None else step - self.max_age
        candidates = sorted(k.decode() for k in self.client.zrangebyscore(self._age, low, "+inf"))
        chosen = rng.sample(candidates, min(n, len(candidates)))
        entries = [self.get(key) for key in chosen]
        return [e for e in entries if e is not None]

    def clear(self) -> None:
        keys = [self._entry_key(k) for k in self.keys()]
        self.client.delete(*keys, self._order, self._age, self._stats, self._config)
