"""RewardWorker: scores decoded images with the configured rewards (a weighted sum).

Each named reward is also returned on its own so that every one is logged.
"""

from __future__ import annotations

import numpy as np

from actors.rewards import get_reward, score_frames

TOTAL = "total"


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
        options = options or {}
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
        return score_frames(self.specs[name], floats, prompts)

    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        """images (N, H, W, 3) uint8, or videos (N, F, H, W, 3) -> {TOTAL: weighted sum, name:
        that reward} (N,) each; a video scores the mean of its frames' scores."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        floats = np.moveaxis(images.astype(np.float32) / 255.0, -1, -3)
        out: dict[str, np.ndarray] = {}
        total = np.zeros(len(prompts))
        for name, spec in self.specs.items():
            values = np.asarray(score_frames(spec, floats, prompts)[spec.key],
                                dtype=np.float64)
            out[name] = values
            total += self.weights[name] * values
        out[TOTAL] = total
        return out
