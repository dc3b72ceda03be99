"""`opgrpo report`: every panel drawn from a synthetic run directory whose files end in a torn
line (a run killed while writing), NaN values skipped, missing keys reported as not logged."""

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from opgrpo import metrics as M
from opgrpo.cli import main
from opgrpo.report import figure, report, summary

TITLES = ["reward: fresh vs replayed samples", "evaluation (ODE samples of the eval prompts)",
          "loss", "KL", "clip fraction", "sequence weight w_i", "buffer",
          "version lag of replayed samples", "seconds per iteration by phase (mean)"]
STEPS = 24


def _row(step: int) -> dict:
    replayed = step > 5  # nothing to replay at first: NaN, as train.py logs it
    return {"step": step, "version": step,
            M.REWARD_MEAN: 0.3 + 0.01 * step, M.REWARD_FRESH_MEAN: 0.3 + 0.01 * step,
            M.REWARD_REPLAYED_MEAN: 0.9 if replayed else math.nan,
            M.LOSS_TOTAL: 1.0 / step, M.LOSS_POLICY: 0.5 / step, M.LOSS_KL: 0.001 * step,
            M.LOSS_APPROX_KL: 1e-4 * step, M.LOSS_CLIPFRAC: 0.1,
            M.LOSS_CLIPFRAC_OFFPOLICY: 0.2 if replayed else math.nan,
            M.LOSS_SEQ_WEIGHT_MEAN: 1.0, M.LOSS_SEQ_WEIGHT_MAX: 1.5,
            M.BUFFER_SIZE: min(step, 16), M.BUFFER_ADMISSIONS: 2 * step,
            M.POLICY_VERSION_LAG_MAX: 3.0 if replayed else math.nan,
            M.POLICY_VERSION_LAG_MEAN: 1.5 if replayed else math.nan,
            "time/rollout": 1.0, "time/reward": 0.2, "time/buffer": 0.01, "time/train": 1.5,
            "time/weight_sync": 0.1, "time/iteration": 3.0 if step % 2 else 2.0,
            "time/elapsed": 2.5 * step}


def _write(path: Path, rows: list[dict], torn: dict | None = None) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if torn is not None:  # the first half of one more row, no newline
        line = json.dumps(torn)
        text += line[: len(line) // 2]
    path.write_text(text)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "full"
    run.mkdir()
    _write(run / "metrics.jsonl", [_row(s) for s in range(1, STEPS + 1)], torn=_row(STEPS + 1))
    evals = [{"step": s, "strict": 0.4 + 0.01 * s, "partial": 0.6, "n_images": 8,
              "per_tag": {"colors": 0.8, "position": math.nan if s == 10 else 0.3},
              "actors": 2, "seconds": 4.0} for s in (0, 10, 20)]
    _write(run / "eval.jsonl", evals, torn={**evals[-1], "step": 24})
    return run


def _texts(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts)


def _xs(ax, label) -> list:
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return list(line.get_xdata())


def test_every_panel_is_drawn_and_torn_lines_are_left_out(run_dir, tmp_path):
    fig = figure([run_dir])
    try:
        axes = fig.axes[:9]
        assert [ax.get_title() for ax in axes] == TITLES
        for ax in axes:
            assert "not logged" not in _texts(ax), ax.get_title()
            assert ax.get_lines() or ax.patches, ax.get_title()
        reward, evaluation, buffer = axes[0], axes[1], axes[6]
        # NaN values are skipped: the replayed reward starts where replay does; the torn row
        # (step 25) is not there
        assert _xs(reward, "replayed")[:3] == [6, 7, 8]
        assert max(max(ln.get_xdata()) for ln in reward.get_lines()) == STEPS
        assert _xs(evaluation, "strict") == [0, 10, 20]  # the torn eval at step 24 is left out
        assert _xs(evaluation, "position") == [0, 20]
        assert {"strict", "colors", "position"} <= {ln.get_label()
                                                    for ln in evaluation.get_lines()}
        twin = [ax for ax in fig.axes[9:] if ax.bbox.bounds == buffer.bbox.bounds]
        assert twin and twin[0].get_lines(), "admissions go on the buffer panel's right axis"
        bars = {t.get_text(): p.get_height()
                for t, p in zip(axes[8].get_xticklabels(), axes[8].patches)}
        assert bars["rollout"] == pytest.approx(1.0)
        assert bars["iteration (total)"] == pytest.approx(2.5)
        assert "elapsed" not in bars
    finally:
        plt.close(fig)
    out = report([run_dir], tmp_path / "out" / "report.png")
    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 1000
    assert out.stat().st_size > 50_000


def test_summary_and_cli(run_dir, tmp_path, capsys):
    text = summary(run_dir)
    assert f"last step {STEPS} (reward {0.3 + 0.01 * STEPS:.3f})" in text
    assert "2.50 s/iteration over 24 steps" in text
    assert "last eval at step 20: strict 0.600 (colors 0.800, position 0.300)" in text
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.png")]) == 0
    printed = capsys.readouterr().out
    assert text in printed and "report written to" in printed
    assert (tmp_path / "r.png").stat().st_size > 0


def test_a_run_with_missing_keys_still_reports(run_dir, tmp_path):
    """An older or partial run: only a few keys, no eval.jsonl; and two runs in one report."""
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    _write(sparse / "metrics.jsonl", [{"step": s, M.REWARD_FRESH_MEAN: 0.5, M.LOSS_TOTAL: 1.0}
                                      for s in (1, 2, 3)])
    fig = figure([sparse])
    try:
        axes = fig.axes[:9]
        drawn = {ax.get_title() for ax in axes if ax.get_lines() or ax.patches}
        assert drawn == {"reward: fresh vs replayed samples", "loss"}
        assert all(_texts(ax).startswith("not logged\n") for ax in axes
                   if ax.get_title() not in drawn)
        assert "not logged: loss/policy" in _texts(axes[2])
        assert "reward/replayed_mean" in _texts(axes[0])
        assert "eval.jsonl" in _texts(axes[1]) and "time/*" in _texts(axes[8])
    finally:
        plt.close(fig)
    assert summary(sparse).splitlines()[1:] == ["  last step 3", "  no evaluation logged"]
    out = report([run_dir, sparse], tmp_path / "both.png")
    assert out.stat().st_size > 0
    fig = figure([run_dir, sparse])
    try:
        assert {"full: fresh", "sparse: fresh", "full: replayed"} <= {
            ln.get_label() for ln in fig.axes[0].get_lines()}
    finally:
        plt.close(fig)


def test_an_empty_or_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        report([tmp_path / "nothing"], tmp_path / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty / "metrics.jsonl", [], torn=_row(1))  # killed while writing its first row
    assert report([empty], tmp_path / "e.png").stat().st_size > 0
    assert "no step logged yet" in summary(empty)
