"""Admission, decay, eviction and sampling rules of the replay buffer (docs/algorithm.md section 4).

Pure Python: no Redis, Ray or torch. The Redis store and the Ray actor reuse these functions so
that every backend makes the same decisions; `priority_order_key` is the score a Redis sorted set
will hold.

Vocabulary (docs/algorithm.md 4):
- reward: the stored trajectory's reward; priority: the reward decayed by the entry's age.
- age: training steps since insertion, ``step - insert_step``.
- gamma: decay factor in (0, 1]; ``max_age``: entries older than this are neither replayed nor kept.

Replayed winners (``buffer.replayed_winners``). A replayed prompt comes back as a mixed
trajectory: its first K transitions are the stored entry's, drawn long ago by an older policy,
and only the rest is fresh. If such a trajectory wins its group and were stored as new, with
``insert_step = now``, its old prefix would start a second life with its age reset to 0: a
prompt that keeps winning its replays would keep the same stale transitions in the buffer for
ever, out of reach of the decay and of ``max_age``, which exist precisely to let old
behaviour-policy data go. So the age of an entry is the age of its oldest transition:
- ``keep_age`` (default): the candidate carries ``prefix_step``, the insert step of the entry it
  was replayed from. It competes with its priority decayed from that step, is stored with that
  insert step (so its order key, decay and ``max_age`` eviction all count from there) and with
  the prefix's behaviour version; a candidate whose prefix is already past ``max_age`` is
  rejected (``REJECTED_EXPIRED``).
- ``exclude``: replayed winners are never admitted (``REJECTED_REPLAYED``); the group adds
  nothing, and the stored entry ages on.

Replay draw (``buffer.replay_draw``). Which stored entries a step replays:
- ``uniform`` (default, the paper's): ``n`` distinct entries, uniformly among the non-expired.
- ``fail_rate``: a replayed success carries learning signal mainly when the fresh samples of its
  group would otherwise all fail (all-equal rewards give zero advantages: a masked group), so
  prompts the current policy rarely solves are drawn more often. Each stored prompt keeps ``s``,
  its latest fresh success rate: for the most recent group of the prompt offered to the buffer,
  ``s = mean(fresh rewards) / winner reward`` clipped to [0, 1] (`fresh_success_rate`; the
  group's replayed sample is not among the fresh ones, and ``s = 0`` when the winner's reward
  is <= 0). For binary rewards that is the share of fresh samples that succeeded. ``s`` is set
  when the entry is admitted and updated by every later offer of the same prompt, admitted or
  rejected (a rejected offer still tells how the current policy does on it); an offer from a
  group with no fresh sample leaves it as it is; it goes with the prompt's entry when that is
  evicted or replaced by another prompt. Entries are drawn without replacement with probability
  proportional to ``w = max(buffer.replay_draw_floor, 1 - s)`` (`replay_weight`; an entry with
  no recorded ``s`` counts as unsolved, ``w = 1``), by `fail_rate_order`: Efraimidis-Spirakis
  keys ``u ** (1 / w)`` over the candidates sorted by prompt key, so the draw depends only on
  the stored state and the rng. The floor keeps solved prompts drawable (their entries still
  age and decay as usual); ``floor = 1`` draws uniformly.
- ``rescue``: nothing is drawn before the rollout. Once a step's fresh groups are scored, each
  group whose fresh rewards are all equal (masked) asks for its own prompt's entry; an entry
  whose reward is above the group's common reward (`lookup`) is replayed into that group in
  place of one fresh sample, so every replay lands where it un-masks a group. At most the step's
  replay budget (rho x prompts per step) groups are rescued, in group order.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

REPLAYED_WINNERS = ("keep_age", "exclude")  # choices of buffer.replayed_winners
REPLAY_DRAWS = ("uniform", "fail_rate", "rescue")  # choices of buffer.replay_draw


def _check_gamma(gamma: float, name: str = "gamma") -> None:
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {gamma!r}; use 1.0 to disable decay")


def decayed_priority(reward: float, age: int, gamma: float) -> float:
    """Priority of an entry of reward ``reward`` that is ``age`` training steps old.

    ``reward * gamma**age`` for reward >= 0 and ``reward / gamma**age`` for reward < 0, so that
    both fall with age and an old entry becomes easier to replace. Very negative rewards at huge
    ages decay to ``-inf`` instead of raising.
    """
    if age < 0:
        raise ValueError(f"age must be >= 0, got {age}; the step is earlier than the insert step")
    _check_gamma(gamma)
    decay = gamma**age  # underflows to 0.0 for huge ages, never overflows since gamma <= 1
    if reward >= 0:
        return reward * decay
    return reward / decay if decay > 0.0 else -math.inf


# Why this key works (g = gamma, s = current step, t = insert step, s >= t):
#   r > 0:  log p = log r + (s - t) log g = s log g + [log r - t log g]
#           s log g is shared by all entries at step s, so p orders like [log r - t log g].
#   r < 0:  log|p| = log|r| - (s - t) log g = -s log g + [log|r| + t log g]
#           a larger |p| is a lower p, so p orders like -[log|r| + t log g].
#   r = 0:  p = 0 forever; between every negative and every positive priority.
# The class (0 negative, 1 zero, 2 positive) settles cross-sign comparisons; within a class
# the key never changes with s, so the order of stored entries is fixed at insertion time and
# decay costs no work per step. Logs keep the key finite for any step (no g**t overflow); for
# g = 1, log g = 0 and the key is just the log of the reward's magnitude.
def priority_order_key(reward: float, insert_step: int, gamma: float) -> tuple[int, float]:
    """Time-invariant sort key: ordering keys orders entries by their current priority.

    For any step ``s`` >= every compared ``insert_step``, ``key_a < key_b`` iff
    ``decayed_priority(r_a, s - t_a, gamma) < decayed_priority(r_b, s - t_b, gamma)``
    (up to float rounding of the logs). Returns ``(sign class, log-space key)``.
    """
    _check_gamma(gamma)
    if not math.isfinite(reward):
        raise ValueError(f"reward must be finite, got {reward!r}")
    log_gamma = math.log(gamma)
    if reward > 0:
        return (2, math.log(reward) - insert_step * log_gamma)
    if reward < 0:
        return (0, -(math.log(-reward) + insert_step * log_gamma))
    return (1, 0.0)


@dataclass(frozen=True)
class BufferEntry:
    """One stored trajectory: the best of its group for ``prompt_key`` when it was admitted.

    ``payload`` is the trajectory (latents, per-step logp_mu, ...) or a reference to it; the
    rules never look inside. It is left out of ``==`` and ``repr`` because tensors compare
    elementwise and print at length.
    """

    prompt_key: str
    reward: float
    insert_step: int
    weight_version: int
    payload: object = field(default=None, compare=False, repr=False)


class AdmissionOutcome(str, Enum):
    """What ``ReplayBufferRules.admit`` did with a candidate, one value per reason."""

    INSERTED = "inserted"  # new prompt, buffer had room
    REPLACED_SAME_PROMPT = "replaced_same_prompt"  # beat the stored entry of its own prompt
    REPLACED_LOWEST = "replaced_lowest"  # buffer full, beat the lowest-priority entry
    REJECTED_LOW_ADVANTAGE = "rejected_low_advantage"  # advantage <= admit_min_advantage
    REJECTED_NOT_BETTER = "rejected_not_better"  # did not beat its own prompt's stored entry
    REJECTED_FULL = "rejected_full"  # buffer full, did not beat the lowest-priority entry
    REJECTED_EXPIRED = "rejected_expired"  # replayed, and its prefix is older than max_age
    REJECTED_REPLAYED = "rejected_replayed"  # replayed, and replayed_winners = "exclude"

    @property
    def admitted(self) -> bool:
        """True when the candidate is now stored."""
        return self in _ADMITTED


_ADMITTED = frozenset(
    {
        AdmissionOutcome.INSERTED,
        AdmissionOutcome.REPLACED_SAME_PROMPT,
        AdmissionOutcome.REPLACED_LOWEST,
    }
)


def check_replayed_winners(mode: str) -> None:
    if mode not in REPLAYED_WINNERS:
        raise ValueError(f"buffer.replayed_winners must be one of {REPLAYED_WINNERS}, got {mode!r}")


def check_replay_draw(mode: str, floor: float) -> None:
    if mode not in REPLAY_DRAWS:
        raise ValueError(f"buffer.replay_draw must be one of {REPLAY_DRAWS}, got {mode!r}")
    if (isinstance(floor, bool) or not isinstance(floor, (int, float))
            or not 0.0 < floor <= 1.0):
        raise ValueError(f"buffer.replay_draw_floor must be in (0, 1], got {floor!r}")


def check_fresh_rate(rate: float | None, prompt_key: str) -> None:
    """A fresh success rate offered with a candidate: None (no fresh sample) or in [0, 1]."""
    if rate is None:
        return
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"fresh_rate must be None or in [0, 1], got {rate!r} for prompt "
                         f"{prompt_key!r}; see fresh_success_rate")


def fresh_success_rate(mean_fresh_reward: float, winner_reward: float) -> float:
    """``s`` of the module docstring: the group's mean fresh reward over its winner's reward,
    clipped to [0, 1]; 0 when the winner's reward is <= 0 (nothing positive was reached)."""
    if not (math.isfinite(mean_fresh_reward) and math.isfinite(winner_reward)):
        raise ValueError(f"rewards must be finite, got mean {mean_fresh_reward!r} and winner "
                         f"{winner_reward!r}")
    if winner_reward <= 0.0:
        return 0.0
    return min(1.0, max(0.0, mean_fresh_reward / winner_reward))


