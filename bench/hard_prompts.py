"""A hard prompt set for the shapes task: the prompts the base model fails whole groups on.

OP-GRPO's replay pays off where fresh groups often fail as a whole (all rewards equal, so every
advantage is zero and the group teaches nothing) and a stored success can be replayed into
them. On the shipped training prompts the base model fails only 7-8% of its groups; this script
finds the prompts where it fails most of them.

Every prompt of the shapes grammar is sampled with the base model exactly as a rollout actor
samples (`configs/shapes_tiny.yaml`: SDE, 10 steps, noise 0.7, guidance 1) and scored with the
training reward (strict: 1 when every constraint holds). Two stages keep it cheap: 8 samples
per prompt, then 8 more for the prompts solved at most twice in the first 8.

- training set: prompts outside the shipped test split solved at most `--max-rate` of the time
  over their 16 samples (default 4/16 = 1 in 4: the base model solves only 11 prompts of the
  grammar's non-test space at most 1 in 8 times, too few to train 300 steps on without
  memorising them) (`configs/shapes/hard_train_metadata.jsonl`);
- test set: prompts of the shipped test split solved at most `--max-test-rate` of the time
  (default 6/16, for enough test prompts that the eval noise stays small)
  (`configs/shapes/hard_test_metadata.jsonl`); the split keeps its held-out (colour, shape)
  pairs, so the test measures generalisation, not recall.

With `--reuse`, the per-prompt counts of an earlier run (same seed) are read back from the
results file and only the selection is redone.

Results (per prompt: samples and successes; per tag counts; the base model's masked-group
fraction on each set, measured on the first 8 samples of each prompt as one group) go to
`bench/results/hard_prompts.json`. Same seed, same sets.

    python bench/hard_prompts.py [--seed 0] [--max-rate 0.25] [--max-test-rate 0.375]
                                 [--threads 2] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hard_prompts.json"
TRAIN_OUT = ROOT / "configs" / "shapes" / "hard_train_metadata.jsonl"
TEST_OUT = ROOT / "configs" / "shapes" / "hard_test_metadata.jsonl"
CONFIG = ROOT / "configs" / "shapes_tiny.yaml"
GROUP = 8
BATCH = 64


def measure(prompts: list[str], samples: range, seed: int, progress: str) -> np.ndarray:
    """(len(prompts), len(samples)) strict scores of SDE samples j in `samples` per prompt."""
    import torch

    from actors.rewards import get_reward, score_frames
    from opgrpo.config import load_config
    from opgrpo.models import FlowPolicy
    from opgrpo.sampling import SamplingSpec, sample_tensors, trajectory_seed

    config = load_config(CONFIG)
    policy = FlowPolicy.from_config(config)
    spec = SamplingSpec.from_config(config)
    reward = get_reward("shapes")
    rows = [(i, p, j) for i, p in enumerate(prompts) for j in samples]
    scores = np.zeros((len(prompts), len(samples)))
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        part = rows[start:start + BATCH]
        texts = [p for _, p, _ in part]
        seeds = [trajectory_seed(seed, "hard-prompts", p, j) for _, p, j in part]
        with torch.no_grad():
            latents, _ = sample_tensors(policy, texts, seeds, spec)
            images = policy.decode(latents[:, -1]).cpu().numpy()
        strict = score_frames(reward, images, texts)["strict"]
        for (i, _, j), value in zip(part, strict):
            scores[i, j - samples.start] = value
        done = min(start + BATCH, len(rows))
        print(f"{progress}: {done}/{len(rows)} samples, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return scores


def sample_all(texts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first 8 scores per prompt, successes, samples) of the two-stage measurement."""
    first = measure(texts, range(GROUP), seed, "stage 1")
    second_idx = [i for i in range(len(texts)) if first[i].sum() <= 2]
    second = measure([texts[i] for i in second_idx], range(GROUP, 2 * GROUP), seed, "stage 2")
    successes = first.sum(axis=1)
    n_samples = np.full(len(texts), GROUP)
    for k, i in enumerate(second_idx):
        successes[i] += second[k].sum()
        n_samples[i] += GROUP
    return first, successes, n_samples


