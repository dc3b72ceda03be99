"""Faults injected into the running service (docs/reliability.md): actors killed with SIGKILL in the
middle of a rollout, a learner rank killed while it trains, Redis stopped, restarted and filled
up under the run, a checkpoint that cannot be written and one damaged before a resume, the
driver killed and resumed, the driver stopped with SIGTERM.

Every run here is compared with one undisturbed reference run of the same config and seed
(synchronous mode; the asynchronous runs here are compared with it too):
rollout seeds depend only on (seed, step, prompt), so work that is redone after a fault must
give the same batch, and the same batch must give the learner the same update. Equal rewards
and equal losses (up to float noise of a fresh process) are the evidence that no group was
lost, trained twice or trained half.

Starting a Trainer (Ray actors that import torch and diffusers, DeepSpeed ranks) costs more
than the steps of these runs, so faults that compose share one run: each test below says what
it injects, in order, and checks everything each fault is known to leave behind.
"""

import contextlib
import copy
import json
import logging
import math
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import redis
import yaml
from safetensors.numpy import load_file

from buffer_service.local_server import LocalRedis
from opgrpo import durable
from opgrpo import metrics as M
from opgrpo.config import build_config, dump_config
from opgrpo.errors import RunStopped
from opgrpo.export import WEIGHTS_FILE
from opgrpo.train import GROUP_RESTARTS, Trainer, WorkerClasses, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 4
# What the rewards and the batch composition give: identical when every step saw the same
# batch (a lost, doubled or half-trained group changes them).
EXACT = (M.REWARD_MEAN, M.REWARD_STD, M.REWARD_DATASET_MEAN, M.REWARD_REPLAYED_MEAN,
         M.ADV_MASKED_FRACTION, M.POLICY_VERSION_LAG_MAX, M.LOSS_CLIPFRAC_OFFPOLICY, "version")
# What the learner computes from log-probabilities: a process that starts fresh (a replaced
# actor, a resumed run) may pick other matmul kernels (memory alignment), which moves values
# in the 7th digit; a wrong batch moves them in the 1st or 2nd.
CLOSE = (M.LOSS_POLICY, M.LOSS_KL, M.LOSS_APPROX_KL, M.LOSS_SEQ_WEIGHT_MEAN)


def _data(tmp_path, name, **sections):
    data = {
        "model": {"path": str(REPO / "tasks/shapes/shapes-base"), "height": 32, "width": 32},
        "sampling": {"num_steps": 6, "guidance_scale": 1.0},
        "rollout": {"num_actors": 2, "num_cpus": 0.25, "prompts_per_step": 4, "group_size": 4,
                    "chunk_size": 8},
        "reward": {"functions": {"shapes_partial": 1.0}, "num_actors": 1, "num_cpus": 0.25},
        "buffer": {"off_policy_fraction": 0.25, "capacity": 16, "truncate_step": 3},
        "learner": {"num_ranks": 1, "num_cpus": 0.25, "micro_batch_size": 16,
                    "learning_rate": 3e-3, "clip_range": 0.2},
        # Synchronous: a redone step then equals the undisturbed one exactly, which is what
        # these tests compare. In async mode a restarted rollout actor loads the newest
        # weights, so a redone chunk may be drawn by a newer version (the async tests below).
        "train": {"num_steps": STEPS, "mode": "sync",
                  "prompts_file": str(REPO / "configs/shapes/train_metadata.jsonl"),
                  "checkpoint_every": 2, "eval_every": 100},
        "run": {"name": name, "output_dir": str(tmp_path), "seed": 0},
    }
    for section, values in sections.items():
        data[section].update(values)
    return data


def _same(value, expected, close: bool = False) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(value, float) and math.isnan(value)
    if close:
        return math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-6)
    return value == expected


def _assert_rows_match(rows, reference, steps=None):
    steps = steps or [r["step"] for r in reference]
    by_step = {r["step"]: r for r in rows}
    wrong = [(step, key, by_step[step][key], reference[step - 1][key])
             for step in steps for key in (*EXACT, *CLOSE)
             if not _same(by_step[step][key], reference[step - 1][key], key in CLOSE)]
    assert not wrong, wrong


