"""OP-GRPO's step saving where its mechanism applies: the hard shapes prompts, clipping active.

Section 1 of docs/benchmarks.md found no step saving on the shipped shapes prompts, where the base
model fails only 7-8% of its groups as a whole. This benchmark trains on the prompts the base
model fails most (`bench/hard_prompts.py`: solved at most 1 in 8 times), evaluates on hard
held-out test prompts of the same tags, and runs Flow-GRPO's two optimizer steps per batch so
that the clip range is active. Evaluations use 16 images per test prompt and 20 ODE steps (half
the usual 40, so that 13 evaluations of 16 images cost less than the training): the eval noise
is measured with `noise`.

Arms (seeds 0, 1, 2 unless said, paired by seed: the same seed draws the same prompts and image
seeds in every arm):
- `grpo`: on-policy GRPO (rho 0);
- `opgrpo`: the paper's defaults (rho 0.125, sequence correction, K = 7 of 10, uniform draw);
- `none`, `naive`: OP-GRPO with the correction ablated (`learner.correction`);
- `rescue`: OP-GRPO with replays chosen after scoring (`buffer.replay_draw: rescue`): a group
  whose fresh samples failed whole gets its prompt's stored success in place of one of them;
- `need` (seed 0 only): OP-GRPO drawing buffer prompts by how often their latest fresh group
  failed (`buffer.replay_draw: fail_rate`), the first attempt at the same aim.

Every run is a real `opgrpo train` of `configs/shapes_tiny.yaml` with the overrides below, in
`bench/runs/hard_regime/<name>/`; an interrupted run resumes from its latest checkpoint, a
finished run is skipped, and each finished run's curves go at once to
`bench/results/hard_regime/<name>.json`, so the benchmark completes over several sittings.
Runs use one torch thread each (sync mode), so two can share the machine: the step counts do
not depend on timing; seconds per step are compared only between runs made the same way.

    python bench/hard_regime.py run [--only grpo-s0 ...]    # run/resume what is not done
    python bench/hard_regime.py noise RUN STEP              # eval noise: a checkpoint, 2 seeds
    python bench/hard_regime.py timing [--arms grpo ...]    # s/step per arm, machine alone
    python bench/hard_regime.py report [--docs]             # JSON + PNG (+ docs tables)
    python bench/hard_regime.py list
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
from train_runner import read_rows, train_or_resume

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "hard_regime"
RESULTS = ROOT / "bench" / "results" / "hard_regime"
SUMMARY = ROOT / "bench" / "results" / "hard_regime.json"
CONFIG = "configs/shapes_tiny.yaml"
STEPS, EVAL_EVERY, EVAL_IMAGES, EVAL_ODE_STEPS = 300, 25, 16, 20
SEEDS = (0, 1, 2)
COMMON = ["train.prompts_file=configs/shapes/hard_train_metadata.jsonl",
          "train.eval_prompts_file=configs/shapes/hard_test_metadata.jsonl",
          f"train.eval_images_per_prompt={EVAL_IMAGES}",
          f"sampling.eval_num_steps={EVAL_ODE_STEPS}", "learner.learning_rate=1e-5",
          "learner.optimizer_steps_per_pass=2", "train.mode=sync", "run.torch_threads=1",
          "train.checkpoint_every=25", "train.keep_checkpoints=20"]
ARMS = {
    "grpo": ["buffer.off_policy_fraction=0"],
    "opgrpo": [],
    "rescue": ["buffer.replay_draw=rescue"],
    "none": ["learner.correction=none"],
    "naive": ["learner.correction=naive"],
    "need": ["buffer.replay_draw=fail_rate"],
}
# `need` (the first design beyond the paper) ran seed 0 only: its replays landed in masked
# groups no more often than the uniform draw's (docs/benchmarks.md section 8), so `rescue`,
# which chooses its replays after scoring, took its place in the seed matrix
ARM_SEEDS = {**{arm: SEEDS for arm in ARMS}, "need": (0,)}
# seed-major: the paired GRPO / OP-GRPO / rescue comparison of a seed comes first
RUNS_DEFINED = {f"{arm}-s{seed}": [f"run.seed={seed}", *overrides]
                for seed in SEEDS for arm, overrides in ARMS.items() if seed in ARM_SEEDS[arm]}
KEPT = ("reward/mean", "reward/fresh_mean", "reward/replayed_mean", "reward/dataset_prompts_mean",
        "loss/clipfrac", "loss/clipfrac_offpolicy", "loss/seq_weight_mean", "loss/seq_weight_max",
        "loss/approx_kl", "loss/kl", "adv/masked_fraction", "buffer/size",
        "buffer/replayed_prompt_fraction", "buffer/replay_fresh_masked_fraction",
        "buffer/replay_rescued_fraction",
        "policy/version_lag_max", "time/iteration")


# Timing runs: each arm's accuracy-run settings (seed 0, one torch thread) for TIMING_STEPS steps
# without evaluations, run one at a time with the machine to themselves; their seconds per step
# turn the accuracy runs' steps into training wall-clock (the accuracy runs share the machine,
# so their own clocks are not comparable). Seconds per step: the mean over steps
# TIMING_SKIP + 1 on (the buffer fills and replay starts in the first steps).
TIMING_STEPS, TIMING_SKIP = 40, 10
TIMING_RUNS = RUNS.parent / "hard_regime_timing"
TIMING_RESULTS = RESULTS.parent / "hard_regime_timing.json"


def time_arm(arm: str) -> dict:
    """One timing run of `arm` (or its saved result): seconds per training step."""
    saved = json.loads(TIMING_RESULTS.read_text()) if TIMING_RESULTS.is_file() else {}
    if arm in saved:
        return saved[arm]
    name = f"time-{arm}"
    overrides = [*COMMON, "run.seed=0", *ARMS[arm], f"run.name={name}",
                 f"run.output_dir={TIMING_RUNS.relative_to(ROOT)}",
                 f"train.num_steps={TIMING_STEPS}", "train.eval_prompts_file=null",
                 f"train.checkpoint_every={TIMING_STEPS}"]
    if (TIMING_RUNS / name).exists():  # a timing run is not resumed: a resume is not steady
        shutil.rmtree(TIMING_RUNS / name)
    train_or_resume(ROOT, TIMING_RUNS / name, CONFIG, overrides)
    rows = read_rows(TIMING_RUNS / name / "metrics.jsonl")
    steady = np.array([r["time/iteration"] for r in rows[TIMING_SKIP:]], dtype=float)
    result = {"overrides": overrides, "steps": len(rows), "steps_averaged": len(steady),
              "mean_s_per_step": float(steady.mean()), "std_s_per_step": float(steady.std())}
    saved[arm] = result
    TIMING_RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    return result


def _finished(name: str) -> bool:
    return (RESULTS / f"{name}.json").is_file()


def run_one(name: str) -> dict:
    overrides = [*COMMON, *RUNS_DEFINED[name], f"run.name={name}",
                 f"run.output_dir={RUNS.relative_to(ROOT)}", f"train.num_steps={STEPS}",
                 f"train.eval_every={EVAL_EVERY}"]
    train_or_resume(ROOT, RUNS / name, CONFIG, overrides)
    rows = read_rows(RUNS / name / "metrics.jsonl")
    evals = read_rows(RUNS / name / "eval.jsonl")
    result = {"name": name, "overrides": overrides, "config": CONFIG, "steps": len(rows),
              "eval": [{"step": e["step"], "strict": e["strict"], "partial": e["partial"],
                        "per_tag": e.get("per_tag", {})} for e in evals],
              "metrics": {key: [r.get(key) for r in rows] for key in KEPT}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result) + "\n")
    return result


def eval_noise(name: str, step: int, seeds: tuple[int, int] = (1000, 2000)) -> dict:
    """Strict accuracy of one checkpoint on the hard test prompts with two sets of image seeds
    (as many images as a training-time evaluation): the eval noise the curves carry."""
    import torch

    from opgrpo.config import load_config
    from opgrpo.evaluate import EvalSettings, evaluate
    from opgrpo.export import WEIGHTS_FILE, checkpoint_tag, load_trainable
    from opgrpo.models import FlowPolicy
    from opgrpo.prompts import load_prompts

    run_dir = RUNS / name
    config = load_config(run_dir / "config.yaml")
    policy = FlowPolicy.from_config(config)
    state, _ = load_trainable(run_dir / "checkpoints" / checkpoint_tag(run_dir, step)
                              / WEIGHTS_FILE)
    policy.load_trainable_state_dict(state)
    records = load_prompts(ROOT / config.train.eval_prompts_file)
    torch.set_num_threads(2)
    out = {}
    for seed in seeds:
        settings = EvalSettings(EVAL_IMAGES, config.sampling.eval_num_steps,
                                config.sampling.eval_guidance_scale, seed,
                                height=config.model.height, width=config.model.width)
        summary, _, _ = evaluate(policy, records, "shapes", settings)
        out[f"seed{seed}"] = summary["strict"]
    values = list(out.values())
    result = {"run": name, "step": step, "images": EVAL_IMAGES * len(records), **out,
              "difference": abs(values[0] - values[1]),
              # binomial standard error of one evaluation at this accuracy and image count
              "binomial_se": float(np.sqrt(values[0] * (1 - values[0])
                                           / (EVAL_IMAGES * len(records))))}
    (RESULTS.parent / "hard_regime_eval_noise.json").write_text(json.dumps(result, indent=2))
    return result


def _smooth(values: np.ndarray, window: int = 3) -> np.ndarray:
    return np.array([values[max(0, i - window + 1): i + 1].mean() for i in range(len(values))])


def _curve(result: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([e["step"] for e in result["eval"]]),
            _smooth(np.array([e["strict"] for e in result["eval"]])))


def _first_reach(curve: np.ndarray, steps: np.ndarray, target: float) -> int | None:
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return int(steps[hit[0]]) if len(hit) else None


def _series(result: dict, key: str) -> np.ndarray:
    values = result["metrics"].get(key) or []
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _nanstat(fn, values: np.ndarray) -> float | None:
    return float(fn(values)) if np.isfinite(values).any() else None


GAIN_FRACTIONS = (0.5, 0.75, 0.9, 1.0)


def _paired_with_grpo(runs: dict, grpo: dict) -> dict:
    """Per seed, against the same seed's GRPO run: the steps each needs to reach a fraction of
    GRPO's gain (its smoothed final minus the base model's accuracy at step 0), their ratio
    (arm / GRPO; None where the arm never gets there), and the mean difference of the raw
    eval accuracies over every evaluation after step 0 (the area between the curves)."""
    fractions: dict = {}
    for fraction in GAIN_FRACTIONS:
        per_seed = {}
        for s, r in runs.items():
            if s not in grpo:
                continue
            g_steps, g_curve = _curve(grpo[s])
            target = float(g_curve[0] + fraction * (g_curve[-1] - g_curve[0]))
            g_reach = _first_reach(g_curve, g_steps, target)
            a_reach = _first_reach(*reversed(_curve(r)), target)
            per_seed[s] = {"target": target, "grpo_steps": g_reach, "arm_steps": a_reach,
                           "ratio": (a_reach / g_reach if a_reach and g_reach else None)}
        fractions[str(fraction)] = per_seed
    area = {}
    for s, r in runs.items():
        if s in grpo:
            mine = np.array([e["strict"] for e in r["eval"]][1:])
            theirs = np.array([e["strict"] for e in grpo[s]["eval"]][1:])
            length = min(len(mine), len(theirs))
            area[s] = float((mine[:length] - theirs[:length]).mean())
    return {"steps_to_fraction_of_grpo_gain": fractions,
            "mean_eval_difference_vs_grpo": area}


def finished_results() -> dict:
    """{run name: its saved result} for every finished run."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
            if p.stem in RUNS_DEFINED}


