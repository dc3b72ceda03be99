"""The shipped shapes base model: loads by path, matches its card, is in the quality window."""

import json
from pathlib import Path

import numpy as np
import pytest

from opgrpo.evaluate import EvalSettings, evaluate
from opgrpo.models import FlowPolicy
from opgrpo.prompts import load_prompts

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "tasks" / "shapes" / "shapes-base"


@pytest.fixture(scope="module")
def card():
    return json.loads((MODEL / "eval.json").read_text())


def test_checkpoint_is_small_and_documented(card):
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    text = (MODEL / "README.md").read_text()
    assert f"{card['summary']['strict']:.3f}" in text
    assert "opgrpo pretrain" in text and "Seed" in text


def test_card_scores_are_in_the_base_quality_window(card):
    summary = card["summary"]
    assert 0.15 <= summary["strict"] <= 0.60
    assert min(summary["per_tag"]["counting"], summary["per_tag"]["position"]) < 0.5 * max(
        summary["per_tag"].values())


def test_loads_with_its_trained_settings():
    policy = FlowPolicy.from_pretrained(MODEL)
    assert policy.max_sequence_length == 1
    assert policy.latent_shape(32, 32) == (8, 8, 8) and policy.default_image_size == 32
    assert policy.transformer.dtype.is_floating_point and str(policy.transformer.dtype) == \
        "torch.float32"


def test_evaluation_reproduces_the_cards_per_image_scores(card):
    """Re-run the card's evaluation on its first 24 prompts: the same images score the same."""
    settings = EvalSettings(**card["settings"])
    records = load_prompts(REPO / card["prompts"])[:24]
    policy = FlowPolicy.from_pretrained(MODEL)
    _, _, scores = evaluate(policy, records, "shapes", settings)
    expected = np.array(card["per_image_strict"][: len(scores["strict"])])
    agreement = float(np.mean(scores["strict"] == expected))
    assert agreement >= 0.95, agreement  # float noise may flip a borderline image or two
