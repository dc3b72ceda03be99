"""LearnerGroup: K LearnerWorker actors forming one DeepSpeed process group.

Rank 0 picks a free port on its node; the other ranks read it; every rank then joins with
the rank-0 address before DeepSpeed starts (the OpenRLHF launcher pattern, small). Methods
returning ObjectRefs end in `_async`; only the driver waits on them.
"""

from __future__ import annotations

import ray

from learner.worker import LearnerWorker
from opgrpo.config import Config, without_url_secrets
from opgrpo.preflight import free_resources, get_within


def split_groups(num_groups: int, num_ranks: int) -> list[list[int]]:
    """Whole groups per rank, contiguous and as even as possible."""
    if num_groups % num_ranks:
        raise ValueError(f"rollout.prompts_per_step ({num_groups}) must be a multiple of "
                         f"learner.num_ranks ({num_ranks}) so that ranks get whole groups")
    per = num_groups // num_ranks
    return [list(range(r * per, (r + 1) * per)) for r in range(num_ranks)]


class LearnerGroup:
    def __init__(self, config: Config, runtime_env: dict | None = None,
                 worker_cls: type = LearnerWorker) -> None:
        self.config = config
        k = config.learner.num_ranks
        actor_cls = ray.remote(worker_cls)
        options = {"num_cpus": config.learner.num_cpus, "num_gpus": config.learner.num_gpus,
                   "runtime_env": runtime_env or {}}
        if config.learner.resources:
            options["resources"] = dict(config.learner.resources)
        # Learner ranks need no credential: every URL in their config is stripped of it
        data, _ = without_url_secrets(config.model_dump(mode="json"))
        self.workers = [actor_cls.options(**options).remote(data, rank, k) for rank in range(k)]
        # Placed (their resources held, which `rollout.num_actors: auto` counts on), not set up.
        self.start_timeout = config.train.actor_start_timeout_s
        get_within([w.__ray_ready__.remote() for w in self.workers], self.start_timeout,
                   lambda r: f"learner rank {r}: its placement by Ray ({options['num_cpus']:g} "
                   f"CPU, {options['num_gpus']:g} GPU, resources {options.get('resources', {})}"
                   f"; free in the cluster now: {free_resources()})",
                   "train.actor_start_timeout_s")
        # Rank 0's rendezvous address reaches every rank's setup as object refs, so nothing
        # here waits: the ranks build their DeepSpeed engines while the driver starts the
        # rollout and reward actors. `wait_ready` collects the outcome.
        addr, port = self.workers[0].address.options(num_returns=2).remote()
        self._setup = [w.setup.remote(addr, port) for w in self.workers]

    def wait_ready(self) -> None:
        """Wait for every rank's engine (a rank's setup error is raised here)."""
        get_within(self._setup, self.start_timeout,
                   lambda r: f"learner rank {r}: its setup (model load, DeepSpeed engine)",
                   "train.actor_start_timeout_s")

    def train_async(self, chunks: list, shards: list[list[dict]], iteration: int) -> list:
        """One rank a shard; `chunks` are rollout refs (each rank fetches what it needs)."""
        refs = []
        for worker, rows in zip(self.workers, shards):
            used = sorted({r["chunk"] for r in rows})
            remap = {c: i for i, c in enumerate(used)}
            local = [{**r, "chunk": remap[r["chunk"]]} for r in rows]
            refs.append(worker.train.remote([chunks[c] for c in used], local, iteration))
        return refs

    def export_weights_async(self):
        """ObjectRef of rank 0's weights, and all ranks' refs (they join the ZeRO-3 gather)."""
        refs = [w.export_weights.remote() for w in self.workers]
        return refs[0], refs

    def save_checkpoint(self, directory: str, tag: str) -> None:
        get_within([w.save_checkpoint.remote(directory, tag) for w in self.workers],
                   self.config.train.step_timeout_s,
                   lambda r: f"learner rank {r}: saving checkpoint {tag}",
                   "train.step_timeout_s")

    def load_checkpoint(self, directory: str, tag: str) -> int:
        return get_within([w.load_checkpoint.remote(directory, tag) for w in self.workers],
                          self.config.train.step_timeout_s,
                          lambda r: f"learner rank {r}: loading checkpoint {tag}",
                          "train.step_timeout_s")[0]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