def report() -> dict:
    """Write the summary JSON and PNG of the finished runs; return the summary."""
    results = finished_results()
    out = summarise(results)
    SUMMARY.write_text(json.dumps(out, indent=2) + "\n")
    if results:
        plot(results, SUMMARY.with_suffix(".png"))
    return out


def summarise(results: dict) -> dict:
    out: dict = {"runs_done": sorted(results),
                 "runs_missing": [n for n in RUNS_DEFINED if n not in results],
                 "settings": {"config": CONFIG, "common_overrides": COMMON, "steps": STEPS,
                              "eval_every": EVAL_EVERY, "eval_images_per_prompt": EVAL_IMAGES},
                 "arms": {}, "per_run": {}}
    hard = ROOT / "bench" / "results" / "hard_prompts.json"
    if hard.is_file():
        out["prompt_sets"] = json.loads(hard.read_text())["sets"]
    for name, r in results.items():
        steps, curve = _curve(r)
        iteration = _series(r, "time/iteration")
        out["per_run"][name] = {
            "final_strict_smoothed": float(curve[-1]),
            "masked_group_fraction_mean": _nanstat(np.nanmean, _series(r, "adv/masked_fraction")),
            "clipfrac": _nanstat(np.nanmean, _series(r, "loss/clipfrac")),
            "clipfrac_offpolicy": _nanstat(np.nanmean, _series(r, "loss/clipfrac_offpolicy")),
            # replayed groups whose fresh samples alone would be masked, and of those the
            # ones the replayed sample un-masked (binary reward: all fresh failed, replay won)
            "replay_fresh_masked_fraction": _nanstat(
                np.nanmean, _series(r, "buffer/replay_fresh_masked_fraction")),
            "replay_rescued_fraction": _nanstat(
                np.nanmean, _series(r, "buffer/replay_rescued_fraction")),
            "seq_weight_mean": _nanstat(np.nanmean, _series(r, "loss/seq_weight_mean")),
            "seq_weight_max": _nanstat(np.nanmax, _series(r, "loss/seq_weight_max")),
            "version_lag_max": _nanstat(np.nanmax, _series(r, "policy/version_lag_max")),
            "seconds_per_iteration_median": _nanstat(np.nanmedian, iteration),
        }
    for arm in ARMS:
        finals = {s: out["per_run"][f"{arm}-s{s}"]["final_strict_smoothed"] for s in SEEDS
                  if f"{arm}-s{s}" in results}
        if finals:
            out["arms"][arm] = {"final_strict": {"mean": float(np.mean(list(finals.values()))),
                                                 "std": float(np.std(list(finals.values()))),
                                                 "per_seed": finals}}
    # steps to reach GRPO's final accuracy: against the mean over GRPO's seeds, and paired
    # (each seed against the same seed's GRPO final); a seed that never reaches it counts as
    # the whole budget in the censored ratio (a lower bound on the true ratio)
    grpo = {s: results[f"grpo-s{s}"] for s in SEEDS if f"grpo-s{s}" in results}
    if grpo:
        target = float(np.mean([_curve(r)[1][-1] for r in grpo.values()]))
        out["grpo_final_target"] = target
        for arm in ARMS:
            if arm == "grpo":
                continue
            runs = {s: results[f"{arm}-s{s}"] for s in SEEDS if f"{arm}-s{s}" in results}
            if not runs:
                continue
            reach = {s: _first_reach(*reversed(_curve(r)), target) for s, r in runs.items()}
            paired = {s: _first_reach(*reversed(_curve(r)), _curve(grpo[s])[1][-1])
                      for s, r in runs.items() if s in grpo}
            # arm steps / GRPO steps to the same seed's GRPO final, a seed whose arm never
            # gets there counted at the whole budget (so the mean is a lower bound then)
            grpo_own = {s: _first_reach(*reversed(_curve(grpo[s])), _curve(grpo[s])[1][-1])
                        for s in paired}
            ratios = [(STEPS if n is None else n) / grpo_own[s] for s, n in paired.items()]
            final_gap = {s: out["arms"][arm]["final_strict"]["per_seed"][s]
                         - out["arms"]["grpo"]["final_strict"]["per_seed"][s]
                         for s in runs if s in grpo}
            seconds = {}
            for s, r in runs.items():
                if paired.get(s) is not None:
                    seconds[s] = float(np.nansum(_series(r, "time/iteration")[:paired[s]]))
            out["arms"][arm].update(_paired_with_grpo(runs, grpo))
            out["arms"][arm].update({
                "steps_to_grpo_mean_final": reach,
                "steps_to_same_seed_grpo_final": paired,
                "paired_step_ratio": float(np.mean(ratios)) if ratios else None,
                "paired_step_ratio_censored_seeds": sorted(s for s, n in paired.items()
                                                           if n is None),
                "final_minus_same_seed_grpo": final_gap,
                # the run's own clock, shared with other work: not comparable between arms
                # (the top-level timed_* key uses the timing runs)
                "train_seconds_to_same_seed_grpo_final": seconds})
        out["arms"]["grpo"]["train_seconds_total"] = {
            s: float(np.nansum(_series(r, "time/iteration"))) for s, r in grpo.items()}
    noise = RESULTS.parent / "hard_regime_eval_noise.json"
    if noise.is_file():
        out["eval_noise"] = json.loads(noise.read_text())
    if TIMING_RESULTS.is_file() and grpo:
        out["timing"] = json.loads(TIMING_RESULTS.read_text())
        out["timed_train_seconds_to_same_seed_grpo_final"] = _wall_clock(out, grpo)
    return out