def _buffer_content(trainer, step) -> dict[str, float]:
    meta_ref, _ = trainer.buffer.sample.options(num_returns=2).remote(64, step, 0)
    return {m["prompt_key"]: m["reward"] for m in ray.get(meta_ref)}


def _weights_file(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """The trainable weights a checkpoint carries (safetensors, as the learner saved them)."""
    return load_file(str(run_dir / "checkpoints" / f"step{step}" / WEIGHTS_FILE))


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="opgrpo")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The undisturbed run: its metrics rows, its final buffer (prompt -> reward) and its run
    directory (its step-STEPS checkpoint holds the final weights)."""
    tmp = tmp_path_factory.mktemp("reference")
    trainer = Trainer(build_config(_data(tmp, "reference")), tmp / "reference")
    try:
        trainer.run()
        content = _buffer_content(trainer, STEPS)
    finally:
        trainer.shutdown()
    return {"rows": M.read_rows(tmp / "reference" / "metrics.jsonl"), "buffer": content,
            "run_dir": tmp / "reference"}


def _busy(pid: int, window_s: float = 0.05) -> bool:
    """Is the process computing right now (CPU time grows by half the window or more)?"""
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(window_s)
    return sum(process.cpu_times()[:2]) - before >= window_s / 2


class Saboteur(threading.Thread):
    """Kills processes of a running Trainer: when the metrics file has `after_rows` rows and
    rollout actor 0 is computing (the next step's rollout is under way), SIGKILL the target.
    Each kill is recorded with the actor handle the Trainer held for the target then."""

    def __init__(self, trainer: Trainer, plan: list[tuple[int, str]]) -> None:
        super().__init__(daemon=True)
        self.trainer, self.plan = trainer, plan
        self.metrics = trainer.run_dir / "metrics.jsonl"
        self.killed: list[dict] = []
        self.error: BaseException | None = None

    def _victim(self, target: str) -> tuple[object, int]:
        t = self.trainer
        handle = {"rollout0": lambda: t.rollout.workers[0],
                  "rollout1": lambda: t.rollout.workers[1],
                  "reward0": lambda: t.rewards.workers[0], "buffer": lambda: t.buffer,
                  "control": lambda: t.control}[target]()
        return handle, ray.get(handle.identity.remote())["pid"]

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while not (hasattr(self.trainer, "rollout") and len(self.trainer.rollout) == 2):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for after_rows, targets in self.plan:  # "a+b": kill a, then b at once
                victims = {t: self._victim(t) for t in targets.split("+")}
                watched = (victims.get("rollout0") or self._victim("rollout0"))[1]
                while len(M.read_rows(self.metrics)) < after_rows or not _busy(watched):
                    assert time.monotonic() < deadline, f"no chance to kill {targets}"
                rows = len(M.read_rows(self.metrics))
                for target, (handle, victim) in victims.items():
                    os.kill(victim, signal.SIGKILL)
                    self.killed.append({"target": target, "pid": victim, "rows": rows,
                                        "handle": handle})
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _run_sabotaged(trainer: Trainer, plan: list[tuple[int, str]]) -> Saboteur:
    """`trainer.run()` while a Saboteur carries out `plan`; returns it, every kill done."""
    saboteur = Saboteur(trainer, plan)
    saboteur.start()
    trainer.run()
    saboteur.join(timeout=60)
    assert saboteur.error is None, saboteur.error
    assert len(saboteur.killed) == sum(len(t.split("+")) for _, t in plan), saboteur.killed
    return saboteur


def test_killed_rollout_reward_and_buffer_actors_and_an_actor_gone_for_good_is_replaced(
        reference, tmp_path, caplog):
    """run.max_actor_restarts 1. SIGKILL the control actor and then rollout actor 0
    mid-rollout (step 2), the reward actor with scoring pending and rollout actor 1 (step 3),
    the buffer actor and rollout actor 1 once more (step 4). Ray restarts each actor once and
    re-runs its unfinished tasks: same handle, a new process. The restarted rollout actor 0
    finds the restarted control actor empty, so it refuses to draw from old weights; the
    driver pushes the current ones and draws the step again. Rollout actor 1's second death
    finds its restarts used up: it stays dead, the driver replaces it and draws the step's
    rollout again. The run's numbers and its final buffer are the reference's."""
    config = build_config(_data(tmp_path, "killed", run={"max_actor_restarts": 1}))
    trainer = Trainer(config, tmp_path / "killed")
    try:
        saboteur = _run_sabotaged(trainer, [(1, "control+rollout0"), (2, "reward0+rollout1"),
                                            (3, "buffer+rollout1")])
        killed = saboteur.killed
        assert [k["target"] for k in killed] == [
            "control", "rollout0", "reward0", "rollout1", "buffer", "rollout1"], killed
        rows_at = [k["rows"] for k in killed]  # each during the next step
        assert rows_at == [1, 1, 2, 2, 3, 3], rows_at
        assert re.search(r"stale weights \(rollout actor 0 holds weight version -?\d+, the "
                         r"iteration needs \d+ or newer\)", caplog.text), caplog.text
        now = {"rollout0": trainer.rollout.workers[0], "reward0": trainer.rewards.workers[0],
               "buffer": trainer.buffer, "control": trainer.control}
        for kill in killed:  # restarted by Ray: the same actor handle, a new process
            if kill["target"] != "rollout1":
                assert now[kill["target"]] is kill["handle"], kill
                assert ray.get(kill["handle"].identity.remote())["pid"] != kill["pid"], kill
        first, second = [k for k in killed if k["target"] == "rollout1"]
        assert second["handle"] is first["handle"] and second["pid"] != first["pid"]
        # its restarts used up, rollout actor 1 was replaced by a new actor
        assert trainer.rollout.workers[1] is not second["handle"]
        assert "an actor was lost for good" in caplog.text, caplog.text
        for worker in trainer.rollout.workers:
            assert ray.get(worker.ready.remote()) == trainer.version
        assert ray.get(trainer.control.status.remote())[1] == trainer.version
        content = _buffer_content(trainer, STEPS)
    finally:
        trainer.shutdown()
    rows = M.read_rows(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_rows_match(rows, reference["rows"])
    assert content == reference["buffer"]  # the buffer lives in Redis: nothing was lost


TIMING = ("time/", "images_per_s")


def _assert_same_numbers(rows, reference) -> None:
    """Every non-timing value of every row: the EXACT ones equal, floats otherwise equal up to
    a fresh process's float noise (see CLOSE)."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, expected in zip(rows, reference):
        keys = {k for k in (*row, *expected) if not k.startswith(TIMING)}
        wrong = [(row["step"], k, row.get(k), expected.get(k)) for k in sorted(keys)
                 if k not in row or k not in expected
                 or not _same(row[k], expected[k],
                              k not in EXACT and isinstance(expected[k], float))]
        assert not wrong, wrong


def _learner_and_rollout_weights(trainer) -> tuple[dict, dict]:
    state_ref, refs = trainer.learners.export_weights_async()
    ray.get(refs)
    return ray.get(state_ref), ray.get(trainer.rollout.workers[0].weights.remote())


def test_async_with_staleness_1_and_a_killed_rollout_actor(reference, tmp_path):
    """s = 1, 3 steps: batch k is drawn by version k - 2 while the learner trains version
    k - 1, so from step 2 on the fresh samples lag by exactly 1 and the learner re-scores them.
    Rollout actor 0 is SIGKILLed while it draws ahead during step 2: Ray restarts it, it loads
    the newest weights from the control actor (a newer version is allowed, an older one
    refused) and redoes its queued chunks. No step is lost or repeated, the lag never exceeds
    1, the first step (drawn and trained by version 0) is the reference's, and the rollout
    actors end with the learner's weights although no push was waited for."""
    steps = 3
    config = build_config(_data(tmp_path, "async1", train={"mode": "async", "max_staleness": 1,
                                                           "num_steps": steps}))
    trainer = Trainer(config, tmp_path / "async1")
    try:
        saboteur = _run_sabotaged(trainer, [(1, "rollout0")])
        now = ray.get(trainer.rollout.workers[0].identity.remote())["pid"]
        assert now != saboteur.killed[0]["pid"]  # Ray restarted it
        learner, held = _learner_and_rollout_weights(trainer)
    finally:
        trainer.shutdown()
    rows = M.read_rows(tmp_path / "async1" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["version"] for r in rows] == list(range(1, steps + 1))
    _assert_same_numbers(rows[:1], reference["rows"][:1])
    # rollout actor 1 is never disturbed: its chunks of batch k (k >= 2) were drawn by
    # version k - 2, so the largest lag is exactly 1 from step 2 on, never more
    assert [r[M.POLICY_STALENESS_MAX] for r in rows] == [0] + [1] * (steps - 1)
    assert rows[0][M.POLICY_RESCORED_FRACTION] == 0
    for row in rows[1:]:  # stale samples were re-scored and carry a sequence weight
        assert row[M.POLICY_RESCORED_FRACTION] > 0 and row["time/learner_rescore"] > 0
        assert math.isfinite(row[M.LOSS_SEQ_WEIGHT_MEAN]) and row[M.LOSS_SEQ_WEIGHT_MEAN] > 0
        assert row[M.POLICY_VERSION_LAG_MAX] >= 1
    assert held.keys() == learner.keys()
    assert all((held[k] == learner[k]).all() for k in learner)


class Background(threading.Thread):
    """`fn()` in a daemon thread; what it raises is kept for the test to report."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn, self.error = fn, None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _wait_for_rows(metrics: Path, done, what: str) -> None:
    deadline = time.monotonic() + 600
    while not done(len(M.read_rows(metrics))):
        assert time.monotonic() < deadline, f"the run never logged {what}"
        time.sleep(0.05)


def _restart_redis_once_waited_for(trainer: Trainer, server: LocalRedis,
                                   probe_s: float = 1.5) -> None:
    """Stop the run's redis-server (SIGTERM: it finishes its append-only file) once metrics
    hold 1 row, and start it again as soon as the buffer actor is seen waiting for it: a call
    to the actor does not return within `probe_s`, so the call it is busy with (every call it
    serves touches Redis) is retrying."""
    _wait_for_rows(trainer.run_dir / "metrics.jsonl", lambda n: n >= 1, "row 1")
    server.stop()
    deadline = time.monotonic() + 600
    while ray.wait([trainer.buffer.identity.remote()], timeout=probe_s)[0]:
        assert time.monotonic() < deadline, "the buffer actor never waited for Redis"
        time.sleep(0.1)
    server.start()


def _stop_redis_after_resumed_row(metrics: Path, server: LocalRedis, row: int) -> None:
    """Stop the redis-server for good once a resumed run, which cut metrics to row - 1 rows
    when it loaded its checkpoint, logs row `row`."""
    _wait_for_rows(metrics, lambda n: n == row - 1, f"{row - 1} rows (the resume's cut)")
    _wait_for_rows(metrics, lambda n: n >= row, f"row {row}")
    server.stop()


def _fill_up_after(server: LocalRedis, checkpoint: Path) -> None:
    """Once `checkpoint` holds the buffer's fingerprint (the buffer part of the checkpoint is
    done): maxmemory below what Redis uses, noeviction, so every write is refused (OOM)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (checkpoint / "buffer.json").is_file():
        time.sleep(0.05)
    client = redis.Redis.from_url(server.url, socket_connect_timeout=2)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) // 2))
    finally:
        client.close()


