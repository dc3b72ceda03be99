"""Orchestration overhead: measured step time / ideal step time at 1..32 rollout actors.

The real driver (`Trainer.step`: prompt sampling, chunked rollout launch, pipelined reward,
advantages, buffer admission on a real embedded Redis, learner shards, weight sync) runs with
stand-in actors whose compute is a calibrated sleep; everything else is real: Ray actors, object
refs of trajectory arrays of the real size, Arrow-encoded buffer entries, weight dicts pushed
through the object store. The ideal step time is the critical path of the same schedule with
zero overhead (rollout chunks round-robin over the actors, each reward actor FIFO, learner
after the last reward), so the ratio isolates what the system adds. Weak scaling: every rollout
actor gets `--chunks-per-actor` chunks per step, so the batch grows with the actor count.

    python bench/system.py --actors 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


# ----- stand-in actors: real interfaces, compute = sleep ------------------------------------
class SleepRollout:
    """RolloutWorker's interface; `generate`/`regenerate` sleep `per_trajectory_s` per row."""

    def __init__(self, config: dict, worker_index: int = 0, control=None) -> None:
        from opgrpo.config import Config

        self.config = Config.model_validate(config)
        self.bench = json.loads(os.environ["OPGRPO_BENCH"])
        self.version = -1
        self.weights_held: dict[str, np.ndarray] = {}

    def ready(self) -> int:
        return self.version

    def set_weights(self, weights: dict[str, np.ndarray], version: int) -> int:
        # a real actor copies the pushed tensors into its parameters: so does this one
        for name, value in weights.items():
            held = self.weights_held.get(name)
            if held is None or held.shape != value.shape:
                self.weights_held[name] = np.array(value)
            else:
                np.copyto(held, value)
        self.version = version
        return version

    def _trajectories(self, prompts, keys, seeds, replayed=False):
        from opgrpo.trajectory import Trajectory

        steps, shape = self.config.sampling.num_steps, self.bench["latent_shape"]
        out = []
        for prompt, key, seed in zip(prompts, keys, seeds):
            rng = np.random.default_rng(seed % 2**32)
            out.append(Trajectory(
                prompt_key=key, prompt=prompt,
                latents=rng.standard_normal((steps + 1, *shape), dtype=np.float32),
                sigmas=np.linspace(1, 0, steps + 1, dtype=np.float32),
                behaviour_logprobs=np.zeros(steps, np.float32), behaviour_version=self.version,
                noise_level=0.7, seed=int(seed), replayed=replayed,
                off_policy_mask=np.zeros(steps, bool), old_logprobs=np.zeros(steps, np.float32)))
        size = self.config.model.height
        images = np.zeros((len(prompts), size, size, 3), np.uint8)
        return out, images

    def generate(self, prompts, keys, seeds, min_version=None):
        from actors.rollout import chunk_meta

        start = time.time()
        time.sleep(self.bench["rollout_s_per_trajectory"] * len(prompts))
        return (*self._trajectories(prompts, keys, seeds),
                chunk_meta(self.version, start, len(prompts)))

    def regenerate(self, payloads, truncate_step, seeds, min_version=None):
        from actors.rollout import chunk_meta
        from opgrpo.trajectory import decode_trajectories

        start = time.time()
        stored = [t for payload in payloads for t in decode_trajectories(payload)]
        time.sleep(self.bench["rollout_s_per_trajectory"] * len(stored))
        return (*self._trajectories([t.prompt for t in stored], [t.prompt_key for t in stored],
                                    seeds, replayed=True),
                chunk_meta(self.version, start, len(stored)))


class SleepReward:
    """RewardWorker's interface; sleeps `reward_s_per_image` per image, random 0/1 rewards."""

    def __init__(self, functions: dict[str, float], options: dict | None = None,
                 device: str = "auto", num_gpus: float = 0.0) -> None:
        self.bench = json.loads(os.environ["OPGRPO_BENCH"])
        self.calls = 0

    def ready(self) -> bool:
        return True

    def score(self, images, prompts):
        time.sleep(self.bench["reward_s_per_image"] * len(prompts))
        self.calls += 1
        rng = np.random.default_rng(self.calls)
        values = (rng.random(len(prompts)) < 0.5).astype(np.float64)
        return {"sleep": values, "total": values}


class SleepLearner:
    """LearnerWorker's interface; fetches its shard's trajectories, sleeps `learner_s`, and
    exports a weight dict of `weight_bytes` bytes."""

    def __init__(self, config: dict, rank: int, world_size: int) -> None:
        self.bench = json.loads(os.environ["OPGRPO_BENCH"])
        self.rank = rank
        self.version = 0
        n = self.bench["weight_bytes"] // 4
        self.state = {"w": np.zeros(n, np.float32)}

    def address(self):
        return "127.0.0.1", 0

    def setup(self, master_addr: str, master_port: int) -> int:
        return self.state["w"].size

    def train(self, chunks, rows, iteration):
        import ray

        resolved = [ray.get(c) if isinstance(c, ray.ObjectRef) else c for c in chunks]
        touched = sum(resolved[r["chunk"]][r["index"]].latents.nbytes for r in rows)
        time.sleep(self.bench["learner_s"])
        self.version += 1
        self.state["w"][0] = self.version
        return {"bench/bytes_trained": float(touched)}

    def export_weights(self):
        return self.state if self.rank == 0 else None

    def save_checkpoint(self, directory, tag):
        return tag

    def load_checkpoint(self, directory, tag):
        return self.version


