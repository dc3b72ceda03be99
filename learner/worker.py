"""LearnerWorker: one DeepSpeed ZeRO rank that trains the policy with the OP-GRPO objective.

K workers form the learner group (see `learner.group`). Each holds a `FlowPolicy`; DeepSpeed
wraps its transformer with a client torch AdamW (no JIT-compiled optimizer, so CPU runs need no
compiler). Every iteration a rank receives its shard of whole groups as rollout-chunk refs,
shuffles the trajectories, cuts them into micro-batches and accumulates gradients one denoising
step at a time; DeepSpeed's gradient accumulation boundary falls every
micro-batches / optimizer_steps_per_pass micro-batches.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import torch

from learner.loss import stats_to_floats
from learner.objective import (
    LossSettings,
    MicroBatch,
    UpdateSize,
    accumulate_gradients,
    rescore_stale,
    trained_steps,
    update_micro_batches,
)
from opgrpo import metrics as M
from opgrpo.config import Config, torch_threads
from opgrpo.models import FlowPolicy
from opgrpo.sampling import SamplingSpec
from opgrpo.trajectory import Trajectory

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
# Optimizer updates of an iteration skipped because a loss in them was NaN or infinite.
SKIPPED_UPDATES = "loss/skipped_updates"


def init_distributed(use_gpu: bool) -> None:
    """`deepspeed.init_distributed` with NCCL on GPUs, gloo on CPU.

    On CPU, DeepSpeed's torch backend JIT-compiles its shared-memory all-reduce op
    (`deepspeed_shm_comm`, a C++ extension) when it starts: a minute or more of compiling on a
    small machine, again whenever the build's flags or paths change, and it needs a compiler.
    Training never uses it (it serves only `inference_all_reduce`; gradients go through
    torch.distributed), so on CPU it is marked incompatible first, which DeepSpeed reads as
    "not available" and skips."""
    import deepspeed

    if not use_gpu:
        import deepspeed.ops

        # DeepSpeed probes its ops once per process and keeps the dict (edits persist)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


class BatchLost(RuntimeError):
    """An iteration's trajectories could not be fetched; the driver draws the step again."""