def replay_weight(rate: float | None, floor: float) -> float:
    """Draw weight under ``fail_rate``: ``max(floor, 1 - s)``; 1 when no ``s`` is recorded."""
    if rate is None:
        return 1.0
    return max(floor, 1.0 - rate)


def fail_rate_order(rates: Mapping[str, float | None], floor: float,
                    rng: random.Random) -> list[str]:
    """Every key of ``rates`` (prompt key -> recorded ``s`` or None) in the order of successive
    draws without replacement, each draw picking a remaining key with probability proportional
    to its `replay_weight`: the first ``n`` are a weighted sample of ``n``, and so are the first
    ``n`` of any subset (a backend skipping damaged entries keeps the distribution).

    Efraimidis-Spirakis: key ``u ** (1 / w)`` per candidate, largest first, computed as
    ``log(u) / w`` (no underflow for small weights) with ``u = 1 - rng.random()`` in (0, 1].
    Candidates are taken in prompt-key order, one ``rng.random()`` each, and ties keep that
    order: the result depends only on the rates and the rng state.
    """
    scored = []
    for key in sorted(rates):
        u = 1.0 - rng.random()
        scored.append((math.log(u) / replay_weight(rates[key], floor), key))
    scored.sort(key=lambda item: -item[0])  # stable: equal keys stay in prompt-key order
    return [key for _, key in scored]


