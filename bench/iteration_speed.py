"""Single-process cost of one training iteration of a config's recipe (no Ray).

Rollout (SDE groups) + decode + reward + advantages + one optimizer step over the batch with
the OP-GRPO objective, timed per phase over several iterations; the first iteration is a warm-up
and is reported separately. Writes JSON (and the mean reward per iteration, a first sign that
the recipe learns) to bench/results/.

    python bench/iteration_speed.py --config configs/shapes_tiny.yaml --iterations 6
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from actors.rewards import get_reward
from learner.advantages import group_advantages
from learner.objective import (
    LossSettings,
    MicroBatch,
    UpdateSize,
    accumulate_gradients,
    update_micro_batches,
)
from opgrpo.config import load_config
from opgrpo.models import FlowPolicy
from opgrpo.prompts import load_prompts
from opgrpo.sampling import SamplingSpec, sample_groups


def run(config_path: str, iterations: int, overrides: list[str]) -> dict:
    config = load_config(config_path, overrides)
    torch.manual_seed(config.run.seed)
    policy = FlowPolicy.from_pretrained(
        config.model.path, lora_rank=config.model.lora_rank,
        keep_reference=config.learner.kl_beta > 0,
        max_sequence_length=config.model.max_sequence_length,
    )
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.learner.learning_rate)
    spec = SamplingSpec.from_config(config)
    settings = LossSettings.from_config(config)
    (reward_name,) = config.reward.functions
    reward = get_reward(reward_name)
    records = load_prompts(config.train.prompts_file)
    rng = np.random.default_rng(config.run.seed)
    n_prompts, group = config.rollout.prompts_per_step, config.rollout.group_size
    rows = []
    for iteration in range(iterations):
        chosen = [records[i] for i in rng.choice(len(records), n_prompts, replace=False)]
        t0 = time.perf_counter()
        trajs = sample_groups(policy, [r.text for r in chosen], [r.key for r in chosen], group,
                              spec, config.run.seed, iteration, version=iteration)
        t1 = time.perf_counter()
        images = policy.decode(torch.from_numpy(np.stack([t.latents[-1] for t in trajs])))
        rewards = reward.score(images, [t.prompt for t in trajs])[reward.key]
        t2 = time.perf_counter()
        adv = group_advantages(torch.tensor(rewards), torch.arange(len(trajs)) // group,
                               config.learner.global_std, config.learner.adv_clip_max)
        order = torch.randperm(len(trajs)).tolist()
        for update in update_micro_batches(order, config.learner.micro_batch_size,
                                           config.learner.optimizer_steps_per_pass):
            size = UpdateSize.of(adv.valid[[i for idx in update for i in idx]])
            for idx in update:
                batch = MicroBatch.from_trajectories(
                    [trajs[i] for i in idx], adv.advantages[idx], adv.valid[idx],
                    device=policy.device)
                accumulate_gradients(policy, batch, spec, settings,
                                     lambda loss: loss.backward(), update=size)
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(),
                                           config.learner.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        rows.append({"iteration": iteration, "rollout_s": t1 - t0, "reward_s": t2 - t1,
                     "train_s": t3 - t2, "total_s": t3 - t0,
                     "reward_mean": float(np.mean(rewards)),
                     "masked_groups": adv.num_masked_groups})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in rows[-1].items()}), flush=True)
    timed = rows[1:] or rows
    mean = {k: float(np.mean([r[k] for r in timed]))
            for k in ("rollout_s", "reward_s", "train_s", "total_s")}
    return {
        "config": config_path, "overrides": overrides,
        "recipe": {"prompts": n_prompts, "group_size": group, "sde_steps": spec.num_steps,
                   "trained_steps": int(np.ceil(settings.timestep_fraction * spec.num_steps)),
                   "guidance": spec.guidance_scale, "kl_beta": settings.kl_beta,
                   "micro_batch": config.learner.micro_batch_size},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "seconds_per_iteration": mean, "warmup_iteration": rows[0], "iterations": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes_tiny.yaml")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="bench/results/iteration_speed.json")
    args = parser.parse_args()
    result = run(args.config, args.iterations, args.set)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds_per_iteration"]))


if __name__ == "__main__":
    main()