def _wall_clock(out: dict, grpo: dict) -> dict:
    """Per arm and seed: steps to the same seed's GRPO final accuracy (GRPO: its own first
    evaluation there) x the arm's seconds per step from its timing run; None where not
    reached or not timed."""
    per_step = {arm: t["mean_s_per_step"] for arm, t in out["timing"].items()}
    wall: dict = {}
    for arm, a in out["arms"].items():
        if arm not in per_step:
            continue
        if arm == "grpo":
            steps = {s: _first_reach(*reversed(_curve(r)), _curve(r)[1][-1])
                     for s, r in grpo.items()}
        else:
            steps = a.get("steps_to_same_seed_grpo_final", {})
        wall[arm] = {s: (None if n is None else n * per_step[arm]) for s, n in steps.items()}
    return wall


DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- hard-regime results -->\n).*?(<!-- /hard-regime results -->)", re.S)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def results_block(out: dict, results: dict) -> str:
    """docs/benchmarks.md section 8's tables, made from the finished runs' saved results."""
    done = [n for n in RUNS_DEFINED if n in results]
    lines = [f"Finished runs: {len(done)} of {len(RUNS_DEFINED)} "
             f"({', '.join(f'`{n}`' for n in done) or 'none'}); made by "
             "`python bench/hard_regime.py report --docs` from "
             "`bench/results/hard_regime/<run>.json`.", "",
             "Eval strict accuracy on the hard test prompts (raw, every "
             f"{EVAL_EVERY} steps from step 0; smoothed final: mean of the last 3):", "",
             "| run | eval strict accuracy | smoothed final |", "|---|---|---|"]
    for name in done:
        curve = " ".join(f"{e['strict']:.3f}".lstrip("0") for e in results[name]["eval"])
        final = out["per_run"][name]["final_strict_smoothed"]
        lines.append(f"| `{name}` | {curve} | {final:.3f} |")
    lines += ["", "Per arm, over its finished seeds (paired with the same seed's GRPO run: "
              "mean difference of the raw accuracies after step 0):", "",
              "| arm | seeds | smoothed final, mean +- std | per seed | "
              "final minus the same seed's GRPO final, mean (per seed) | "
              "mean difference vs GRPO, per seed | steps to the same seed's GRPO final, "
              "arm / GRPO, mean over seeds (paper 0.342; `>`: at least, a seed not there in "
              f"{STEPS} steps, counted at the budget) |", "|---|---|---|---|---|---|---|"]
    for arm, a in out["arms"].items():
        per_seed = " / ".join(f"s{s}: {v:.3f}" for s, v in a["final_strict"]["per_seed"].items())
        diff = a.get("mean_eval_difference_vs_grpo")
        diff = " / ".join(f"s{s}: {v:+.3f}" for s, v in diff.items()) if diff else "-"
        gap = a.get("final_minus_same_seed_grpo")
        gap = (f"{np.mean(list(gap.values())):+.3f} ("
               + " / ".join(f"{v:+.3f}" for v in gap.values()) + ")") if gap else "-"
        ratio = a.get("paired_step_ratio")
        ratio = "-" if ratio is None else (
            (">" if a.get("paired_step_ratio_censored_seeds") else "") + f"{ratio:.2f}")
        lines.append(f"| `{arm}` | {len(a['final_strict']['per_seed'])} | "
                     f"{a['final_strict']['mean']:.3f} +- {a['final_strict']['std']:.3f} | "
                     f"{per_seed} | {gap} | {diff} | {ratio} |")
    lines += ["", "Steps to reach a fraction of the same seed's GRPO gain (GRPO's smoothed curve "
              "from step 0 to its final; curves read at the evaluation grid; ratio = arm / GRPO, "
              "the paper's is 0.342 at the full gain; `-`: not reached in "
              f"{STEPS} steps):", "",
              "| arm | seed | 50% | 75% | 90% | 100% |", "|---|---|---|---|---|---|"]
    for arm, a in out["arms"].items():
        fractions = a.get("steps_to_fraction_of_grpo_gain")
        if not fractions:
            continue
        for s in fractions[str(GAIN_FRACTIONS[0])]:
            cells = []
            for fraction in GAIN_FRACTIONS:
                c = fractions[str(fraction)][s]
                arm_steps = "-" if c["arm_steps"] is None else c["arm_steps"]
                cells.append(f"{arm_steps} vs {c['grpo_steps']} ({_f(c['ratio'], 2)})")
            lines.append(f"| `{arm}` | {s} | " + " | ".join(cells) + " |")
    lines += ["", "Training diagnostics per run (means over the steps; replayed groups: those "
              "that hold a replayed sample):", "",
              "| run | masked groups | clip fraction all / off-policy | replayed groups whose "
              "fresh samples alone are masked | replayed groups the replay un-masks | "
              "w_i mean / max | version lag max | s/step (median) |",
              "|---|---|---|---|---|---|---|---|"]
    for name in done:
        r = out["per_run"][name]
        lines.append(
            f"| `{name}` | {_pct(r['masked_group_fraction_mean'])} | {_f(r['clipfrac'], 4)} / "
            f"{_f(r['clipfrac_offpolicy'], 4)} | {_pct(r['replay_fresh_masked_fraction'])} | "
            f"{_pct(r['replay_rescued_fraction'])} | {_f(r['seq_weight_mean'], 4)} / "
            f"{_f(r['seq_weight_max'], 4)} | {_f(r['version_lag_max'], 0)} | "
            f"{_f(r['seconds_per_iteration_median'], 1)} |")
    if "timing" in out:
        lines += ["", "Training wall-clock to the same seed's GRPO final accuracy: steps to it x "
                  f"the arm's seconds per step from a timing run (seed 0, {TIMING_STEPS} steps, "
                  f"mean of steps {TIMING_SKIP + 1}-{TIMING_STEPS}, one torch thread, alone on "
                  "the machine; evaluations excluded):", "",
                  "| arm | s/step (timing run) | training seconds to GRPO's final, per seed |",
                  "|---|---|---|"]
        for arm, t in out["timing"].items():
            wall = out["timed_train_seconds_to_same_seed_grpo_final"].get(arm, {})
            cells = " / ".join(f"s{s}: {'-' if v is None else f'{v:.0f}'}"
                               for s, v in wall.items()) or "-"
            lines.append(f"| `{arm}` | {t['mean_s_per_step']:.2f} +- "
                         f"{t['std_s_per_step']:.2f} | {cells} |")
    return "\n".join(lines)


