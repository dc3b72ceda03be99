"""One typed configuration for a whole run: pydantic models read from YAML plus `--set` overrides.

Every knob is declared, defaulted and described exactly once here; no other module reads a
setting with a fallback default. Unknown keys and bad values are refused with the dotted path of
the field (`learner.clip_range`) and the reason, before any long work starts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_resources(resources: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources: positive amounts, and not the ones with their own fields."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} has its own field (num_cpus / num_gpus); resources "
                             "holds custom resources only")
        if not amount > 0:
            raise ValueError(f"{name!r}: amount must be > 0, got {amount}")
    return resources


Resources = Annotated[dict[str, float], AfterValidator(_check_resources)]


# Flow-GRPO's LoRA targets: the image stream (to_q/k/v/out) and the text stream
# (add_q/k/v_proj, to_add_out) of every joint attention block.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0",
                        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class ModelConfig(_Section):
    path: str | None = Field(None, description="Directory of a diffusers-layout pipeline.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the transformer (the SDE math is float32)."
    )
    lora_rank: int = Field(0, ge=0, description="LoRA rank on attention projections; 0 = full.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = lora_rank.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        description="Module names of the transformer that receive LoRA adapters (default: "
        "Flow-GRPO's, the image and the text stream of every attention block; names a "
        "family lacks are skipped).",
    )
    height: int = Field(512, ge=8, le=4096, multiple_of=8,
                        description="Image height in pixels (a multiple of 8, at most 4096).")
    width: int = Field(512, ge=8, le=4096, multiple_of=8,
                       description="Image width in pixels (a multiple of 8, at most 4096).")
    max_sequence_length: int | None = Field(
        None, ge=1, description="T5 tokens per prompt; unset = the model directory's setting "
        "or the family's default (SD3 128 as Flow-GRPO, FLUX 512, Wan 226)."
    )
    offload_text_encoders: bool = Field(
        False, description="Keep the frozen text encoders in host memory and move them to "
        "the GPU only to encode prompts the embedding cache lacks (saves T5-XXL's ~9 GiB "
        "per rollout actor and learner rank, costs a host-to-GPU copy per cache miss).")
    prompt_cache_size: int = Field(
        1024, ge=0, description="Prompt embeddings kept per process (least recently used "
        "evicted; held in host memory in the model dtype, moved to the device per batch); "
        "0 = encode every batch.")
    num_frames: int = Field(
        1, ge=1, description="Frames per video sample (Wan2.1: 4k+1, e.g. 81); 1 for image "
        "models.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute transformer activations in the backward pass (learner): "
        "less memory, about a third more compute.")
    init_lora: str | None = Field(
        None, description="Start from this LoRA instead of a fresh adapter (Flow-GRPO's "
        "train.lora_path): a directory in diffusers' format (what `opgrpo export` writes, "
        "pytorch_lora_weights.safetensors) or peft's (adapter_model.safetensors + "
        "adapter_config.json, e.g. Flow-GRPO's checkpoints/checkpoint-N/lora). Learner ranks "
        "and rollout actors load it into the trainable adapter, whose rank, alpha and target "
        "modules (model.lora_*) must match it; the KL reference stays the base model.")

    @field_validator("init_lora")
    @classmethod
    def _check_init_lora(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ValueError(f"directory {value} does not exist (a LoRA directory, e.g. "
                             "written by `opgrpo export RUN --out DIR`)")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{value} holds no *.safetensors file (LoRA weights in diffusers' "
                             "or peft's format; pickled .bin files are not loaded)")
        return str(path.resolve())  # actors may run in another working directory

    @model_validator(mode="after")
    def _init_lora_needs_lora(self) -> ModelConfig:
        if self.init_lora is not None and self.lora_rank == 0:
            raise ValueError("model.init_lora needs model.lora_rank > 0 (the rank of that LoRA): "
                             "it is loaded into the trainable LoRA adapter")
        return self


class SamplingConfig(_Section):
    num_steps: int = Field(10, ge=2, description="SDE steps per training trajectory (T).")
    noise_level: float = Field(0.7, ge=0, description="SDE noise level a (0 = ODE).")
    guidance_scale: float = Field(4.5, ge=1.0, description="CFG scale for rollouts (1 = off).")
    eval_num_steps: int = Field(40, ge=1, description="ODE steps for evaluation sampling.")
    eval_guidance_scale: float = Field(4.5, ge=1.0, description="CFG scale for evaluation.")
    logprob_reduce: Literal["mean", "sum"] = Field(
        "mean", description="Reduction of per-element log-densities (Flow-GRPO uses mean)."
    )
    latent_storage_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of stored trajectory latents (buffer and object store)."
    )


class RolloutConfig(_Section):
    num_actors: int | Literal["auto"] = Field(1, description="Rollout actors, or 'auto'.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per rollout actor.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per rollout actor.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts (groups) per iteration.")
    group_size: int = Field(8, ge=2, description="Trajectories per prompt (G).")
    chunk_size: int = Field(8, ge=1, le=4096, description="Trajectories per rollout task.")
    resources: Resources = Field(
        default_factory=dict, description="Custom Ray resources per rollout actor, e.g. "
        "{rollout_slot: 1} to place rollout actors on nodes started with --resources.")

    @model_validator(mode="after")
    def _check_actors(self) -> RolloutConfig:
        if isinstance(self.num_actors, int) and self.num_actors < 1:
            raise ValueError("num_actors must be >= 1 or 'auto'")
        return self


class RewardConfig(_Section):
    functions: dict[str, float] = Field(
        default_factory=dict, description="Reward name -> weight; the total is the weighted "
        "sum. A name is a built-in reward (shapes, jpeg, pickscore, aesthetic, ocr, geneval, "
        "...), Flow-GRPO's name of one (pickscore_score, jpeg_compressibility, ...; the run "
        "logs ours), `http` or `http_<label>` (a scorer served over HTTP, "
        "actors/rewards/http.py), or an import path 'package.module:object' (a reward you "
        "bring, actors/rewards/plugins.py)."
    )
    num_actors: int = Field(1, ge=1, description="Reward actors.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per reward actor.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per reward actor (Ray resource).")
    resources: Resources = Field(
        default_factory=dict, description="Custom Ray resources per reward actor, e.g. "
        "{reward_slot: 1} for nodes started with --resources.")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-reward options (model paths, OCR engine, "
        "server URL), e.g. {pickscore: {model: /models/PickScore_v1, processor: "
        "/models/CLIP-ViT-H-14}}; see actors/rewards/<name>.py.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where reward models run; auto = cuda when reward.num_gpus > 0.")

    @field_validator("functions", "options")
    @classmethod
    def _canonical_names(cls, table: dict) -> dict:
        """Flow-GRPO's reward names become ours here, so the run (config.yaml, metrics) logs
        ours; a Flow-GRPO reward we do not implement is refused by name."""
        import logging

        from actors.rewards import canonical_name

        out: dict = {}
        for name, value in table.items():
            canonical = canonical_name(name)
            if canonical in out:
                raise ValueError(f"{name!r} and {canonical!r} are the same reward: name it once")
            if canonical != name:
                logging.getLogger(__name__).info(
                    "reward %r is Flow-GRPO's name of %r: logged as %r", name, canonical,
                    canonical)
            out[canonical] = value
        return out

    @model_validator(mode="after")
    def _check_options(self) -> RewardConfig:
        from actors.rewards import get_reward

        for name in self.functions:
            get_reward(name)  # an unknown name fails here, listing the known ones
        for name, options in self.options.items():
            if name not in self.functions:
                raise ValueError(f"options.{name}: {name!r} is not in reward.functions")
            spec = get_reward(name)
            if spec.options is None:
                raise ValueError(f"options.{name}: this reward takes no options")
            try:
                spec.options.model_validate(options)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"options.{name}.{where}: {first['msg']}") from None
        return self


class BufferConfig(_Section):
    off_policy_fraction: float = Field(
        0.125, ge=0, lt=1, description="Fraction rho of prompts from the buffer (0 = on-policy)."
    )
    capacity: int = Field(256, ge=1, description="Entries kept (one per prompt).")
    decay_gamma: float = Field(0.99, gt=0, le=1, description="Stepwise priority decay gamma.")
    max_age: int | None = Field(None, ge=1, description="Entries older than this are evicted.")
    admit_min_advantage: float = Field(0.0, description="Admit a group's best only above this.")
    replayed_winners: Literal["keep_age", "exclude"] = Field(
        "keep_age", description="A replayed (mixed) trajectory that wins its group: `keep_age` "
        "offers it as old as its buffer prefix (stored with the prefix's insert step, so decay "
        "and max_age count from there and replay cannot reset them; rejected if the prefix is "
        "past max_age); `exclude` admits nothing for that group.")
    replay_draw: Literal["uniform", "fail_rate", "rescue"] = Field(
        "uniform", description="Which entries a step replays: `uniform` (the paper's) over the "
        "non-expired entries; `fail_rate` without replacement with weight max(replay_draw_floor, "
        "1 - s), s = the prompt's latest fresh success rate (mean fresh reward / winner reward of "
        "its last group offered to the buffer, clipped to [0, 1]), so prompts the policy rarely "
        "solves, where a replayed success un-masks its group, come back more often; `rescue` "
        "draws nothing before the rollout: after scoring, a group whose fresh rewards are all "
        "equal gets its own prompt's stored entry, if rewarded higher, in place of one fresh "
        "sample (at most off_policy_fraction x prompts_per_step groups per step).")
    replay_draw_floor: float = Field(
        0.05, description="fail_rate: draw weight of a prompt the policy always solves, in "
        "(0, 1] (1 = uniform).")
    truncate_step: int | None = Field(
        None, ge=1, description="Replayed transitions kept (K); default round(0.7*T)."
    )
    redis_url: str | None = Field(
        None, description="External Redis (redis://[:password@]host:port/db); unset = embedded "
        "server. The password may instead come from REDIS_PASSWORD; the run's config.yaml "
        "never holds it.")
    redis_timeout_s: float = Field(
        120.0, gt=0, description="How long the run waits for an unreachable Redis before it "
        "checkpoints and stops.")
    exact_resume: bool = Field(
        True, description="Keep entries replaced or evicted since the last checkpoint until the "
        "next one, so that --resume gets the buffer exactly as it was (costs Redis memory: "
        "one trajectory per removal between checkpoints).")

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @field_validator("replay_draw_floor")
    @classmethod
    def _check_floor(cls, floor: float) -> float:
        if not 0.0 < floor <= 1.0:  # NaN fails too
            raise ValueError(f"must be in (0, 1], got {floor!r}: the fail_rate draw weight of a "
                             "prompt the policy always solves (0 would never replay it; 1 draws "
                             "uniformly)")
        return floor


class LearnerConfig(_Section):
    correction: Literal["sequence", "naive", "none"] = Field(
        "sequence", description="Off-policy correction (docs/algorithm.md section 3)."
    )
    clip_range: float = Field(1e-4, gt=0, description="PPO clip epsilon.")
    kl_beta: float = Field(0.04, ge=0, description="KL weight beta (0 = no reference policy).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to +-this.")
    global_std: bool = Field(False, description="Normalise advantages by the batch std.")
    seq_weight_max: float | None = Field(None, gt=0, description="Clamp w_i to [0, this].")
    stale_rescore: Literal["all", "trained"] = Field(
        "all", description="Async mode: the steps of a stale sample (drawn by an older version "
        "than the learner's) that the learner re-scores under pi_old and puts in w_i. `all` "
        "is the exact sequence ratio; `trained` skips the untrained steps (cheaper, biased).")
    timestep_fraction: float = Field(
        0.9, gt=0, le=1, description="Share of SDE steps trained: the first "
        "int(fraction x T), at least 1, as Flow-GRPO (0.99 of 10 trains 9 and skips the last).")
    detach_uncond: bool = Field(
        True, description="With CFG (guidance_scale > 1), no gradient through the "
        "unconditional branch of the guided velocity, as Flow-GRPO's trainer.")
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, ge=1, description="Trajectories per forward/backward.")
    updates_per_step: int = Field(1, ge=1, description="Passes over each batch (inner epochs).")
    optimizer_steps_per_pass: int = Field(
        1, ge=1, description="Optimizer steps per pass over a batch: after the first, theta "
        "moves away from pi_old and the clipping has work to do (Flow-GRPO uses 2)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: optimizer state and step on the CPU (stage >= 1).")
    offload_params: bool = Field(
        False, description="ZeRO-Infinity: parameters on the CPU between uses (stage 3 only).")
    num_ranks: int = Field(1, ge=1, description="Learner ranks (one DeepSpeed process each).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per learner rank.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per learner rank (Ray resource).")
    resources: Resources = Field(
        default_factory=dict, description="Custom Ray resources per learner rank, e.g. "
        "{learner_slot: 1} to keep the ranks off rollout nodes.")
    ema: bool = Field(
        False, description="Keep an exponential moving average of the trainable weights "
        "(diffusers' EMAModel, on learner rank 0, float32): evaluations sample with it, "
        "checkpoints hold it, `opgrpo export --ema` writes it; training and rollouts keep "
        "the live weights. Flow-GRPO evaluates such an EMA. Not with zero_stage 3.")
    ema_decay: float = Field(
        0.9, gt=0, lt=1, description="EMA decay d: each update sets ema = d x ema + (1 - d) "
        "x theta (the first update copies theta). Flow-GRPO's train_sd3.py uses 0.9.")
    ema_update_every: int = Field(
        1, ge=1, description="Optimizer steps between EMA updates (Flow-GRPO's SD3 script "
        "updates every 8 of its steps).")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="A learner update whose loss is NaN or infinite is skipped (no "
        "optimizer step; counted in loss/skipped_updates); after this many consecutive "
        "steps with a skipped update the run stops with an error instead of training on.")
    max_group_restarts: int = Field(
        2, ge=0, description="A learner rank that dies (its process killed, its node lost) or "
        "raises in an update or a weight export: the driver rebuilds the learner group, "
        "restores the last checkpoint (weights, optimizer, replay buffer; metrics rows after "
        "it dropped) and trains on from the step after it, at most this often per run; one "
        "more failure stops the run with the --resume command.")

    @model_validator(mode="after")
    def _check_ema(self) -> LearnerConfig:
        if self.ema and self.zero_stage == 3:
            raise ValueError("ema needs zero_stage <= 2: ZeRO-3 partitions the parameters "
                             "over the ranks, and the EMA is kept of whole weights on rank 0 "
                             "(set learner.zero_stage 2, or learner.ema false)")
        return self


class TrainConfig(_Section):
    num_steps: int = Field(300, ge=1, description="Training iterations.")
    mode: Literal["sync", "async"] = Field(
        "async", description="async: the rollout of the next batches runs while the learner "
        "trains (see max_staleness); the faster mode when rollout and learner have their own "
        "devices. sync: rollout waits for the learner and the learner for rollout; use it "
        "when they share devices (docs/benchmarks.md section 7).")
    max_staleness: int = Field(
        1, ge=0, le=64, description="Async mode: weight versions a fresh sample may lag "
        "behind the learner when it is trained. Batch k is launched as soon as version k-1-s "
        "exists, so up to s batches are drawn ahead. 0 = the synchronous schedule. Ignored in "
        "sync mode.")
    prompts_file: str | None = Field(None, description="Training prompts (txt or JSONL).")
    eval_prompts_file: str | None = Field(None, description="Evaluation prompts.")
    eval_every: int = Field(25, ge=1)
    eval_images_per_prompt: int = Field(
        2, ge=1, description="Images per evaluation prompt (fixed seeds: evals are paired)."
    )
    eval_batch_size: int = Field(
        16, ge=1, description="Evaluation images per rollout-actor task; the eval set is "
        "spread over every rollout actor in tasks of this size.")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int | None = Field(
        3, ge=1, description="Newest checkpoints kept on disk (older ones are deleted after "
        "each new one is complete); unset = keep all.")
    step_timeout_s: float = Field(
        1800.0, gt=0, description="Longest the driver waits for one piece of a step's work "
        "(a rollout chunk, its rewards, a learner rank's update, a weight push, the buffer): "
        "past it the run stops with an error naming the actor and what it waited for. Ray's "
        "restart of a crashed actor and its re-run tasks happen within this wait.")
    eval_timeout_s: float = Field(
        3600.0, gt=0, description="Longest the driver waits for an evaluation (its images "
        "from the rollout actors and their scores from the reward actors): past it the run "
        "stops with an error naming the actor and the evaluation's step.")
    actor_start_timeout_s: float = Field(
        1200.0, gt=0, description="Longest the driver waits for an actor to be placed by Ray "
        "and to load its model (learner ranks, rollout actors, also those `opgrpo scale` "
        "adds). Requests the whole cluster cannot hold are refused at once, before any actor "
        "starts; this bounds the wait for resources that exist but are busy.")


class RunConfig(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="Run directory name.")
    output_dir: str = Field("runs", description="Parent of run directories.")
    seed: int = Field(0, ge=0, description="Seed of every random draw in the run.")
    ray_address: str | None = Field(None, description="Ray cluster; unset = local Ray.")
    max_actor_restarts: int = Field(
        5, ge=-1, description="Times Ray restarts a crashed rollout, reward or buffer actor "
        "(its unfinished tasks run again on the new one); -1 = no limit.")
    check_cluster_resources: bool = Field(
        True, description="Before any actor starts (and for each `opgrpo scale`), compare "
        "the actors' summed requests (num_cpus, num_gpus, resources; learner ranks x per "
        "rank) with what the Ray cluster holds and refuse, naming the fields, what does not "
        "fit. Turn off for an autoscaling cluster that adds nodes on demand.")
    dashboard_host: str | None = Field(
        None, description="Start the local Ray's dashboard bound to this address (e.g. "
        "127.0.0.1); unset = no dashboard. Not used when joining a cluster.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per actor; unset = ceil(its num_cpus). On one "
        "CPU machine the synchronous phases do not overlap, so each may use every core."
    )
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"], description="Where metrics go: jsonl "
        "(metrics.jsonl, eval.jsonl; always on, the record) and optionally tensorboard "
        "(RUN/tensorboard) and wandb (RUN/wandb, offline unless WANDB_MODE says otherwise); "
        "the extras need pip install 'opgrpo[loggers]'. See opgrpo/loggers.py.")
    wandb_project: str = Field("opgrpo", min_length=1, description="W&B project (wandb).")

    @field_validator("loggers")
    @classmethod
    def _jsonl_first(cls, names: list[str]) -> list[str]:
        """jsonl is always on: put first, each backend once."""
        return list(dict.fromkeys(["jsonl", *names]))


def torch_threads(config: Config, num_cpus: float) -> int:
    """Threads an actor with `num_cpus` CPUs should give torch."""
    if config.run.torch_threads is not None:
        return config.run.torch_threads
    return max(1, math.ceil(num_cpus))


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        steps = self.sampling.num_steps
        if self.buffer.truncate_step is not None and self.buffer.truncate_step > steps:
            raise ValueError(
                f"buffer.truncate_step ({self.buffer.truncate_step}) must be <= "
                f"sampling.num_steps ({steps})"
            )
        per_rank = self.rollout.prompts_per_step * self.rollout.group_size // max(
            1, self.learner.num_ranks)
        micro = -(-per_rank // self.learner.micro_batch_size)
        if micro % self.learner.optimizer_steps_per_pass:
            raise ValueError(
                f"learner.optimizer_steps_per_pass ({self.learner.optimizer_steps_per_pass}) "
                f"must divide the {micro} micro-batches each learner rank gets per iteration"
            )
        groups, ranks = self.rollout.prompts_per_step, self.learner.num_ranks
        if groups % ranks:
            raise ValueError(
                f"rollout.prompts_per_step ({groups}) must be a multiple of learner.num_ranks "
                f"({ranks}): each rank trains whole groups"
            )
        if self.sampling.noise_level == 0:
            raise ValueError("sampling.noise_level must be > 0 for training (0 has no log-prob)")
        if self.learner.offload_params and self.learner.zero_stage != 3:
            raise ValueError("learner.offload_params needs learner.zero_stage 3 "
                             f"(got {self.learner.zero_stage})")
        if (self.model.dtype != "float32" and self.model.lora_rank == 0
                and self.learner.zero_stage == 0):
            raise ValueError(f"full fine-tuning in model.dtype {self.model.dtype} needs "
                             "learner.zero_stage >= 1: only ZeRO accumulates half-precision "
                             "gradients in float32 (or set model.lora_rank > 0)")
        if self.learner.offload_optimizer and self.learner.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage >= 1")
        return self

    @property
    def staleness(self) -> int:
        """Batches drawn ahead of the learner: max_staleness in async mode, else 0."""
        return self.train.max_staleness if self.train.mode == "async" else 0

    def shared_gpu_warning(self) -> str | None:
        """Async mode overlaps rollout and training only where each has its own device; a
        rollout actor and a learner rank packed onto one GPU compete for it instead."""
        rollout, learner = self.rollout.num_gpus, self.learner.num_gpus
        if self.staleness and 0 < rollout < 1 and 0 < learner < 1 and rollout + learner <= 1:
            return (f"train.mode is async, but rollout.num_gpus ({rollout}) and "
                    f"learner.num_gpus ({learner}) let Ray put a rollout actor and a learner "
                    "rank on one GPU, where they compete instead of overlapping: set "
                    "train.mode=sync for this layout (docs/benchmarks.md, section 7)")
        return None

    @property
    def truncate_step(self) -> int:
        """K: replayed transitions kept from the buffer (docs/algorithm.md section 5)."""
        if self.buffer.truncate_step is not None:
            return self.buffer.truncate_step
        return max(1, round(0.7 * self.sampling.num_steps))

    @property
    def num_train_steps_per_trajectory(self) -> int:
        """Transitions trained per trajectory: int(timestep_fraction * T), at least 1."""
        from learner.objective import trained_steps

        return len(trained_steps(self.sampling.num_steps, self.learner.timestep_fraction))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {dotted!r} is not of the form section.key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return key.strip(), value


def build_config(
    data: dict[str, Any] | None, overrides: list[str] = (), source: str = ""
) -> Config:
    """Validate a config tree with overrides applied; raise ConfigError naming each bad field."""
    tree: dict[str, Any] = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source or "config")) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (or defaults when `path` is None) and apply `--set` overrides."""
    if path is None:
        return build_config({}, overrides, source="defaults")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data)}")
    return build_config(data, overrides, source=str(path))