FULL_AT = "step3"  # the checkpoint the file-size-limited learner cannot write
LIMIT = 1 << 20  # bytes; the shapes model has 3.5 M trainable weights, 14 MB in float32


def _limited_learner():
    from learner.worker import LearnerWorker

    class FileSizeLimitedLearner(LearnerWorker):
        """The real learner, whose process may not write files over LIMIT bytes while it
        saves the FULL_AT checkpoint (the kernel fails the write with EFBIG, as a full disk
        fails it with ENOSPC)."""

        def save_checkpoint(self, directory: str, tag: str) -> str:
            if tag != FULL_AT:
                return super().save_checkpoint(directory, tag)
            before = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, before[1]))
            try:
                return super().save_checkpoint(directory, tag)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, before)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on
    return FileSizeLimitedLearner  # the actors' path


def test_redis_restart_waited_for_down_full_or_unwritable_checkpoint_stop_cleanly_resume_falls_back(
        reference, tmp_path, caplog):
    """A separate redis-server (password, append-only file) under a run and two resumes,
    checkpoints every step.

    1. The run's learner may not write files over 1 MiB while it saves the step-3 checkpoint.
       Redis is stopped after step 1 and started again once the buffer actor waits for it:
       the run waits and goes on with the buffer intact (step 1 counts no outage, step 2
       one; steps 1-2 are the reference's). The step-3 checkpoint cannot be written: the run
       stops with a one-line message, removes the incomplete checkpoint, leaves no temporary
       file and latest.json at step 2; steps 1 and 2 verify.
    2. A byte of step 2's weights flipped, `--resume` (with an override) names the file,
       falls back to step 1 (buffer rolled back to step 1: step 2 is the reference's again)
       and writes config.yaml with the override only after the checkpoint loaded. Redis is
       stopped for good after its step 2: past buffer.redis_timeout_s the run writes a
       checkpoint of step 2 (written again, whole) and stops (RunStopped with the --resume
       command, no password).
    3. Redis back, the resume continues to the last step; once its step-3 checkpoint is
       written, Redis hits maxmemory (noeviction): the run writes a learner-only checkpoint
       of the last logged step and stops with a one-line message naming the refusal (OOM).
       Every step is logged once.
    """
    caplog.set_level(logging.INFO, logger="opgrpo.train")
    with LocalRedis(tmp_path / "redis") as server:
        # redis_timeout_s: more than the restart takes (the probe, then a start), and what
        # the run waits before it stops for Redis down too long
        data = _data(tmp_path, "outages", train={"checkpoint_every": 1},
                     buffer={"redis_url": server.url, "redis_timeout_s": 8.0})
        run_dir = tmp_path / "outages"
        checkpoints = run_dir / "checkpoints"
        metrics = run_dir / "metrics.jsonl"
        trainer = Trainer(build_config(data), run_dir,
                          workers=WorkerClasses(learner=_limited_learner()))
        restart = Background(lambda: _restart_redis_once_waited_for(trainer, server))
        restart.start()
        try:
            with pytest.raises(RunStopped) as unwritable:
                trainer.run()
        finally:
            trainer.shutdown()
        restart.join(timeout=60)
        assert restart.error is None, restart.error
        rows = M.read_rows(metrics)
        assert [r["step"] for r in rows] == [1, 2, 3]
        first, second = rows[:2]
        assert first[M.BUFFER_OUTAGES] == 0 and second[M.BUFFER_OUTAGES] == 1
        assert second[M.BUFFER_SIZE] >= first[M.BUFFER_SIZE] > 0
        _assert_rows_match(rows, reference["rows"], steps=[1, 2])
        message = str(unwritable.value)
        assert "\n" not in message, message
        assert f"checkpoint of step 3 could not be written: {checkpoints / 'step3'}" in message
        assert "too large" in message and "last complete checkpoint is step 2" in message
        assert f"--resume {run_dir}" in message
        assert not sorted(run_dir.rglob("*.tmp")) and not (checkpoints / "step3").exists()
        assert json.loads((checkpoints / "latest.json").read_text())["step"] == 2
        for step in (1, 2):
            assert durable.verify_checkpoint(checkpoints / f"step{step}")["version"] == step

        weights = checkpoints / "step2" / WEIGHTS_FILE
        flipped = bytearray(weights.read_bytes())
        flipped[len(flipped) // 2] ^= 0x10
        weights.write_bytes(bytes(flipped))
        # the override changes nothing in the run (no evaluation prompts), only config.yaml
        fallback = Trainer(build_config(copy.deepcopy(data), ["train.eval_every=50"]), run_dir,
                           resume=True)
        stop = Background(lambda: _stop_redis_after_resumed_row(metrics, server, 2))
        stop.start()
        try:
            with pytest.raises(RunStopped, match=r"did not answer.*--resume") as err:
                fallback.run()
        finally:
            fallback.shutdown()
        stop.join(timeout=60)
        assert stop.error is None, stop.error
        assert f"{weights} does not match the sha256" in caplog.text
        assert "resuming from the older checkpoint step1 (step 1)" in caplog.text
        loaded = next(r for r in caplog.records
                      if r.getMessage().startswith("resumed at step 1"))
        config_yaml = run_dir / "config.yaml"
        assert "eval_every: 50" in config_yaml.read_text()
        assert "eval_every: 50" not in dump_config(build_config(data))
        assert config_yaml.stat().st_mtime >= loaded.created  # after the checkpoint loaded
        assert server.password not in str(err.value)
        latest = json.loads((checkpoints / "latest.json").read_text())
        rows = M.read_rows(metrics)
        assert [r["step"] for r in rows] == list(range(1, latest["step"] + 1))
        assert latest["step"] == 2  # (< STEPS) Redis went after step 2
        _assert_rows_match(rows, reference["rows"], steps=[1, 2])
        assert durable.verify_checkpoint(checkpoints / "step2")["version"] == 2  # whole again

        server.start()
        resumed = Trainer(build_config(data), run_dir, resume=True)
        filler = Background(lambda: _fill_up_after(server, checkpoints / f"step{STEPS - 1}"))
        filler.start()
        try:
            with pytest.raises(RunStopped) as full:
                resumed.run()
        finally:
            resumed.shutdown()
            filler.join(timeout=10)
        assert filler.error is None, filler.error
    message = str(full.value)
    assert "OOM" in message and "raise maxmemory" in message and "\n" not in message, message
    assert "Once it accepts writes again: opgrpo train --resume" in message
    assert server.password not in message
    rows = M.read_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the resume went on
    assert all(math.isfinite(r[M.LOSS_POLICY]) for r in rows)
    latest = json.loads((checkpoints / "latest.json").read_text())
    assert latest["step"] == STEPS  # the last logged step


def _latest_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


class LearnerKiller(threading.Thread):
    """SIGKILLs learner rank 0's process while it trains the step after `after_rows` metrics
    rows, for each `after_rows` of `plan` in turn: the first time it is seen computing with
    that many rows and latest.json at that step (not while it saves that step's checkpoint).
    After a kill it waits for the driver's new learner group and takes its rank 0's pid."""

    def __init__(self, trainer: Trainer, plan: list[int]) -> None:
        super().__init__(daemon=True)
        self.trainer, self.plan = trainer, plan
        self.metrics = trainer.run_dir / "metrics.jsonl"
        self.killed: list[dict] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while not hasattr(self.trainer, "loggers"):  # prepared: the learner group is up
                assert time.monotonic() < deadline, "the run never started"
                time.sleep(0.1)
            for n, after_rows in enumerate(self.plan):
                group = self.trainer.learners
                pid = ray.get(group.workers[0].identity.remote())["pid"]
                process = psutil.Process(pid)
                while True:
                    assert time.monotonic() < deadline, "no chance to kill the learner"
                    rows = len(M.read_rows(self.metrics))
                    assert rows <= after_rows, f"step {after_rows + 1} ended unkilled"
                    before = sum(process.cpu_times()[:2])
                    time.sleep(0.05)
                    busy = sum(process.cpu_times()[:2]) - before >= 0.025
                    if (rows == after_rows and busy
                            and _latest_step(self.trainer.run_dir) == after_rows):
                        break
                os.kill(pid, signal.SIGKILL)
                self.killed.append({"pid": pid, "rows": len(M.read_rows(self.metrics))})
                while n + 1 < len(self.plan) and self.trainer.learners is group:
                    assert time.monotonic() < deadline, "the learner group was not rebuilt"
                    time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _start_driver(tmp_path, log_name: str, *args: str):
    """`opgrpo train ARGS` in its own process (and session), its stderr in a file: (process,
    log file)."""
    log = tmp_path / f"{log_name}.log"
    with log.open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "opgrpo", "train", *args], cwd=REPO,
                                  env=_driver_env(), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    return driver, log


