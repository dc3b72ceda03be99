"""Pools of Ray actors: rollout workers that can grow and shrink between iterations, reward
workers. (The control actor that `opgrpo scale` talks to: `actors/control.py`.)"""

from __future__ import annotations

import json
import logging
import math

import ray

from actors.control import control_name
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from opgrpo.config import SECRET_URLS_ENV, Config, without_url_secrets
from opgrpo.preflight import (
    Request,
    WaitTimeout,
    actor_request,
    free_resources,
    get_within,
    unmet_requests,
)

log = logging.getLogger(__name__)


def runtime_env_with(runtime_env: dict, env_vars: dict[str, str]) -> dict:
    """`runtime_env` with `env_vars` added to its environment variables (a new dict): how a
    secret reaches the one actor that needs it, instead of riding in a config object."""
    if not env_vars:
        return runtime_env
    return {**runtime_env, "env_vars": {**runtime_env.get("env_vars", {}), **env_vars}}


def reward_actor_args(config: Config, runtime_env: dict) -> tuple[tuple, dict]:
    """A reward actor's constructor arguments and runtime_env: reward.options with every URL
    stripped of its credentials (user info, password-like query parameters); the original
    URLs reach the actor in an environment variable (SECRET_URLS_ENV), which RewardWorker
    reads back."""
    options, secrets = without_url_secrets(config.reward.options, "reward.options")
    args = (config.reward.functions, options, config.reward.device, config.reward.num_gpus)
    return args, runtime_env_with(
        runtime_env, {SECRET_URLS_ENV: json.dumps(secrets)} if secrets else {})


def fault_options(config: Config) -> dict:
    """Ray restarts a crashed actor (up to run.max_actor_restarts times) and re-runs the tasks
    it had not finished; results come back once, so no sample is counted twice."""
    return {"max_restarts": config.run.max_actor_restarts, "max_task_retries": -1}


def resource_requests(config: Config, rollout_actors: int) -> list[Request]:
    """The Ray requests of a run's actors by config section (the control and buffer actors
    ask for none): `rollout_actors` rollout actors, the learner ranks, the reward actors."""
    return [("rollout", rollout_actors, actor_request(config.rollout.num_cpus,
                                                      config.rollout.num_gpus,
                                                      config.rollout.resources)),
            ("learner", config.learner.num_ranks, actor_request(config.learner.num_cpus,
                                                                config.learner.num_gpus,
                                                                config.learner.resources)),
            ("reward", config.reward.num_actors, actor_request(config.reward.num_cpus,
                                                               config.reward.num_gpus,
                                                               config.reward.resources))]


def is_actor_failure(exc: BaseException) -> bool:
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                            ray.exceptions.ActorUnavailableError))


def is_lost_data(exc: BaseException) -> bool:
    """An object (a rollout chunk) went away with the node that held it."""
    from learner.worker import BatchLost

    return isinstance(exc, (ray.exceptions.ObjectLostError, ray.exceptions.ObjectFetchTimedOutError,
                            BatchLost))


