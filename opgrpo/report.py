"""`opgrpo report RUN [RUN ...]`: the panels a user watches during a run, in one PNG, and a
short text summary per run.

Panels (metric keys from `opgrpo.metrics`): reward (fresh vs replayed samples), evaluation
(the main score and each prompt tag), loss, KL, clip fraction (all and off-policy), sequence
weights w_i, buffer size and admissions, version lag, and the seconds per iteration of each
phase (`time/*`). A key no run logged leaves its panel saying "not logged"; NaN and missing
values are skipped. A torn last line of metrics.jsonl or eval.jsonl (a run killed while it
wrote) is left out, so a running or crashed run can be reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from opgrpo import metrics as M  # noqa: E402

PHASES = ("rollout", "reward", "buffer", "train", "weight_sync")
# eval.jsonl columns that are bookkeeping, not scores
EVAL_BOOKKEEPING = {"step", "actors", "seconds", "n_images"}
SMOOTH = 10


@dataclass
class Panel:
    title: str
    keys: tuple[str, ...]
    right: tuple[str, ...] = ()  # keys drawn against a second y axis (another scale)
    ylabel: str = ""
    labels: dict[str, str] = field(default_factory=dict)


PANELS = (
    Panel("reward: fresh vs replayed samples", (M.REWARD_FRESH_MEAN, M.REWARD_REPLAYED_MEAN),
          labels={M.REWARD_FRESH_MEAN: "fresh", M.REWARD_REPLAYED_MEAN: "replayed"}),
    Panel("loss", (M.LOSS_TOTAL, M.LOSS_POLICY)),
    Panel("KL", (M.LOSS_KL, M.LOSS_APPROX_KL)),
    Panel("clip fraction", (M.LOSS_CLIPFRAC, M.LOSS_CLIPFRAC_OFFPOLICY),
          labels={M.LOSS_CLIPFRAC: "all", M.LOSS_CLIPFRAC_OFFPOLICY: "off-policy"}),
    Panel("sequence weight w_i", (M.LOSS_SEQ_WEIGHT_MEAN, M.LOSS_SEQ_WEIGHT_MAX),
          labels={M.LOSS_SEQ_WEIGHT_MEAN: "mean", M.LOSS_SEQ_WEIGHT_MAX: "max"}),
    Panel("buffer", (M.BUFFER_SIZE,), right=(M.BUFFER_ADMISSIONS,), ylabel="entries",
          labels={M.BUFFER_SIZE: "size", M.BUFFER_ADMISSIONS: "admissions (total, right)"}),
    Panel("version lag of replayed samples", (M.POLICY_VERSION_LAG_MAX,
                                              M.POLICY_VERSION_LAG_MEAN), ylabel="versions",
          labels={M.POLICY_VERSION_LAG_MAX: "max", M.POLICY_VERSION_LAG_MEAN: "mean"}),
)


def read_jsonl(path: Path) -> list[dict]:
    """Complete rows of a JSON-lines file ([] if it does not exist; a torn last line is left
    out)."""
    return M.read_rows(path)


def _finite(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` where it is a finite number."""
    pairs = [(r["step"], float(r[key])) for r in rows if "step" in r and _finite(r.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _smooth(values: list[float], window: int = SMOOTH) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def eval_key(rows: list[dict]) -> str | None:
    """The main score of eval.jsonl rows: `strict` if logged, else the first numeric column."""
    for row in rows:
        if _finite(row.get("strict")):
            return "strict"
    for row in rows:
        for key, value in row.items():
            if key not in EVAL_BOOKKEEPING and _finite(value):
                return key
    return None


def _tags(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row.get("per_tag"), dict):
            seen.update(dict.fromkeys(row["per_tag"]))
    return list(seen)


def _not_logged(ax, keys) -> None:
    ax.text(0.5, 0.5, "not logged\n" + "\n".join(keys), ha="center", va="center",
            transform=ax.transAxes, color="gray", fontsize=9)


def _line(ax, steps, values, label, color=None, marker=None):
    """The values faint, their running mean (SMOOTH steps) drawn over them."""
    if len(values) > SMOOTH and marker is None:
        line = ax.plot(steps, _smooth(values), label=label, color=color)[0]
        ax.plot(steps, values, alpha=0.25, color=line.get_color())
    else:
        ax.plot(steps, values, label=label, color=color, marker=marker or ".")


def _draw_panel(ax, panel: Panel, runs: list[tuple[str, list[dict]]]) -> None:
    multi = len(runs) > 1
    axes = {k: ax for k in panel.keys}
    if panel.right:
        twin = ax.twinx()
        axes.update({k: twin for k in panel.right})
    missing, colors = [], iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 8)
    for key, target in axes.items():
        drawn = False
        for name, rows in runs:
            steps, values = _series(rows, key)
            if not values:
                continue
            label = panel.labels.get(key, key)
            _line(target, steps, values, f"{name}: {label}" if multi else label, next(colors))
            drawn = True
        if not drawn:
            missing.append(key)
    ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
    if len(missing) == len(axes):
        _not_logged(ax, missing)
        return
    if missing:
        ax.text(0.01, 0.01, "not logged: " + ", ".join(missing), transform=ax.transAxes,
                color="gray", fontsize=7, va="bottom")
    handles, labels = [], []
    for target in {id(a): a for a in axes.values()}.values():
        h, lab = target.get_legend_handles_labels()
        handles += h
        labels += lab
    ax.legend(handles, labels, fontsize=7)
    ax.grid(alpha=0.3)


def _draw_eval(ax, runs: list[tuple[str, list[dict]]]) -> None:
    """The main score (thick, with markers) and each tag's score per evaluation."""
    multi, drawn = len(runs) > 1, False
    for name, evals in runs:
        key = eval_key(evals)
        if key is None:
            continue
        steps, values = _series(evals, key)
        prefix = f"{name}: " if multi else ""
        line = ax.plot(steps, values, marker="o", linewidth=2.2, label=f"{prefix}{key}")[0]
        drawn = True
        for tag in _tags(evals):
            pairs = [(e["step"], float(e["per_tag"][tag])) for e in evals
                     if isinstance(e.get("per_tag"), dict) and _finite(e["per_tag"].get(tag))]
            if pairs:
                ax.plot(*zip(*pairs), marker=".", linewidth=0.9, alpha=0.8,
                        linestyle="--" if multi else "-",
                        color=line.get_color() if multi else None, label=f"{prefix}{tag}")
    ax.set(title="evaluation (ODE samples of the eval prompts)", xlabel="step")
    if not drawn:
        _not_logged(ax, ["eval.jsonl"])
        return
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)


