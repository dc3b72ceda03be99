"""The replay buffer kept in Redis, deciding with the pure rules of `buffer_service.rules`.

Layout under a namespace `ns` (one per run):
- `ns:entry:<prompt key>`: hash {reward, insert_step, admitted, version, payload, sum[, prompt]};
  payload is the trajectory as Arrow IPC bytes (never pickle: nothing read back can run code),
  sum its blake2b digest (a damaged entry is detected, evicted and counted, never used).
  insert_step is the step of the entry's oldest transition (a replayed winner keeps its
  prefix's, see `buffer_service.rules`); admitted is the step it was written.
- `ns:order`: sorted set, member = prompt key, score = `order_score` (time-invariant, so decay
  costs no writes: the lowest-priority entry is always the first member).
- `ns:age`: sorted set, member = prompt key, score = insert step (max_age eviction).
- `ns:admitted`: sorted set, member = prompt key, score = the step it was admitted (rollback:
  a replayed winner admitted after a checkpoint may carry an insert step before it).
- `ns:stats`: hash of counters (admissions, replacements, evictions, rejections).
- `ns:fresh_rate`: hash, prompt key -> latest fresh success rate `s` of a stored prompt (the
  `buffer.replay_draw = fail_rate` weights, see `buffer_service.rules`): written with an
  admitted entry, updated by a rejected offer of a stored prompt, deleted with the entry when
  it is evicted or replaced by another prompt. Recorded in every draw mode.
- `ns:config`: hash of capacity and gamma; reopening with another gamma is refused because the
  stored order scores depend on it.
- `ns:gone:<n>` + sorted set `ns:gone` (score = the step of removal): entries replaced or evicted
  since the last checkpoint, kept (when `keep_removed`) so that `rollback_to(step)` rebuilds the
  buffer exactly as it was at that checkpoint; `purge_removed(step)` drops them once a later
  checkpoint is safely written. `ns:stats_at`: the counters at each checkpoint, and
  `ns:fresh_rate_at` the whole `ns:fresh_rate` hash (JSON, one float per entry), same purpose:
  a rate updated by a rejected offer after the checkpoint changes no entry, so the removed
  entries alone could not undo it.

Every admission is one optimistic transaction (WATCH / MULTI / EXEC): the entry, the sorted
sets, the fresh rate and the counters change together or not at all, so a run that dies
mid-admission leaves a consistent buffer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import redis

from buffer_service.rules import (
    AdmissionOutcome,
    BufferEntry,
    check_fresh_rate,
    check_replay_draw,
    check_replayed_winners,
    decide_admission,
    fail_rate_order,
    priority_order_key,
)

log = logging.getLogger(__name__)
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


STAT_NAMES = ("admissions", "replacements", "evictions", "rejections", "corrupted")


def payload_digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class CorruptEntry(ValueError):
    """A stored entry is missing fields, does not parse, or fails its checksum."""


def _parse_rate(raw: bytes | None) -> float | None:
    """A stored fresh rate; None when absent or unreadable (the entry then counts as unsolved:
    a damaged rate only changes a draw weight, so it is not worth evicting the entry)."""
    if raw is None:
        return None
    try:
        rate = float(raw)
    except ValueError:
        return None
    return rate if 0.0 <= rate <= 1.0 else None


def _parse_entry(prompt_key: str, raw: dict[bytes, bytes]) -> StoredEntry:
    try:
        payload = raw[b"payload"]
        stored_sum = raw.get(b"sum")
        if stored_sum is not None and stored_sum.decode() != payload_digest(payload):
            raise CorruptEntry(f"buffer entry {prompt_key!r}: payload checksum mismatch")
        reward = float(raw[b"reward"])
        if not math.isfinite(reward):
            raise CorruptEntry(f"buffer entry {prompt_key!r}: reward {reward} is not finite")
        prompt = raw.get(b"prompt")
        return StoredEntry(prompt_key, reward, int(raw[b"insert_step"]), int(raw[b"version"]),
                           payload, prompt.decode() if prompt is not None else None)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CorruptEntry):
            raise
        raise CorruptEntry(f"buffer entry {prompt_key!r} is damaged: {exc!r}") from None


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
        keep_removed: bool = True,
        replayed_winners: str = "keep_age",
        replay_draw: str = "uniform",
        replay_draw_floor: float = 0.05,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"buffer.capacity must be > 0, got {capacity}")
        check_replayed_winners(replayed_winners)
        check_replay_draw(replay_draw, replay_draw_floor)
        self.client = client
        self.ns = namespace
        self.capacity = capacity
        self.gamma = gamma
        self.max_age = max_age
        self.admit_min_advantage = admit_min_advantage
        self.keep_removed = keep_removed
        self.replayed_winners = replayed_winners
        self.replay_draw = replay_draw
        self.replay_draw_floor = float(replay_draw_floor)
        self._order, self._age = f"{namespace}:order", f"{namespace}:age"
        self._admitted = f"{namespace}:admitted"
        self._stats, self._config = f"{namespace}:stats", f"{namespace}:config"
        self._gone, self._gone_seq = f"{namespace}:gone", f"{namespace}:gone_seq"
        self._stats_at = f"{namespace}:stats_at"
        self._rates, self._rates_at = f"{namespace}:fresh_rate", f"{namespace}:fresh_rate_at"
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
        return self._parse_stats(self.client.hgetall(self._stats))

    @staticmethod
    def _parse_stats(raw: dict[bytes, bytes]) -> dict[str, int]:
        return {name: int(raw.get(name.encode(), 0)) for name in STAT_NAMES}

    def fresh_rate(self, prompt_key: str) -> float | None:
        """The stored prompt's latest fresh success rate `s`, None if not recorded."""
        return _parse_rate(self.client.hget(self._rates, prompt_key))

    def _meta(self, reader, prompt_key: str) -> BufferEntry | None:
        reward, step, version = reader.hmget(
            self._entry_key(prompt_key), "reward", "insert_step", "version"
        )
        if reward is None:
            return None
        return BufferEntry(prompt_key, float(reward), int(step), int(version))

    def get(self, prompt_key: str) -> StoredEntry | None:
        """The entry, None if absent; raises CorruptEntry if it is damaged."""
        raw = self.client.hgetall(self._entry_key(prompt_key))
        if not raw:
            return None
        return _parse_entry(prompt_key, raw)

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self.client.zrange(self._order, 0, -1))

    # ----- writes --------------------------------------------------------------------------
    def evict_expired(self, step: int) -> list[str]:
        """Remove entries older than max_age at `step` (touches only the expired ones)."""
        if self.max_age is None:
            return []
        expired = [k.decode() for k in
                   self.client.zrangebyscore(self._age, "-inf", f"({step - self.max_age}")]
        self._remove_many(expired, count_as="evictions", step=step)
        return expired

    def _gone_names(self, n: int) -> list[str]:
        """n fresh names for removed entries (a counter: names are never reused)."""
        last = int(self.client.incrby(self._gone_seq, n))
        return [f"{self.ns}:gone:{i}" for i in range(last - n + 1, last + 1)]

    def _retire(self, tx, prompt_key: str, name: str | None, step: int,
                drop_rate: bool = True) -> None:
        """Queue the removal of a live entry on `tx`: kept under `name` (see keep_removed),
        or deleted when name is None. Its fresh rate goes too unless `drop_rate` is False (a
        replacement by the same prompt keeps the prompt's rate until the offer brings news);
        a rollback restores rates from `ns:fresh_rate_at`."""
        if drop_rate:
            tx.hdel(self._rates, prompt_key)
        if name is None:
            tx.delete(self._entry_key(prompt_key))
        else:
            tx.rename(self._entry_key(prompt_key), name)
            tx.hset(name, "key", prompt_key)
            tx.zadd(self._gone, {name: step})
        tx.zrem(self._order, prompt_key)
        tx.zrem(self._age, prompt_key)
        tx.zrem(self._admitted, prompt_key)

    def _remove_many(self, keys: list[str], count_as: str | None = None,
                     step: int | None = None) -> None:
        """Remove entries and their index members in one transaction; with a `step` (a
        removal the run may roll back) they are kept until the next checkpoint."""
        if not keys:
            return
        names = (self._gone_names(len(keys)) if self.keep_removed and step is not None
                 else [None] * len(keys))
        with self.client.pipeline(transaction=True) as tx:
            for key, name in zip(keys, names):
                self._retire(tx, key, name, step if step is not None else 0)
            if count_as:
                tx.hincrby(self._stats, count_as, len(keys))
            tx.execute()

    def remove_inserted_after(self, step: int) -> list[str]:
        """Remove entries admitted after `step`: on resume from a checkpoint at `step`, they
        belong to steps that will be run again. A replayed winner may be admitted after `step`
        with an insert step before it, hence `ns:admitted`; `ns:age` covers buffers written
        before that index existed (their entries were admitted at their insert step)."""
        later = {k.decode() for index in (self._age, self._admitted)
                 for k in self.client.zrangebyscore(index, f"({step}", "+inf")}
        self._remove_many(sorted(later))
        return sorted(later)

    # ----- checkpoints ---------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """{"entries": n, "sha256": ...} of the live entries: sha256 over the sorted (prompt
        key, insert step, admitted step, reward repr, payload digest: the checksum stored at
        admission, the payload's own hash for an entry without one). Equal fingerprints mean
        the same entries with the same payloads; a resume compares the rolled-back buffer's
        with the one its checkpoint stored (a flushed or older Redis differs). Reads no
        payload of an entry with its checksum, so a checkpoint costs one round trip."""
        keys = self.keys()
        digest = hashlib.sha256()
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(self._entry_key(key), "insert_step", "admitted", "reward", "sum")
            rows = pipe.execute() if keys else []
        for key, (inserted, admitted, reward, checksum) in zip(keys, rows):
            admitted = admitted if admitted is not None else inserted
            if checksum is None:
                payload = self.client.hget(self._entry_key(key), "payload")
                checksum = payload_digest(payload).encode() if payload is not None else None
            fields = [key, *(b.decode() if b is not None else "-"
                             for b in (inserted, admitted, reward, checksum))]
            digest.update(json.dumps(fields).encode() + b"\n")
        digest.update(f"entries={len(keys)}".encode())
        return {"entries": len(keys), "sha256": digest.hexdigest()}

    def commit(self, step: int) -> dict:
        """A checkpoint at `step` is being written: remember the counters and the fresh rates
        as they are now (read together, written together). Returns the buffer's
        `fingerprint()`, which the checkpoint stores."""
        with self.client.pipeline(transaction=True) as tx:
            tx.hgetall(self._stats)
            tx.hgetall(self._rates)
            raw_stats, raw_rates = tx.execute()
        rates = {k.decode(): v.decode() for k, v in raw_rates.items()}  # exact strings back
        with self.client.pipeline(transaction=True) as tx:
            tx.hset(self._stats_at, str(step), json.dumps(self._parse_stats(raw_stats)))
            tx.hset(self._rates_at, str(step), json.dumps(rates, sort_keys=True))
            tx.execute()
        return self.fingerprint()

    def purge_removed(self, step: int) -> int:
        """The checkpoint at `step` is safely written: entries removed at or before it, and
        counter snapshots of earlier checkpoints, can no longer be needed. Returns how many
        removed entries were dropped."""
        names = self.client.zrangebyscore(self._gone, "-inf", step)
        old = [f for f in self.client.hkeys(self._stats_at) if int(f) < step]
        old_rates = [f for f in self.client.hkeys(self._rates_at) if int(f) < step]
        with self.client.pipeline(transaction=True) as tx:
            if names:
                tx.delete(*names)
                tx.zrem(self._gone, *names)
            if old:
                tx.hdel(self._stats_at, *old)
            if old_rates:
                tx.hdel(self._rates_at, *old_rates)
            tx.execute()
        return len(names)

    def rollback_to(self, step: int) -> dict[str, int]:
        """Put the buffer back as it was at the checkpoint of `step`.

        Entries inserted later are dropped; entries removed later (replaced or evicted) but
        inserted by then come back; the counters and the fresh rates return to their snapshot
        (rates only for entries stored after the rollback; without a snapshot, the current
        rates of those entries are kept). Exact when the store kept its removed entries since
        that checkpoint (`keep_removed`).
        """
        dropped = self.remove_inserted_after(step)
        restored = discarded = 0
        for raw_name, removed_at in self.client.zrange(self._gone, 0, -1, withscores=True):
            name = raw_name.decode()
            key, inserted, admitted = self.client.hmget(name, "key", "insert_step", "admitted")
            admitted = admitted if admitted is not None else inserted
            with self.client.pipeline(transaction=True) as tx:
                if (removed_at > step and key is not None and admitted is not None
                        and int(admitted) <= step):
                    prompt_key, reward = key.decode(), float(self.client.hget(name, "reward"))
                    tx.rename(name, self._entry_key(prompt_key))
                    tx.hdel(self._entry_key(prompt_key), "key")
                    tx.zadd(self._order, {prompt_key: order_score(reward, int(inserted),
                                                                  self.gamma)})
                    tx.zadd(self._age, {prompt_key: int(inserted)})
                    tx.zadd(self._admitted, {prompt_key: int(admitted)})
                    restored += 1
                else:
                    tx.delete(name)
                    discarded += 1
                tx.zrem(self._gone, name)
                tx.execute()
        snapshot = self.client.hget(self._stats_at, str(step))
        if snapshot is not None:
            with self.client.pipeline(transaction=True) as tx:
                tx.delete(self._stats)
                tx.hset(self._stats, mapping=json.loads(snapshot))
                tx.execute()
        self._restore_rates(step)
        return {"dropped": len(dropped), "restored": restored, "discarded": discarded}

    def _restore_rates(self, step: int) -> None:
        """`ns:fresh_rate` as snapshot at `step`, for the entries stored now."""
        live = set(self.keys())
        snapshot = self.client.hget(self._rates_at, str(step))
        if snapshot is not None:
            source = json.loads(snapshot)
        else:
            source = {k.decode(): v.decode() for k, v in self.client.hgetall(self._rates).items()}
        rates = {key: value for key, value in source.items() if key in live}
        with self.client.pipeline(transaction=True) as tx:
            tx.delete(self._rates)
            if rates:
                tx.hset(self._rates, mapping=rates)
            tx.execute()

    def admit(
        self,
        prompt_key: str,
        reward: float,
        advantage: float,
        step: int,
        weight_version: int,
        payload: bytes,
        prompt: str | None = None,
        prefix_step: int | None = None,
        fresh_rate: float | None = None,
    ) -> AdmissionOutcome:
        """Offer a group's best trajectory (docs/algorithm.md 4), atomically.

        `prefix_step`: for a replayed (mixed) trajectory, the insert step of the entry it was
        replayed from, None for a fresh one; `fresh_rate`: the group's fresh success rate, None
        without fresh samples; both as in `ReplayBufferRules.admit`."""
        if not math.isfinite(reward) or math.isnan(advantage):
            raise ValueError(f"prompt {prompt_key!r}: reward and advantage must be finite")
        check_fresh_rate(fresh_rate, prompt_key)
        rate = None if fresh_rate is None else repr(float(fresh_rate))
        self.evict_expired(step)
        inserted = step if prefix_step is None else prefix_step
        entry_key = self._entry_key(prompt_key)
        digest = payload_digest(payload)
        with self.client.pipeline(transaction=True) as tx:
            while True:
                try:
                    tx.watch(entry_key, self._order)
                    outcome, victim, stored = self._decide(tx, prompt_key, reward, advantage,
                                                           step, prefix_step)
                    name = (self._gone_names(1)[0] if victim is not None and self.keep_removed
                            else None)
                    tx.multi()
                    if outcome.admitted:
                        if victim is not None:
                            self._retire(tx, victim, name, step,
                                         drop_rate=victim != prompt_key)
                        fields = {"reward": repr(float(reward)), "insert_step": inserted,
                                  "admitted": step, "version": weight_version,
                                  "payload": payload, "sum": digest}
                        if prompt is not None:
                            fields["prompt"] = prompt
                        tx.hset(entry_key, mapping=fields)
                        tx.zadd(self._order,
                                {prompt_key: order_score(reward, inserted, self.gamma)})
                        tx.zadd(self._age, {prompt_key: inserted})
                        tx.zadd(self._admitted, {prompt_key: step})
                        if rate is not None:
                            tx.hset(self._rates, prompt_key, rate)
                        tx.hincrby(self._stats, "admissions", 1)
                        if outcome is not AdmissionOutcome.INSERTED:
                            tx.hincrby(self._stats, "replacements", 1)
                    else:
                        if stored and rate is not None:  # still news about the prompt
                            tx.hset(self._rates, prompt_key, rate)
                        tx.hincrby(self._stats, "rejections", 1)
                    tx.execute()
                    return outcome
                except redis.WatchError:
                    continue  # another writer changed the watched keys: decide again

    def _decide(self, tx, prompt_key, reward, advantage, step, prefix_step):
        stored = self._meta(tx, prompt_key)
        full = int(tx.zcard(self._order)) >= self.capacity
        lowest = None
        if stored is None and full:
            (first,) = tx.zrange(self._order, 0, 0)
            lowest = self._meta(tx, first.decode())
        outcome = decide_admission(reward, advantage, step, stored, lowest, full, self.gamma,
                                   self.admit_min_advantage, prefix_step=prefix_step,
                                   max_age=self.max_age, replayed_winners=self.replayed_winners)
        victim = None
        if outcome is AdmissionOutcome.REPLACED_SAME_PROMPT:
            victim = prompt_key
        elif outcome is AdmissionOutcome.REPLACED_LOWEST:
            victim = lowest.prompt_key
        return outcome, victim, stored is not None

    def sample(self, n: int, step: int, rng: random.Random,
               validate: Callable[[StoredEntry], None] | None = None) -> list[StoredEntry]:
        """Up to n distinct entries among those not expired at `step`: uniformly, or under
        `replay_draw = "fail_rate"` weighted as `ReplayBufferRules.sample` (the same keys for
        the same entries, rates and rng).

        A damaged entry (CorruptEntry from parsing, or any ValueError from `validate`) is
        evicted, counted as `corrupted` and replaced by another draw: the run goes on.
        """
        low = "-inf" if self.max_age is None else step - self.max_age
        candidates = sorted(k.decode() for k in self.client.zrangebyscore(self._age, low, "+inf"))
        if self.replay_draw == "fail_rate":
            raw = self.client.hmget(self._rates, candidates) if candidates else []
            candidates = fail_rate_order(
                {key: _parse_rate(value) for key, value in zip(candidates, raw)},
                self.replay_draw_floor, rng)
        else:
            rng.shuffle(candidates)
        # draws in order: a damaged one is replaced by the next
        chosen: list[StoredEntry] = []
        for key in candidates:
            if len(chosen) == n:
                break
            entry = self._intact(key, validate)
            if entry is not None:
                chosen.append(entry)
        return chosen

    def _intact(self, key: str,
                validate: Callable[[StoredEntry], None] | None) -> StoredEntry | None:
        """The entry of `key` (None if absent); a damaged one (CorruptEntry from parsing, or
        any ValueError from `validate`) is evicted, counted, and None is returned."""
        try:
            entry = self.get(key)
            if entry is not None and validate is not None:
                validate(entry)
        except ValueError as exc:
            self.discard_corrupt(key, str(exc))
            return None
        return entry

    def lookup(self, wanted: list[tuple[str, float]], n: int, step: int,
               validate: Callable[[StoredEntry], None] | None = None) -> list[StoredEntry]:
        """Up to n entries among `wanted` (prompt key, the reward its entry must exceed), in
        that order, as `ReplayBufferRules.lookup`; a damaged entry is evicted and counted, as in
        `sample`."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        chosen: list[StoredEntry] = []
        for key, above in wanted:
            if len(chosen) == n:
                break
            entry = self._intact(key, validate)
            if entry is None or entry.reward <= above:
                continue
            if self.max_age is not None and step - entry.insert_step > self.max_age:
                continue
            chosen.append(entry)
        return chosen

    def discard_corrupt(self, prompt_key: str, reason: str) -> None:
        """Evict a damaged entry for good (it is not kept for rollback) and count it."""
        log.warning("buffer entry %r is damaged and was evicted: %s", prompt_key, reason)
        with self.client.pipeline(transaction=True) as tx:
            self._retire(tx, prompt_key, None, 0)
            tx.hincrby(self._stats, "corrupted", 1)
            tx.execute()

    def clear(self) -> None:
        keys = [self._entry_key(k) for k in self.keys()]
        gone = self.client.zrange(self._gone, 0, -1)
        self.client.delete(*keys, *gone, self._order, self._age, self._admitted, self._stats,
                           self._config, self._gone, self._gone_seq, self._stats_at,
                           self._rates, self._rates_at)
