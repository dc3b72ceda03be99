"""The shapes task: grammar and metadata, renderer/detector agreement, reward registry."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.rewards import get_reward
from actors.rewards.shapes import classify_shape, detect, score_images, summarize
from tasks.shapes.grammar import (
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    TAGS,
    all_prompts,
    metadata_for,
    split_prompts,
    uses_held_out_pair,
)
from tasks.shapes.render import (
    PALETTE,
    PlacedObject,
    draw,
    place_objects,
    relation_holds,
    render_batch,
)

REPO = Path(__file__).resolve().parents[1]


def test_grammar_covers_every_tag_with_geneval_metadata():
    rows = all_prompts()
    assert {r["tag"] for r in rows} == set(TAGS)
    assert len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"tag", "include", "prompt"}
        for item in row["include"]:
            assert item["class"] in SHAPES and 1 <= item["count"] <= 4
            assert item.get("color", "red") in COLORS
    examples = {r["prompt"]: r for r in rows}
    assert examples["three blue circles"]["include"] == [
        {"class": "circle", "count": 3, "color": "blue"}]
    pos = examples["a red square to the left of a green triangle"]
    assert pos["tag"] == "position"
    assert pos["include"][1] == {"class": "square", "count": 1, "color": "red",
                                 "position": ["left of", 0]}


def test_split_holds_out_attribute_pairs_from_training():
    train, test = split_prompts()
    assert not any(uses_held_out_pair(r) for r in train)
    held = [r for r in test if uses_held_out_pair(r)]
    assert len(held) >= 20
    named = {(i.get("color"), i["class"]) for r in held for i in r["include"]}
    assert set(HELD_OUT_PAIRS) <= named
    assert {r["tag"] for r in test} == set(TAGS) == {r["tag"] for r in train}
    # the large tags have disjoint train/test prompts
    for tag in ("counting", "position", "color_attr"):
        assert not ({r["prompt"] for r in train if r["tag"] == tag}
                    & {r["prompt"] for r in test if r["tag"] == tag})


def test_shipped_prompt_files_match_the_grammar():
    train, test = split_prompts()
    for name, rows in (("train", train), ("test", test)):
        path = REPO / "configs" / "shapes" / f"{name}_metadata.jsonl"
        assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_metadata_lookup():
    assert metadata_for("Three blue circles ")["tag"] == "counting"
    with pytest.raises(ValueError, match="not a prompt of the shapes grammar"):
        metadata_for("a dog")


def test_renderer_satisfies_metadata_and_is_reproducible():
    rows = all_prompts()[::5]
    images = render_batch(rows, seed=3)
    assert images.shape == (len(rows), 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, render_batch(rows, seed=3))
    assert not np.array_equal(images, render_batch(rows, seed=4))
    rng = random.Random(0)
    for row in rows:
        placed = place_objects(row, rng)
        assert len(placed) == sum(i["count"] for i in row["include"])
        for item in row["include"]:
            if "color" in item:
                assert sum(o.color == item["color"] and o.shape == item["class"]
                           for o in placed) >= item["count"]


def test_detector_agrees_with_renderer():
    train, test = split_prompts()
    rows = (train + test) * 2
    scores = score_images(render_batch(rows, seed=11), rows)
    summary = summarize(scores, rows)
    assert summary["strict"] >= 0.98, summary
    assert all(v >= 0.95 for v in summary["per_tag"].values()), summary


def test_detector_is_low_on_images_of_other_prompts():
    train, test = split_prompts()
    rows = train + test
    images = render_batch(rows, seed=12)
    shuffled = [rows[(i + 17) % len(rows)] for i in range(len(rows))]
    assert summarize(score_images(images, shuffled), shuffled)["strict"] < 0.1


def test_detector_tolerates_speckle():
    train, _ = split_prompts()
    images = render_batch(train, seed=13)
    rng = np.random.default_rng(0)
    speckle = rng.random(images.shape[:3]) < 0.02
    palette = np.array([(0, 0, 0), *PALETTE.values()], dtype=np.uint8)
    noisy = images.copy()
    noisy[speckle] = palette[rng.integers(0, len(palette), int(speckle.sum()))]
    noisy = np.clip(noisy + rng.normal(0, 20, noisy.shape), 0, 255).astype(np.uint8)
    assert summarize(score_images(noisy, train), train)["strict"] >= 0.95


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_shapes_are_classified_at_every_size(shape):
    for size in range(7, 12):
        (found,) = detect(draw([PlacedObject(shape, "blue", 10, 10, size)]))
        assert (found.shape, found.color) == (shape, "blue")


def test_partial_credit_and_relations():
    meta = metadata_for("a red square to the left of a green triangle")
    wrong_side = draw([PlacedObject("square", "red", 20, 12, 9),
                       PlacedObject("triangle", "green", 3, 12, 9)])
    result = score_images(wrong_side[None], [meta])
    assert result["strict"][0] == 0 and result["partial"][0] == pytest.approx(2 / 3)
    assert relation_holds((2, 10), (20, 12), "left of")
    assert not relation_holds((2, 10), (3, 30), "left of")  # mostly above, not left


def test_reward_registry_scores_float_images():
    reward = get_reward("shapes")
    rows = [metadata_for("two red circles"), metadata_for("a blue square")]
    images = torch.from_numpy(render_batch(rows, 0)).permute(0, 3, 1, 2).float() / 255
    scores = reward.score(images, [r["prompt"] for r in rows])
    assert scores["strict"].tolist() == [1.0, 1.0]
    summary = reward.summarize(scores, [r["prompt"] for r in rows])
    assert summary["per_tag"] == {"counting": 1.0, "colors": 1.0}
    with pytest.raises(ValueError, match="known"):
        get_reward("nope")


def test_classify_shape_on_masks():
    assert classify_shape(np.ones((8, 8), bool)) == "square"
    tri = np.array([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    assert classify_shape(np.repeat(tri, 2, axis=0)) == "triangle"
