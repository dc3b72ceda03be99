"""`opgrpo train`: set up a run (Ray, actors, run directory), loop, checkpoint, resume.

The run directory `runs/<name>/` holds `config.yaml` (resolved), `metrics.jsonl` (one JSON
object per step), `checkpoints/` (DeepSpeed state and a `manifest.json` per checkpoint,
`latest.json`; see `opgrpo.durable`), `samples/` (eval grids),
`redis/` (the embedded buffer's data) and `eval.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from actors.control import NAMESPACE, Control, control_name
from actors.pool import (
    RewardPool,
    RolloutPool,
    fault_options,
    is_actor_failure,
    is_lost_data,
    resource_requests,
    runtime_env_with,
)
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker, StaleWeights
from buffer_service.actor import BufferService, RedisRefused, RedisUnavailable, connect_redis
from learner.group import LearnerGroup
from learner.stats import batch_statistics
from learner.worker import SKIPPED_UPDATES, LearnerWorker, nan_mean
from opgrpo import durable
from opgrpo import metrics as M
from opgrpo.config import (
    Config,
    credentials_missing,
    dump_config,
    load_config,
    redact_url,
    url_password,
)
from opgrpo.driver import (
    Iteration,
    Rollout,
    admit_winners,
    advantages_of,
    learner_shards,
    replay_group_metrics,
    score,
    timed,
)
from opgrpo.errors import BufferMismatch, RunStopped
from opgrpo.loggers import check_loggers, make_loggers
from opgrpo.models import check_model_dir, policy_class
from opgrpo.preflight import check_requests, get_within, wait_within
from opgrpo.prompts import load_prompts

log = logging.getLogger(__name__)
BUFFER_FINGERPRINT = "buffer.json"  # in a checkpoint: the buffer's fingerprint at its step
ROLLOUT_ATTEMPTS = 3  # an iteration's rollout is redone at most this often after actor loss
GROUP_RESTARTS = "learner/group_restarts"  # learner groups rebuilt so far in this process


class LearnerFailed(RuntimeError):
    """A learner rank died or raised in an update or a weight export (`__cause__`)."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_model(config: Config) -> None:
    """The model directory against the run's model settings, from its JSON files alone (no
    weights are read, Ray is not started): a diffusers pipeline (`check_model_dir`) of a
    supported family (`policy_class`, by model_index.json), an image or a video model as
    model.num_frames says, and model.height/width multiples of what its VAE and patch size
    need. Each refusal names the directory, its pipeline class and the setting; the actors
    would otherwise fail on it only after Ray and every actor started."""
    path = check_model_dir(config.model.path)
    family = policy_class(path)  # an unsupported pipeline class: ValueError naming the file
    name, model = family.pipeline_class, config.model
    index = _read_json(path / "model_index.json")
    transformer = _read_json(path / "transformer" / "config.json")
    has_vae = bool((index.get("vae") or [None])[0])
    vae = _read_json(path / "vae" / "config.json") if has_vae else {}
    patch = transformer.get("patch_size", 1)
    if family.is_video:
        temporal = int(vae.get("scale_factor_temporal", 4))
        if (model.num_frames - 1) % temporal:
            raise ValueError(f"model.num_frames ({model.num_frames}) must be {temporal} k + 1 "
                             f"for {path} ({name}: its VAE compresses time {temporal}x), "
                             "e.g. 1, 5, 81")
        multiple = int(vae.get("scale_factor_spatial", 8)) * int(
            patch[1] if isinstance(patch, list) else patch)
    else:
        if model.num_frames != 1:
            raise ValueError(f"model.num_frames is {model.num_frames}, but {path} holds a "
                             f"{name}, an image model: set model.num_frames 1, or point "
                             "model.path at a video model (WanPipeline)")
        blocks = vae.get("block_out_channels") or [0]
        factor = 2 ** (len(blocks) - 1)
        # FLUX packs 2x2 latent cells into a token; SD3 patches by its config's patch_size
        multiple = factor * (2 if name == "FluxPipeline" else int(patch))
    if model.height % multiple or model.width % multiple:
        raise ValueError(f"model.height x model.width ({model.height}x{model.width}) must be "
                         f"multiples of {multiple} for {path} ({name}: VAE factor x patch "
                         "size)")


def _absolute(config: Config) -> Config:
    """Actors may run in another working directory: pass them absolute paths (the model, and
    reward options that name existing files). The GenEval client's metadata defaults to the
    run's prompt files."""
    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        # a path, not a word like `tesseract`: it has a directory part and exists
        if (isinstance(value, str) and "://" not in value and Path(value).parent != Path()
                and Path(value).exists()):
            return str(Path(value).resolve())
        return value

    data = config.model_dump(mode="json")
    data["model"]["path"] = str(Path(config.model.path).resolve())
    options = data["reward"]["options"]
    if "geneval" in config.reward.functions:
        geneval = options.setdefault("geneval", {})
        if not geneval.get("metadata_files"):
            geneval["metadata_files"] = [f for f in (config.train.prompts_file,
                                                     config.train.eval_prompts_file) if f]
    for name in options:
        options[name] = {key: resolve(value) for key, value in options[name].items()}
    return Config.model_validate(data)


def runtime_env(config: Config) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if config.learner.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    return {"env_vars": env}


RUN_ID = "run_id"  # in the run directory: the run's id, made at its first start


def run_id(run_dir: Path, create: bool) -> str | None:
    """The run's id (12 hex digits) from `run_dir/run_id`; made and written atomically when
    absent and `create` (a new run), else None (a run started before run ids)."""
    path = Path(run_dir) / RUN_ID
    if path.is_file():
        return path.read_text().strip()
    if not create:
        return None
    value = uuid.uuid4().hex[:12]
    durable.atomic_write_text(path, value + "\n")
    return value


def buffer_namespace(run_name: str, run_id: str | None) -> str:
    """The run's Redis key prefix: `opgrpo:<run name>:<run id>`, so that two runs with the
    same run.name on one Redis never share a buffer (`opgrpo:<run name>` without an id)."""
    return f"opgrpo:{run_name}" if run_id is None else f"opgrpo:{run_name}:{run_id}"


