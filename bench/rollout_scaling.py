"""Rollout scaling on the tiny model: images/s with 1 and 2 rollout actors on this machine.

Real `RolloutWorker` actors (the shipped shapes model, the tiny recipe's 10 SDE steps) generate
the same workload, chunks handed out round-robin as the driver does; images/s counts decoded
final samples per second of wall-clock. Each actor gets `cores / N` torch threads (and, as a
variant, every actor all cores: oversubscribed).

    python bench/rollout_scaling.py --actors 1 2 --chunks 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def measure(n_actors: int, threads: int, args) -> dict:
    import ray

    from actors.rollout import RolloutWorker
    from opgrpo.config import load_config
    from opgrpo.prompts import load_prompts
    from opgrpo.sampling import trajectory_seed

    config = load_config(str(ROOT / args.config), [
        f"run.torch_threads={threads}", f"model.path={ROOT / 'tasks/shapes/shapes-base'}"])
    prompts = load_prompts(str(ROOT / config.train.prompts_file))
    actor_cls = ray.remote(RolloutWorker).options(num_cpus=0)
    actors = [actor_cls.remote(config.model_dump(mode="json"), i) for i in range(n_actors)]
    ray.get([a.ready.remote() for a in actors])

    def chunk(c: int):
        rows = [prompts[(c * args.chunk_size + j) % len(prompts)] for j in range(args.chunk_size)]
        seeds = [trajectory_seed(0, "scaling", c, j) for j in range(args.chunk_size)]
        return actors[c % n_actors].generate.options(num_returns=3).remote(
            [r.text for r in rows], [r.key for r in rows], seeds)[1]

    ray.get([chunk(c) for c in range(n_actors)])  # warm-up: one chunk per actor
    start = time.perf_counter()
    images = ray.get([chunk(c) for c in range(args.chunks)])
    elapsed = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    n_images = sum(len(i) for i in images)
    return {"rollout_actors": n_actors, "torch_threads_per_actor": threads,
            "images": n_images, "seconds": elapsed, "images_per_s": n_images / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shapes_tiny.yaml")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()
    import ray

    cores = os.cpu_count() or 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for n in args.actors:
            variants = {1, max(1, cores // n), cores}  # 1 thread: per-core efficiency
            for threads in sorted(variants):
                results.append(measure(n, threads, args))
                print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"settings": vars(args), "machine": {"cpus": cores, "platform": platform.platform()},
           "results": results}
    (RESULTS / "rollout_scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'rollout_scaling.json'}")


if __name__ == "__main__":
    main()