def describe_config(section: str | None = None, width: int = 100) -> str:
    """Every key of the config with its type, constraints, default and description, nested
    sections as `section.key` (`opgrpo config --describe`); `section` narrows it to one
    section (`buffer`) or key (`buffer.capacity`). ConfigError for a name that is neither."""
    import textwrap

    rows = list(_described_fields(Config, ""))
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
        if not rows:
            raise ConfigError(f"unknown config section or key {section!r}; sections: "
                              f"{', '.join(Config.model_fields)}")
    lines = []
    for key, kind, default, description in rows:
        lines.append(f"{key}: {kind} = {default}")
        lines += textwrap.wrap(description or "(no description)", width,
                               initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def _described_fields(model: type[BaseModel], prefix: str):
    """(dotted key, type, default as JSON, description) of every leaf field of `model`."""
    import json

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _described_fields(annotation, key + ".")
            continue
        kind = _type_name(annotation)
        limits = [f"{symbol} {getattr(m, attr)}" for m in field.metadata
                  for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if getattr(m, attr, None) is not None]
        limits += [f"matching {m.pattern}" for m in field.metadata
                   if getattr(m, "pattern", None)]
        limits += [f"multiple of {m.multiple_of}" for m in field.metadata
                   if getattr(m, "multiple_of", None)]
        if limits:
            kind += f" ({', '.join(limits)})"
        default = field.get_default(call_default_factory=True)
        yield key, kind, json.dumps(default, default=str), field.description or ""


def _type_name(annotation: Any) -> str:
    """A field's type as a user reads it: `float | null`, `mean | sum`, `list[str]`."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(_type_name, args))}]"
    return getattr(annotation, "__name__", str(annotation))


CREDENTIALS_REMOVED = "credentials removed"  # config.yaml's comment on such a URL


def dump_config(config: Config) -> str:
    """The resolved config as YAML (written to a run directory as config.yaml) with every URL's
    credentials removed (user info, secret query parameters: `without_url_secrets`), so that
    no password or token is kept on disk. A comment at the top names each URL that lost them:
    a resumed run takes the Redis password from REDIS_PASSWORD or REDIS_URL, and any other
    URL's credentials again from `--set` (`reward_credentials_missing` warns when they are not
    given); rewards can take a token from the environment instead (`token_env`)."""
    data, removed = without_url_secrets(config.model_dump(mode="json"))
    notes = []
    for path in removed:
        again = ("REDIS_PASSWORD or REDIS_URL gives it to a resumed run"
                 if path == "buffer.redis_url" else f"give them again with --set {path}=...")
        notes.append(f"# {path}: {CREDENTIALS_REMOVED} ({again})\n")
    return "".join(notes) + yaml.safe_dump(data, sort_keys=False)


def credentials_missing(config_yaml: str, overrides: list[str]) -> list[str]:
    """The URLs whose credentials config.yaml says were removed (other than the Redis URL,
    which the environment supplies) and that `overrides` does not set again."""
    given = {o.split("=", 1)[0].strip() for o in overrides}
    missing = []
    for line in config_yaml.splitlines():
        if not line.startswith("# ") or f": {CREDENTIALS_REMOVED}" not in line:
            continue
        path = line[2:].split(":", 1)[0]
        if path != "buffer.redis_url" and not any(path == g or path.startswith(g + ".")
                                                  for g in given):
            missing.append(path)
    return missing


# Query parameters whose value is a credential: a word of the name (split at `_`, `-`, `.`
# and camelCase) is one of these, or the name ends with one of the second set (`accesstoken`).
# A parameter merely containing such a word (`ssl_keyfile`: a path) is kept.
SECRET_QUERY_WORDS = frozenset({"password", "passwd", "pass", "pwd", "token", "secret", "key",
                                "apikey", "auth", "sig", "signature", "credential",
                                "credentials"})
SECRET_QUERY_ENDINGS = ("password", "passwd", "token", "secret", "apikey")
# Schemes whose user name is an account name, kept, not a credential.
_NAMED_USER_SCHEMES = ("redis", "rediss", "unix")
# The environment variable through which an actor receives the URLs that
# `without_url_secrets` took credentials out of (JSON: {dotted path: original URL}).
SECRET_URLS_ENV = "OPGRPO_SECRET_URLS"


def secret_query_name(name: str) -> bool:
    """Whether a URL query parameter called `name` carries a credential."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    words = set(re.split(r"[^a-z0-9]+", spaced))
    return bool(words & SECRET_QUERY_WORDS) or name.lower().endswith(SECRET_QUERY_ENDINGS)


