"""Evaluation: ODE samples of a prompt set scored by a registered reward (`opgrpo eval`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.rewards import get_reward, score_frames
from opgrpo.images import to_uint8
from opgrpo.models import FlowPolicy
from opgrpo.prompts import PromptRecord
from opgrpo.sampling import sample_ode, trajectory_seed


@dataclass(frozen=True)
class EvalSettings:
    n_per_prompt: int = 4
    num_steps: int = 40
    guidance_scale: float = 1.0
    seed: int = 0
    batch_size: int = 64
    height: int | None = None  # None: the model's default size
    width: int | None = None


@torch.no_grad()
def generate(
    policy: FlowPolicy, records: list[PromptRecord], settings: EvalSettings, progress=None,
    quantise: bool = False,
) -> torch.Tensor | np.ndarray:
    """Images (N * n_per_prompt, 3, H, W), or video frames (N * n_per_prompt, F, 3, H, W), in
    [0, 1], prompt-major, seeds from (seed, key, j) (the same images however the prompts are
    split over actors). `quantise`: (N, H, W, 3) / (N, F, H, W, 3) uint8 on the host instead,
    each batch quantised on the device as it is decoded, so a large prompt set never holds
    float images on the device."""
    height = settings.height or policy.default_image_size
    width = settings.width or policy.default_image_size
    rows = [(r.text, trajectory_seed(settings.seed, "eval", r.key, j))
            for r in records for j in range(settings.n_per_prompt)]
    task = progress.add_task("evaluating", total=len(rows)) if progress else None
    images = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start : start + settings.batch_size]
        latents = sample_ode(policy, [c[0] for c in chunk], [c[1] for c in chunk],
                             settings.num_steps, settings.guidance_scale, height, width)
        decoded = policy.decode(latents)
        images.append(to_uint8(decoded) if quantise else decoded)
        if progress:
            progress.advance(task, len(chunk))
    return np.concatenate(images) if quantise else torch.cat(images)


def evaluate(
    policy: FlowPolicy,
    records: list[PromptRecord],
    reward_name: str,
    settings: EvalSettings,
    progress=None,
    reward_options: dict | None = None,
) -> tuple[dict, torch.Tensor, dict[str, np.ndarray]]:
    """Summary (reward-specific), the images, and the per-image scores."""
    reward = get_reward(reward_name).load(reward_options)
    images = generate(policy, records, settings, progress)
    prompts = [r.text for r in records for _ in range(settings.n_per_prompt)]
    scores = score_frames(reward, images, prompts)
    summary = reward.summarize(scores, prompts)
    return summary, images, scores
