"""GenEval's rules on hand-made detections (exact verdicts), and the detector-backed scorer
end to end on tiny random Mask2Former and CLIP models of the real classes, behind the HTTP
server that the `geneval` reward calls."""

import threading

import numpy as np
import pytest

from actors.rewards import get_reward
from tasks.geneval.rules import COLORS, Detection, RuleSettings, judge, relations, select


def _det(x1, y1, x2, y2, score=0.95):
    return Detection(np.array([x1, y1, x2, y2], float), score)


def _colors(table):
    """A colour classifier that answers from a table keyed by the box's x1."""
    return lambda dets, name: [table[int(d.box[0])] for d in dets]


def test_thresholds_order_limit_and_overlap():
    found = {"dog": [_det(0, 0, 9, 9, 0.5), _det(20, 0, 29, 9, 0.95), _det(1, 0, 10, 9, 0.8),
                     _det(40, 0, 49, 9, 0.2)]}
    kept = select(found, "two_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.8, 0.5]  # 0.2 is under 0.3
    assert [d.score for d in select(found, "counting")["dog"]] == [0.95]  # 0.9 for counting
    dedup = select(found, "two_object", RuleSettings(max_overlap=0.5))
    assert [d.score for d in dedup["dog"]] == [0.95, 0.8]  # the 0.5 box overlaps the 0.8 one
    assert select(found, "x", RuleSettings(max_objects=1))["dog"][0].score == 0.95


def test_relative_positions_ignore_small_offsets():
    left, right = _det(0, 40, 19, 59), _det(60, 40, 79, 59)
    assert relations(left, right) == {"left of"} and relations(right, left) == {"right of"}
    top, bottom = _det(40, 0, 59, 19), _det(40, 60, 59, 79)
    assert relations(top, bottom) == {"above"}
    assert relations(_det(0, 0, 19, 19), _det(2, 1, 21, 20)) == set()  # within the margin
    diagonal = relations(_det(0, 0, 19, 19), _det(60, 60, 79, 79))
    assert diagonal == {"left of", "above"}  # both components exceed half the offset
    assert relations(_det(0, 0, 19, 19), _det(60, 10, 79, 29)) == {"left of"}


def test_judge_counts_colors_positions_and_exclusions():
    objects = {"cat": [_det(0, 40, 19, 59)], "dog": [_det(60, 40, 79, 59), _det(80, 0, 99, 9)]}
    colors = _colors({0: "black", 60: "white", 80: "brown"})
    meta = {"include": [{"class": "cat", "count": 1, "color": "black"},
                        {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    assert judge(objects, meta, colors)[:2] == (True, 1.0)
    wrong_color = {"include": [{"class": "cat", "count": 1, "color": "red"}]}
    strict, partial, reasons = judge(objects, wrong_color, colors)
    assert (strict, partial) == (False, 0.0) and "expected red cat" in reasons[0]
    counting = {"include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog",
                                                                       "count": 4}]}
    assert judge(objects, counting, colors)[:2] == (False, 0.5)
    excluded = {"include": [{"class": "cat", "count": 1}],
                "exclude": [{"class": "dog", "count": 2}]}
    assert judge(objects, excluded, colors)[:2] == (False, 0.5)
    # a position clause whose target clause failed has no target
    no_target = {"include": [{"class": "bird", "count": 1},
                             {"class": "dog", "count": 1, "position": ["above", 0]}]}
    strict, partial, reasons = judge(objects, no_target, colors)
    assert (strict, partial) == (False, 0.0) and "no target" in reasons[1]


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A tiny random Mask2Former (Swin backbone) whose labels include the shapes classes."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    labels = ["circle", "square", "triangle"] + [f"thing{i}" for i in range(5)]
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_layers=1, decoder_layers=2, num_queries=8, encoder_feedforward_dim=64,
        dim_feedforward=64, num_attention_heads=2, use_pretrained_backbone=False,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    directory = tmp_path_factory.mktemp("tiny-mask2former")
    Mask2FormerForUniversalSegmentation(config).save_pretrained(directory,
                                                                safe_serialization=True)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(
        directory)
    return directory


def test_detector_scorer_through_the_server(tiny_detector, tmp_path):
    import json
    from pathlib import Path

    from opgrpo.tiny import save_tiny_clip
    from tasks.geneval.server import DetectorScorer, make_server
    from tasks.shapes.render import render_batch

    scorer = DetectorScorer(str(tiny_detector), str(save_tiny_clip(tmp_path / "clip")))
    repo = Path(__file__).resolve().parents[1]
    metadata_file = repo / "configs/shapes/test_metadata.jsonl"
    rows = [json.loads(line) for line in metadata_file.read_text().splitlines()[:4]]
    images = render_batch(rows, seed=0)
    found = scorer.detect(images[0])
    assert found and all(d.mask is not None and d.mask.any() for ds in found.values()
                         for d in ds)
    some = next(iter(found.values()))
    assert all(c in COLORS for c in scorer.colors(images[0], some, "circle"))
    # everything is a detection above 0: with threshold 0 the clauses can be met
    direct = scorer(images, rows)
    assert set(direct) == {"strict", "partial"} and len(direct["strict"]) == 4
    assert all(0 <= p <= 1 for p in direct["partial"])

    server = make_server("127.0.0.1", 0, scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reward = get_reward("geneval").load({
            "url": f"http://127.0.0.1:{server.server_port}/score",
            "metadata_files": [str(metadata_file)], "key": "partial"})
        floats = images.astype(np.float32).transpose(0, 3, 1, 2) / 255
        scores = reward.score(floats, [r["prompt"] for r in rows])
        np.testing.assert_allclose(scores["partial"], direct["partial"])
        np.testing.assert_allclose(scores["strict"], direct["partial"])  # key: partial
    finally:
        server.shutdown()
        server.server_close()
