"""JPEG compressibility (DDPO's `jpeg_compressibility`): the negative size in kB of the image
saved as JPEG at quality 95. Simpler images score higher; `jpeg_incompressibility` is its
negation. No model: it runs anywhere and gives every image a distinct score."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

QUALITY = 95


def jpeg_kilobytes(images: np.ndarray) -> np.ndarray:
    """images (N, 3, H, W) floats in [0, 1] -> JPEG size in kB (N,)."""
    pixels = (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round()
    pixels = pixels.astype(np.uint8).transpose(0, 2, 3, 1)
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=QUALITY)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float64)


def compressibility(images, prompts: list[str]) -> dict[str, np.ndarray]:
    kb = jpeg_kilobytes(images)
    return {"compressibility": -kb, "jpeg_kb": kb}


def incompressibility(images, prompts: list[str]) -> dict[str, np.ndarray]:
    kb = jpeg_kilobytes(images)
    return {"incompressibility": kb, "jpeg_kb": kb}
