"""LAION aesthetic score: a head on normalised CLIP ViT-L/14 image embeddings.

The head is a safetensors file: either one linear layer (`weight`, `bias`: the original LAION
aesthetic predictor) or the MLP of the "improved aesthetic predictor" (`layers.0/2/4/6/7`,
768-1024-128-64-16-1). Convert the published `.pth` once with
`opgrpo convert-aesthetic-head IN.pth OUT.safetensors` (it reads tensors only, never code).
"""

from __future__ import annotations

import numpy as np
import torch

from actors.rewards.common import (
    RewardOptions,
    clip_features,
    load_clip,
    require_dir,
    require_file,
    to_pil,
)

NAME, KEY = "aesthetic", "aesthetic"
DESCRIPTION = "LAION aesthetic predictor on CLIP ViT-L/14 image embeddings (about 1-10)"
MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear indices of the improved predictor's nn.Sequential


class Options(RewardOptions):
    clip: str  # directory of the CLIPModel (openai/clip-vit-large-patch14)
    head: str  # safetensors file of the head
    processor: str | None = None  # CLIPProcessor directory; default: `clip`
    batch_size: int = 32

    def check(self, prefix: str) -> None:
        require_dir(self.clip, f"{prefix}.clip", "a local copy of openai/clip-vit-large-patch14")
        require_dir(self.processor, f"{prefix}.processor", "a CLIPProcessor directory")
        require_file(self.head, f"{prefix}.head", "the aesthetic head as safetensors")


def load_head(path: str) -> torch.nn.Module:
    """The head from its safetensors state dict (linear or the improved MLP)."""
    from safetensors.torch import load_file

    state = load_file(path)
    if set(state) == {"weight", "bias"}:
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        return head
    names = {f"layers.{i}.{p}" for i in MLP_LAYERS for p in ("weight", "bias")}
    if set(state) != names:
        raise ValueError(f"{path}: expected a linear head (weight, bias) or the improved "
                         f"predictor's layers.{{0,2,4,6,7}}, got {sorted(state)[:6]}")
    layers: list[torch.nn.Module] = []
    for index in range(max(MLP_LAYERS) + 1):
        if index in MLP_LAYERS:
            w = state[f"layers.{index}.weight"]
            layers.append(torch.nn.Linear(w.shape[1], w.shape[0]))
        else:
            layers.append(torch.nn.Dropout(0.0))
    head = torch.nn.Sequential(*layers)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return head


def build(options: Options, device: str):
    model, processor, dev = load_clip(options.clip, options.processor, device)
    head = load_head(options.head).to(dev).eval()

    @torch.no_grad()
    def score(images, prompts: list[str]) -> dict[str, np.ndarray]:
        values = []
        for start in range(0, len(prompts), options.batch_size):
            pil = to_pil(images[start:start + options.batch_size])
            inputs = processor(images=pil, return_tensors="pt").to(dev)
            embedding = clip_features(
                model.get_image_features(pixel_values=inputs["pixel_values"]))
            values.append(head(embedding.float()).squeeze(-1).cpu().numpy())
        return {KEY: np.concatenate(values).astype(np.float64)}

    return score


def convert_head(source: str, target: str) -> list[str]:
    """A published `.pth` head -> safetensors (tensors only: `weights_only=True`)."""
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"{source} is not a state dict of tensors")
    save_file({k: v.contiguous() for k, v in state.items()}, target)
    load_head(target)  # it is a head this reward can use
    return sorted(state)
