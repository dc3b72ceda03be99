"""Soak: memory of every process over a long run with the buffer full and constant replacement.

A real training run of the tiny shapes task (`configs/shapes_tiny.yaml`: Ray actors, embedded
Redis, DeepSpeed learner) with a small buffer (capacity 8 < prompts seen, rho 0.25), so that
nearly every step replaces entries, and a checkpoint every 25 steps, so that the entries kept
for an exact resume pile up and are purged again. Every `--every` steps it records the resident
set of the driver, each rollout and reward actor, the learner rank(s) and the buffer actor
(psutil), and Redis's own `used_memory` / `used_memory_rss` and key count (INFO).

The verdict per process: the growth from step 50 (after warm-up: allocator pools, compiled
kernels, the first checkpoint) to the end, in MB and in MB per 100 steps.

    python bench/soak.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def _rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / MB
    except psutil.NoSuchProcess:
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50, help="growth is measured after this")
    parser.add_argument("--torch-threads", type=int, default=2,
                        help="torch threads per process (2: what the soak in docs/benchmarks.md "
                        "ran with, the synchronous phases taking both cores in turn)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from rich.progress import Progress

    from opgrpo.config import load_config
    from opgrpo.driver import Iteration
    from opgrpo.train import Trainer

    tmp = tempfile.mkdtemp(prefix="opgrpo-soak-")
    config = load_config(ROOT / "configs" / "shapes_tiny.yaml", [
        f"run.output_dir={tmp}", "run.name=soak", f"train.num_steps={args.steps}",
        f"buffer.capacity={args.capacity}", "buffer.off_policy_fraction=0.25",
        "train.checkpoint_every=25", "train.eval_prompts_file=null", "train.mode=sync",
        f"run.torch_threads={args.torch_threads}"])
    trainer = Trainer(config, Path(tmp) / "soak")
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             namespace="opgrpo")
    samples, rows = [], []
    try:
        trainer.prepare()
        iteration = Iteration(trainer.config, trainer.rollout, trainer.rewards, trainer.buffer)

        def processes() -> dict[str, int]:
            found = {"driver": os.getpid(),
                     "buffer actor": ray.get(trainer.buffer.identity.remote())["pid"]}
            for i, w in enumerate(trainer.rollout.workers):
                found[f"rollout actor {i}"] = ray.get(w.identity.remote())["pid"]
            for i, w in enumerate(trainer.rewards.workers):
                found[f"reward actor {i}"] = ray.get(w.identity.remote())["pid"]
            for i, w in enumerate(trainer.learners.workers):
                found[f"learner rank {i}"] = ray.get(w.identity.remote())["pid"]
            return found

        pids = processes()
        started = time.perf_counter()
        with Progress() as progress:
            task = progress.add_task("soak", total=args.steps)
            for step in range(1, args.steps + 1):
                row = trainer.step(iteration, step)
                rows.append({k: row[k] for k in ("step", "time/iteration", "buffer/size",
                                                 "buffer/replacements", "buffer/admissions")})
                if step % config.train.checkpoint_every == 0:
                    trainer.checkpoint(step)
                if step % args.every == 0 or step == 1:
                    redis = ray.get(trainer.buffer.redis_memory.remote())
                    samples.append({"step": step, **{name: _rss_mb(pid)
                                                     for name, pid in pids.items()},
                                    "redis used_memory": redis["used_memory"] / MB,
                                    "redis used_memory_rss": redis["used_memory_rss"] / MB,
                                    "redis keys": redis["keys"]})
                progress.update(task, advance=1)
        elapsed = time.perf_counter() - started
    finally:
        trainer.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)  # the run's checkpoints and Redis files
    names = [k for k in samples[0] if k != "step"]
    steps = np.array([s["step"] for s in samples])
    after = steps >= args.warmup
    verdict = {}
    for name in names:
        values = np.array([s[name] for s in samples], dtype=float)
        slope = np.polyfit(steps[after], values[after], 1)[0] * 100 if after.sum() > 2 else None
        first = values[after][0]
        verdict[name] = {"at_warmup": float(first), "at_end": float(values[-1]),
                         "max_after_warmup": float(values[after].max()),
                         "growth_after_warmup": float(values[-1] - first),
                         "slope_per_100_steps": None if slope is None else float(slope)}
    replacements = rows[-1]["buffer/replacements"]
    out = {"settings": vars(args) | {"config": "configs/shapes_tiny.yaml",
                                     "checkpoint_every": 25, "off_policy_fraction": 0.25},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "elapsed_s": elapsed, "buffer_full_from_step": next(
               (r["step"] for r in rows if r["buffer/size"] >= args.capacity), None),
           "replacements": replacements, "admissions": rows[-1]["buffer/admissions"],
           "verdict": verdict, "samples": samples, "steps": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(out, indent=2) + "\n")
    _plot(samples, names, args.warmup)
    for name, v in verdict.items():
        print(f"{name:>24}: {v['at_warmup']:8.1f} -> {v['at_end']:8.1f} "
              f"(slope {v['slope_per_100_steps']:+.2f} per 100 steps)")
    print(f"wrote {RESULTS / 'soak.json'} and soak.png")


def _plot(samples: list[dict], names: list[str], warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in samples]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in names:
        if name.startswith("redis"):
            continue
        left.plot(steps, [s[name] for s in samples], label=name)
    left.set(xlabel="step", ylabel="resident set (MB)", title="processes")
    left.axvline(warmup, color="grey", ls=":")
    left.legend(fontsize=7)
    right.plot(steps, [s["redis used_memory"] for s in samples], label="used_memory")
    right.plot(steps, [s["redis used_memory_rss"] for s in samples], label="used_memory_rss")
    right.set(xlabel="step", ylabel="MB", title="Redis (checkpoint every 25 steps)")
    right.axvline(warmup, color="grey", ls=":")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "soak.png", dpi=110)


if __name__ == "__main__":
    main()