class RolloutPool:
    """N rollout actors; every actor holds the current weights before it receives work."""

    def __init__(self, config: Config, runtime_env: dict, worker_cls: type = RolloutWorker,
                 control=None, control_actor: str | None = None) -> None:
        self.config = config
        # the control actor's name (`control_name`), which rollout actors look it up by
        self.control_actor = control_actor or control_name(config.run.name)
        # Rollout actors need no credential: every URL in their config is stripped of it
        self.data, _ = without_url_secrets(config.model_dump(mode="json"))
        self.options = {"num_cpus": config.rollout.num_cpus, "num_gpus": config.rollout.num_gpus,
                        "runtime_env": runtime_env, **fault_options(config)}
        if config.rollout.resources:
            self.options["resources"] = dict(config.rollout.resources)
        self.actor_cls = ray.remote(worker_cls)
        self.control = control
        self.workers: list = []
        self.weights_ref = None
        self.version = -1
        self._next_index = 0
        self._send_limits()

    def _send_limits(self) -> None:
        """Let the control actor refuse an `opgrpo scale` size the cluster cannot hold."""
        if self.control is None:
            return
        others = resource_requests(self.config, 0)[1:]
        per_actor = (resource_requests(self.config, 1)[0][2]
                     if self.config.run.check_cluster_resources else None)
        self.control.set_limits.remote(others, per_actor)  # runs before any later call

    def most_that_fit(self) -> int | None:
        """The most rollout actors the cluster can hold beside the other actors (None: no
        limit, or run.check_cluster_resources is off)."""
        if not self.config.run.check_cluster_resources:
            return None
        cluster = dict(ray.cluster_resources())
        fits = []
        for section, count, request in resource_requests(self.config, 1):
            if section != "rollout":
                for name, amount in request.items():
                    cluster[name] = cluster.get(name, 0.0) - count * amount
        for name, amount in resource_requests(self.config, 1)[0][2].items():
            fits.append(math.floor(max(0.0, cluster.get(name, 0.0)) / amount + 1e-9))
        return min(fits) if fits else None

    def __len__(self) -> int:
        return len(self.workers)

    def target_size(self, requested: int | str) -> int:
        """`auto`: what the free cluster resources allow on top of the current actors."""
        if requested != "auto":
            size = int(requested)
            most = self.most_that_fit() if size > len(self.workers) else None
            if most is not None and size > max(most, len(self.workers), 1):
                problems = unmet_requests(resource_requests(self.config, size),
                                          ray.cluster_resources())
                log.warning("%d rollout actors asked for, but the cluster holds at most %d "
                            "beside the other actors (%s): using %d", size, most,
                            "; ".join(problems), max(most, len(self.workers), 1))
                return max(most, len(self.workers), 1)
            return size
        free = ray.available_resources()
        per_cpu, per_gpu = self.options["num_cpus"], self.options["num_gpus"]
        fits = []
        if per_gpu > 0:
            fits.append(math.floor(free.get("GPU", 0.0) / per_gpu + 1e-9))
        if per_cpu > 0:
            fits.append(math.floor(free.get("CPU", 0.0) / per_cpu + 1e-9))
        for name, amount in self.options.get("resources", {}).items():
            if amount > 0:
                fits.append(math.floor(free.get(name, 0.0) / amount + 1e-9))
        extra = min(fits) if fits else 0
        return max(1, len(self.workers) + extra)

    def resize(self, size: int) -> None:
        """Grow (new actors get the current weights first) or shrink to `size` actors."""
        while len(self.workers) > size:
            ray.kill(self.workers.pop())
        added = []
        while len(self.workers) < size:
            added.append(self._new_worker())
            self.workers.append(added[-1])
        try:
            self._ready(added)
        except WaitTimeout as exc:
            kept = len(self.workers) - len(added)
            if not kept:  # the run's first actors: nothing to go on with
                raise
            log.warning("%s; the pool gives the %d new actor(s) up and goes on with %d",
                        exc, len(added), kept)
            for worker in added:
                ray.kill(worker, no_restart=True)
            self.workers = self.workers[:kept]
            if self.control is not None:  # else the next step would ask for them again
                get_within(self.control.set_rollout.remote(kept), self._step_timeout,
                           "control actor: reset the requested rollout size",
                           "train.step_timeout_s")
            return
        if added:
            log.info("rollout actors: %d", len(self.workers))

    def _new_worker(self):
        # The control actor goes by name, not by handle: a handle among the constructor
        # arguments is kept in the object store, and Ray warns that a restart needs it there
        # (ray-project/ray#53727). A name is plain data in the actor's creation task.
        worker = self.actor_cls.options(**self.options).remote(
            self.data, self._next_index,
            None if self.control is None else self.control_actor)
        self._next_index += 1
        return worker

    def resync(self) -> None:
        """Give the control actor and every rollout actor that holds another version (both
        restarted, the control actor empty) the current weights."""
        if self.control is not None:
            self.restore_control(get_within(self.control.status.remote(), self._step_timeout,
                                            "control actor: status", "train.step_timeout_s"))
        self._ready(self.workers)

    @property
    def _step_timeout(self) -> float:
        return self.config.train.step_timeout_s

    def _ready(self, workers: list) -> None:
        """Wait until `workers` are up and hold the current weights (a new actor loads them
        from the control actor in its constructor when it can, else gets them here), at most
        train.actor_start_timeout_s: WaitTimeout names the actor and its request."""
        if not workers:
            return
        index = [next(i for i, x in enumerate(self.workers) if x is w) for w in workers]
        timeout = self.config.train.actor_start_timeout_s

        def starting(i: int) -> str:
            return (f"rollout actor {index[i]}: its start (placement by Ray with "
                    f"{self.options['num_cpus']:g} CPU, {self.options['num_gpus']:g} GPU, "
                    f"resources {self.options.get('resources', {})}, then the model load; "
                    f"free in the cluster now: {free_resources()})")

        if self.weights_ref is not None and self.control is None:
            get_within([w.set_weights.remote(self.weights_ref, self.version) for w in workers],
                       timeout, starting, "train.actor_start_timeout_s")
            return
        held = get_within([w.ready.remote() for w in workers], timeout, starting,
                          "train.actor_start_timeout_s")
        stale = [i for i, v in enumerate(held) if v != self.version]
        if stale and self.weights_ref is not None:
            get_within([workers[i].set_weights.remote(self.weights_ref, self.version)
                        for i in stale], self._step_timeout,
                       lambda j: f"rollout actor {index[stale[j]]}: weight push of version "
                       f"{self.version}", "train.step_timeout_s")

    def set_weights(self, weights_ref, version: int, wait: bool = True) -> None:
        """Push `version` to every actor and the control actor. An actor takes it after the
        tasks the driver sent it before (Ray runs one caller's tasks on an actor in order);
        `wait=False` returns without waiting for that."""
        self.weights_ref, self.version = weights_ref, version
        # The control actor holds them for actors that (re)start from now on; a push to an
        # actor that dies meanwhile is re-run by Ray on its restarted process, after the
        # constructor, so every actor ends up with `version` before its next task.
        pending = [w.set_weights.remote(weights_ref, version) for w in self.workers]
        if self.control is not None:
            pending.append(self.control.set_weights.remote([weights_ref], version))
        if wait:  # else a failed push shows in the next chunk (StaleWeights, actor death)
            n = len(self.workers)
            get_within(pending, self._step_timeout,
                       lambda i: (f"rollout actor {i}" if i < n else "control actor")
                       + f": weight push of version {version}", "train.step_timeout_s")

    def restore_control(self, held_version: int) -> None:
        """A control actor that Ray restarted holds no weights: give it the current ones, so
        that a rollout actor restarted later loads them."""
        if self.control is not None and self.weights_ref is not None \
                and held_version != self.version:
            log.warning("the control actor lost its state (restarted); weight version %d "
                        "given to it again", self.version)
            self._send_limits()
            get_within(self.control.set_weights.remote([self.weights_ref], self.version),
                       self._step_timeout, f"control actor: weight push of version "
                       f"{self.version}", "train.step_timeout_s")

    def replace_dead(self) -> int:
        """Replace actors that are gone for good (restarts used up, node lost); returns how
        many. The new ones hold the current weights before this returns."""
        probes = [w.ready.remote() for w in self.workers]
        dead = []
        for i, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=60)
            except Exception as exc:  # noqa: BLE001 - any failure to answer means replace it
                log.warning("rollout actor %d does not answer (%s); replacing it", i,
                            type(exc).__name__)
                dead.append(i)
        for i in dead:
            ray.kill(self.workers[i], no_restart=True)
            self.workers[i] = self._new_worker()
        self._ready([self.workers[i] for i in dead])
        return len(dead)

    def worker(self, i: int):
        return self.workers[i % len(self.workers)]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


