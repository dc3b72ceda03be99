"""`opgrpo report RUN [RUN ...]`: reward and accuracy curves and the time breakdown, as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from opgrpo import metrics as M  # noqa: E402

PHASES = ("rollout", "reward", "buffer", "train", "weight_sync")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def report(runs: list[str | Path], out: str | Path) -> Path:
    """Draw training reward, eval accuracy and per-phase seconds of each run into one PNG."""
    runs = [Path(r) for r in runs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run / 'metrics.jsonl'} is missing: not a run directory")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in runs:
        rows = read_jsonl(run / "metrics.jsonl")
        steps = [r["step"] for r in rows]
        rewards = [r[M.REWARD_MEAN] for r in rows]
        line = axes[0].plot(steps, _smooth(rewards), label=run.name)[0]
        axes[0].plot(steps, rewards, alpha=0.25, color=line.get_color())
        evals = read_jsonl(run / "eval.jsonl")
        if evals:
            key = "strict" if "strict" in evals[0] else next(
                k for k, v in evals[0].items() if isinstance(v, float))
            axes[1].plot([e["step"] for e in evals], [e[key] for e in evals], marker="o",
                         label=f"{run.name} ({key})")
    axes[0].set(title="training reward (mean; line: 10-step average)", xlabel="step")
    axes[1].set(title="evaluation (ODE samples of eval prompts)", xlabel="step")
    last = read_jsonl(runs[0] / "metrics.jsonl")
    shares = [sum(r.get(f"time/{p}", 0.0) for r in last) / max(1, len(last)) for p in PHASES]
    axes[2].bar(PHASES, shares, color="tab:gray")
    axes[2].set(title=f"seconds per iteration by phase ({runs[0].name})", ylabel="s")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
