"""GenEval's decision rules over object detections (Ghosh et al. 2023, `evaluate_images.py`).

Given, per class, the detections an instance detector found (box with confidence, optional
mask), an image is correct for a prompt's metadata when:
- every `include` clause finds at least `count` objects of its class, among detections above
  the confidence threshold (0.3; 0.9 for the `counting` tag), at most 16 per class, most
  confident first (optionally de-duplicated by IoU);
- a clause with a `color` has at least `count` of those objects classified as that colour
  (a zero-shot classifier over ten colour names, on the object's masked crop);
- a clause with a `position` [relation, index] has each of its objects in that relation
  (`left of`, `right of`, `above`, `below`) to every object of the clause `index` refers to;
  offsets smaller than 0.1 x the two objects' summed sizes do not count;
- no `exclude` clause finds `count` or more objects of its class.

`strict` is that all-or-nothing verdict; `partial` is the fraction of clauses that hold, the
dense variant Flow-GRPO trains with. The detector and colour classifier are passed in, so the
rules run on any detector's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
          "white")


@dataclass
class Detection:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in pixels
    score: float
    mask: np.ndarray | None = None  # (H, W) bool


@dataclass(frozen=True)
class RuleSettings:
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # IoU above which a less confident box is dropped; 1 = keep all
    position_threshold: float = 0.1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    def area(box) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select(detections: dict[str, list[Detection]], tag: str,
           settings: RuleSettings = RuleSettings()) -> dict[str, list[Detection]]:
    """Per class: above the threshold, most confident first, at most max_objects, IoU-deduped."""
    threshold = settings.counting_threshold if tag == "counting" else settings.threshold
    kept: dict[str, list[Detection]] = {}
    for name, found in detections.items():
        queue = sorted((d for d in found if d.score > threshold), key=lambda d: -d.score)
        queue = queue[:settings.max_objects]
        chosen: list[Detection] = []
        while queue:
            best = queue.pop(0)
            chosen.append(best)
            if settings.max_overlap < 1:
                queue = [d for d in queue if iou(best.box, d.box) < settings.max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def relations(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Where A is relative to B (image y grows downwards), ignoring small offsets."""
    box_a, box_b = np.asarray(a.box[:4], float), np.asarray(b.box[:4], float)
    center_a = (box_a[:2] + box_a[2:]) / 2
    center_b = (box_b[:2] + box_b[2:]) / 2
    size = np.abs(box_a[2:] - box_a[:2]) + np.abs(box_b[2:] - box_b[:2])
    offset = center_a - center_b
    kept = np.maximum(np.abs(offset) - position_threshold * size, 0) * np.sign(offset)
    if np.all(np.abs(kept) < 1e-3):
        return set()
    dx, dy = kept / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


ColorFn = Callable[[Sequence[Detection], str], list[str]]


def judge(objects: dict[str, list[Detection]], metadata: dict, colors: ColorFn,
          settings: RuleSettings = RuleSettings()) -> tuple[bool, float, list[str]]:
    """(strict, partial, reasons) for selected `objects` against GenEval `metadata`."""
    reasons: list[str] = []
    held = total = 0
    groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        total += 1
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            seen = colors(found, name)
            if seen.count(clause["color"]) < count:
                ok = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found "
                               f"{seen.count(clause['color'])}")
        if ok and "position" in clause:
            relation, index = clause["position"]
            targets = groups[index] if index < len(groups) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not all(relation in relations(o, t, settings.position_threshold)
                         for o in found for t in targets):
                ok = False
                reasons.append(f"expected {name} {relation} the target")
        groups.append(found if ok else None)
        held += ok
    for clause in metadata.get("exclude", []):
        total += 1
        name, count = clause["class"], clause["count"]
        ok = len(objects.get(name, [])) < count
        if not ok:
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
        held += ok
    strict = not reasons
    return strict, (held / total if total else 1.0), reasons