def buffer_actor_args(config: Config, run_dir: Path, runtime_env: dict,
                      run_id: str | None = None) -> tuple[tuple, dict]:
    """The buffer actor's constructor arguments and runtime_env (its namespace:
    `buffer_namespace`). Its Redis URL goes without the password, which reaches this actor
    alone as REDIS_PASSWORD (buffer_service.actor uses it when the URL has none): no config
    object that Ray ships carries it."""
    data = config.buffer.model_dump()
    password = None
    if data["redis_url"]:
        password = url_password(data["redis_url"])
        data["redis_url"] = redact_url(data["redis_url"], mask=None)
    args = (data, str(Path(run_dir).resolve()), buffer_namespace(config.run.name, run_id),
            config.sampling.latent_storage_dtype)
    return args, runtime_env_with(runtime_env, {"REDIS_PASSWORD": password} if password else {})


def prune_checkpoints(directory: Path, keep: int | None, latest_tag: str) -> list[str]:
    """Delete the `stepN` checkpoints beyond the newest `keep` (never `latest_tag`); returns
    the deleted tags. `keep` None keeps all. Complete checkpoints (with a manifest) rank before
    incomplete ones, so that a directory left by a failed save never pushes out the checkpoint
    a resume would fall back to; directories newer than `latest_tag` (a run resumed at an
    older step) are neither counted nor deleted."""
    import shutil

    if keep is None:
        return []
    steps = [s for s in durable.checkpoint_steps(directory) if s <= int(latest_tag[4:])]
    ranked = sorted(steps, reverse=True, key=lambda s: (
        (directory / f"step{s}" / durable.MANIFEST).is_file(), s))
    doomed = [f"step{s}" for s in sorted(ranked[keep:]) if f"step{s}" != latest_tag]
    for tag in doomed:
        shutil.rmtree(directory / tag)
    return doomed


@dataclass(frozen=True)
class WorkerClasses:
    """The actor classes a Trainer starts. The defaults are the real ones; `bench/system.py`
    swaps in stand-ins whose compute is a calibrated sleep to measure orchestration alone."""

    rollout: type = RolloutWorker
    reward: type = RewardWorker
    learner: type = LearnerWorker


