"""Reward functions behind one registry: `get_reward(name)` returns a `RewardSpec`.

A scorer maps decoded images (N, 3, H, W) floats in [0, 1] and their prompts to a dict of
(N,) float arrays; its `key` entry is the reward the trainer uses, the others are logged.
`summarize` turns per-image scores into the numbers an evaluation reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def mean_summary(scores: dict[str, np.ndarray], prompts: list[str]) -> dict:
    summary = {name: float(np.mean(values)) for name, values in scores.items()}
    summary["n_images"] = len(prompts)
    return summary


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: `score(images, prompts) -> {name: (N,) array}` and its main key."""

    name: str
    key: str
    score: Callable[..., dict[str, np.ndarray]]
    description: str
    summarize: Callable[[dict[str, np.ndarray], list[str]], dict] = field(default=mean_summary)


def _shapes_score(images, prompts: list[str]) -> dict[str, np.ndarray]:
    from actors.rewards.shapes import score_images, to_uint8
    from opgrpo.shapes.grammar import metadata_for

    return score_images(to_uint8(images), [metadata_for(p) for p in prompts])


def _shapes_summary(scores: dict[str, np.ndarray], prompts: list[str]) -> dict:
    from actors.rewards.shapes import summarize
    from opgrpo.shapes.grammar import metadata_for

    return summarize(scores, [metadata_for(p) for p in prompts])


def _jpeg(images, prompts: list[str]) -> dict[str, np.ndarray]:
    from actors.rewards.jpeg import compressibility

    return compressibility(np.asarray(images), prompts)


def _jpeg_inverse(images, prompts: list[str]) -> dict[str, np.ndarray]:
    from actors.rewards.jpeg import incompressibility

    return incompressibility(np.asarray(images), prompts)


REGISTRY: dict[str, RewardSpec] = {
    "shapes": RewardSpec("shapes", "strict", _shapes_score,
                         "shapes task: 1 if every GenEval-style constraint holds, else 0",
                         _shapes_summary),
    "shapes_partial": RewardSpec("shapes_partial", "partial", _shapes_score,
                                 "shapes task: fraction of constraints that hold",
                                 _shapes_summary),
    "jpeg": RewardSpec("jpeg", "compressibility", _jpeg,
                       "JPEG compressibility: minus the kB of the image at quality 95"),
    "jpeg_incompressibility": RewardSpec("jpeg_incompressibility", "incompressibility",
                                         _jpeg_inverse, "JPEG size in kB at quality 95"),
}


def score_frames(spec: RewardSpec, images, prompts: list[str]) -> dict[str, np.ndarray]:
    """`spec.score` on images (N, 3, H, W), or on video frames (N, F, 3, H, W): every frame
    is scored with its video's prompt and a video's score is the mean over its frames."""
    if images.ndim == 4:
        return spec.score(images, prompts)
    n, frames = images.shape[:2]
    flat = images.reshape(n * frames, *images.shape[2:])
    scores = spec.score(flat, [p for p in prompts for _ in range(frames)])
    return {name: np.asarray(values, dtype=np.float64).reshape(n, frames).mean(axis=1)
            for name, values in scores.items()}


def get_reward(name: str) -> RewardSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r} in reward.functions; known: {sorted(REGISTRY)}"
        ) from None
