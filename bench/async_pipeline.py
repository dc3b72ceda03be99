"""Synchronous against asynchronous training on the shapes task: wall-clock to a target accuracy.

Every run is a real `opgrpo train` of `configs/shapes_tiny.yaml` with section 1's benchmark
recipe (learning rate 1e-5, checkpoints every 25 steps). The wall-clock to a target accuracy
is measured in two parts, so that no number depends on what else the machine was doing, or
on which day (this box's speed changed by 1.6x between two sessions):

* **Accuracy runs** (300 steps, 3 seeds per mode, plus the staleness sweep s = 2, 4, 8 of
  150 steps on seed 0) give accuracy against the step. They do not evaluate while they
  train; `evaluate` scores their checkpoints afterwards with the in-run protocol (127 test
  prompts, 4 ODE images of 40 steps each, the run's fixed seeds; `bench/eval_drift.py`
  reproduces in-run evaluations exactly). A run's numbers do not depend on timing (the async
  schedule depends on the config only, and every side runs one torch thread), so accuracy
  runs may share the machine.
* **Timing runs** (50 steps each, seed 0) give the seconds per step of each mode and the
  busy and idle fractions. `timing` runs them back to back, alone on the machine.

Wall-clock to the target = steps to the target (accuracy run) x seconds per step (timing
run of the same mode, steps 2-50).

Each side owns one core (`run.torch_threads=1`): the rollout actor one, the learner rank one.
That models the deployment the pipeline is for, rollout and learner on separate GPUs, where
synchronous mode leaves one side idle while the other works. `sync2t-s0` measures synchronous
mode with each phase on both cores, the best this 2-core box can do without overlap, and
`async2t-s0` asynchronous mode with both sides on both cores (they compete for them).

    python bench/async_pipeline.py run [--only NAME ...]      # accuracy runs: train, evaluate
    python bench/async_pipeline.py timing                     # timing runs, alone
    python bench/async_pipeline.py evaluate [--only NAME ...] # checkpoints -> eval curves
    python bench/async_pipeline.py report                     # table JSON + PNG

`run` trains each run (resuming a stopped one), evaluates its checkpoints and rewrites the
report before it goes on to the next, so the results (`bench/results/async_pipeline/`: each
run's kept metric series and its eval curve) are complete per run and outlive the run
directories, which hold the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
from train_runner import read_rows, train_or_resume

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "async_pipeline"
RESULTS = ROOT / "bench" / "results" / "async_pipeline"
CONFIG = "configs/shapes_tiny.yaml"
STEPS, EVERY, SEEDS = 300, 25, (0, 1, 2)
# Section 1's benchmark recipe; no evaluation in the run (see the module docstring). The tiny
# recipe trains 2 of 10 steps: re-scoring all 10 steps of a stale sample would cost the
# learner more than its training, so the learner re-scores the trained steps (`async1-all-s0`
# measures the exact variant's cost).
COMMON = ["learner.learning_rate=1e-5", f"train.checkpoint_every={EVERY}",
          "train.eval_prompts_file=null", "learner.stale_rescore=trained"]
ONE_CORE = ["run.torch_threads=1"]
RUNS_DEFINED: dict[str, tuple[list[str], int]] = {}  # name -> (overrides, steps)
for _seed in SEEDS:
    RUNS_DEFINED[f"sync-s{_seed}"] = ([f"run.seed={_seed}", "train.mode=sync", *ONE_CORE], STEPS)
    RUNS_DEFINED[f"async1-s{_seed}"] = ([f"run.seed={_seed}", "train.mode=async",
                                         "train.max_staleness=1", *ONE_CORE], STEPS)
SWEEP, SWEEP_STEPS = (2, 4, 8), 150
for _s in SWEEP:  # the largest staleness that stays stable (seed 0)
    RUNS_DEFINED[f"async{_s}-s0"] = (["run.seed=0", "train.mode=async",
                                      f"train.max_staleness={_s}", *ONE_CORE], SWEEP_STEPS)
TIMING_STEPS = 50
# timing runs -> the accuracy runs' mode they time
TIMING = {
    "time-sync-s0": (["run.seed=0", "train.mode=sync", *ONE_CORE], "sync"),
    "time-async1-s0": (["run.seed=0", "train.mode=async", "train.max_staleness=1", *ONE_CORE],
                       "async1"),
    # both sides on both cores
    "sync2t-s0": (["run.seed=0", "train.mode=sync", "run.torch_threads=2"], "sync"),
    "async2t-s0": (["run.seed=0", "train.mode=async", "train.max_staleness=1",
                    "run.torch_threads=2"], "async1"),
    # the exact re-scoring of every step (`learner.stale_rescore: all`)
    "async1-all-s0": (["run.seed=0", "train.mode=async", "train.max_staleness=1",
                       "learner.stale_rescore=all", *ONE_CORE], "async1"),
}
for _name, (_overrides, _mode) in TIMING.items():
    RUNS_DEFINED[_name] = (_overrides, TIMING_STEPS)
TIMING_ONLY = tuple(TIMING)
ONE_CORE_TIMING = {"sync": "time-sync-s0", "async1": "time-async1-s0"}
SHARED_TIMING = {"sync": "sync2t-s0", "async1": "async2t-s0"}
ORDER = ["async1-s0", "sync-s0", "async1-s1", "sync-s1", "async1-s2", "sync-s2", "async8-s0",
         "async4-s0", "async2-s0"]
# The staleness sweep runs half as long (150 steps) and is judged by its final accuracy (the
# mean of the last 3 evaluations) against async1-s0 and sync-s0 at step 150, and by its
# training curves (reward, KL, clip fraction, sequence weights), so its checkpoints are
# evaluated less often.
SPARSE_EVAL = (0, 50, 100, 125, 150)
KEPT = ("reward/mean", "reward/dataset_prompts_mean", "loss/approx_kl", "loss/kl",
        "loss/clipfrac", "loss/seq_weight_mean", "loss/seq_weight_max",
        "policy/staleness_max", "policy/staleness_mean", "policy/rescored_fraction",
        "time/iteration", "time/elapsed", "time/rollout", "time/train", "time/rollout_busy",
        "time/learner_compute", "time/learner_rescore", "time/weight_sync", "actors/rollout")


def run_one(name: str) -> None:
    """Train `name` (or resume it) and keep its metric series in the results."""
    overrides, steps = RUNS_DEFINED[name]
    run_dir = RUNS / name
    if len(read_rows(run_dir / "metrics.jsonl")) < steps:
        full = [*COMMON, *overrides, f"run.name={name}",
                f"run.output_dir={RUNS.relative_to(ROOT)}", f"train.num_steps={steps}"]
        train_or_resume(ROOT, run_dir, CONFIG, full)
    rows = read_rows(run_dir / "metrics.jsonl")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}_metrics.json").write_text(
        json.dumps({k: [r.get(k) for r in rows] for k in KEPT}) + "\n")


def evaluate_run(name: str, threads: int) -> dict:
    """Eval strict accuracy of the run's checkpoints every 25 steps (step 0 = base model),
    saved after each one, so that a stopped evaluation goes on where it was."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from eval_drift import evaluate_model

    from opgrpo.config import load_config
    from opgrpo.export import export_checkpoint

    torch.set_num_threads(threads)
    run_dir = RUNS / name
    config = load_config(run_dir / "config.yaml")
    path = RESULTS / f"{name}_eval.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    steps = (SPARSE_EVAL if name.startswith(tuple(f"async{x}-" for x in SWEEP))
             else range(0, RUNS_DEFINED[name][1] + 1, EVERY))
    for step in steps:
        if str(step) in done:
            continue
        if step == 0 and (base := _base_eval(config.run.seed)) is not None:
            done["0"] = base  # the same base model, prompts and seeds: the same evaluation
            path.write_text(json.dumps(done) + "\n")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            model = (config.model.path if step == 0 else
                     str(export_checkpoint(run_dir, Path(tmp) / "m", step=step,
                                           fused=True)))
            done[str(step)] = evaluate_model(model, ["test_ode40"], config.run.seed)["test_ode40"]
        path.write_text(json.dumps(done) + "\n")
    return done