# ----- the ideal schedule --------------------------------------------------------------------
def ideal_step_s(chunk_sizes: list[int], n_rollout: int, n_reward: int, bench: dict) -> float:
    """Critical path with zero overhead: chunk c on rollout actor c % N (sequential per actor),
    its reward on reward actor c % M (FIFO), the learner after the last reward."""
    actor_free = [0.0] * n_rollout
    reward_free = [0.0] * n_reward
    done = 0.0
    for c, size in enumerate(chunk_sizes):
        a = c % n_rollout
        actor_free[a] += size * bench["rollout_s_per_trajectory"]
        r = c % n_reward
        reward_free[r] = max(reward_free[r], actor_free[a]) + size * bench["reward_s_per_image"]
        done = max(done, reward_free[r])
    return done + bench["learner_s"]


def measure(n_actors: int, args, bench: dict) -> dict:
    from opgrpo import metrics as M
    from opgrpo.config import load_config
    from opgrpo.driver import Iteration
    from opgrpo.train import Trainer, WorkerClasses

    group = 8
    prompts = n_actors * args.chunks_per_actor * args.chunk_size // group
    n_reward = max(1, n_actors // args.actors_per_reward)
    overrides = [
        f"rollout.num_actors={n_actors}", "rollout.num_cpus=0.01", "reward.num_cpus=0.01",
        "learner.num_cpus=0.01", f"rollout.prompts_per_step={prompts}",
        f"rollout.group_size={group}", f"rollout.chunk_size={args.chunk_size}",
        f"reward.num_actors={n_reward}", "reward.functions={shapes: 1.0}",
        f"learner.micro_batch_size={prompts * group}", "train.eval_prompts_file=null",
        f"buffer.off_policy_fraction={args.rho}", f"run.name=system-{n_actors}",
        "train.mode=sync",  # the synchronous iteration's overhead (section 2)
        "run.torch_threads=2",  # as section 2 ran (the config's setting then)
    ]
    config = load_config(str(ROOT / "configs" / "shapes_tiny.yaml"), overrides)
    config = config.model_copy(update={"model": config.model.model_copy(
        update={"path": str(ROOT / config.model.path)})})
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"prompts_file": str(ROOT / config.train.prompts_file)})})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run",
                          workers=WorkerClasses(SleepRollout, SleepReward, SleepLearner))
        try:
            trainer.prepare()
            iteration = Iteration(trainer.config, trainer.rollout, trainer.rewards,
                                  trainer.buffer)
            rows, ideals = [], []
            for step in range(1, args.warmup + args.iterations + 1):
                row = trainer.step(iteration, step)
                # the chunks this step really had: fresh rows cut by chunk_size, then one
                # chunk of the replayed trajectories (one per replayed prompt)
                n_replay = round(row[M.BUFFER_REPLAYED_FRACTION] * prompts)
                fresh_rows = prompts * group - n_replay
                sizes = [min(args.chunk_size, fresh_rows - s)
                         for s in range(0, fresh_rows, args.chunk_size)]
                if n_replay:
                    sizes.append(n_replay)
                if step > args.warmup:
                    rows.append(row)
                    ideals.append(ideal_step_s(sizes, n_actors, n_reward, bench))
        finally:
            trainer.shutdown()
    measured = np.array([r["time/iteration"] for r in rows])
    ideal = np.array(ideals)
    return {
        "rollout_actors": n_actors, "reward_actors": n_reward, "prompts_per_step": prompts,
        "trajectories_per_step": prompts * group,
        "measured_s": float(measured.mean()), "ideal_s": float(ideal.mean()),
        "ratio": float((measured / ideal).mean()),
        "ratio_max": float((measured / ideal).max()),
        "phases_s": {k: float(np.mean([r[f"time/{k}"] for r in rows]))
                     for k in ("rollout", "reward", "buffer", "train", "weight_sync")},
    }


def plot(results: list[dict], path: Path, target: float) -> None:
    from plotting import figure, save

    fig, ax = figure()
    n = [r["rollout_actors"] for r in results]
    ax.plot(n, [r["ratio"] for r in results], marker="o", label="measured / ideal")
    ax.axhline(target, color="tab:red", ls="--", label=f"target {target}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rollout actors", ylabel="step time ratio",
           title="orchestration overhead (compute = calibrated sleep)")
    save(fig, ax, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--chunks-per-actor", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--actors-per-reward", type=int, default=4)
    parser.add_argument("--rollout-s", type=float, default=0.0625,
                        help="sleep per trajectory (0.5 s per 8-trajectory chunk)")
    parser.add_argument("--reward-s", type=float, default=0.002, help="sleep per image")
    parser.add_argument("--learner-s", type=float, default=1.0)
    parser.add_argument("--weight-mb", type=float, default=14.0,
                        help="weights pushed per step (14 MB = the shapes model in fp32)")
    parser.add_argument("--latent-shape", type=int, nargs="+", default=[8, 8, 8])
    parser.add_argument("--rho", type=float, default=0.125)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--target", type=float, default=1.05)
    args = parser.parse_args()
    bench = {"rollout_s_per_trajectory": args.rollout_s, "reward_s_per_image": args.reward_s,
             "learner_s": args.learner_s, "weight_bytes": int(args.weight_mb * 2**20),
             "latent_shape": args.latent_shape}
    os.environ["OPGRPO_BENCH"] = json.dumps(bench)  # inherited by the actors started below
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             namespace="opgrpo", runtime_env={"env_vars": {"OPGRPO_BENCH": json.dumps(bench)}})
    results = []
    try:
        for n in args.actors:
            results.append(measure(n, args, bench))
            print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"settings": bench | {k: v for k, v in vars(args).items() if k != "actors"},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "results": results}
    (RESULTS / "system.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "system.png", args.target)
    print(f"wrote {RESULTS / 'system.json'} and system.png")


if __name__ == "__main__":
    main()