def decide_admission(
    reward: float,
    advantage: float,
    step: int,
    stored: BufferEntry | None,
    lowest: BufferEntry | None,
    full: bool,
    gamma: float,
    admit_min_advantage: float = 0.0,
    *,
    prefix_step: int | None = None,
    max_age: int | None = None,
    replayed_winners: str = "keep_age",
) -> AdmissionOutcome:
    """The admission rule of docs/algorithm.md 4 as one pure decision, shared by every backend.

    Args:
        stored: the entry already stored for the candidate's prompt, if any.
        lowest: the lowest-priority entry (needed only when no entry is stored and `full`).
        full: whether the buffer holds `capacity` entries.
        prefix_step: for a replayed (mixed) candidate, the insert step of the entry its prefix
            came from; None for a fresh one. The candidate is then as old as its prefix (see
            the module docstring): it competes with ``decayed_priority(reward, step -
            prefix_step)``, and one already past `max_age` is rejected.
    """
    insert_step = step
    if prefix_step is not None:
        if not 0 <= prefix_step <= step:
            raise ValueError(f"prefix_step must be in [0, step={step}], got {prefix_step}; "
                             "pass the insert step of the entry the sample was replayed from")
        if replayed_winners == "exclude":
            return AdmissionOutcome.REJECTED_REPLAYED
        if max_age is not None and step - prefix_step > max_age:
            return AdmissionOutcome.REJECTED_EXPIRED
        insert_step = prefix_step
    if advantage <= admit_min_advantage:
        return AdmissionOutcome.REJECTED_LOW_ADVANTAGE
    priority = decayed_priority(reward, step - insert_step, gamma)  # = reward when fresh
    if stored is not None:
        if priority > decayed_priority(stored.reward, step - stored.insert_step, gamma):
            return AdmissionOutcome.REPLACED_SAME_PROMPT
        return AdmissionOutcome.REJECTED_NOT_BETTER
    if not full:
        return AdmissionOutcome.INSERTED
    if lowest is None:
        raise ValueError("a full buffer must pass its lowest-priority entry")
    if priority > decayed_priority(lowest.reward, step - lowest.insert_step, gamma):
        return AdmissionOutcome.REPLACED_LOWEST
    return AdmissionOutcome.REJECTED_FULL


