"""RolloutWorker: holds pi_old (the weights of this iteration) and draws SDE trajectories.

A thin shell around `opgrpo.sampling`; Ray runs it as an actor (`ray.remote(RolloutWorker)`),
tests and benchmarks may call it directly. Trajectories and decoded images are returned as
numpy arrays, which Ray stores zero-copy in its object store: they reach reward actors, the
buffer actor and the learners as object refs, never through the driver.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from opgrpo.config import Config, torch_threads
from opgrpo.images import to_uint8
from opgrpo.models import FlowPolicy
from opgrpo.sampling import SamplingSpec, device_stack, regenerate_from, sample_trajectories
from opgrpo.trajectory import Trajectory, decode_trajectories

log = logging.getLogger(__name__)


class StaleWeights(RuntimeError):
    """A rollout task needs at least a weight version this actor does not hold (it was
    restarted while the control actor had no weights to give it): the driver pushes the current
    weights and draws the step again."""


def chunk_meta(version: int, start: float, n: int) -> dict:
    """What the driver learns of a finished chunk without fetching it: the weight version it
    was drawn with, and when this actor worked on it (wall-clock seconds since the epoch)."""
    return {"version": version, "start": start, "end": time.time(), "count": n}


class RolloutWorker:
    """One rollout process: a policy copy at weight version `version`."""

    def __init__(self, config: dict, worker_index: int = 0, control: str | None = None) -> None:
        """`control`: the name of the run's Control actor; when it holds weights (a worker
        added or restarted mid-run), they are loaded here, before this actor takes any task."""
        self.config = Config.model_validate(config)
        torch.manual_seed(self.config.run.seed)
        torch.set_num_threads(torch_threads(self.config, self.config.rollout.num_cpus))
        use_gpu = torch.cuda.is_available() and self.config.rollout.num_gpus > 0
        self.policy = FlowPolicy.from_config(self.config, device="cuda" if use_gpu else "cpu")
        self.spec = SamplingSpec.from_config(self.config)
        self.worker_index = worker_index
        self.version = -1  # no weights from a learner yet
        if control is not None:
            self._load_current(control)

    def _load_current(self, control_name: str) -> None:
        import ray

        from actors.control import NAMESPACE

        try:
            control = ray.get_actor(control_name, namespace=NAMESPACE)
            refs, version = ray.get(control.get_weights.remote(), timeout=120)
        except (ValueError, ray.exceptions.RayError) as exc:
            # A new actor then gets the weights from the driver (RolloutPool._ready). A
            # restarted one refuses tasks of another version (StaleWeights) rather than draw
            # from stale weights, and the driver pushes the weights and redraws the step.
            log.warning("rollout actor %d: no weights from %s (%s)",
                        self.worker_index, control_name, type(exc).__name__)
            return
        if refs:
            self.set_weights(ray.get(refs[0]), version)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            log.warning("rollout actor %d restarted after a crash; loaded weight version %d",
                        self.worker_index, self.version)

    def ready(self) -> int:
        """Returns the weight version held (a cheap liveness probe)."""
        return self.version

    def identity(self) -> dict:
        """This actor's process id and Ray node id (fault tests, placement checks)."""
        import os

        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def _check_version(self, min_version: int | None) -> None:
        # Pushes reach an actor in the order the driver sent them, between its tasks, so a
        # chunk runs with the version the driver pushed last before it. Only an actor that
        # was restarted meanwhile can hold another one: a newer version (from the control
        # actor) is fine, an older one is refused.
        if min_version is not None and self.version < min_version:
            raise StaleWeights(f"rollout actor {self.worker_index} holds weight version "
                               f"{self.version}, the iteration needs {min_version} or newer")

    def set_weights(self, weights: dict[str, np.ndarray], version: int) -> int:
        """Load the learner's trainable weights (LoRA only when LoRA is on) as `version`."""
        state = {name: torch.from_numpy(np.asarray(value)) for name, value in weights.items()}
        self.policy.load_trainable_state_dict(state)
        self.version = version
        return version

    def weights(self) -> dict[str, np.ndarray]:
        """The trainable weights held now (for checks that rollout and learner agree)."""
        return {k: v.float().numpy() for k, v in self.policy.trainable_state_dict().items()}

    def _images(self, trajectories: list[Trajectory]) -> np.ndarray:
        finals = device_stack(self.policy, [t.latents[-1] for t in trajectories])
        return to_uint8(self.policy.decode(finals))

    def generate(
        self, prompts: list[str], keys: list[str], seeds: list[int],
        min_version: int | None = None,
    ) -> tuple[list[Trajectory], np.ndarray, dict]:
        """Fresh trajectories (one per row), their decoded images (N, H, W, 3) uint8 (video:
        (N, F, H, W, 3)) and the chunk's `chunk_meta`. With `min_version`, refuses to draw from
        weights older than that version."""
        self._check_version(min_version)
        start = time.time()
        trajectories = sample_trajectories(
            self.policy, prompts, keys, seeds, self.spec, self.version
        )
        images = self._images(trajectories)
        return trajectories, images, chunk_meta(self.version, start, len(trajectories))

    def regenerate(
        self, payloads: list[bytes], truncate_step: int, seeds: list[int],
        min_version: int | None = None,
    ) -> tuple[list[Trajectory], np.ndarray, dict]:
        """Mixed trajectories from stored ones (Arrow bytes): prefix kept, tail redrawn; with
        images and meta as `generate`."""
        self._check_version(min_version)
        start = time.time()
        stored = [traj for payload in payloads for traj in decode_trajectories(payload)]
        mixed = regenerate_from(
            self.policy, stored, truncate_step, seeds, self.spec, self.version
        )
        images = self._images(mixed)
        return mixed, images, chunk_meta(self.version, start, len(mixed))

    def evaluate(
        self, prompts: list[tuple[str, str]], n_per_prompt: int, num_steps: int,
        guidance_scale: float, seed: int, weights: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """ODE samples of (text, key) prompts, prompt-major, as (N, H, W, 3) uint8 (video:
        (N, F, H, W, 3)), quantised batch by batch on the device (`train.eval_batch_size`).

        `weights`: trainable weights to sample with instead of the ones held (the learner's
        EMA, `learner.ema`), every trainable weight by name. They are swapped in for this task
        only: the held weights are put back afterwards, and the version does not change."""
        from opgrpo.evaluate import EvalSettings, generate
        from opgrpo.prompts import PromptRecord

        records = [PromptRecord(key, text) for text, key in prompts]
        settings = EvalSettings(n_per_prompt, num_steps, guidance_scale, seed,
                                batch_size=self.config.train.eval_batch_size,
                                height=self.config.model.height, width=self.config.model.width)
        if weights is None:
            return generate(self.policy, records, settings, quantise=True)
        held = self.policy.trainable_state_dict()  # copies
        if set(weights) != set(held):
            wrong = sorted(set(weights) ^ set(held))
            raise KeyError(f"evaluation weights do not match the trainable weights "
                           f"({len(wrong)} names differ, e.g. {wrong[:3]})")
        try:
            self.policy.load_trainable_state_dict(
                {name: torch.from_numpy(np.asarray(value)) for name, value in weights.items()})
            return generate(self.policy, records, settings, quantise=True)
        finally:
            self.policy.load_trainable_state_dict(held)
