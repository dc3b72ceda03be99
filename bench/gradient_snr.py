"""How much of one batch's policy gradient is signal? Cosine between independent batches.

For a fixed set of prompts, draw B independent rollout batches (different seeds) from the same
weights, score them, and compute each batch's OP-GRPO gradient (on-policy, no KL) with the
learner's own objective. If the batch gradient were mostly signal, gradients of independent
batches would point the same way (cosine near 1); if it is mostly noise, their cosine is near 0
and an optimizer step is a random step. Repeated for several `learner.timestep_fraction` values
(which SDE steps are trained), this is the measurement behind the tiny recipe's choice of
training only the first steps. Writes bench/results/gradient_snr.json and a PNG.

    python bench/gradient_snr.py --batches 6 --fractions 0.1 0.2 0.3 0.5 0.9
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from actors.rewards import get_reward
from learner.advantages import group_advantages
from learner.objective import LossSettings, MicroBatch, UpdateSize, accumulate_gradients
from opgrpo.config import load_config
from opgrpo.models import FlowPolicy
from opgrpo.prompts import load_prompts
from opgrpo.sampling import SamplingSpec, sample_groups

RESULTS = Path(__file__).resolve().parent / "results"


def batch_gradient(policy, config, prompts, spec, settings,
                   seed: int) -> tuple[torch.Tensor, float]:
    """The flattened gradient of one on-policy batch of `prompts` x group_size trajectories."""
    group = config.rollout.group_size
    (reward_name,) = config.reward.functions
    reward = get_reward(reward_name)
    trajs = sample_groups(policy, [r.text for r in prompts], [r.key for r in prompts], group,
                          spec, seed, 0, version=0)
    images = policy.decode(torch.from_numpy(np.stack([t.latents[-1] for t in trajs])))
    rewards = reward.score(images, [t.prompt for t in trajs])[reward.key]
    adv = group_advantages(torch.tensor(rewards), torch.arange(len(trajs)) // group,
                           config.learner.global_std, config.learner.adv_clip_max)
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    mb = config.learner.micro_batch_size
    size = UpdateSize.of(adv.valid)  # one update over the whole batch
    for start in range(0, len(trajs), mb):
        idx = list(range(start, min(start + mb, len(trajs))))
        batch = MicroBatch.from_trajectories([trajs[i] for i in idx], adv.advantages[idx],
                                             adv.valid[idx], device=policy.device)
        accumulate_gradients(policy, batch, spec, settings, lambda loss: loss.backward(),
                             update=size)
    grad = torch.cat([p.grad.flatten() for p in params]).clone()
    return grad, float(np.mean(rewards))


def measure(config_path: str, fraction: float, batches: int, n_prompts: int,
            overrides: list[str]) -> dict:
    config = load_config(config_path, [*overrides, f"learner.timestep_fraction={fraction}"])
    torch.manual_seed(config.run.seed)
    policy = FlowPolicy.from_pretrained(config.model.path, lora_rank=config.model.lora_rank,
                                        lora_alpha=config.model.lora_alpha, keep_reference=False)
    spec = SamplingSpec.from_config(config)
    lc = config.learner
    settings = LossSettings(lc.clip_range, lc.correction, 0.0, None, fraction)
    records = load_prompts(config.train.prompts_file)
    rng = np.random.default_rng(config.run.seed)
    prompts = [records[i] for i in rng.choice(len(records), n_prompts, replace=False)]
    start = time.perf_counter()
    grads, means = [], []
    for b in range(batches):
        grad, mean = batch_gradient(policy, config, prompts, spec, settings, 1000 + b)
        grads.append(grad)
        means.append(mean)
    pairs = list(itertools.combinations(range(batches), 2))
    cos = [float(torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0))
           for i, j in pairs]
    # each batch against the mean of the others: a less noisy estimate of the true direction
    loo = [float(torch.nn.functional.cosine_similarity(
        grads[i], torch.stack([g for j, g in enumerate(grads) if j != i]).mean(0), dim=0))
        for i in range(batches)]
    return {
        "timestep_fraction": fraction,
        "trained_steps": config.num_train_steps_per_trajectory,
        "batch": n_prompts * config.rollout.group_size,
        "cosine_pairs_mean": float(np.mean(cos)),
        "cosine_pairs_sem": float(np.std(cos) / np.sqrt(len(cos))),
        "cosine_leave_one_out_mean": float(np.mean(loo)),
        "gradient_norm_mean": float(np.mean([g.norm().item() for g in grads])),
        "reward_means": means,
        "seconds": time.perf_counter() - start,
    }


def plot(results: list[dict], out: Path) -> None:
    from plotting import figure, save

    fig, ax = figure()
    steps = [r["trained_steps"] for r in results]
    ax.errorbar(steps, [r["cosine_pairs_mean"] for r in results],
                yerr=[r["cosine_pairs_sem"] for r in results], marker="o",
                label="pairs of independent batches")
    ax.plot(steps, [r["cosine_leave_one_out_mean"] for r in results], marker="s",
            label="batch vs mean of the others")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="trained SDE steps (first n of T)", ylabel="gradient cosine",
           title=f"gradient agreement, batch of {results[0]['batch']} trajectories")
    save(fig, ax, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shapes_tiny.yaml")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.9])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for fraction in args.fractions:
        results.append(measure(args.config, fraction, args.batches, args.prompts, args.set))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "reward_means"}),
              flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"config": args.config, "overrides": args.set, "batches": args.batches,
           "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                       "platform": platform.platform(), "torch": torch.__version__},
           "results": results}
    (RESULTS / "gradient_snr.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "gradient_snr.png")
    print(f"wrote {RESULTS / 'gradient_snr.json'} and gradient_snr.png")


if __name__ == "__main__":
    main()