def _driver_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    return env


def _wait_rows(driver, metrics: Path, n: int, log: Path) -> None:
    deadline = time.monotonic() + 600
    while len(M.read_rows(metrics)) < n:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_learner_rank_is_rebuilt_restarts_used_up_stop_and_a_killed_driver_resumes(
        reference, tmp_path, caplog):
    """learner.max_group_restarts 1, checkpoints every step.

    Learner rank 0 SIGKILLed while it trains step 2: the driver rebuilds the learner group
    (another process), restores checkpoint step1 and trains on. The rebuilt rank 0 raises in
    its update of step 3 (a rank raising is a learner failure too), past the limit: the run
    stops (RunStopped naming the limit and `opgrpo train --resume
    RUN`), metrics hold steps 1-2 (the restart counted from step 2 on), and the rollout actor
    holds exactly the weights of checkpoint step2. `opgrpo train --config C` is then refused.
    `opgrpo train --resume RUN` goes on, and its process is SIGKILLed during step 4 (after
    the step-3 checkpoint, as with a lost machine); `opgrpo train --config C
    --resume-if-exists` (what a re-applied KubeRay RayJob runs) resumes it to the end. Every
    step is in metrics.jsonl once with the reference's numbers, and the final weights are the
    reference's to float noise."""
    caplog.set_level(logging.INFO, logger="opgrpo.train")
    data = _data(tmp_path, "learner", learner={"max_group_restarts": 1},
                 train={"checkpoint_every": 1})
    run_dir = tmp_path / "learner"
    metrics = run_dir / "metrics.jsonl"
    from learner.worker import LearnerWorker

    class RaisesAtStep3(LearnerWorker):
        """A learner rank whose update of step 3 raises (as an op error or a bad batch
        would); every other call is the real rank's."""

        def train(self, chunks, rows, iteration):
            if iteration == 3 and self.rank == 0:
                raise RuntimeError("injected: rank 0 raises in the update of step 3")
            return super().train(chunks, rows, iteration)

    trainer = Trainer(build_config(data), run_dir,
                      workers=WorkerClasses(learner=RaisesAtStep3))
    killer = LearnerKiller(trainer, plan=[1])
    try:
        killer.start()
        with pytest.raises(RunStopped) as stopped:
            trainer.run()
        killer.join(timeout=30)
        assert killer.error is None, killer.error
        assert [k["rows"] for k in killer.killed] == [1], killer.killed
        now = ray.get(trainer.learners.workers[0].identity.remote())["pid"]
        assert now != killer.killed[0]["pid"]  # the rebuilt group's rank 0: a new process
        held = ray.get(trainer.rollout.workers[0].weights.remote())
        held_version = ray.get(trainer.rollout.workers[0].ready.remote())
    finally:
        trainer.shutdown()
    assert "Rebuilding the learner group (restart 1 of learner.max_group_restarts = 1)" in (
        caplog.text)
    assert "resumed at step 1" in caplog.text
    message = str(stopped.value)
    assert "a learner rank failed at step 3" in message, message
    assert "injected: rank 0 raises in the update of step 3" in message + caplog.text, message
    assert "learner.max_group_restarts = 1" in message, message
    assert f"opgrpo train --resume {run_dir}" in message, message
    rows = M.read_rows(metrics)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r[GROUP_RESTARTS] for r in rows] == [0, 1]
    _assert_rows_match(rows, reference["rows"], steps=[1, 2])
    # The rollout actor got the restored weights and every later version: it holds exactly
    # what the rebuilt learner saved at step 2.
    saved = _weights_file(run_dir, 2)
    assert held_version == 2 and held.keys() == saved.keys()
    assert all(np.array_equal(held[k], saved[k]) for k in saved)

    config = tmp_path / "learner.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(str(config), [], None, None)
    driver, log = _start_driver(tmp_path, "resume", "--resume", str(run_dir))
    try:
        _wait_rows(driver, metrics, 3, log)
        while _latest_step(run_dir) != 3:
            assert driver.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)  # into step 4
        driver.kill()
        driver.wait(timeout=30)
    finally:  # what the driver started (a local Ray) goes with it, as with a lost machine
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    killed_at = len(M.read_rows(metrics))
    assert killed_at < STEPS
    done = subprocess.run([sys.executable, "-m", "opgrpo", "train", "--config", str(config),
                           "--resume-if-exists"], cwd=REPO, env=_driver_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming it (--resume-if-exists)" in done.stderr, done.stderr[-3000:]
    rows = M.read_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # rebuilds are counted per driver process: the resumed ones rebuilt none
    assert [r[GROUP_RESTARTS] for r in rows] == [0, 1, 0, 0]
    _assert_rows_match(rows, reference["rows"])
    final, expected = _weights_file(run_dir, STEPS), _weights_file(reference["run_dir"], STEPS)
    assert final.keys() == expected.keys()
    assert max(float(np.abs(final[k] - expected[k]).max()) for k in final) < 1e-5


def test_async_with_staleness_0_is_the_synchronous_run_and_sigterm_stops_everything_it_started(
        reference, tmp_path):
    """`opgrpo train` with `train.mode: async` and s = 0 is the synchronous schedule: its
    first STEPS rows are the reference's, every non-timing value (replayed prompts included),
    no lag, nothing re-scored. Then SIGTERM, as `kill` / `ray job stop` / a container stop
    send it, during the next step: the driver shuts its actors, the embedded Redis and its
    local Ray down, exits with 143 and leaves no process behind."""
    redis_servers: list[psutil.Process] = []
    config = tmp_path / "sigterm.yaml"
    config.write_text(yaml.safe_dump(_data(
        tmp_path, "sigterm", train={"mode": "async", "max_staleness": 0, "num_steps": 1000,
                                    "checkpoint_every": 1000})))
    driver, log = _start_driver(tmp_path, "sigterm", "--config", str(config))
    metrics = tmp_path / "sigterm" / "metrics.jsonl"
    try:
        _wait_rows(driver, metrics, STEPS, log)
        started = psutil.Process(driver.pid).children(recursive=True)
        redis_servers = [p for p in psutil.process_iter(["name"])
                         if p.info["name"] == "redis-server"
                         and _cwd(p) == str((tmp_path / "sigterm" / "redis").resolve())]
        assert len(redis_servers) == 1  # the run's embedded Redis
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=120)
        time.sleep(2)  # a process may take a moment to be reaped
        left = [(p.pid, p.name()) for p in [*started, *redis_servers] if _alive(p)]
    finally:  # (only cleans up after a failure: the checks above ran first)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        for p in redis_servers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert not left, left
    text = log.read_text()
    assert code == 128 + signal.SIGTERM and "SIGTERM: stopping the run" in text, text[-3000:]
    rows = M.read_rows(metrics)[:STEPS]
    assert any(r[M.BUFFER_REPLAYED_FRACTION] > 0 for r in rows)  # every path compared
    _assert_same_numbers(rows, reference["rows"])
    assert all(r[M.POLICY_STALENESS_MAX] == 0 and r[M.POLICY_RESCORED_FRACTION] == 0
               for r in rows)


def _alive(process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cwd(process) -> str | None:
    try:
        return process.cwd()
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return None