log = logging.getLogger(__name__)


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW, whose step does nothing while `skip` is set: the learner sets it for an
    update in which a loss was NaN or infinite, so that neither the weights nor the optimizer
    state take garbage gradients. DeepSpeed's ZeRO optimizers call this step on their float32
    partitions, so the guard holds whatever the stage."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def nan_mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean ignoring NaN (a statistic absent from a micro-batch, e.g. off-policy
    clip fraction without off-policy samples); NaN only where every row is NaN. Keys ending
    in `_max` (a maximum per micro-batch) take the maximum instead."""
    out = {}
    for key in rows[0] if rows else []:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        if not values:
            out[key] = math.nan
        else:
            out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
    return out


def micro_batches_per_rank(config: Config) -> tuple[int, int]:
    """(trajectories per rank, micro-batches per rank) of one iteration."""
    total = config.rollout.prompts_per_step * config.rollout.group_size
    per_rank = total // config.learner.num_ranks
    return per_rank, -(-per_rank // config.learner.micro_batch_size)


def deepspeed_config(config: Config) -> dict:
    """The DeepSpeed config of a learner rank, derived from the run config."""
    _, n_micro = micro_batches_per_rank(config)
    per_update = n_micro // config.learner.optimizer_steps_per_pass
    backwards = per_update * len(trained_steps(config.sampling.num_steps,
                                               config.learner.timestep_fraction))
    zero: dict = {"stage": config.learner.zero_stage}
    if config.learner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if config.learner.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": config.learner.micro_batch_size,
        "gradient_accumulation_steps": backwards,
        "gradient_clipping": config.learner.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # The client optimizer (torch AdamW) also steps on offloaded state; DeepSpeed's own
        # CPU Adam needs a compiled extension.
        "zero_force_ds_cpu_optimizer": False,
        **precision_config(config),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def precision_config(config: Config) -> dict:
    """DeepSpeed's precision sections for the run's model dtype.

    With LoRA, DeepSpeed runs in float32 over the float32 LoRA weights (`models.py` loads the
    frozen transformer in the model dtype and the adapter in float32, as Flow-GRPO does):
    DeepSpeed's bf16 mode would cast the adapter to bf16, so the rollout actors (float32 LoRA)
    and the learner would compute different log-probs, and gradients would add up in bf16 over
    every backward of an update. The frozen base still runs in bf16. Full fine-tuning in bf16
    or fp16 uses DeepSpeed's half-precision mode with float32 master weights and float32
    gradient accumulation (`data_types.grad_accum_dtype`).
    """
    half = config.model.dtype in ("bfloat16", "float16") and config.model.lora_rank == 0
    out: dict = {"bf16": {"enabled": half and config.model.dtype == "bfloat16"},
                 "fp16": {"enabled": half and config.model.dtype == "float16"}}
    if half:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


class LearnerWorker:
    """One learner rank. Call `address` on rank 0, then `setup` on every rank."""

    def __init__(self, config: dict, rank: int, world_size: int) -> None:
        self.config = Config.model_validate(config)
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self.ema = None  # diffusers' EMAModel on rank 0 when learner.ema is on (see _new_ema)
        self.version = 0

    def identity(self) -> dict:
        """This rank's process id and Ray node id (fault tests, memory checks)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: the rendezvous of the group (rank 0 only)."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build the policy and the DeepSpeed engine."""
        use_gpu = torch.cuda.is_available() and self.config.learner.num_gpus > 0
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
                           "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                           "LOCAL_RANK": "0"})
        init_distributed(use_gpu)
        cfg = self.config
        torch.manual_seed(cfg.run.seed)
        torch.set_num_threads(torch_threads(cfg, cfg.learner.num_cpus))
        return self.build(FlowPolicy.from_config(
            cfg, device="cuda" if use_gpu else "cpu",
            keep_reference=cfg.learner.kl_beta > 0 and cfg.model.lora_rank == 0,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        ))

    def build(self, policy: FlowPolicy) -> int:
        """This rank's optimizer, DeepSpeed engine and EMA over `policy` (the process group
        is up); `bench/gpu_check.py` calls it on a policy it built itself. Returns the number
        of trainable parameters."""
        import deepspeed

        cfg = self.config
        self.policy = policy
        params = self.policy.trainable_parameters()
        optimizer = GuardedAdamW(params, lr=cfg.learner.learning_rate,
                                 betas=cfg.learner.adam_betas,
                                 weight_decay=cfg.learner.weight_decay)
        self.optimizer = optimizer
        self._bad_loss: torch.Tensor | None = None  # a non-finite loss in this update so far
        self._skipped = 0
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy.transformer, optimizer=optimizer, config=deepspeed_config(cfg),
        )
        # Checkpoint files as safetensors + JSON instead of DeepSpeed's pickles: a checkpoint
        # copied from elsewhere cannot run code when a run resumes from it.
        from learner.safe_state import SafeCheckpointEngine

        self.engine.checkpoint_engine = SafeCheckpointEngine()
        self.ema = self._new_ema()
        self.spec = SamplingSpec.from_config(cfg)
        self.settings = LossSettings.from_config(cfg)
        return sum(p.numel() for p in params)

    def train(self, chunks: list, rows: list[dict], iteration: int) -> dict[str, float]:
        """`optimizer_steps_per_pass` optimizer steps per pass over this rank's shard.

        chunks: rollout results (object refs or values) this shard draws from.
        rows: one per trajectory: {chunk, index, advantage, valid}.
        """
        resolved = self._fetch_all(chunks)
        began = time.perf_counter()
        trajectories: list[Trajectory] = [resolved[r["chunk"]][r["index"]] for r in rows]
        # pi_old is this rank's weights now: samples drawn by an older version (async mode)
        # get their old log-probs from one no-grad forward per step before any update.
        trajectories, n_stale = rescore_stale(
            self.policy, trajectories, self.version, self.spec, self.settings,
            self.config.learner.micro_batch_size, forward_all=self._any_rank_stale(trajectories))
        rescored_s = time.perf_counter() - began
        advantages = torch.tensor([r["advantage"] for r in rows], dtype=torch.float32)
        valid = torch.tensor([r["valid"] for r in rows], dtype=torch.bool)
        mb = self.config.learner.micro_batch_size
        _, n_micro = micro_batches_per_rank(self.config)
        if -(-len(rows) // mb) != n_micro:
            raise ValueError(f"rank {self.rank} got {len(rows)} trajectories; expected "
                             f"{n_micro} micro-batches of {mb}")
        collected: list[dict[str, float]] = []
        self._skipped = 0
        rng = random.Random(f"{self.config.run.seed}/{iteration}/{self.rank}")
        for _ in range(self.config.learner.updates_per_step):
            order = list(range(len(rows)))
            rng.shuffle(order)  # docs/algorithm.md 5: shuffle before cutting micro-batches
            for update in update_micro_batches(order, mb,
                                               self.config.learner.optimizer_steps_per_pass):
                size = self._update_size(valid[[i for idx in update for i in idx]])
                for idx in update:
                    batch = MicroBatch.from_trajectories(
                        [trajectories[i] for i in idx], advantages[idx], valid[idx],
                        device=self.policy.device)
                    collected.append(stats_to_floats(accumulate_gradients(
                        self.policy, batch, self.spec, self.settings, self._backward,
                        update=size)))
        self.version += 1
        return {**nan_mean(collected), M.POLICY_RESCORED_FRACTION: n_stale / max(1, len(rows)),
                SKIPPED_UPDATES: float(self._skipped),
                "time/learner_rescore": rescored_s,
                "time/learner_compute": time.perf_counter() - began}

    def _update_size(self, valid: torch.Tensor) -> UpdateSize:
        """The update's sample counts over all ranks, per rank (DeepSpeed averages the ranks'
        gradients), so the loss is the mean over the update's samples of every rank."""
        if self.world_size == 1:
            return UpdateSize.of(valid)
        import torch.distributed as dist

        counts = torch.tensor([float(valid.sum()), float(valid.numel())], dtype=torch.float64)
        dist.all_reduce(counts)
        return UpdateSize(float(counts[0]) / self.world_size, float(counts[1]) / self.world_size)

    def _any_rank_stale(self, trajectories: list[Trajectory]) -> bool:
        """Whether any rank has samples to re-score. Then every rank runs the forwards over
        all of its samples: ranks hold equally many, and under ZeRO-3 each forward gathers
        the parameters collectively, so all ranks must run the same number of them."""
        if self.world_size == 1:
            return False
        import torch.distributed as dist

        mine = any(t.rollout_version != self.version for t in trajectories)
        flag = torch.tensor([int(mine)], dtype=torch.int64)
        dist.all_reduce(flag)
        return int(flag.item()) > 0

    def _fetch_all(self, chunks: list) -> list:
        """Every chunk this rank trains on, or BatchLost on every rank: the ranks agree before
        any compute, so a group is trained whole or not at all (a chunk can be lost with the
        node whose object store held it)."""
        import ray

        try:
            resolved, missing = [ray.get(c) if isinstance(c, ray.ObjectRef) else c
                                 for c in chunks], None
        except (ray.exceptions.ObjectLostError, ray.exceptions.ObjectFetchTimedOutError,
                ray.exceptions.RayActorError) as exc:
            resolved, missing = [], exc
        lost = 1 if missing is not None else 0
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([lost], dtype=torch.int64)
            dist.all_reduce(flag)
            lost = int(flag.item())
        if lost:
            raise BatchLost(f"rank {self.rank}: trajectories of this iteration were lost before "
                            f"training ({type(missing).__name__ if missing else 'on another rank'}"
                            "); no rank trained on them")
        return resolved

    def _backward(self, loss: torch.Tensor) -> None:
        """Backward of one step's loss, then DeepSpeed's step (a no-op except at the
        accumulation boundary). An update in which any rank saw a NaN or infinite loss is
        not applied: its optimizer step is skipped on every rank and counted."""
        bad = ~torch.isfinite(loss.detach())  # on the device: no sync until the boundary
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss, scale_wrt_gas=False)
        skip = boundary and self._update_not_finite()
        self.optimizer.skip = skip
        before = self.engine.global_steps
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = False
        if boundary:
            self._bad_loss = None
        if skip:
            self._skipped += 1
            log.warning("rank %d: a loss of this update was NaN or infinite; the update is "
                        "skipped (weights and optimizer state unchanged)", self.rank)
        elif self.ema is not None and self.engine.global_steps != before:
            self._ema_after_step()

    def _update_not_finite(self) -> bool:
        """Whether a loss of the update now ending was NaN or infinite on any rank (the ranks
        agree, so all of them skip it or none)."""
        flag = self._bad_loss.reshape(1).to(torch.int64)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ----- EMA of the trainable weights (learner.ema) ------------------------------------
    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.policy.transformer.named_parameters() if p.requires_grad]

    def _new_ema(self):
        """diffusers' EMAModel over the trainable weights as they are now, on rank 0 only (the
        ranks hold the same whole weights under ZeRO 0-2; ZeRO-3 is refused by the config).
        Its shadow weights are float32 whatever the model dtype. `min_decay = decay` turns off
        EMAModel's decay warm-up ((1 + n) / (10 + n)): after its first update, which copies the
        weights, every update mixes with the configured decay."""
        if not self.config.learner.ema or self.rank != 0:
            return None
        from diffusers.training_utils import EMAModel

        decay = self.config.learner.ema_decay
        ema = EMAModel([p for _, p in self._trainable_named()], decay=decay, min_decay=decay)
        ema.to(dtype=torch.float32)
        self._ema_pending = 0  # optimizer steps since the last EMA update
        return ema

    def _ema_after_step(self) -> None:
        """Called after each optimizer step: every `learner.ema_update_every`-th updates."""
        self._ema_pending += 1
        if self._ema_pending >= self.config.learner.ema_update_every:
            self._ema_pending = 0
            self.ema.step([p for _, p in self._trainable_named()])

    def export_ema_weights(self) -> dict[str, np.ndarray] | None:
        """The EMA of the trainable weights (float32) from rank 0, named as `export_weights`;
        None on other ranks. Raises when `learner.ema` is off."""
        if not self.config.learner.ema:
            raise RuntimeError("learner.ema is off: there are no EMA weights")
        if self.ema is None:
            return None
        return {n: s.detach().float().cpu().numpy().copy()
                for (n, _), s in zip(self._trainable_named(), self.ema.shadow_params,
                                     strict=True)}

    def export_weights(self) -> dict[str, np.ndarray] | None:
        """Trainable weights (gathered under ZeRO-3) from rank 0; every rank must call."""
        params = dict(self.policy.transformer.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad]
        if self.config.learner.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([params[n] for n in names]):
                state = {n: params[n].detach().float().cpu().numpy().copy() for n in names}
        else:
            state = {n: params[n].detach().float().cpu().numpy().copy() for n in names}
        return state if self.rank == 0 else None

    def save_checkpoint(self, directory: str, tag: str) -> str:
        """DeepSpeed's state (for resuming) plus the trainable weights as safetensors (for
        `opgrpo export`, readable without unpickling); every rank must call."""
        # Frozen weights come from model.path on resume: a LoRA checkpoint holds the adapter
        # and its optimizer state only, not the whole transformer.
        self.engine.save_checkpoint(directory, tag=tag, client_state={"version": self.version},
                                    exclude_frozen_parameters=True)
        if self.rank == 0:  # DeepSpeed's recovery scripts read pickles: not for these files
            for script in RECOVERY_SCRIPTS:
                (Path(directory) / tag / script).unlink(missing_ok=True)
        state = self.export_weights()  # gathers under ZeRO-3: all ranks take part
        if self.rank == 0:
            from safetensors.numpy import save_file

            from opgrpo.durable import atomic_write  # temp file, fsync, rename, fsync dir
            from opgrpo.export import WEIGHTS_FILE

            atomic_write(Path(directory) / tag / WEIGHTS_FILE, lambda tmp: save_file(
                state, str(tmp), metadata={"version": str(self.version)}))
            if self.ema is not None:
                self._save_ema(Path(directory) / tag)
        return tag

    def _save_ema(self, tag_dir: Path) -> None:
        """The EMA weights as safetensors beside the trainable ones (`EMA_FILE`), with the
        EMAModel's update count and the counter of steps towards the next update."""
        from safetensors.numpy import save_file

        from opgrpo.durable import atomic_write
        from opgrpo.export import EMA_FILE

        weights = self.export_ema_weights()
        atomic_write(tag_dir / EMA_FILE, lambda tmp: save_file(weights, str(tmp), metadata={
            "version": str(self.version), "decay": str(self.ema.decay),
            "optimization_step": str(self.ema.optimization_step),
            "pending": str(self._ema_pending)}))

    def _load_ema(self, tag_dir: Path) -> None:
        """Restore the EMA saved with a checkpoint; one without it (written with learner.ema
        off) starts the EMA from the weights just loaded, with a warning."""
        from opgrpo.export import EMA_FILE, load_trainable

        self.ema = self._new_ema()  # from the loaded weights
        path = tag_dir / EMA_FILE
        if not path.is_file():
            log.warning("%s has no EMA weights (%s): the EMA starts from the checkpoint's "
                        "weights", tag_dir, EMA_FILE)
            return
        saved, meta = load_trainable(path)
        names = [n for n, _ in self._trainable_named()]
        if set(saved) != set(names):
            wrong = sorted(set(saved) ^ set(names))
            raise ValueError(f"{path} does not match the trainable weights of this config "
                             f"({len(wrong)} names differ, e.g. {wrong[:3]})")
        self.ema.load_state_dict({
            "optimization_step": int(meta["optimization_step"]),
            "shadow_params": [saved[n].to(device=s.device, dtype=torch.float32)
                              for n, s in zip(names, self.ema.shadow_params, strict=True)]})
        self._ema_pending = int(meta.get("pending", 0))

    def load_checkpoint(self, directory: str, tag: str) -> int:
        """Resume from `directory/tag`: frozen weights stay as loaded from model.path, every
        trainable weight must be in the checkpoint (checked here: DeepSpeed's non-strict load
        would skip a missing one silently)."""
        from learner.safe_state import load_state

        states = Path(directory) / tag / "mp_rank_00_model_states.pt"
        if states.is_file():
            saved = load_state(states)["module"]
            params = dict(self.policy.transformer.named_parameters())
            trainable = {n for n, p in params.items() if p.requires_grad}
            buffers = {n for n, _ in self.policy.transformer.named_buffers()}
            missing = sorted(trainable - set(saved))
            unknown = sorted(set(saved) - set(params) - buffers)
            reshaped = sorted(  # ZeRO-3 saves empty placeholders: no shape to compare
                n for n in trainable & set(saved) if saved[n].numel()
                and tuple(saved[n].shape) != tuple(getattr(params[n], "ds_shape",
                                                           params[n].shape)))
            wrong = missing + unknown + reshaped
            if wrong:
                raise ValueError(f"{states} lacks or mismatches {len(wrong)} trainable weights "
                                 f"of this config (e.g. {wrong[:3]}): was it written with another "
                                 "model.lora_rank or model.lora_target_modules?")
        _, client_state = self.engine.load_checkpoint(directory, tag=tag,
                                                      load_module_strict=False)
        self.version = int(client_state["version"])
        if self.config.learner.ema and self.rank == 0:
            self._load_ema(Path(directory) / tag)
        return self.version