def eval_shards(n_prompts: int, n_actors: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) prompt ranges, one per actor that gets any, sizes within one."""
    parts = max(1, min(n_prompts, n_actors))
    bounds = [round(i * n_prompts / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def eval_results(image_refs: list, part_refs: list, step: int, timeout_s: float,
                 actors: tuple[int, int]) -> list[dict]:
    """The evaluation's per-shard scores: waits at most `timeout_s` (train.eval_timeout_s)
    for the images of every shard (shard i from rollout actor i) and then for their scores
    (from reward actor i mod the reward actors); WaitTimeout names the actor and the step."""
    n_rollout, n_reward = actors
    began = time.monotonic()
    wait_within(image_refs, timeout_s, lambda i: f"rollout actor {i % n_rollout}: the "
                f"evaluation images of step {step} (shard {i})", "train.eval_timeout_s")
    left = max(1.0, timeout_s - (time.monotonic() - began))
    return get_within(part_refs, left, lambda i: f"reward actor {i % n_reward}: the "
                      f"evaluation scores of step {step} (shard {i})", "train.eval_timeout_s")


def per_tag_means(values: np.ndarray, tags: list[str | None]) -> dict[str, float]:
    """Mean of `values` per prompt tag (the `tag` field of a JSONL prompt file, as GenEval's
    metadata has), tags in first-seen order; untagged prompts are left out."""
    groups: dict[str, list[float]] = {}
    for value, tag in zip(values, tags):
        if tag is not None:
            groups.setdefault(str(tag), []).append(float(value))
    return {tag: float(np.mean(v)) for tag, v in groups.items()}


def check_fingerprint(tag_dir: Path, have: dict, exact_resume: bool, accept_buffer: bool,
                      where: str, run_dir: Path) -> None:
    """Compare the buffer's fingerprint `have` with the one checkpoint `tag_dir` stored (see
    `Trainer.check_buffer`): BufferMismatch, or with `accept_buffer` a warning saying what
    was lost."""
    want = json.loads((tag_dir / BUFFER_FINGERPRINT).read_text())
    if have["sha256"] == want["sha256"]:
        log.info("replay buffer matches checkpoint %s (%d entries)", tag_dir.name,
                 have["entries"])
        return
    if not exact_resume and (have["entries"] > 0 or want["entries"] == 0):
        log.warning("replay buffer differs from checkpoint %s (%d entries now, %d then; "
                    "buffer.exact_resume is off, so a rollback is approximate)", tag_dir.name,
                    have["entries"], want["entries"])
        return
    lost = (f"the checkpoint's buffer held {want['entries']} entries, Redis ({where}) now "
            f"holds {have['entries']} and they do not match")
    if accept_buffer:
        log.warning("--accept-buffer: %s; training goes on with the buffer as it is (what "
                    "is missing is lost)", lost)
        return
    raise BufferMismatch(
        f"the replay buffer does not match checkpoint {tag_dir.name}: {lost} (flushed, "
        "restarted without its data, or another Redis). Restore Redis from its append-only "
        "file or a backup and resume again, or resume with the buffer as it is: opgrpo train "
        f"--resume {run_dir} --accept-buffer")


class Trainer:
    def __init__(self, config: Config, run_dir: Path, resume: bool = False,
                 workers: WorkerClasses | None = None, accept_buffer: bool = False) -> None:
        self.config, self.run_dir, self.resume = config, run_dir, resume
        self.accept_buffer = accept_buffer  # resume with a buffer unlike the checkpoint's
        self.workers = workers or WorkerClasses()
        check_loggers(config.run.loggers)  # an extra asked for but not installed
        if not config.model.path:
            raise ValueError("model.path is not set: point it at a diffusers model directory")
        check_model(config)
        if config.train.prompts_file is None:
            raise ValueError("train.prompts_file is not set: point it at a prompt file")
        self.dataset = load_prompts(config.train.prompts_file)
        if len(self.dataset) < config.rollout.prompts_per_step:  # else step 1 fails
            raise ValueError(f"train.prompts_file {config.train.prompts_file} holds "
                             f"{len(self.dataset)} prompts, fewer than the "
                             f"rollout.prompts_per_step ({config.rollout.prompts_per_step}) "
                             "distinct prompts each step draws: add prompts or lower "
                             "rollout.prompts_per_step")
        self._nonfinite_steps: list[int] = []  # consecutive steps with a skipped update
        self.eval_prompts = (load_prompts(config.train.eval_prompts_file)
                             if config.train.eval_prompts_file else [])
        from actors.rewards import get_reward

        if not config.reward.functions:
            raise ValueError("reward.functions is empty: name at least one reward, e.g. "
                             "{shapes_partial: 1.0}")
        for name in config.reward.functions:  # names, options and the files they name
            get_reward(name).check_options(config.reward.options.get(name))
        url = config.buffer.redis_url or os.environ.get("REDIS_URL")
        if url:  # unreachable, or a wrong password: say so before anything starts
            connect_redis(url, None)[0].close()
        self.config = _absolute(config)
        if warning := config.shared_gpu_warning():
            log.warning(warning)

    # ----- setup ---------------------------------------------------------------------------
    def start_actors(self) -> None:
        cfg, env = self.config, runtime_env(self.config)
        # The control and buffer actors stay on the driver's node (hard affinity: a soft
        # preference let Ray place them on worker nodes, which may be lost): the control
        # actor must outlive any worker node, and the embedded Redis keeps its files in the
        # run directory, which is on this machine. With an external Redis the buffer actor
        # could live anywhere, but the driver's node is the one the run cannot lose anyway.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if cfg.run.check_cluster_resources:  # what can never be placed fails now, not later
            first = cfg.rollout.num_actors if isinstance(cfg.rollout.num_actors, int) else 1
            check_requests(resource_requests(cfg, first))
        here = ray.get_runtime_context().get_node_id()
        self.run_id = run_id(self.run_dir, create=not self.resume)
        if self.run_id is None:
            log.info("%s has no %s (started before run ids): its buffer namespace and control "
                     "actor go by run.name alone", self.run_dir, RUN_ID)
        self.control_actor = control_name(cfg.run.name, self.run_id)
        self.control = ray.remote(Control).options(
            name=self.control_actor, namespace=NAMESPACE, get_if_exists=True,
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            # A restarted control actor starts empty: the driver puts the weights back at the
            # next sync, and a pending `opgrpo scale` request is lost (the config's size holds).
            **fault_options(cfg),
        ).remote()
        # Ray restarts a killed buffer actor; it reconnects to Redis, where the buffer lives.
        buffer_args, buffer_env = buffer_actor_args(cfg, self.run_dir, env, self.run_id)
        self.buffer = ray.remote(BufferService).options(
            num_cpus=0, runtime_env=buffer_env, **fault_options(cfg),
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
            *buffer_args)
        # The learner ranks set up (DeepSpeed) while the rollout and reward actors load.
        self.learners = LearnerGroup(cfg, env, self.workers.learner)
        self.rollout = RolloutPool(cfg, env, self.workers.rollout, control=self.control,
                                   control_actor=self.control_actor)
        self.rewards = RewardPool(cfg, env, self.workers.reward)
        self.rollout.resize(self._requested_rollout())
        self.learners.wait_ready()
        self.rewards.wait_ready()

    def _requested_rollout(self) -> int:
        asked, held = get_within(self.control.status.remote(), self.config.train.step_timeout_s,
                                 "control actor: status", "train.step_timeout_s")
        self.rollout.restore_control(held)
        return self.rollout.target_size(asked if asked is not None
                                        else self.config.rollout.num_actors)

    def _sync_weights(self) -> int:
        """Push the learner's weights to the rollout actors as `self.version`. In async mode
        the push is not waited for: each actor takes it after the chunks it already has
        queued (a chunk is drawn with one version), so the learner goes on at once."""
        state_ref, all_refs = self.learners.export_weights_async()
        # other ranks only join the gather; their errors surface here
        try:
            get_within(all_refs[1:], self.config.train.step_timeout_s,
                       lambda i: f"learner rank {i + 1}: weight export of version "
                       f"{self.version}", "train.step_timeout_s")
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            raise LearnerFailed(f"weight export of version {self.version}") from exc
        # straight from rank 0's store
        self.rollout.set_weights(state_ref, self.version, wait=self.config.staleness == 0)
        return self.version

    # ----- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, step: int, with_buffer: bool = True) -> None:
        """Learner state, then its manifest (every file's size and sha256, each file fsynced),
        then the buffer's snapshot, then `latest.json` (the commit point: a run killed before
        it resumes from the previous checkpoint, whose buffer state is still recoverable),
        then pruning, then the buffer drops what neither this checkpoint nor the one a resume
        would fall back to (the newest older complete one) needs. A write that fails (a full
        disk) removes the incomplete checkpoint and stops the run with a message."""
        import shutil

        directory = self.run_dir / "checkpoints"
        tag = f"step{step}"
        try:
            # a directory of this step is from an attempt that never completed or a run that
            # resumed at an older step: latest.json names an older checkpoint
            shutil.rmtree(directory / tag, ignore_errors=True)
            self.learners.save_checkpoint(str(directory.resolve()), tag)
            durable.write_manifest(directory / tag, step=step, tag=tag, version=self.version)
        except Exception as exc:
            shutil.rmtree(directory / tag, ignore_errors=True)  # frees what it took
            self._stop_for_write(exc, f"the checkpoint of step {step}", directory / tag,
                                 "its incomplete files were removed; ")
            raise
        fingerprint = None
        if with_buffer:
            fingerprint = self._buffer_call("checkpoint", step)
            try:  # beside the manifest, not in it: a resume compares the buffer with it
                durable.atomic_write_json(directory / tag / BUFFER_FINGERPRINT, fingerprint)
            except OSError as exc:
                shutil.rmtree(directory / tag, ignore_errors=True)
                self._stop_for_write(exc, f"the checkpoint of step {step}", directory / tag,
                                     "its incomplete files were removed; ")
                raise
        try:
            durable.atomic_write_json(directory / durable.LATEST, {
                "step": step, "tag": tag, "version": self.version,
                "manifest": durable.MANIFEST, "buffer": fingerprint})
        except OSError as exc:
            try:  # is the new latest.json in place (only its directory's fsync failed)?
                named = json.loads((directory / durable.LATEST).read_text())["tag"]
            except (OSError, ValueError, KeyError, TypeError):
                named = None
            if named != tag:
                shutil.rmtree(directory / tag, ignore_errors=True)
            self._stop_for_write(exc, f"the checkpoint of step {step}", directory / tag,
                                 "its incomplete files were removed; ")
            raise
        self.last_checkpoint = step
        # only after the new checkpoint is complete (latest.json names it)
        prune_checkpoints(directory, self.config.train.keep_checkpoints, tag)
        if with_buffer:
            fallback = next((s for s in durable.checkpoint_steps(directory) if s < step and (
                directory / f"step{s}" / durable.MANIFEST).is_file()), step)
            self._buffer_call("checkpoint_done", fallback)

    def _buffer_call(self, method: str, *args):
        """The buffer actor's `method(*args)`, waited for at most train.step_timeout_s."""
        return get_within(getattr(self.buffer, method).remote(*args),
                          self.config.train.step_timeout_s,
                          f"buffer actor: {method}({', '.join(map(str, args))})",
                          "train.step_timeout_s")

    def _stop_for_write(self, exc: BaseException, what: str, where: Path,
                        done: str = "") -> None:
        """A write of a run file that failed for an I/O reason (a full disk, a file-size
        limit) stops the run with a one-line message naming the file and the reason
        (RunStopped); anything else is left to the caller."""
        failed = durable.write_error(exc)
        if failed is None:
            return
        _, reason, name = failed
        last = getattr(self, "last_checkpoint", 0)
        then = (f"the last complete checkpoint is step {last}; once there is room: opgrpo "
                f"train --resume {self.run_dir}" if last else "no checkpoint to resume from")
        raise RunStopped(f"{what} could not be written: {name or where}: {reason}. The run "
                         f"stopped; {done}{then}") from None

    @contextlib.contextmanager
    def _writing(self, what: str, where: Path):
        """Around a write of a run file: see `_stop_for_write`."""
        try:
            yield
        except OSError as exc:
            self._stop_for_write(exc, what, where)
            raise

    def resume_point(self) -> dict:
        """The checkpoint a resume loads ({step, tag, version}): the latest if it verifies
        against its manifest, else the newest older one that does (`durable.resume_checkpoint`;
        DamagedCheckpoint, which says what to do, when none does). Checked before any actor
        starts; each bad file is named in a warning."""
        state, problems = durable.resume_checkpoint(self.run_dir / "checkpoints")
        for problem in problems:
            log.warning("checkpoint check: %s", problem)
        if state.pop("fallback"):
            log.warning("resuming from the older checkpoint %s (step %d) instead of the "
                        "latest; the replay buffer is rolled back to that step too",
                        state["tag"], state["step"])
        return state

    def restore(self, state: dict | None = None) -> int:
        """Load the checkpoint `state` (default: `resume_point()`); returns the first step."""
        state = state or self.resume_point()
        self.version = self.learners.load_checkpoint(
            str((self.run_dir / "checkpoints").resolve()), state["tag"])
        changes = self._buffer_call("rollback_to", state["step"])
        self.check_buffer(state)
        self.last_checkpoint = state["step"]
        self._truncate_metrics(state["step"])
        log.info("resumed at step %d; buffer as at that checkpoint (%d newer entries dropped, "
                 "%d replaced or evicted since restored)", state["step"], changes["dropped"],
                 changes["restored"])
        return state["step"] + 1

    def check_buffer(self, state: dict) -> None:
        """The rolled-back buffer must be the one the checkpoint `state` stored (its
        `buffer.json` fingerprint): a flushed, emptied or older Redis refuses the resume
        (BufferMismatch, saying what to do) unless `accept_buffer` (`--accept-buffer`), which
        goes on with the buffer as it is and logs what was lost. A checkpoint without a
        fingerprint (written while Redis was down, or by an older version) is not checked.
        With buffer.exact_resume off a rollback is not exact, so only an emptied buffer
        counts as a mismatch."""
        tag_dir = self.run_dir / "checkpoints" / state["tag"]
        if not (tag_dir / BUFFER_FINGERPRINT).is_file():
            log.warning("checkpoint %s has no buffer fingerprint (%s): the replay buffer is "
                        "resumed unchecked", state["tag"], BUFFER_FINGERPRINT)
            return
        check_fingerprint(tag_dir, self._buffer_call("fingerprint"),
                          self.config.buffer.exact_resume, self.accept_buffer,
                          self._redis_where(), self.run_dir)

    def _redis_where(self) -> str:
        url = self.config.buffer.redis_url or os.environ.get("REDIS_URL")
        return redact_url(url) if url else f"embedded, {self.run_dir / 'redis'}"

    def _truncate_metrics(self, last_step: int) -> None:
        """Drop metric and eval rows of steps after the checkpoint: they are run again. The
        file is replaced atomically: a failed write leaves every old row."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            if path.is_file():
                rows = [r for r in M.read_rows(path) if r["step"] <= last_step]
                with self._writing(f"{name} (rows up to step {last_step})", path):
                    durable.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    # ----- evaluation ----------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """ODE samples of the evaluation prompts, spread over every rollout actor in contiguous
        shards (seeds come from the prompt keys, so the images do not depend on the actor
        count), each shard's uint8 images passed by reference to a reward actor (they do not
        cross the driver), scored in parallel; the driver fetches only the grid's images."""
        from actors.rewards import get_reward
        from opgrpo.images import save_grid

        cfg = self.config
        started = time.perf_counter()
        name = next(iter(cfg.reward.functions))  # the first reward is the evaluation metric
        spec = get_reward(name)
        records, n = self.eval_prompts, cfg.train.eval_images_per_prompt
        shards = eval_shards(len(records), len(self.rollout))
        # learner.ema: the actors sample with rank 0's EMA weights for this task only
        ema = self.learners.workers[0].export_ema_weights.remote() if cfg.learner.ema else None
        image_refs = [self.rollout.worker(i).evaluate.remote(
            [(r.text, r.key) for r in records[a:b]], n, cfg.sampling.eval_num_steps,
            cfg.sampling.eval_guidance_scale, cfg.run.seed, weights=ema)
            for i, (a, b) in enumerate(shards)]
        texts = [r.text for r in records for _ in range(n)]
        part_refs = [self.rewards.worker(i).score_with.remote(name, ref, texts[a * n:b * n])
                     for i, (ref, (a, b)) in enumerate(zip(image_refs, shards))]
        parts = eval_results(image_refs, part_refs, step, cfg.train.eval_timeout_s,
                             (len(self.rollout), len(self.rewards.workers)))
        scores = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        summary = spec.summarize(scores, texts)
        tags = [r.metadata.get("tag") for r in records for _ in range(n)]
        if "per_tag" not in summary and any(t is not None for t in tags):
            summary["per_tag"] = per_tag_means(scores[spec.key], tags)
        shown = min(8, len(records))
        grid = [get_within(ref, cfg.train.eval_timeout_s, f"evaluation of step {step}: the "
                           "images of a shard", "train.eval_timeout_s")[: (min(b, shown) - a) * n]
                for ref, (a, b) in zip(image_refs, shards) if a < shown]
        floats = np.moveaxis(np.concatenate(grid).astype(np.float32) / 255, -1, -3)
        labels = [f"{spec.key}={v:.2f}" for v in scores[spec.key][: shown * n]]
        save_grid(torch.from_numpy(floats), [r.text for r in records[:shown]],
                  self.run_dir / "samples" / f"step{step:05d}.png", n, labels)
        path = self.run_dir / "eval.jsonl"
        with self._writing(f"the evaluation of step {step}", path), path.open("a") as f:
            durable.append_line(f, json.dumps({"step": step, **summary, "actors": len(shards),
                                               "seconds": time.perf_counter() - started}))
        log.info("eval at step %d: %s", step, json.dumps(summary))
        self.loggers.log_eval(step, summary, self.run_dir / "samples" / f"step{step:05d}.png")
        return summary

    # ----- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.config
        first = self.prepare()
        iteration = Iteration(cfg, self.rollout, self.rewards, self.buffer)
        metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        summary = {}
        if not self.resume and self.eval_prompts:
            summary["eval_before"] = self.evaluate(0)
        self._started = time.perf_counter()  # the first evaluation is not training time
        columns = (TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*columns) as progress:
            task = progress.add_task("train", total=cfg.train.num_steps, completed=first - 1,
                                     info="")
            step = first
            while step <= cfg.train.num_steps:
                try:
                    row = self.step(iteration, step)
                except RedisUnavailable as exc:  # before training: the step did not happen
                    self._stop_for_redis(exc, step - 1)
                except Exception as exc:
                    if not self._learner_failed(exc):
                        raise
                    step = self._restart_learners(exc, step)
                    metrics_file.close()  # the restore replaced the file: append to the new
                    metrics_file = (self.run_dir / "metrics.jsonl").open("a")
                    progress.update(task, completed=step - 1)
                    continue
                with self._writing(f"the metrics of step {step}", Path(metrics_file.name)):
                    durable.append_line(metrics_file, json.dumps(row))
                self.loggers.log_scalars(step, row)
                self._stop_if_not_finite(step, row)
                if self.redis_down is not None:  # trained, but the buffer's side was lost
                    self._stop_for_redis(self.redis_down, step)
                info = (f"reward {row[M.REWARD_MEAN]:.3f}  clip {row[M.LOSS_CLIPFRAC]:.3f}  "
                        f"{row['time/iteration']:.1f}s/it  actors {row['actors/rollout']}")
                progress.update(task, completed=step, info=info)
                if not progress.console.is_terminal:  # `ray job logs`, a log file: a line
                    log.info("step %d/%d  %s", step, cfg.train.num_steps, info)
                if self.eval_prompts and (step % cfg.train.eval_every == 0
                                          or step == cfg.train.num_steps):
                    summary["eval_last"] = self.evaluate(step)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.num_steps:
                    try:
                        self.checkpoint(step)
                    except RedisUnavailable as exc:
                        self._stop_for_redis(exc, step)
                    except Exception as exc:
                        if not self._learner_failed(exc):
                            raise
                        step = self._restart_learners(exc, step)
                        metrics_file.close()
                        metrics_file = (self.run_dir / "metrics.jsonl").open("a")
                        progress.update(task, completed=step - 1)
                        continue
                step += 1
        metrics_file.close()
        summary["run_dir"] = str(self.run_dir)
        summary["steps"] = cfg.train.num_steps
        return summary

    def _learner_failed(self, exc: Exception) -> bool:
        """Is `exc` a learner rank's failure: it raised in an update or a weight export
        (LearnerFailed), or a rank's process is gone (the error then may come out of a wait
        on something that needed its result, such as a rollout actor's weight push)?"""
        if isinstance(exc, LearnerFailed):
            return True
        if isinstance(exc, RunStopped) or not hasattr(self, "learners"):
            return False
        for worker in self.learners.workers:
            try:
                ray.get(worker.__ray_ready__.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                return True
            except ray.exceptions.GetTimeoutError:  # busy, not gone
                continue
        return False

    def _restart_learners(self, exc: Exception, step: int) -> int:
        """After a learner rank's failure during `step`: a new learner group, the last
        checkpoint restored as `--resume` does (`restore`: weights, optimizer, the replay buffer
        rolled back, metrics rows after it dropped), its weights pushed to the rollout actors,
        which keep running; batches drawn ahead (async mode) are discarded, so every step from
        the checkpoint on is drawn again. Returns the step to go on with. Past
        learner.max_group_restarts, or with no checkpoint yet, RunStopped says how to go on."""
        cause = exc.__cause__ if isinstance(exc, LearnerFailed) and exc.__cause__ else exc
        # a rank that raised: its own exception, not Ray's wrapper (whose first line is the
        # task's name in terminal colours)
        if isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
            cause = cause.cause
        what = f"{exc}: " if isinstance(exc, LearnerFailed) else ""
        failure = f"a learner rank failed at step {step} ({what}{type(cause).__name__}: " + (
            str(cause).strip().splitlines() or [""])[0] + ")"
        limit = self.config.learner.max_group_restarts
        if not (self.run_dir / "checkpoints" / durable.LATEST).is_file():
            raise RunStopped(f"{failure}; no checkpoint was written yet, so there is nothing "
                             "to restore: start the run again under a new run.name") from exc
        if self.group_restarts >= limit:
            raise RunStopped(f"{failure}; the learner group was rebuilt {self.group_restarts} "
                             f"time(s) already (learner.max_group_restarts = {limit}). The "
                             f"run stopped; to go on from its last checkpoint: opgrpo train "
                             f"--resume {self.run_dir}") from exc
        self.group_restarts += 1
        log.warning("%s. Rebuilding the learner group (restart %d of "
                    "learner.max_group_restarts = %d) and restoring the last checkpoint",
                    failure, self.group_restarts, limit)
        self.pipeline.clear()  # drawn ahead with weights the restore takes back
        self.learners.shutdown()
        self.learners = LearnerGroup(self.config, runtime_env(self.config),
                                     self.workers.learner)
        self.learners.wait_ready()
        first = self.restore()
        self._nonfinite_steps = []
        self._sync_weights()  # the checkpoint's version, before the next rollout
        return first

    def _stop_if_not_finite(self, step: int, row: dict) -> None:
        """The learner skips an update whose loss is NaN or infinite (`SKIPPED_UPDATES`);
        after learner.max_nonfinite_steps consecutive steps with one the run stops (RunStopped)
        instead of training on what produced them."""
        if not row.get(SKIPPED_UPDATES, 0) > 0:
            self._nonfinite_steps = []
            return
        self._nonfinite_steps.append(step)
        limit = self.config.learner.max_nonfinite_steps
        log.warning("step %d: the learner's loss was NaN or infinite; %g update(s) skipped "
                    "(%d of learner.max_nonfinite_steps = %d consecutive steps)", step,
                    row[SKIPPED_UPDATES], len(self._nonfinite_steps), limit)
        if len(self._nonfinite_steps) >= limit:
            raise RunStopped(
                f"the learner's loss was NaN or infinite in {limit} consecutive steps "
                f"({', '.join(map(str, self._nonfinite_steps))}; learner.max_nonfinite_steps "
                f"= {limit}): their updates were skipped and the run stopped instead of "
                "training on. Check the rewards (metrics.jsonl), lower learner.learning_rate, "
                "or use model.dtype float32; "
                + (f"the last checkpoint is step {last}" if (
                    last := getattr(self, "last_checkpoint", 0)) else
                   "no checkpoint was written yet"))

    def _last_elapsed(self) -> float:
        """`time/elapsed` of the last logged step (0 for a new run)."""
        path = self.run_dir / "metrics.jsonl"
        rows = M.read_rows(path)
        return float(rows[-1].get("time/elapsed", 0.0)) if rows else 0.0

    def _stop_for_redis(self, exc: Exception, last_done: int) -> None:
        """Redis stayed down: checkpoint the last finished step (learner only; the buffer
        already holds what it had), then stop with a message that says how to go on."""
        if last_done > self.last_checkpoint:
            self.checkpoint(last_done, with_buffer=False)
        where = f"step {last_done}" if last_done else "no step finished; nothing to resume"
        cause = getattr(exc, "cause", None) or exc  # the actor's own error, not Ray's wrapper
        when = ("Once it accepts writes again" if isinstance(cause, RedisRefused)
                else "When Redis is back")
        raise RunStopped(f"{str(cause).rstrip('.')}. The run stopped; checkpoint: {where}. "
                         f"{when}: opgrpo train --resume {self.run_dir}") from None

    def prepare(self) -> int:
        """Run directory, actors, restored state, first weight sync; returns the first step."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run's config.yaml (its overrides) is written once the checkpoint loaded:
        # a resume that fails leaves the file it was started from.
        resume_at = self.resume_point() if self.resume else None
        if not self.resume:
            self._write_config()
        self.start_actors()
        self.version, self._buffer_busy_s, self.last_checkpoint = 0, 0.0, 0
        self.redis_down: Exception | None = None
        self.group_restarts = 0  # learner groups rebuilt (learner.max_group_restarts)
        # Launched rollouts not trained yet, by step: in async mode up to max_staleness
        # batches are drawn ahead of the learner. A resumed run starts with none.
        self.pipeline: dict[int, Rollout] = {}
        first = 1
        if self.resume:
            first = self.restore(resume_at)
            self._write_config()
        # `time/elapsed`: wall-clock of the training loop (later evaluations included); a
        # resumed run's clock goes on from its last row
        self._elapsed_before, self._started = self._last_elapsed(), time.perf_counter()
        self.loggers = make_loggers(self.config, self.run_dir, start_step=first)
        self._sync_weights()
        return first

    def _write_config(self) -> None:
        path = self.run_dir / "config.yaml"
        with self._writing("the run's config", path):
            durable.atomic_write_text(path, dump_config(self.config))

    def _launch_ahead(self, iteration: Iteration, step: int) -> None:
        """Launch every batch up to step + s that is not launched yet. The weights of version
        step - 1 are pushed, so batch m (trained by version m - 1) lags by at most s: the
        schedule, and with it every sample's version, depends on the config alone."""
        last = min(step + self.config.staleness, self.config.train.num_steps)
        for m in range(step, last + 1):
            if m not in self.pipeline:
                self.pipeline[m] = iteration.launch(m, self.dataset, self.version)

    def _resize_rollout(self) -> None:
        target = self._requested_rollout()
        if target < len(self.rollout) and self.pipeline:
            # Chunks queued on an actor about to go would be lost: let them finish first
            # (their results stay in the object store after the actor is gone).
            for launched in self.pipeline.values():
                wait_within(launched.meta, self.config.train.step_timeout_s, launched.drawing,
                            "train.step_timeout_s")
        self.rollout.resize(target)

    def step(self, iteration: Iteration, step: int) -> dict:
        cfg, timings = self.config, {}
        start = time.perf_counter()
        self._resize_rollout()
        self._launch_ahead(iteration, step)
        for attempt in range(1, ROLLOUT_ATTEMPTS + 1):
            rollout, reward_means = self._rollout_and_score(
                iteration, step, timings, self.pipeline.pop(step, None))
            samples = rollout.samples
            adv = advantages_of(cfg, samples)
            # Buffer admission runs in the buffer actor while the learner trains: neither
            # reads what the other writes, and the next step's replay sampling waits for both.
            admitted = admit_winners(self.buffer, rollout, samples, adv, step)
            try:
                with timed("train", timings):
                    shards = learner_shards(cfg, samples, adv)
                    stats = nan_mean(get_within(
                        self.learners.train_async(rollout.trajectories, shards, step),
                        cfg.train.step_timeout_s,
                        lambda r: f"learner rank {r}: the update of step {step}",
                        "train.step_timeout_s"))
                break
            except Exception as exc:
                if not is_lost_data(exc) and isinstance(exc, (ray.exceptions.RayTaskError,
                                                              ray.exceptions.RayActorError)):
                    raise LearnerFailed(f"the update of step {step}") from exc
                if not is_lost_data(exc) or attempt == ROLLOUT_ATTEMPTS:
                    raise
                ray.wait(admitted, num_returns=len(admitted), timeout=300)
                log.warning("step %d: trajectories were lost with their node before training "
                            "(%s); no rank trained on them, drawing the step again", step,
                            type(exc).__name__)
        with timed("buffer", timings):  # what admission adds after training (usually ~0)
            try:
                outcomes = self._admission_outcomes(admitted, step)
                buffer_stats = get_within(self.buffer.stats.remote(), cfg.train.step_timeout_s,
                                          "buffer actor: stats", "train.step_timeout_s")
            except RedisUnavailable as exc:  # the step is trained: log it, then stop
                self.redis_down, outcomes = exc, []
                buffer_stats = dict.fromkeys(("size", "admissions", "replacements", "evictions",
                                              "corrupted", "outages"), float("nan"))
                buffer_stats["busy_s"] = self._buffer_busy_s
        # a restarted buffer actor counts its busy time from 0 again
        previous_busy_s = min(self._buffer_busy_s, buffer_stats["busy_s"])
        self._buffer_busy_s = buffer_stats["busy_s"]
        self.version += 1
        with timed("weight_sync", timings):
            self._sync_weights()
        elapsed = time.perf_counter() - start
        row = {"step": step, "version": self.version, **stats, **reward_means,
               **batch_statistics(samples, adv, self.version - 1),
               **replay_group_metrics(samples), **timings,
               "time/iteration": elapsed, "images_per_s": len(samples) / elapsed,
               # actor-seconds of rollout work on this batch (drawn during earlier steps in
               # async mode): busy fraction = sum / (actors x wall-clock)
               "time/rollout_busy": rollout.busy_seconds,
               "time/elapsed": self._elapsed_before + time.perf_counter() - self._started,
               # the buffer actor's own working time this step, overlapped or not
               "time/buffer_actor": buffer_stats["busy_s"] - previous_busy_s,
               M.BUFFER_SIZE: buffer_stats["size"],
               M.BUFFER_ADMISSIONS: buffer_stats["admissions"],
               M.BUFFER_REPLACEMENTS: buffer_stats["replacements"],
               M.BUFFER_EVICTIONS: buffer_stats["evictions"],
               M.BUFFER_CORRUPTED: buffer_stats["corrupted"],
               M.BUFFER_OUTAGES: buffer_stats["outages"],
               "buffer/admitted_this_step": sum(o in ("inserted", "replaced_same_prompt",
                                                      "replaced_lowest") for o in outcomes),
               "actors/rollout": len(self.rollout), "actors/learner": cfg.learner.num_ranks,
               GROUP_RESTARTS: self.group_restarts}
        return row

    def _admission_outcomes(self, admitted: list, step: int) -> list[str]:
        """Outcomes of the step's admissions. A chunk lost with its node after training is
        not admitted (the buffer keeps what it had); anything else is raised."""
        outcomes = []
        for ref in admitted:
            try:
                outcomes += get_within(ref, self.config.train.step_timeout_s,
                                       f"buffer actor: admission of step {step}",
                                       "train.step_timeout_s")
            except Exception as exc:
                if not is_lost_data(exc):
                    raise
                log.warning("step %d: a chunk was lost before the buffer read it (%s); its "
                            "group winners are not admitted", step, type(exc).__name__)
        return outcomes

    def _rollout_and_score(self, iteration: Iteration, step: int, timings: dict,
                           launched: Rollout | None = None):
        """Wait for the step's rollout (`launched` earlier, or launched now) and its rewards.
        A crashed actor is restarted by Ray, which re-runs its unfinished tasks; an actor that
        is gone for good (restarts used up, node lost) is replaced here and the whole rollout
        is drawn again: every draw is seeded by (seed, step, prompt), so the redone batch is
        the same one (with the current weights), and nothing of it reached the learner or the
        buffer yet. `time/rollout` is the driver's wait: in async mode the drawing mostly
        happened during earlier steps (`time/rollout_busy` counts it)."""
        oldest = self.version - self.config.staleness
        for attempt in range(1, ROLLOUT_ATTEMPTS + 1):
            try:
                with timed("rollout", timings):
                    rollout = launched or iteration.launch(step, self.dataset, self.version)
                    launched = None  # a redraw launches anew
                    rollout.wait_drawn(self.config.train.step_timeout_s)
                with timed("reward", timings):  # a lost chunk's error surfaces in its reward
                    reward_means = score(rollout, self.config.train.step_timeout_s)
                if self.config.buffer.replay_draw == "rescue":
                    with timed("rescue", timings):  # replays into the masked groups
                        timeout = self.config.train.step_timeout_s
                        if iteration.rescue(rollout, step, self.version, timeout):
                            rollout.wait_drawn(timeout)
                            reward_means = score(rollout, timeout)
                too_old = min(s.rollout_version for s in rollout.samples)
                if too_old < oldest:  # the schedule rules it out; never train on it
                    raise StaleWeights(f"step {step}: a chunk was drawn by weight version "
                                       f"{too_old}; train.max_staleness allows {oldest} or newer")
                return rollout, reward_means
            except Exception as exc:
                if attempt == ROLLOUT_ATTEMPTS:
                    raise
                if isinstance(exc, StaleWeights):
                    # Mostly a rollout actor restarted while the control actor (restarted
                    # too) had no weights; the message says which actor and which versions.
                    cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps it
                    log.warning("step %d: stale weights (%s); pushing the current ones and "
                                "drawing the step's rollout again (attempt %d of %d)", step,
                                cause, attempt + 1, ROLLOUT_ATTEMPTS)
                    self.rollout.resync()
                    continue
                if not is_actor_failure(exc):
                    raise
                log.warning("step %d: an actor was lost for good (%s); replacing it and "
                            "drawing the step's rollout again (attempt %d of %d)", step,
                            type(exc).__name__, attempt + 1, ROLLOUT_ATTEMPTS)
                self.rollout.replace_dead()
                self.rewards.replace_dead()
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        if hasattr(self, "loggers"):
            self.loggers.close()
        for part in ("rollout", "rewards", "learners"):
            if hasattr(self, part):
                getattr(self, part).shutdown()
        if hasattr(self, "buffer"):
            try:
                ray.get(self.buffer.shutdown.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - a dead buffer actor has nothing to stop
                log.warning("buffer actor shutdown: %s", type(exc).__name__)


def train(config_path: str | None, overrides: list[str], resume: str | None,
          address: str | None, resume_if_exists: bool = False,
          accept_buffer: bool = False) -> dict:
    """Entry point of `opgrpo train`; works the same under `ray job submit`. With
    `resume_if_exists` (`--resume-if-exists`) a run whose directory (run.output_dir/run.name
    of the config) holds a checkpoint is resumed instead of refused: a job that is submitted
    again (a KubeRay RayJob re-applied after its head node was lost) goes on from there."""
    if resume_if_exists and not resume:
        if config_path is None:
            raise ValueError("--resume-if-exists needs --config (it names the run directory)")
        found = load_config(config_path, overrides)
        found_dir = Path(found.run.output_dir) / found.run.name
        if (found_dir / "checkpoints" / "latest.json").is_file():
            log.warning("%s holds a checkpoint: resuming it (--resume-if-exists)", found_dir)
            resume = str(found_dir)
    if resume:
        run_dir = Path(resume)
        config = load_config(run_dir / "config.yaml", overrides)
        for path in credentials_missing((run_dir / "config.yaml").read_text(), overrides):
            log.warning("%s: config.yaml keeps this URL without its credentials; if the "
                        "server needs them, give them again with --set %s=...", path, path)
        if not (run_dir / "checkpoints" / "latest.json").is_file():
            raise FileNotFoundError(
                f"{run_dir / 'checkpoints' / 'latest.json'} is missing: the run stopped before "
                f"its first checkpoint (train.checkpoint_every = "
                f"{config.train.checkpoint_every}), so there is nothing to resume; start it "
                "again under a new run.name")
    else:
        config = load_config(config_path, overrides)
        run_dir = Path(config.run.output_dir) / config.run.name
        if (run_dir / "checkpoints" / "latest.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run; resume it with --resume "
                                  f"{run_dir} or choose another run.name")
        if (run_dir / "metrics.jsonl").exists():
            raise FileExistsError(f"{run_dir} holds a run that stopped before its first "
                                  "checkpoint; choose another run.name (or delete that "
                                  "directory)")
    trainer = Trainer(config, run_dir, resume=bool(resume),  # validates files before Ray
                      accept_buffer=accept_buffer)
    address = address or config.run.ray_address or os.environ.get("RAY_ADDRESS")
    # No address anywhere: a fresh local Ray for this run ("local"), never a stale cluster
    # that an earlier `ray start` on this machine left in /tmp/ray/ray_current_cluster.
    ray.init(**ray_init_options(config, address))
    received: list[int] = []
    previous = _stop_on_sigterm(received)
    try:
        return trainer.run()
    except SystemExit:
        # A signal that lands inside `ray.get` comes back out of Ray as SystemExit(1); give
        # the caller the conventional 128 + signal number (143 for SIGTERM).
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        trainer.shutdown()
        ray.shutdown()  # a local Ray stops all its processes; a cluster keeps running
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def ray_init_options(config: Config, address: str | None) -> dict:
    """`ray.init` arguments: join `address`, or start a local Ray whose dashboard is off, or
    bound to `run.dashboard_host` (127.0.0.1 keeps it off the network)."""
    options = {"address": address or "local", "namespace": NAMESPACE, "log_to_driver": False}
    if not address:
        options["include_dashboard"] = config.run.dashboard_host is not None
        if config.run.dashboard_host is not None:
            options["dashboard_host"] = config.run.dashboard_host
    return options


def _stop_on_sigterm(received: list[int]):
    """SIGTERM (`kill`, `ray job stop`, a container stop) ends the run like Ctrl-C: actors,
    the embedded Redis and a local Ray are shut down instead of left running. The last
    checkpoint stays the resume point. The signal number is appended to `received`.
    Returns the previous handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        log.warning("SIGTERM: stopping the run (the last checkpoint is the resume point)")
        received.append(signum)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)