def time_keys(rows: list[dict]) -> list[str]:
    """`time/*` columns of per-iteration seconds (not the cumulative `time/elapsed`): the
    driver's phases first, then the rest in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update((k, None) for k in row if k.startswith("time/") and k != "time/elapsed")
    phases = [f"time/{p}" for p in PHASES if f"time/{p}" in seen]
    return phases + [k for k in seen if k not in phases]


def _draw_times(ax, runs: list[tuple[str, list[dict]]]) -> None:
    """Mean seconds per iteration of every `time/*` column, one bar per run."""
    keys = time_keys([r for _, rows in runs for r in rows])
    ax.set(title="seconds per iteration by phase (mean)", ylabel="s")
    if not keys:
        _not_logged(ax, ["time/*"])
        return
    width = 0.8 / len(runs)
    for i, (name, rows) in enumerate(runs):
        means = []
        for key in keys:
            values = _series(rows, key)[1]
            means.append(sum(values) / len(values) if values else 0.0)
        ax.bar([x + i * width for x in range(len(keys))], means, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    names = {"time/iteration": "iteration (total)"}
    ax.set_xticklabels([names.get(k, k.removeprefix("time/")) for k in keys], rotation=35,
                       ha="right", fontsize=8)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _load(run: Path) -> tuple[list[dict], list[dict]]:
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} is missing: not a run directory")
    return read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "eval.jsonl")


def figure(runs: list[str | Path]):
    """The report's figure: 3 x 3 panels (row by row: reward, evaluation, loss, KL, clip
    fraction, w_i, buffer, version lag, phase times)."""
    loaded = [(Path(run).name, *_load(Path(run))) for run in runs]
    metrics = [(name, rows) for name, rows, _ in loaded]
    fig, grid = plt.subplots(3, 3, figsize=(18, 13))
    axes = list(grid.flat)
    _draw_panel(axes[0], PANELS[0], metrics)
    _draw_eval(axes[1], [(name, evals) for name, _, evals in loaded])
    for ax, panel in zip(axes[2:8], PANELS[1:]):
        _draw_panel(ax, panel, metrics)
    _draw_times(axes[8], metrics)
    fig.suptitle("  |  ".join(f"{name}: {len(rows)} steps" for name, rows in metrics))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def report(runs: list[str | Path], out: str | Path) -> Path:
    """Draw every panel for the runs into one PNG; returns its path."""
    fig = figure(runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary(run: str | Path) -> str:
    """A few lines on a run: last step, last evaluation, mean seconds per iteration."""
    run = Path(run)
    rows, evals = _load(run)
    lines = [f"{run.name}:"]
    if rows:
        last = rows[-1]
        seconds = _series(rows, "time/iteration")[1]
        reward = last.get(M.REWARD_MEAN)
        lines.append(f"  last step {last['step']}"
                     + (f" (reward {reward:.3f})" if _finite(reward) else "")
                     + (f", {sum(seconds) / len(seconds):.2f} s/iteration over {len(seconds)}"
                        " steps" if seconds else ""))
    else:
        lines.append("  no step logged yet")
    key = eval_key(evals)
    scored = [e for e in evals if key is not None and _finite(e.get(key))]
    if scored:
        last = scored[-1]
        tags = last.get("per_tag") if isinstance(last.get("per_tag"), dict) else {}
        per_tag = ", ".join(f"{t} {v:.3f}" for t, v in tags.items() if _finite(v))
        lines.append(f"  last eval at step {last['step']}: {key} {last[key]:.3f}"
                     + (f" ({per_tag})" if per_tag else ""))
    else:
        lines.append("  no evaluation logged")
    return "\n".join(lines)
