"""Where does a run's eval accuracy go? Re-evaluate its checkpoints under several settings.

The sample-efficiency runs train on 10-step SDE samples of the train prompts but are evaluated
with 40-step ODE samples of the held-out test prompts. When the training reward keeps rising
while the eval accuracy falls back, this separates the two candidate causes:
- prompts: the same sampler on the train prompts (generalisation to held-out compositions);
- sampler: the test prompts with a 10-step ODE (the training step count) instead of 40 steps.
Each checkpoint is exported (`opgrpo.export`) and evaluated in this process with fixed seeds.

    python bench/eval_drift.py bench/runs/sample_efficiency/grpo-s0 --steps 0 150 300
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# name -> (prompt file, ODE steps, images per prompt)
VARIANTS = {
    "test_ode40": ("configs/shapes/test_metadata.jsonl", 40, 4),
    "test_ode10": ("configs/shapes/test_metadata.jsonl", 10, 4),
    "train_ode40": ("configs/shapes/train_metadata.jsonl", 40, 2),
}


def evaluate_model(model_dir: str, variants: list[str], seed: int) -> dict:
    from opgrpo.evaluate import EvalSettings, evaluate
    from opgrpo.models import FlowPolicy
    from opgrpo.prompts import load_prompts

    policy = FlowPolicy.from_pretrained(model_dir)
    out = {}
    for name in variants:
        prompts, steps, n = VARIANTS[name]
        summary, _, _ = evaluate(policy, load_prompts(str(ROOT / prompts)), "shapes",
                                 EvalSettings(n_per_prompt=n, num_steps=steps, seed=seed))
        out[name] = {"strict": summary["strict"], "partial": summary["partial"],
                     "per_tag": summary["per_tag"]}
        print(json.dumps({"model": Path(model_dir).name, name: out[name]["strict"]}),
              flush=True)
    return out


def main() -> None:
    from opgrpo.config import load_config
    from opgrpo.export import export_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory with checkpoints")
    parser.add_argument("--steps", type=int, nargs="+", required=True,
                        help="checkpoint steps; 0 = the base model")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    seed = load_config(run / "config.yaml").run.seed
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for step in args.steps:
            if step == 0:
                model = load_config(run / "config.yaml").model.path
            else:
                model = str(export_checkpoint(run, Path(tmp) / f"step{step}", step=step,
                                                fused=True))
            results[str(step)] = evaluate_model(model, args.variants, seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"eval_drift_{run.name}.json"
    path.write_text(json.dumps({"run": run.name, "variants": VARIANTS, "seed": seed,
                                "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