def redact_url(url: str, mask: str | None = "***") -> str:
    """`url` as logs, errors and the run's config.yaml may show it: credentials replaced by
    `mask`, or removed (None). Credentials are the password of the user info, the value of
    every password-like query parameter (`password`, `pass`, `token`, `secret`, `key`,
    `api_key`, `X-Amz-Signature`, ... in any case; see `secret_query_name`), a fragment, and
    the whole user info (`https://TOKEN@host`, `http://user:password@host`), except the user
    name of a Redis URL: the ACL user that the password (REDIS_PASSWORD) belongs to."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        if parts.scheme.lower() not in _NAMED_USER_SCHEMES:
            userinfo = mask or ""
        elif colon:
            userinfo = user if mask is None else f"{user}:{mask}"
        netloc = f"{userinfo}@{host}" if userinfo else host
    fields = []
    for field in parts.query.split("&") if parts.query else []:
        name, _, _ = field.partition("=")
        if not secret_query_name(unquote_plus(name)):
            fields.append(field)
        elif mask is not None:
            fields.append(f"{name}={mask}")
    query = "&".join(fields)
    fragment = parts.fragment and (mask or "")
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def url_password(url: str) -> str | None:
    """The password a Redis URL carries, decoded: its user info's, else a `password` query
    parameter's (redis-py reads both, the user info's first); None without one."""
    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    return next((value for name, value in parse_qsl(parts.query) if name == "password" and value),
                None)


def without_url_secrets(value: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """`value` (a config tree of dicts, lists and strings) with every URL in it as
    `redact_url(url, mask=None)` gives it, and {dotted path: original URL} of the URLs that
    changed. Actor arguments are built this way, so that no config object an actor receives
    carries a password; an actor that needs a URL's credentials gets the originals through
    its runtime_env (SECRET_URLS_ENV) and `with_url_secrets`."""
    found: dict[str, str] = {}

    def walk(item: Any, where: str) -> Any:
        if isinstance(item, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v, f"{where}.{i}") for i, v in enumerate(item)]
        if isinstance(item, str) and "://" in item:
            clean = redact_url(item, mask=None)
            if clean != item:
                found[where] = item
            return clean
        return item

    return walk(value, path), found


def with_url_secrets(value: Any, path: str = "", env: dict[str, str] | None = None) -> Any:
    """Inside an actor: `value` with the URLs that `without_url_secrets` cleaned put back from
    the environment (SECRET_URLS_ENV). A URL is restored only where the value at its path is
    still the cleaned form of the original; without the variable `value` is returned as is."""
    import json
    import os

    raw = (os.environ if env is None else env).get(SECRET_URLS_ENV)
    if not raw:
        return value
    originals: dict[str, str] = json.loads(raw)

    def walk(item: Any, where: str) -> Any:
        if isinstance(item, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v, f"{where}.{i}") for i, v in enumerate(item)]
        original = originals.get(where)
        if original is not None and item == redact_url(original, mask=None):
            return original
        return item

    return walk(value, path)