def _base_eval(seed: int) -> dict | None:
    """Step 0 (the base model) as another run of the same seed evaluated it, if one did."""
    for path in sorted(RESULTS.glob(f"*-s{seed}_eval.json")):
        if "0" in (done := json.loads(path.read_text())):
            return done["0"]
    return None


def _smooth(values: np.ndarray, window: int = 3) -> np.ndarray:
    """Trailing mean over `window` evaluations (section 1's curve)."""
    return np.array([values[max(0, i - window + 1): i + 1].mean() for i in range(len(values))])


def _series(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def summarize(name: str) -> dict | None:
    path = RESULTS / f"{name}_metrics.json"
    if not path.is_file():
        return None
    series = json.loads(path.read_text())
    rows = [dict(zip(series, values)) for values in zip(*series.values())]
    overrides, steps = RUNS_DEFINED[name]
    threads = 2 if "run.torch_threads=2" in overrides else 1
    actors = _series(rows, "actors/rollout")
    iteration = _series(rows, "time/iteration")
    elapsed = _series(rows, "time/elapsed")
    wall = float(elapsed[-1])
    busy = float(np.nansum(_series(rows, "time/rollout_busy")))
    compute = float(np.nansum(_series(rows, "time/learner_compute")))
    out = {
        "name": name, "overrides": [*COMMON, *overrides], "steps_done": len(rows),
        "steps": steps, "torch_threads": threads,
        "median_s_per_step": float(np.median(iteration[1:])),
        "mean_s_per_step": float(np.mean(iteration[1:])),  # steady state: steps 2 on
        "wall_clock_s": wall,
        # busy: actor-seconds of chunk work over actors x wall-clock; idle: wall-clock the
        # learner rank did not spend in `train` (fetching, re-scoring and updating)
        "rollout_busy_fraction": busy / (float(np.nanmean(actors)) * wall),
        "learner_idle_fraction": 1 - compute / wall,
        "staleness_max": float(np.nanmax(_series(rows, "policy/staleness_max"))),
        "rescore_s_mean": float(np.nanmean(_series(rows, "time/learner_rescore"))),
        "metrics": series,
    }
    path = RESULTS / f"{name}_eval.json"
    if path.is_file():
        evals = json.loads(path.read_text())
        steps_eval = sorted(int(s) for s in evals)
        strict = np.array([evals[str(s)]["strict"] for s in steps_eval])
        out["eval_steps"] = steps_eval
        out["eval_strict"] = strict.tolist()
        out["eval_strict_smoothed"] = _smooth(strict).tolist()
        out["elapsed_at_eval"] = [0.0 if s == 0 else float(elapsed[s - 1]) for s in steps_eval
                                  if s <= len(rows)]
    return out


def _grpo_target() -> dict:
    """Section 1's on-policy GRPO (sync, no buffer): its final smoothed eval accuracy."""
    finals = {}
    for seed in SEEDS:
        path = ROOT / "bench" / "results" / "sample_efficiency" / f"grpo-s{seed}.json"
        result = json.loads(path.read_text())
        strict = np.array([e["strict"] for e in result["eval"]])
        finals[seed] = float(_smooth(strict)[-1])
    return {"per_seed": finals, "mean": float(np.mean(list(finals.values())))}


def _reach(summary: dict, target: float) -> int | None:
    """First evaluated step whose smoothed accuracy reaches `target`."""
    for step, value in zip(summary["eval_steps"], summary["eval_strict_smoothed"]):
        if step > 0 and value >= target - 1e-9:
            return step
    return None


def _mode(name: str) -> str:
    return name.rsplit("-s", 1)[0]


def _seconds(step: int | None, per_step: float | None) -> float | None:
    return None if step is None or per_step is None else step * per_step


def report() -> dict:
    """Accuracy runs with their steps to the target, timing runs with their seconds per step,
    and the product of the two per mode (one core per side, and shared cores)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = _grpo_target()
    timing = {name: s for name in TIMING if (s := summarize(name)) is not None}
    one_core = {mode: timing[name]["mean_s_per_step"]
                for mode, name in ONE_CORE_TIMING.items() if name in timing}
    shared = {mode: timing[name]["mean_s_per_step"]
              for mode, name in SHARED_TIMING.items() if name in timing}
    runs = {}
    for name in ORDER:
        summary = summarize(name)
        if summary is None or "eval_strict_smoothed" not in summary:
            continue
        seed, mode = int(name.rsplit("-s", 1)[1]), _mode(name)
        step, paired = _reach(summary, target["mean"]), _reach(summary, target["per_seed"][seed])
        summary.update({
            "reach_target_step": step, "reach_paired_step": paired,
            "reach_target_s": _seconds(step, one_core.get(mode)),
            "reach_paired_s": _seconds(paired, one_core.get(mode)),
            "reach_target_s_shared_cores": _seconds(step, shared.get(mode)),
            "reach_paired_s_shared_cores": _seconds(paired, shared.get(mode)),
            "final_strict_smoothed": float(np.mean(summary["eval_strict"][-3:]))})
        runs[name] = summary
    out = {"target": target, "s_per_step": {"one_core_per_side": one_core,
                                            "shared_cores": shared},
           "timing": timing, "runs": runs, "equal_time": _equal_time(runs, one_core),
           "seed_mean": _seed_mean(runs, target["mean"], one_core)}
    (ROOT / "bench" / "results" / "async_pipeline.json").write_text(json.dumps(out) + "\n")
    plot(runs, out["seed_mean"], target, one_core,
         ROOT / "bench" / "results" / "async_pipeline.png")
    for s in timing.values():
        print(json.dumps({k: s.get(k) for k in (
            "name", "steps_done", "mean_s_per_step", "median_s_per_step",
            "rollout_busy_fraction", "learner_idle_fraction", "staleness_max",
            "rescore_s_mean")}))
    for s in runs.values():
        print(json.dumps({k: s.get(k) for k in (
            "name", "steps_done", "final_strict_smoothed", "reach_target_step",
            "reach_target_s", "reach_paired_step", "reach_paired_s", "staleness_max")}))
    return out


def _seed_mean(runs: dict, target: float, per_step: dict) -> dict:
    """Per mode (sync, async1): the smoothed accuracy averaged over the seeds at each step that
    every seed evaluated, and when that mean curve reaches the target (step and seconds)."""
    out = {}
    for mode in ("sync", "async1"):
        seeds = [runs[name] for seed in SEEDS if (name := f"{mode}-s{seed}") in runs]
        if len(seeds) < len(SEEDS):
            continue
        common = sorted(set.intersection(*(set(s["eval_steps"]) for s in seeds)))
        curve = [float(np.mean([s["eval_strict_smoothed"][s["eval_steps"].index(step)]
                                for s in seeds])) for step in common]
        mean = {"eval_steps": common, "eval_strict_smoothed": curve}
        step = _reach(mean, target)
        out[mode] = {**mean, "reach_target_step": step,
                     "reach_target_s": _seconds(step, per_step.get(mode))}
    return out


def _equal_time(runs: dict, per_step: dict) -> dict:
    """Per seed: in the time the async run takes for all its steps, how far the sync run of
    the same seed gets (the last evaluated step within that time) and its accuracy there."""
    if set(per_step) != {"sync", "async1"}:
        return {}
    out = {}
    for seed in SEEDS:
        fast, slow = runs.get(f"async1-s{seed}"), runs.get(f"sync-s{seed}")
        if not (fast and slow):
            continue
        budget = fast["eval_steps"][-1] * per_step["async1"]
        reached = [i for i, step in enumerate(slow["eval_steps"])
                   if step * per_step["sync"] <= budget]
        i = reached[-1]
        out[str(seed)] = {"seconds": budget, "async_step": fast["eval_steps"][-1],
                          "async_strict": fast["eval_strict_smoothed"][-1],
                          "sync_step": slow["eval_steps"][i],
                          "sync_strict": slow["eval_strict_smoothed"][i]}
    return out


def plot(runs: dict, seed_mean: dict, target: dict, per_step: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"sync": "tab:blue", "async1": "tab:orange", "async2": "tab:green",
               "async4": "tab:red", "async8": "tab:purple"}
    def draw(s: dict, mode: str, **style) -> None:
        if mode in per_step:  # the time axis only for the modes that have a timing run
            ax_time.plot(np.array(s["eval_steps"]) * per_step[mode] / 60,
                         s["eval_strict_smoothed"], **style)
        ax_step.plot(s["eval_steps"], s["eval_strict_smoothed"], **style)

    for name, s in runs.items():
        draw(s, _mode(name), color=colours.get(_mode(name), "grey"), alpha=0.5, linewidth=1,
             label=name)
    for mode, s in seed_mean.items():
        draw(s, mode, color=colours[mode], linewidth=3, label=f"{mode}: mean of 3 seeds")
    for ax in (ax_time, ax_step):
        ax.axhline(target["mean"], color="black", linestyle="--", linewidth=1,
                   label="on-policy GRPO final (3 seeds)")
        ax.set_ylabel("eval strict accuracy (trailing mean of 3)")
    ax_time.set_xlabel("training wall-clock (min): step x seconds per step of the mode")
    ax_step.set_xlabel("step")
    ax_step.legend(fontsize=7, ncol=2)
    fig.suptitle("shapes task: synchronous vs asynchronous OP-GRPO (one core per side)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run", "timing", "evaluate", "report"])
    parser.add_argument("--only", nargs="+", choices=list(RUNS_DEFINED))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of `evaluate`")
    args = parser.parse_args()
    names = args.only or (list(TIMING) if args.action == "timing" else ORDER)
    # SIGTERM stops the runner through its `finally`s: the current run is stopped too and
    # resumes from its last checkpoint next time (background jobs ignore SIGINT)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.action == "run":
        for name in names:
            run_one(name)
            if name not in TIMING_ONLY:
                evaluate_run(name, args.threads)
            report()
    elif args.action == "timing":
        for name in names:
            run_dir = RUNS / name
            if len(read_rows(run_dir / "metrics.jsonl")) < TIMING_STEPS and run_dir.exists():
                shutil.rmtree(run_dir)  # a timing run is not resumed: it starts again
            run_one(name)
        report()
    elif args.action == "evaluate":
        for name in names:
            if name not in TIMING_ONLY:
                evaluate_run(name, args.threads)
    else:
        report()


if __name__ == "__main__":
    main()