# Rebuild the lazy heap once stale items outnumber live ones by this margin, so its size stays
# O(capacity) and each removal costs O(log capacity) amortised.
_HEAP_SLACK = 32


class ReplayBufferRules:
    """In-memory replay buffer applying docs/algorithm.md 4; the reference for every store backend.

    State:
    - ``_entries``: prompt_key -> BufferEntry (at most one entry per prompt).
    - ``_heap``: min-heap of (order key, seq, prompt_key). Removing from the middle of a heap is
      O(n), so removed or replaced entries are left in place and skipped when they reach the top
      (lazy invalidation); ``_live_seq`` tells which seq is current for each prompt.
    - ``_by_age``: min-heap of (insert step, seq, prompt_key), lazy in the same way. A replayed
      winner is stored with its prefix's older insert step, so entries do not arrive in age
      order; the heap still gives the oldest first and ``evict_expired`` only touches those.
    """

    def __init__(
        self,
        capacity: int,
        gamma: float = 0.99,
        max_age: int | None = None,
        admit_min_advantage: float = 0.0,
        replayed_winners: str = "keep_age",
        replay_draw: str = "uniform",
        replay_draw_floor: float = 0.05,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"buffer.capacity must be > 0, got {capacity!r}")
        _check_gamma(gamma, "buffer.gamma")
        if max_age is not None and (
            isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0
        ):
            raise ValueError(f"buffer.max_age must be None or an int >= 0, got {max_age!r}")
        if not isinstance(admit_min_advantage, (int, float)) or not math.isfinite(
            admit_min_advantage
        ):
            raise ValueError(
                f"buffer.admit_min_advantage must be a finite number, got {admit_min_advantage!r}"
            )
        check_replayed_winners(replayed_winners)
        check_replay_draw(replay_draw, replay_draw_floor)
        self.capacity = capacity
        self.replayed_winners = replayed_winners
        self.replay_draw = replay_draw
        self.replay_draw_floor = float(replay_draw_floor)
        self.gamma = float(gamma)
        self.max_age = max_age
        self.admit_min_advantage = float(admit_min_advantage)

        self._entries: dict[str, BufferEntry] = {}
        self._rates: dict[str, float] = {}  # prompt_key -> latest fresh success rate s
        self._heap: list[tuple[tuple[int, float], int, str]] = []
        self._live_seq: dict[str, int] = {}
        self._next_seq = 0
        self._by_age: list[tuple[int, int, str]] = []
        self._last_step: int | None = None
        # evictions counts max_age evictions only; entries pushed out by a better candidate
        # are counted under replacements.
        self.stats: dict[str, int] = {
            "admissions": 0,
            "replacements": 0,
            "evictions": 0,
            "rejections": 0,
        }

    # ----- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt_key: object) -> bool:
        return prompt_key in self._entries

    def entries(self) -> list[BufferEntry]:
        """Stored entries, oldest insert first (a copy; entries themselves are frozen)."""
        order = sorted((e.insert_step, self._live_seq[k], k) for k, e in self._entries.items())
        return [self._entries[key] for _, _, key in order]

    def get(self, prompt_key: str) -> BufferEntry | None:
        """The stored entry for ``prompt_key``, or None."""
        return self._entries.get(prompt_key)

    def priority(self, prompt_key: str, step: int) -> float:
        """Decayed priority of the stored entry for ``prompt_key`` at training step ``step``."""
        entry = self._entries.get(prompt_key)
        if entry is None:
            raise KeyError(f"prompt {prompt_key!r} is not in the replay buffer")
        return decayed_priority(entry.reward, step - entry.insert_step, self.gamma)

    def fresh_rate(self, prompt_key: str) -> float | None:
        """The stored prompt's latest fresh success rate ``s``, None if not recorded."""
        return self._rates.get(prompt_key)

    def lowest_entry(self) -> BufferEntry | None:
        """The entry with the lowest priority (the same at every step), or None if empty."""
        heap = self._heap
        while heap:
            _, seq, prompt_key = heap[0]
            if self._live_seq.get(prompt_key) == seq:
                return self._entries[prompt_key]
            heapq.heappop(heap)  # stale: its entry was replaced or evicted
        return None

    # ----- rules ---------------------------------------------------------------------------

    def admit(
        self,
        prompt_key: str,
        reward: float,
        advantage: float,
        step: int,
        weight_version: int,
        payload: object = None,
        prefix_step: int | None = None,
        fresh_rate: float | None = None,
    ) -> AdmissionOutcome:
        """Offer a group's best trajectory to the buffer at training step ``step``.

        Expired entries are evicted first. Then, per docs/algorithm.md 4: reject unless
        ``advantage > admit_min_advantage``; if the prompt is stored, replace it iff ``reward``
        beats its decayed priority; else insert if there is room; else replace the lowest-priority
        entry iff ``reward`` beats its decayed priority.

        ``prefix_step``: for a replayed (mixed) trajectory, the insert step of the entry it was
        replayed from (None for a fresh one). Under ``keep_age`` it is stored with that insert
        step and competes with its reward decayed from it; under ``exclude`` it is rejected.

        ``fresh_rate``: ``s`` of the candidate's group (`fresh_success_rate`), None when the
        group had no fresh sample. It becomes the prompt's recorded rate whenever the prompt is
        stored after the offer, admitted or not (see the module docstring).
        """
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r} for prompt {prompt_key!r}")
        if math.isnan(advantage):
            raise ValueError(f"advantage must not be NaN (prompt {prompt_key!r})")
        check_fresh_rate(fresh_rate, prompt_key)
        self._advance_to(step)
        self._evict_expired(step)

        insert_step = step if prefix_step is None else prefix_step
        candidate = BufferEntry(prompt_key, float(reward), insert_step, weight_version, payload)
        stored = self._entries.get(prompt_key)
        full = len(self._entries) >= self.capacity
        lowest = self.lowest_entry() if stored is None and full else None
        outcome = decide_admission(
            reward, advantage, step, stored, lowest, full, self.gamma, self.admit_min_advantage,
            prefix_step=prefix_step, max_age=self.max_age, replayed_winners=self.replayed_winners,
        )
        if not outcome.admitted:
            if stored is not None and fresh_rate is not None:
                self._rates[prompt_key] = float(fresh_rate)  # still news about the prompt
            return self._reject(outcome)
        if outcome is AdmissionOutcome.REPLACED_SAME_PROMPT:
            previous_rate = self._rates.get(prompt_key)
            self._remove(prompt_key)
            if previous_rate is not None:  # the same prompt: its rate stays until news
                self._rates[prompt_key] = previous_rate
        elif outcome is AdmissionOutcome.REPLACED_LOWEST:
            self._remove(lowest.prompt_key)
        self._store(candidate)
        if fresh_rate is not None:
            self._rates[prompt_key] = float(fresh_rate)
        return self._admitted(outcome)

    def evict_expired(self, step: int) -> list[str]:
        """Remove entries older than ``max_age`` at ``step``; return their prompt keys.

        Costs O(evicted * log capacity): only the expired oldest entries are read.
        """
        self._advance_to(step)
        return self._evict_expired(step)

    def sample(self, n: int, step: int, rng: random.Random) -> list[BufferEntry]:
        """Up to ``n`` distinct entries drawn among those not expired at ``step``: uniformly,
        or under ``replay_draw = "fail_rate"`` weighted by `replay_weight` (`fail_rate_order`).

        ``rng`` is a stdlib ``random.Random`` (no numpy needed). Candidates are sorted by prompt
        key before drawing, so the result depends only on the stored entries (and rates) and
        the rng state, not on the order of past operations. Sampling does not evict.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._advance_to(step)
        candidates = sorted(key for key in self._entries if not self._is_expired(key, step))
        if self.replay_draw == "fail_rate":
            order = fail_rate_order({key: self._rates.get(key) for key in candidates},
                                    self.replay_draw_floor, rng)
            chosen = order[:n]
        else:
            chosen = rng.sample(candidates, min(n, len(candidates)))
        return [self._entries[key] for key in chosen]

    def lookup(self, wanted: list[tuple[str, float]], n: int, step: int) -> list[BufferEntry]:
        """For ``replay_draw = "rescue"``: up to ``n`` entries among ``wanted`` (prompt key, the
        reward its entry must exceed), in that order, each present, not expired at ``step`` and
        rewarded strictly above its bound. Like `sample`, it does not evict."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._advance_to(step)
        chosen: list[BufferEntry] = []
        for key, above in wanted:
            if len(chosen) == n:
                break
            entry = self._entries.get(key)
            if entry is not None and not self._is_expired(key, step) and entry.reward > above:
                chosen.append(entry)
        return chosen

    # ----- internals -----------------------------------------------------------------------

    def _advance_to(self, step: int) -> None:
        # Steps must be non-decreasing for the order keys to be compared at a step >= every
        # insert step (a replayed winner's insert step is older still, never newer).
        if self._last_step is not None and step < self._last_step:
            raise ValueError(
                f"step went backwards: got {step} after {self._last_step}; "
                "pass the learner's current training step, which never decreases"
            )
        self._last_step = step

    def _is_expired(self, prompt_key: str, step: int) -> bool:
        if self.max_age is None:
            return False
        return step - self._entries[prompt_key].insert_step > self.max_age

    def _evict_expired(self, step: int) -> list[str]:
        evicted: list[str] = []
        heap = self._by_age
        while heap:
            _, seq, oldest = heap[0]
            if self._live_seq.get(oldest) != seq:
                heapq.heappop(heap)  # stale: its entry was replaced or evicted
                continue
            if not self._is_expired(oldest, step):
                break  # every other entry was inserted no earlier, so none is expired either
            self._remove(oldest)
            evicted.append(oldest)
        self.stats["evictions"] += len(evicted)
        return evicted

    def _store(self, entry: BufferEntry) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._entries[entry.prompt_key] = entry
        self._live_seq[entry.prompt_key] = seq
        heapq.heappush(self._by_age, (entry.insert_step, seq, entry.prompt_key))
        order_key = priority_order_key(entry.reward, entry.insert_step, self.gamma)
        # seq breaks ties between equal priorities in favour of evicting the older entry.
        heapq.heappush(self._heap, (order_key, seq, entry.prompt_key))

    def _remove(self, prompt_key: str) -> None:
        del self._entries[prompt_key]
        self._rates.pop(prompt_key, None)
        del self._live_seq[prompt_key]  # its items in both heaps become stale
        if len(self._heap) > 2 * len(self._entries) + _HEAP_SLACK:
            self._heap = self._live_items(self._heap)
        if len(self._by_age) > 2 * len(self._entries) + _HEAP_SLACK:
            self._by_age = self._live_items(self._by_age)

    def _live_items(self, heap: list) -> list:
        """`heap` without its stale items, as a heap (items end with (seq, prompt_key))."""
        live = [item for item in heap if self._live_seq.get(item[2]) == item[1]]
        heapq.heapify(live)
        return live

    def _admitted(self, outcome: AdmissionOutcome) -> AdmissionOutcome:
        self.stats["admissions"] += 1
        if outcome is not AdmissionOutcome.INSERTED:
            self.stats["replacements"] += 1
        return outcome

    def _reject(self, outcome: AdmissionOutcome) -> AdmissionOutcome:
        self.stats["rejections"] += 1
        return outcome
