"""The numbers section 8 of docs/benchmarks.md reports are what the runs' curves say.

`bench/hard_regime.py summarise` turns saved eval curves into the headline numbers: steps to the
same seed's GRPO final accuracy and their ratio (the paper's 0.342), with a seed that never gets
there counted at the budget and flagged, and the paired final-accuracy gap. Built here from
curves whose answers are known by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hard_regime():
    sys.path.insert(0, str(REPO / "bench"))
    import hard_regime

    return hard_regime


def _result(strict: list[float], steps: int = 300) -> dict:
    return {"eval": [{"step": 25 * i, "strict": v} for i, v in enumerate(strict)],
            "metrics": {"adv/masked_fraction": [0.1] * steps, "time/iteration": [2.0] * steps},
            "steps": steps}


def test_step_ratio_censoring_and_final_gap(hard_regime):
    # smoothing is the trailing mean of 3 evaluations
    grpo0 = [0.30, 0.30, 0.30, 0.60, 0.60, 0.60, 0.60]   # smoothed final 0.6, first at step 125
    fast0 = [0.30, 0.30, 0.60, 0.60, 0.60, 0.60, 0.60]   # 0.6 at step 100: ratio 0.8
    grpo1 = [0.30, 0.30, 0.30, 0.30, 0.50, 0.50, 0.50]   # final 0.5, first at step 150
    slow1 = [0.30, 0.30, 0.30, 0.30, 0.30, 0.40, 0.40]   # never reaches 0.5: censored at 300
    results = {"grpo-s0": _result(grpo0), "opgrpo-s0": _result(fast0),
               "grpo-s1": _result(grpo1), "opgrpo-s1": _result(slow1)}
    out = hard_regime.summarise(results)
    op = out["arms"]["opgrpo"]

    assert op["steps_to_same_seed_grpo_final"] == {0: 100, 1: None}
    assert op["paired_step_ratio_censored_seeds"] == [1]
    assert op["paired_step_ratio"] == pytest.approx((100 / 125 + 300 / 150) / 2)
    assert op["final_minus_same_seed_grpo"][0] == pytest.approx(0.0)
    assert op["final_minus_same_seed_grpo"][1] == pytest.approx(0.4 - 0.5 + (0.3 - 0.4) / 3)
    half = op["steps_to_fraction_of_grpo_gain"]["0.5"]
    # seed 0: GRPO's gain runs 0.3 -> 0.6, half is 0.45: GRPO's smoothed curve passes it at
    # step 100 (0.5), the fast arm's at step 75 (0.5)
    assert (half[0]["grpo_steps"], half[0]["arm_steps"], half[0]["ratio"]) == (100, 75, 0.75)
    # seed 1: the censored seed is written as a lower bound in the docs table
    block = hard_regime.results_block(out, results)
    assert "| `opgrpo` | 2 |" in block and f">{(0.8 + 2.0) / 2:.2f} |" in block
    assert "| 1 | " in block and "- vs 125 (-) | - vs 150 (-)" in block
