"""Renderer of the shapes task: images that satisfy a prompt's metadata exactly.

Resolution 32 x 32: the smallest size at which four objects of 7-11 px fit without overlap and
a circle, a square and a triangle stay distinguishable by their fill ratio (about 0.8, 1.0 and
0.55 of their bounding box); every doubling of the side quadruples the transformer's tokens,
which the CPU budget of the task cannot pay. Objects are flat palette colours on black, drawn
without anti-aliasing so that the detector's colour classes are exact on rendered data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 7, 11
GAP = 2  # free pixels kept between objects' boxes, so no two objects ever touch
BACKGROUND = (0, 0, 0)
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}


@dataclass(frozen=True)
class PlacedObject:
    shape: str
    color: str
    x: int  # left
    y: int  # top
    size: int

    @property
    def center(self) -> tuple[float, float]:
        half = (self.size - 1) / 2
        return (self.x + half, self.y + half)

    def box(self, margin: int = 0) -> tuple[int, int, int, int]:
        return (self.x - margin, self.y - margin, self.x + self.size - 1 + margin,
                self.y + self.size - 1 + margin)


def relation_holds(subject_center, reference_center, relation: str, min_offset=2.0) -> bool:
    """Direction test shared by the renderer and the detector.

    The offset from reference to subject must point into the 60-degree cone of the relation's
    direction (its component along that direction >= half its length) and be at least
    `min_offset` pixels along it. Image y grows downwards, so "above" means smaller y.
    """
    dx = subject_center[0] - reference_center[0]
    dy = subject_center[1] - reference_center[1]
    norm = float(np.hypot(dx, dy))
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    return norm > 0 and along >= min_offset and along >= 0.5 * norm


def _overlaps(a: PlacedObject, b: PlacedObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box(GAP)
    bx0, by0, bx1, by1 = b.box()
    return not (ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0)


def _objects_for(metadata: dict, rng: random.Random) -> list[tuple[str, str, int]]:
    """(shape, colour, include index) for every object the metadata asks for."""
    wanted = []
    for index, item in enumerate(metadata["include"]):
        for _ in range(item["count"]):
            color = item.get("color") or rng.choice(list(PALETTE))
            wanted.append((item["class"], color, index))
    return wanted


def place_objects(
    metadata: dict, rng: random.Random, image_size: int = IMAGE_SIZE, max_tries: int = 2000
) -> list[PlacedObject]:
    """Random sizes and places, no overlap, position relations held with a clear margin."""
    wanted = _objects_for(metadata, rng)
    relations = [
        (i, item["position"][0], item["position"][1])
        for i, item in enumerate(metadata["include"])
        if item.get("position")
    ]
    for _ in range(max_tries):
        placed: list[PlacedObject] = []
        by_item: dict[int, PlacedObject] = {}
        for shape, color, index in wanted:
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            candidate = PlacedObject(
                shape, color, rng.randint(0, image_size - size), rng.randint(0, image_size - size),
                size,
            )
            if any(_overlaps(candidate, other) for other in placed):
                break
            placed.append(candidate)
            by_item.setdefault(index, candidate)
        else:
            if all(
                relation_holds(by_item[i].center, by_item[j].center, rel, min_offset=5.0)
                and _clear_direction(by_item[i].center, by_item[j].center, rel)
                for i, rel, j in relations
            ):
                return placed
    raise RuntimeError(f"could not place the objects of {metadata['prompt']!r}")


def _clear_direction(subject, reference, relation: str) -> bool:
    """Rendered relations are unambiguous: the offset lies within 40 degrees of the axis."""
    dx, dy = subject[0] - reference[0], subject[1] - reference[1]
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    return along >= 0.77 * float(np.hypot(dx, dy))


def draw(objects: list[PlacedObject], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Rasterise objects to a (H, W, 3) uint8 image."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.box()
        fill = PALETTE[obj.color]
        if obj.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(image, dtype=np.uint8)


def render(metadata: dict, rng: random.Random, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (H, W, 3) uint8 that satisfies `metadata` exactly."""
    return draw(place_objects(metadata, rng, image_size), image_size)


def render_batch(rows: list[dict], seed: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for metadata rows, reproducible from `seed`."""
    rng = random.Random(seed)
    return np.stack([render(row, rng, image_size) for row in rows])
