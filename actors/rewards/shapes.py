"""Rule-based GenEval-style scorer of the shapes task: detect, then check the prompt's metadata.

Detection: every pixel takes the nearest palette colour (or background); each colour's mask is
cleaned of isolated pixels (so the speckle of a half-trained model does not split or invent
objects, as GenEval's detector tolerates texture), split into 8-connected components, and
components smaller than `min_area` pixels are dropped. Squares fill their bounding box; a
triangle (apex up) is narrow at the top and wide at the bottom; a circle is neither.

Scores per image: `strict` is 1 when every constraint holds, else 0; `partial` is the fraction of
constraints that hold. Constraints: for each include item, the number of detected objects of its
class (and colour, when given) equals its count; for each position, some detected subject stands
in the relation to some detected reference object.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tasks.shapes.grammar import TAGS
from tasks.shapes.render import BACKGROUND, PALETTE, relation_holds

COLOR_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # index 0: background
SQUARE_MIN_FILL = 0.86
TRIANGLE_TOP_RATIO = 0.45


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    center: tuple[float, float]  # (x, y)
    area: int


def classify_shape(mask: np.ndarray) -> str:
    """Shape of one object's filled mask (cropped to its bounding box).

    Squares fill their box. Triangles (drawn apex up) are much narrower in their top quarter
    than in their bottom quarter; circles are as wide at the top as at the bottom. Widths of
    whole bands, not single pixels, keep this stable when speckle eats a corner or an apex.
    """
    height, width = mask.shape
    if mask.sum() / (height * width) >= SQUARE_MIN_FILL:
        return "square"
    band = max(1, height // 4)
    widths = mask.sum(axis=1).astype(np.float32)
    top, bottom = widths[:band].mean(), widths[-band:].mean()
    return "triangle" if top < TRIANGLE_TOP_RATIO * bottom else "circle"


def _colour_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into [background, *PALETTE] of the nearest colour of every pixel."""
    pixels = image.astype(np.float32)[..., None, :]
    distances = ((pixels - _PALETTE_RGB) ** 2).sum(-1)
    return distances.argmin(-1)


def _despeckle(labels: np.ndarray, n_classes: int, min_same: int = 2) -> np.ndarray:
    """Relabel isolated pixels: one with fewer than `min_same` of its 8 neighbours sharing its
    label takes its neighbourhood's most common label. Pixels of a drawn shape, corners and
    apexes included, have at least two same-label neighbours and are kept."""
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 0
    counts = np.stack([
        ndimage.convolve((labels == c).astype(np.float32), kernel, mode="constant")
        for c in range(n_classes)
    ])
    same = np.take_along_axis(counts, labels[None], 0)[0]
    return np.where(same < min_same, counts.argmax(0), labels)


def detect(image: np.ndarray, min_area: int = 12) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image."""
    labels = _despeckle(_colour_labels(image), len(_PALETTE_RGB))
    found = []
    for index, color in enumerate(COLOR_NAMES, start=1):
        components, count = ndimage.label(labels == index, structure=np.ones((3, 3)))
        for slc, label in zip(ndimage.find_objects(components), range(1, count + 1)):
            mask = ndimage.binary_fill_holes(components[slc] == label)
            area = int(mask.sum())
            if area < min_area:
                continue
            height = slc[0].stop - slc[0].start
            width = slc[1].stop - slc[1].start
            center = (slc[1].start + (width - 1) / 2, slc[0].start + (height - 1) / 2)
            found.append(Detection(classify_shape(mask), color, center, area))
    return found


def _matches(det: Detection, item: dict) -> bool:
    return det.shape == item["class"] and item.get("color") in (None, det.color)


def check_constraints(detections: list[Detection], metadata: dict) -> list[bool]:
    """One bool per constraint of the metadata (counts first, then positions)."""
    include = metadata["include"]
    results = [sum(_matches(d, item) for d in detections) == item["count"] for item in include]
    for item in include:
        if not item.get("position"):
            continue
        relation, ref_index = item["position"]
        subjects = [d for d in detections if _matches(d, item)]
        references = [d for d in detections if _matches(d, include[ref_index])]
        results.append(any(
            relation_holds(s.center, r.center, relation) for s in subjects for r in references
        ))
    return results


def score_images(images: np.ndarray, metadata: list[dict]) -> dict[str, np.ndarray]:
    """`strict` and `partial` (N,) float arrays for images (N, H, W, 3) uint8."""
    if len(images) != len(metadata):
        raise ValueError(f"{len(images)} images but {len(metadata)} metadata rows")
    strict, partial = [], []
    for image, meta in zip(images, metadata):
        checks = check_constraints(detect(image), meta)
        strict.append(float(all(checks)))
        partial.append(sum(checks) / len(checks))
    return {"strict": np.array(strict), "partial": np.array(partial)}


def summarize(scores: dict[str, np.ndarray], metadata: list[dict]) -> dict:
    """GenEval-style summary: overall means and per-tag strict accuracy."""
    per_tag: dict[str, list[float]] = defaultdict(list)
    for value, meta in zip(scores["strict"], metadata):
        per_tag[meta["tag"]].append(float(value))
    return {
        "strict": float(np.mean(scores["strict"])),
        "partial": float(np.mean(scores["partial"])),
        "per_tag": {tag: float(np.mean(per_tag[tag])) for tag in TAGS if tag in per_tag},
        "n_images": int(len(scores["strict"])),
    }


def to_uint8(images) -> np.ndarray:
    """Images as (N, H, W, 3) uint8 from a float tensor/array (N, 3, H, W) in [0, 1]."""
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    return array
