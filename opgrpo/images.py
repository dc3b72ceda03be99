"""Image grids with captions, saved as PNG: what a person looks at to judge samples.

Video samples (N, F, 3, H, W) give the grid of their middle frames as PNG and the whole grid
animated, frame by frame, as a GIF beside it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) floats in [0, 1] on any device -> (..., H, W, 3) uint8 numpy (images or
    video frames); quantised on the device, so a quarter of the bytes cross to the host."""
    quantised = (images.movedim(-3, -1).to(torch.float32).clamp(0, 1) * 255).round()
    return quantised.to(torch.uint8).cpu().numpy()


def to_pil(image: torch.Tensor, tile: int) -> Image.Image:
    """(3, H, W) float in [0, 1] -> PIL image scaled (nearest) to `tile` pixels wide."""
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    pil = Image.fromarray(array.astype(np.uint8))
    scale = max(1, tile // pil.width)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def save_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | Path,
    columns: int,
    labels: list[str] | None = None,
    tile: int = 128,
    frame_ms: int = 125,
) -> Path:
    """Save images (N, 3, H, W) in rows of `columns`; one caption per row, labels per image.

    Row r shows images r*columns .. r*columns+columns-1 with `captions[r]` above them. Videos
    (N, F, 3, H, W): the PNG shows the middle frames, `path` with suffix .gif all frames.
    """
    images = torch.as_tensor(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:
        frames = [_canvas(images[:, f], captions, columns, labels, tile)
                  for f in range(images.shape[1])]
        frames[len(frames) // 2].save(path)
        frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:],
                       duration=frame_ms, loop=0)
        return path
    _canvas(images, captions, columns, labels, tile).save(path)
    return path


def _canvas(images: torch.Tensor, captions: list[str], columns: int,
            labels: list[str] | None, tile: int) -> Image.Image:
    n = images.shape[0]
    if n % columns:
        raise ValueError(f"{n} images do not fill rows of {columns}")
    rows = n // columns
    if len(captions) != rows:
        raise ValueError(f"need {rows} captions (one per row), got {len(captions)}")
    font = ImageFont.load_default()
    tiles = [to_pil(images[i], tile) for i in range(n)]
    tw, th = tiles[0].size
    width = max(columns * (tw + 4) + 4, 240)
    wrap = max(20, width // 7)
    caption_lines = [textwrap.wrap(c, wrap) or [""] for c in captions]
    line_h, label_h = 12, 12 if labels else 0
    heights = [len(lines) * line_h + 6 + th + label_h + 6 for lines in caption_lines]
    canvas = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for r, lines in enumerate(caption_lines):
        for j, text in enumerate(lines):
            draw.text((4, y + 3 + j * line_h), text, fill="black", font=font)
        top = y + len(lines) * line_h + 6
        for c in range(columns):
            i = r * columns + c
            canvas.paste(tiles[i], (4 + c * (tw + 4), top))
            if labels:
                draw.text((4 + c * (tw + 4), top + th + 1), labels[i], fill="black", font=font)
        y += heights[r]
    return canvas
