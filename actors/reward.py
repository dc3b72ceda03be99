"""RewardWorker: scores decoded images with the configured rewards (a weighted sum).

Each named reward is also returned on its own so that every one is logged.
"""

from __future__ import annotations

import numpy as np

from actors.rewards import get_reward, score_frames
from opgrpo.config import with_url_secrets

TOTAL = "total"


def checked_scores(name: str, scores: dict, n: int) -> dict[str, np.ndarray]:
    """The score arrays a reward function returned, each (n,) float64; one of another length
    is refused here, in the reward actor, naming the reward and the counts (the driver would
    otherwise index past it, or pair scores with the wrong samples)."""
    out = {}
    for key, values in scores.items():
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.shape != (n,):
            raise ValueError(f"reward {name!r} returned {array.size} {key!r} scores for {n} "
                             f"images: a reward must return one score per image")
        out[key] = array
    return out


class RewardWorker:
    """Holds the reward functions of `reward.functions` ({name: weight})."""

    def __init__(self, functions: dict[str, float], options: dict | None = None,
                 device: str = "auto", num_gpus: float = 0.0) -> None:
        """`options`: reward.options ({name: {option: value}}); `device` auto = cuda when
        this actor has a GPU (num_gpus > 0) and torch sees one."""
        if not functions:
            raise ValueError("reward.functions is empty: name at least one reward, e.g. shapes")
        if device == "auto":
            import torch

            device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # URLs with credentials come back from this actor's environment (actors/pool.py
        # reward_actor_args): the options it was constructed with carry none
        options = with_url_secrets(options or {}, "reward.options")
        self.device = device
        self.specs = {name: get_reward(name).load(options.get(name), device)
                      for name in functions}
        self.weights = dict(functions)

    def ready(self) -> bool:
        return True

    def identity(self) -> dict:
        """This actor's process id and Ray node id (fault tests, placement checks)."""
        import os

        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def score_with(self, name: str, images: np.ndarray, prompts: list[str]
                   ) -> dict[str, np.ndarray]:
        """Every score of reward `name` (not only its main key), for evaluation summaries."""
        floats = np.moveaxis(images.astype(np.float32) / 255.0, -1, -3)
        return checked_scores(name, score_frames(self.specs[name], floats, prompts),
                              len(prompts))

    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        """images (N, H, W, 3) uint8, or videos (N, F, H, W, 3) -> {TOTAL: weighted sum, name:
        that reward} (N,) each; a video scores the mean of its frames' scores."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        floats = np.moveaxis(images.astype(np.float32) / 255.0, -1, -3)
        out: dict[str, np.ndarray] = {}
        total = np.zeros(len(prompts))
        for name, spec in self.specs.items():
            scores = checked_scores(name, score_frames(spec, floats, prompts), len(prompts))
            if spec.key not in scores:
                raise ValueError(f"reward {name!r} returned no {spec.key!r} score (got "
                                 f"{sorted(scores)})")
            values = scores[spec.key]
            out[name] = values
            total += self.weights[name] * values
        out[TOTAL] = total
        return out