def render_doc(out: dict, results: dict) -> str:
    """docs/benchmarks.md with its hard-regime block regenerated."""
    text = DOC.read_text()
    if not BLOCK.search(text):
        raise ValueError(f"{DOC.name} has no <!-- hard-regime results --> block")
    return BLOCK.sub(lambda m: m.group(1) + results_block(out, results) + "\n" + m.group(2),
                     text)


def plot(results: dict, path: Path) -> None:
    """Per arm: the seed-mean smoothed eval curve with the seeds' min-max band; the smoothed
    curve minus the same seed's GRPO curve (paired, so seeds that start apart do not mix into
    the comparison); and the masked-group fraction over training."""
    from plotting import figure, save

    fig, axes = figure(3, figsize=(19, 4.5))
    axes[1].axhline(0.0, color="C0", lw=1)
    for k, arm in enumerate(ARMS):
        runs = [results[f"{arm}-s{s}"] for s in SEEDS if f"{arm}-s{s}" in results]
        if not runs:
            continue
        colour = f"C{k}"
        length = min(len(r["eval"]) for r in runs)
        steps = _curve(runs[0])[0][:length]
        curves = np.array([_curve(r)[1][:length] for r in runs])
        axes[0].plot(steps, curves.mean(0), color=colour, marker="o", ms=3,
                     label=f"{arm} ({len(runs)} seeds)")
        axes[0].fill_between(steps, curves.min(0), curves.max(0), color=colour, alpha=0.15)
        paired = [(_curve(results[f"{arm}-s{s}"])[1], _curve(results[f"grpo-s{s}"])[1])
                  for s in SEEDS if arm != "grpo" and f"{arm}-s{s}" in results
                  and f"grpo-s{s}" in results]
        if paired:
            n = min(min(len(a), len(g)) for a, g in paired)
            diffs = np.array([a[:n] - g[:n] for a, g in paired])
            axes[1].plot(steps[:n], diffs.mean(0), color=colour, marker="o", ms=3,
                         label=f"{arm} ({len(paired)} seeds)")
            axes[1].fill_between(steps[:n], diffs.min(0), diffs.max(0), color=colour,
                                 alpha=0.15)
        masked = np.array([_series(r, "adv/masked_fraction")[:min(r["steps"] for r in runs)]
                           for r in runs])
        window = 25
        smooth = np.array([np.nanmean(masked[:, max(0, i - window + 1): i + 1])
                           for i in range(masked.shape[1])])
        axes[2].plot(np.arange(1, len(smooth) + 1), smooth, color=colour, label=arm)
    axes[0].set(title="hard test prompts: strict accuracy (3-eval trailing mean; band: seeds)",
                xlabel="training step", ylabel="eval strict accuracy")
    axes[1].set(title="minus the same seed's GRPO (smoothed; band: seeds)",
                xlabel="training step", ylabel="accuracy difference")
    axes[2].set(title="masked (all-equal) groups, 25-step mean over seeds",
                xlabel="training step", ylabel="fraction of groups")
    save(fig, axes, path, legend_size=8)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) the runs not finished yet")
    p.add_argument("--only", nargs="+", default=None, choices=list(RUNS_DEFINED))
    n = sub.add_parser("noise", help="evaluate one checkpoint with two image seeds")
    n.add_argument("run", choices=list(RUNS_DEFINED))
    n.add_argument("step", type=int)
    r = sub.add_parser("report", help="write the summary JSON and PNG from finished runs")
    r.add_argument("--docs", action="store_true",
                   help="also rewrite the results tables of docs/benchmarks.md section 8")
    t = sub.add_parser("timing", help="seconds per step of each arm (run alone on the machine)")
    t.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    sub.add_parser("list", help="which runs are finished")
    args = parser.parse_args()
    if args.command == "list":
        for name in RUNS_DEFINED:
            print(f"{'done' if _finished(name) else 'todo'}  {name}")
        return
    if args.command == "noise":
        print(json.dumps(eval_noise(args.run, args.step), indent=2))
        return
    if args.command == "timing":
        for arm in args.arms:
            print(json.dumps({arm: time_arm(arm)}), flush=True)
    if args.command == "run":
        for name in args.only or list(RUNS_DEFINED):
            if not _finished(name):
                run_one(name)
                print(json.dumps(report()["per_run"].get(name)), flush=True)
    out = report()
    if getattr(args, "docs", False):
        DOC.write_text(render_doc(out, finished_results()))
        print(f"rewrote the hard-regime tables of {DOC.relative_to(ROOT)}", file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