class RewardPool:
    def __init__(self, config: Config, runtime_env: dict, worker_cls: type = RewardWorker) -> None:
        self.actor_cls = ray.remote(worker_cls)
        self.args, runtime_env = reward_actor_args(config, runtime_env)
        self.options = {"num_cpus": config.reward.num_cpus, "num_gpus": config.reward.num_gpus,
                        "runtime_env": runtime_env, **fault_options(config)}
        if config.reward.resources:
            self.options["resources"] = dict(config.reward.resources)
        self.workers = [self.actor_cls.options(**self.options).remote(*self.args)
                        for _ in range(config.reward.num_actors)]
        self.start_timeout = config.train.actor_start_timeout_s

    def wait_ready(self) -> None:
        """Wait until every reward actor is placed and has loaded its rewards, at most
        train.actor_start_timeout_s (WaitTimeout names the actor and its request)."""
        get_within([w.ready.remote() for w in self.workers], self.start_timeout,
                   lambda i: f"reward actor {i}: its start (placement by Ray with "
                   f"{self.options['num_cpus']:g} CPU, {self.options['num_gpus']:g} GPU, "
                   f"resources {self.options.get('resources', {})}, then loading the "
                   f"rewards; free in the cluster now: {free_resources()})",
                   "train.actor_start_timeout_s")

    def worker(self, i: int):
        return self.workers[i % len(self.workers)]

    def replace_dead(self) -> int:
        """Replace reward actors that are gone for good; returns how many."""
        replaced = 0
        for i, worker in enumerate(self.workers):
            try:
                ray.get(worker.ready.remote(), timeout=60)
            except Exception as exc:  # noqa: BLE001 - any failure to answer means replace it
                log.warning("reward actor %d does not answer (%s); replacing it", i,
                            type(exc).__name__)
                ray.kill(worker, no_restart=True)
                self.workers[i] = self.actor_cls.options(**self.options).remote(*self.args)
                replaced += 1
        return replaced

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
