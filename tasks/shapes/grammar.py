"""The "shapes" task's prompt grammar: GenEval in miniature, with GenEval-style metadata.

Objects have a shape (class), a colour and a count. Six tags mirror GenEval's: single_object,
two_object, counting, colors, position, color_attr. Every prompt comes with metadata in the
format of GenEval's `evaluation_metadata.jsonl` (as Flow-GRPO's `dataset/geneval` ships it):

    {"tag": "position", "prompt": "a red square to the left of a green triangle",
     "include": [{"class": "triangle", "count": 1, "color": "green"},
                 {"class": "square", "count": 1, "color": "red", "position": ["left of", 0]}]}

`position: [relation, j]` says this object stands in `relation` to include item j.
The split holds out some (colour, shape) pairs from training entirely (compositional test).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATION_WORDS = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# (colour, shape) pairs that never appear in a training prompt; the test split uses them.
HELD_OUT_PAIRS = (("purple", "triangle"), ("yellow", "square"), ("white", "circle"))


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _phrase(shape: str, count: int = 1, color: str | None = None) -> str:
    words = [NUMBER_WORDS[count]]
    if color:
        words.append(color)
    words.append(_noun(shape, count))
    return " ".join(words)


def _item(shape: str, count: int = 1, color: str | None = None, position=None) -> dict:
    item = {"class": shape, "count": count}
    if color:
        item["color"] = color
    if position:
        item["position"] = list(position)
    return item


def all_prompts() -> list[dict]:
    """Every prompt of the grammar with its metadata, in a fixed order."""
    rows: list[dict] = []

    def add(tag: str, prompt: str, include: list[dict]) -> None:
        rows.append({"tag": tag, "include": include, "prompt": prompt})

    for shape in SHAPES:
        add("single_object", _phrase(shape), [_item(shape)])
    for a, b in itertools.permutations(SHAPES, 2):
        add("two_object", f"{_phrase(a)} and {_phrase(b)}", [_item(a), _item(b)])
    for shape, count in itertools.product(SHAPES, (2, 3, 4)):
        add("counting", _phrase(shape, count), [_item(shape, count)])
        for color in COLORS:
            add("counting", _phrase(shape, count, color), [_item(shape, count, color)])
    for shape, color in itertools.product(SHAPES, COLORS):
        add("colors", _phrase(shape, 1, color), [_item(shape, 1, color)])
    for (sa, ca), (sb, cb) in itertools.permutations(itertools.product(SHAPES, COLORS), 2):
        if sa == sb:
            continue  # "a red circle and a blue circle" is a counting-by-colour task, not ours
        add("color_attr", f"{_phrase(sa, 1, ca)} and {_phrase(sb, 1, cb)}",
            [_item(sa, 1, ca), _item(sb, 1, cb)])
        for relation in RELATIONS:
            # the subject is include item 1, placed relative to item 0 (GenEval's convention)
            prompt = f"{_phrase(sa, 1, ca)} {RELATION_WORDS[relation]} {_phrase(sb, 1, cb)}"
            add("position", prompt, [_item(sb, 1, cb), _item(sa, 1, ca, (relation, 0))])
    return rows


def uses_held_out_pair(row: dict) -> bool:
    """True when a prompt names a held-out (colour, shape) pair."""
    return any((item.get("color"), item["class"]) in HELD_OUT_PAIRS for item in row["include"])


# Per tag: (test prompts, cap on training prompts). Tags whose whole prompt space is tiny
# (single_object, two_object, and colors without held-out pairs) sit in both splits, as in
# GenEval; otherwise test and train prompts are disjoint. The caps keep the training mix from
# being 75% position prompts.
SPLIT_SIZES = {
    "single_object": (3, 3),
    "two_object": (6, 6),
    "colors": (18, 15),
    "counting": (20, 60),
    "position": (40, 120),
    "color_attr": (40, 80),
}


def split_prompts(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and test prompt sets (SPLIT_SIZES); held-out pairs go to test only.

    About half of each tag's test prompts name a held-out (colour, shape) pair where the tag
    has such prompts, so the test measures compositional generalisation as well as fit.
    """
    rng = random.Random(seed)
    rows = all_prompts()
    train: list[dict] = []
    test: list[dict] = []
    for tag in TAGS:
        n_test, n_train = SPLIT_SIZES[tag]
        tagged = [r for r in rows if r["tag"] == tag]
        held = [r for r in tagged if uses_held_out_pair(r)]
        seen = [r for r in tagged if not uses_held_out_pair(r)]
        rng.shuffle(held)
        rng.shuffle(seen)
        if len(seen) + len(held) <= n_test:  # tiny tag: everything is tested, seen ones trained
            test.extend(seen + held)
            train.extend(seen[:n_train])
            continue
        n_held = min(len(held), n_test // 2)
        test.extend(held[:n_held] + seen[: n_test - n_held])
        train.extend(seen[n_test - n_held :][:n_train])
    return train, test


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vocabulary() -> list[str]:
    """Every word the grammar uses (for the word-level text tokenizer)."""
    words = {w for r in all_prompts() for w in r["prompt"].split()}
    return sorted(words)


_METADATA_BY_PROMPT: dict[str, dict] = {}


def metadata_for(prompt: str) -> dict:
    """The metadata of a grammar prompt (the grammar is small, so prompts are looked up)."""
    if not _METADATA_BY_PROMPT:
        _METADATA_BY_PROMPT.update({row["prompt"]: row for row in all_prompts()})
    try:
        return _METADATA_BY_PROMPT[prompt.strip().lower()]
    except KeyError:
        raise ValueError(f"{prompt!r} is not a prompt of the shapes grammar") from None
