"""What the model-based rewards share: strict options, path checks, images as PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict


class RewardOptions(BaseModel):
    """Options of one reward (`reward.options.<name>`); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    def check(self, prefix: str) -> None:
        """Raise FileNotFoundError naming the option when a path it names is missing."""


def require_dir(path: str | None, option: str, hint: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise FileNotFoundError(f"{option}: directory {path} does not exist ({hint})")


def require_file(path: str | None, option: str, hint: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{option}: file {path} does not exist ({hint})")


def torch_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("reward.device is cuda but this reward actor sees no GPU "
                           "(give it reward.num_gpus > 0)")
    return torch.device(device)


def to_pil(images) -> list:
    """(N, 3, H, W) floats in [0, 1] -> PIL RGB images."""
    from PIL import Image

    pixels = (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round()
    return [Image.fromarray(p) for p in pixels.astype(np.uint8).transpose(0, 2, 3, 1)]


def load_clip(model_dir: str, processor_dir: str | None, device: str):
    """(CLIPModel in eval mode on `device`, CLIPProcessor, the torch device), safetensors only."""
    from transformers import CLIPModel, CLIPProcessor

    dev = torch_device(device)
    processor = CLIPProcessor.from_pretrained(processor_dir or model_dir, local_files_only=True)
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True,
                                      use_safetensors=True).to(dev).eval()
    return model, processor, dev


def clip_features(out):
    """Normalised CLIP embeddings (transformers 5 may return an output object, not a tensor)."""
    import torch

    if not isinstance(out, torch.Tensor):
        out = out.pooler_output
    return out / out.norm(dim=-1, keepdim=True)
