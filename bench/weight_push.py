"""Weight push: seconds to deliver S bytes of weights to N rollout actors on one node.

The path is the service's: the learner's weight dict (name -> numpy array) is put into Ray's
object store once, every rollout actor gets the ref and copies each array into the tensor it
already holds (what `RolloutWorker.set_weights` does via `load_trainable_state_dict`). The
baseline is one in-process memory copy of S bytes. Target: push time / N <= 2 x that copy.

Sizes: 10 MB, 100 MB, 1 GB of full weights cut into 4 MB tensors, and the LoRA-only dict of
SD3.5-Medium (rank 32 on to_q/to_k/to_v/to_out.0, counted on the real diffusers class built on
the meta device, so no weights are needed): its real tensor names and shapes, hundreds of small
arrays.

    python bench/weight_push.py --actors 1 4 16 --sizes-mb 10 100 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TENSOR_BYTES = 4 * 2**20

# SD3.5-Medium's transformer config (the published one; the model class is diffusers' own).
SD35M = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
         "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
         "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
         "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}


class Receiver:
    """Holds a copy of the weights like a rollout actor; `receive` loads a pushed dict."""

    def __init__(self) -> None:
        self.held: dict[str, np.ndarray] = {}

    def receive(self, weights: dict[str, np.ndarray]) -> int:
        total = 0
        for name, value in weights.items():
            held = self.held.get(name)
            if held is None or held.shape != value.shape:
                held = self.held[name] = np.empty_like(value)
            np.copyto(held, value)
            total += value.nbytes
        return total

    def clear(self) -> None:
        self.held = {}


def full_weights(size_bytes: int) -> dict[str, np.ndarray]:
    n_full, rest = divmod(size_bytes, TENSOR_BYTES)
    out = {f"block.{i}.weight": np.ones(TENSOR_BYTES // 4, np.float32) for i in range(n_full)}
    if rest:
        out["tail.weight"] = np.ones(rest // 4, np.float32)
    return out


def lora_weights_sd35m(rank: int = 32) -> dict[str, np.ndarray]:
    """The LoRA-only state dict of SD3.5-M (names/shapes of the real model + peft)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35M)
    config = LoraConfig(r=rank, lora_alpha=2 * rank,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    return {name: np.ones(tuple(t.shape), np.float32) for name, t in state.items()}


def copy_seconds(weights: dict[str, np.ndarray], repeats: int = 3) -> float:
    """One in-process memory copy of the same bytes (best of `repeats`)."""
    total = sum(v.nbytes for v in weights.values())
    src = np.ones(total // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return best


def push_seconds(actors, weights: dict[str, np.ndarray], repeats: int, warmup: int) -> float:
    """Median seconds of `repeats` pushes after `warmup` untimed ones. The warm-up pushes
    allocate the actors' copies and touch the object store's pages: in a VM (this machine is
    one) the first touch of guest memory costs a host page fault per page, which a training
    run pays in its first steps only."""
    import ray

    for _ in range(warmup):
        ray.get([a.receive.remote(ray.put(weights)) for a in actors])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ref = ray.put(weights)  # the learner's export lands in the store once
        ray.get([a.receive.remote(ref) for a in actors])
        times.append(time.perf_counter() - start)
        del ref
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed pushes first")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip size x actors combinations above this share of free RAM")
    args = parser.parse_args()
    import psutil
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    payloads = {f"full-{int(mb)}MB": full_weights(int(mb * 2**20)) for mb in args.sizes_mb}
    payloads["lora-sd35m-r32"] = lora_weights_sd35m()
    results, skipped = [], []
    try:
        remote = ray.remote(num_cpus=0)(Receiver)
        for n in args.actors:
            actors = [remote.remote() for _ in range(n)]
            for name, weights in payloads.items():
                size = sum(v.nbytes for v in weights.values())
                if size * (n + 2) > args.memory_fraction * psutil.virtual_memory().available:
                    skipped.append({"payload": name, "actors": n, "bytes": size,
                                    "why": f"{n} copies + the store would exceed "
                                           f"{args.memory_fraction:.0%} of free RAM"})
                    print(f"skip {name} x {n}: not enough memory", flush=True)
                    continue
                push = push_seconds(actors, weights, args.repeats, args.warmup)
                copy = copy_seconds(weights)
                results.append({"payload": name, "bytes": size, "tensors": len(weights),
                                "actors": n, "push_s": push, "copy_s": copy,
                                "push_per_actor_over_copy": push / n / copy})
                print(json.dumps(results[-1]), flush=True)
                ray.get([a.clear.remote() for a in actors])
            for a in actors:
                ray.kill(a)
    finally:
        ray.shutdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"target": "push_s / actors <= 2 x copy_s",
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "ram_gb": psutil.virtual_memory().total / 2**30},
           "results": results, "skipped": skipped}
    (RESULTS / "weight_push.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "weight_push.png")
    print(f"wrote {RESULTS / 'weight_push.json'} and weight_push.png")


def plot(results: list[dict], path: Path) -> None:
    from plotting import figure, save

    fig, ax = figure(figsize=(6.5, 4))
    for name in dict.fromkeys(r["payload"] for r in results):
        rows = [r for r in results if r["payload"] == name]
        ax.plot([r["actors"] for r in rows], [r["push_per_actor_over_copy"] for r in rows],
                marker="o", label=name)
    ax.axhline(2.0, color="tab:red", ls="--", label="target 2x")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="receiving actors", ylabel="push time per actor / memcpy time",
           title="weight push through the object store")
    save(fig, ax, path, legend_size=7)


if __name__ == "__main__":
    main()
