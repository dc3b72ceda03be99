"""Pools of Ray actors: rollout workers that can grow and shrink between iterations, reward
workers, and the small control actor through which `opgrpo scale` resizes a running job."""

from __future__ import annotations

import logging
import math

import ray

from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from opgrpo.config import Config

log = logging.getLogger(__name__)
NAMESPACE = "opgrpo"


def control_name(run_name: str) -> str:
    return f"control:{run_name}"


class Control:
    """Holds what another shell asked for (`opgrpo scale`); the driver reads it each step."""

    def __init__(self) -> None:
        self.rollout: int | str | None = None

    def set_rollout(self, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"rollout actors must be >= 1 or 'auto', got {value!r}")
        self.rollout = value
        return value

    def get_rollout(self) -> int | str | None:
        return self.rollout


class RolloutPool:
    """N rollout actors; every actor holds the current weights before it receives work."""

    def __init__(self, config: Config, runtime_env: dict, worker_cls: type = RolloutWorker) -> None:
        self.config = config
        self.data = config.model_dump(mode="json")
        self.options = {"num_cpus": config.rollout.num_cpus, "num_gpus": config.rollout.num_gpus,
                        "runtime_env": runtime_env}
        self.actor_cls = ray.remote(worker_cls)
        self.workers: list = []
        self.weights_ref = None
        self.version = -1
        self._next_index = 0

    def __len__(self) -> int:
        return len(self.workers)

    def target_size(self, requested: int | str) -> int:
        """`auto`: what the free cluster resources allow on top of the current actors."""
        if requested != "auto":
            return int(requested)
        free = ray.available_resources()
        per_cpu, per_gpu = self.options["num_cpus"], self.options["num_gpus"]
        fits = []
        if per_gpu > 0:
            fits.append(math.floor(free.get("GPU", 0.0) / per_gpu + 1e-9))
        if per_cpu > 0:
            fits.append(math.floor(free.get("CPU", 0.0) / per_cpu + 1e-9))
        extra = min(fits) if fits else 0
        return max(1, len(self.workers) + extra)

    def resize(self, size: int) -> None:
        """Grow (new actors get the current weights first) or shrink to `size` actors."""
        while len(self.workers) > size:
            ray.kill(self.workers.pop())
        added = []
        while len(self.workers) < size:
            worker = self.actor_cls.options(**self.options).remote(self.data, self._next_index)
            self._next_index += 1
            self.workers.append(worker)
            added.append(worker)
        if added and self.weights_ref is not None:
            ray.get([w.set_weights.remote(self.weights_ref, self.version) for w in added])
        elif added:
            ray.get([w.ready.remote() for w in added])
        if added:
            log.info("rollout actors: %d", len(self.workers))

    def set_weights(self, weights_ref, version: int) -> None:
        self.weights_ref, self.version = weights_ref, version
        ray.get([w.set_weights.remote(weights_ref, version) for w in self.workers])

    def worker(self, i: int):
        return self.workers[i % len(self.workers)]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


class RewardPool:
    def __init__(self, config: Config, runtime_env: dict, worker_cls: type = RewardWorker) -> None:
        actor_cls = ray.remote(worker_cls)
        options = {"num_cpus": config.reward.num_cpus, "num_gpus": config.reward.num_gpus,
                   "runtime_env": runtime_env}
        self.workers = [actor_cls.options(**options).remote(config.reward.functions)
                        for _ in range(config.reward.num_actors)]

    def worker(self, i: int):
        return self.workers[i % len(self.workers)]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