def reuse(texts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same three arrays, read back from the results file of an earlier run."""
    saved = json.loads(RESULTS.read_text())
    if saved["seed"] != seed:
        raise ValueError(f"{RESULTS} was measured with seed {saved['seed']}, not {seed}")
    by_prompt = {p["prompt"]: p for p in saved["prompts"]}
    rows = [by_prompt[t] for t in texts]
    return (np.array([r["first_group"] for r in rows], dtype=float),
            np.array([r["successes"] for r in rows], dtype=float),
            np.array([r["samples"] for r in rows]))


def masked_fraction(first_group: np.ndarray) -> float:
    """Share of groups (rows) whose rewards are all equal."""
    return float(np.mean(first_group.min(axis=1) == first_group.max(axis=1)))


def main(argv: list[str] | None = None) -> int:
    import torch

    from tasks.shapes.grammar import TAGS, all_prompts, write_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rate", type=float, default=0.25,
                        help="a training prompt is hard when solved at most this often (of 16)")
    parser.add_argument("--max-test-rate", type=float, default=0.375,
                        help="the same for the test prompts")
    parser.add_argument("--reuse", action="store_true",
                        help="take the per-prompt counts from the last results file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = all_prompts()
    test = {json.loads(line)["prompt"] for line in
            (ROOT / "configs/shapes/test_metadata.jsonl").read_text().splitlines() if line}
    shipped_train = {json.loads(line)["prompt"] for line in
                     (ROOT / "configs/shapes/train_metadata.jsonl").read_text().splitlines()
                     if line}
    texts = [r["prompt"] for r in rows]
    if args.reuse:
        first, successes, n_samples = reuse(texts, args.seed)
    else:
        first, successes, n_samples = sample_all(texts, args.seed)
    rate = successes / n_samples
    in_test = np.array([t in test for t in texts])
    measured = n_samples == 2 * GROUP
    sets = {"hard_train": measured & ~in_test & (rate <= args.max_rate + 1e-9),
            "hard_test": measured & in_test & (rate <= args.max_test_rate + 1e-9),
            "shipped_train": np.array([t in shipped_train for t in texts]),
            "shipped_test": in_test}
    write_jsonl([rows[i] for i in np.flatnonzero(sets["hard_train"])], TRAIN_OUT)
    write_jsonl([rows[i] for i in np.flatnonzero(sets["hard_test"])], TEST_OUT)
    summary = {
        name: {"prompts": int(mask.sum()),
               "per_tag": {tag: int(sum(mask[i] and rows[i]["tag"] == tag
                                        for i in range(len(rows)))) for tag in TAGS},
               "base_masked_group_fraction": masked_fraction(first[mask]),
               "base_all_fail_group_fraction": float(np.mean(first[mask].max(axis=1) == 0)),
               "base_success_rate_first_8": float(first[mask].mean())}
        for name, mask in sets.items()}
    result = {"benchmark": "hard_prompts", "seed": args.seed, "max_rate": args.max_rate,
              "max_test_rate": args.max_test_rate,
              "group": GROUP, "sampling": "configs/shapes_tiny.yaml (SDE, 10 steps)",
              "sets": summary,
              "files": {"hard_train": str(TRAIN_OUT.relative_to(ROOT)),
                        "hard_test": str(TEST_OUT.relative_to(ROOT))},
              "prompts": [{"prompt": texts[i], "tag": rows[i]["tag"],
                           "split": "test" if in_test[i] else "train",
                           "samples": int(n_samples[i]), "successes": int(successes[i]),
                           "first_group": first[i].astype(int).tolist()}
                          for i in range(len(rows))]}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}, {TRAIN_OUT.relative_to(ROOT)}, "
          f"{TEST_OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
