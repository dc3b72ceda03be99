"""PickScore (Kirstain et al. 2023): a CLIP-H model fine-tuned on human preferences.

score = logit_scale * cos(image embedding, prompt embedding), the preference logit of
PickScore's own inference code; the reward is that divided by 26, Flow-GRPO's scaling (typical
values 0.8-0.9). Load `yuvalkirstain/PickScore_v1` (`CLIPModel`) and the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (`CLIPProcessor`) from local directories.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.rewards.common import (
    RewardOptions,
    clip_features,
    load_clip,
    require_dir,
    to_pil,
)

NAME, KEY = "pickscore", "pickscore"
DESCRIPTION = "PickScore preference logit / 26 (CLIP-H fine-tuned on human preferences)"
SCALE = 26.0


class Options(RewardOptions):
    model: str  # directory of the PickScore CLIPModel (safetensors)
    processor: str | None = None  # directory of the CLIPProcessor; default: `model`
    batch_size: int = 32

    def check(self, prefix: str) -> None:
        hint = "a local copy of yuvalkirstain/PickScore_v1"
        require_dir(self.model, f"{prefix}.model", hint)
        require_dir(self.processor, f"{prefix}.processor", "a CLIPProcessor directory")


def build(options: Options, device: str):
    model, processor, dev = load_clip(options.model, options.processor, device)

    @torch.no_grad()
    def score(images, prompts: list[str]) -> dict[str, np.ndarray]:
        values = []
        for start in range(0, len(prompts), options.batch_size):
            pil = to_pil(images[start:start + options.batch_size])
            text = prompts[start:start + options.batch_size]
            inputs = processor(text=text, images=pil, padding=True, truncation=True,
                               max_length=77, return_tensors="pt").to(dev)
            image = clip_features(model.get_image_features(
                pixel_values=inputs["pixel_values"]))
            words = clip_features(model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
            logits = model.logit_scale.exp() * (image * words).sum(-1)
            values.append(logits.float().cpu().numpy())
        raw = np.concatenate(values).astype(np.float64)
        return {KEY: raw / SCALE, "pickscore_logit": raw}

    return score

