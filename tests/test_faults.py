"""Faults injected into the running service (docs/reliability.md): actors killed with SIGKILL in the
middle of a rollout, Redis stopped and restarted under the run, the driver killed and resumed.

Every run here is compared with one undisturbed reference run of the same config and seed
(synchronous mode; the asynchronous runs here are compared with it too):
rollout seeds depend only on (seed, step, prompt), so work that is redone after a fault must
give the same batch, and the same batch must give the learner the same update. Equal rewards
and equal losses (up to float noise of a fresh process) are the evidence that no group was
lost, trained twice or trained half.
"""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from buffer_service.local_server import LocalRedis
from opgrpo import metrics as M
from opgrpo.config import build_config
from opgrpo.driver import Iteration
from opgrpo.errors import RunStopped
from opgrpo.train import Trainer

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


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="opgrpo")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The undisturbed run: its metrics rows and its final buffer (prompt -> reward)."""
    tmp = tmp_path_factory.mktemp("reference")
    trainer = Trainer(build_config(_data(tmp, "reference")), tmp / "reference")
    try:
        trainer.run()
        content = _buffer_content(trainer, STEPS)
    finally:
        trainer.shutdown()
    return {"rows": M.read_rows(tmp / "reference" / "metrics.jsonl"), "buffer": content}


def _busy(pid: int, window_s: float = 0.05) -> bool:
    """Is the process computing right now (CPU time grows by half the window or more)?"""
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(window_s)
    return sum(process.cpu_times()[:2]) - before >= window_s / 2


class Saboteur(threading.Thread):
    """Kills processes of a running Trainer: when the metrics file has `after_rows` rows and
    rollout actor 0 is computing (the next step's rollout is under way), SIGKILL the target."""

    def __init__(self, trainer: Trainer, plan: list[tuple[int, str]]) -> None:
        super().__init__(daemon=True)
        self.trainer, self.plan = trainer, plan
        self.metrics = trainer.run_dir / "metrics.jsonl"
        self.killed: list[dict] = []
        self.error: BaseException | None = None

    def _target_pid(self, target: str) -> int:
        t = self.trainer
        handle = {"rollout0": lambda: t.rollout.workers[0],
                  "rollout1": lambda: t.rollout.workers[1],
                  "reward0": lambda: t.rewards.workers[0], "buffer": lambda: t.buffer,
                  "control": lambda: t.control}[target]()
        return ray.get(handle.identity.remote())["pid"]

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while not (hasattr(self.trainer, "rollout") and len(self.trainer.rollout) == 2):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for after_rows, targets in self.plan:  # "a+b": kill a, then b at once
                victims = {t: self._target_pid(t) for t in targets.split("+")}
                watched = victims.get("rollout0") or self._target_pid("rollout0")
                while len(M.read_rows(self.metrics)) < after_rows or not _busy(watched):
                    assert time.monotonic() < deadline, f"no chance to kill {targets}"
                rows = len(M.read_rows(self.metrics))
                for target, victim in victims.items():
                    os.kill(victim, signal.SIGKILL)
                    self.killed.append({"target": target, "pid": victim, "rows": rows})
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


def test_killed_rollout_reward_and_buffer_actors(reference, tmp_path, caplog):
    """SIGKILL the control actor and then a rollout actor mid-rollout (step 2), the reward
    actor with scoring pending (step 3) and the buffer actor (step 4): Ray restarts each and
    re-runs their unfinished tasks. The restarted rollout actor finds the restarted control
    actor empty, so it refuses to draw from old weights; the driver pushes the current ones
    and draws the step again. The run's numbers are the reference's."""
    trainer = Trainer(build_config(_data(tmp_path, "killed")), tmp_path / "killed")
    try:
        saboteur = _run_sabotaged(trainer, [(1, "control+rollout0"), (2, "reward0"),
                                            (3, "buffer")])
        assert [k["target"] for k in saboteur.killed] == [
            "control", "rollout0", "reward0", "buffer"], saboteur.killed
        rows_at = [k["rows"] for k in saboteur.killed]  # each during the next step
        assert rows_at == [1, 1, 2, 3], rows_at
        assert re.search(r"stale weights \(rollout actor 0 holds weight version -?\d+, the "
                         r"iteration needs \d+ or newer\)", caplog.text), caplog.text
        now = {"rollout0": trainer.rollout.workers[0], "reward0": trainer.rewards.workers[0],
               "buffer": trainer.buffer, "control": trainer.control}
        for kill in saboteur.killed:  # the same actor handle, a new process
            assert ray.get(now[kill["target"]].identity.remote())["pid"] != kill["pid"]
        assert ray.get(trainer.rollout.workers[0].ready.remote()) == trainer.version
        assert ray.get(trainer.control.status.remote())[1] == trainer.version
        content = _buffer_content(trainer, STEPS)
    finally:
        trainer.shutdown()
    rows = M.read_rows(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_rows_match(rows, reference["rows"])
    assert content == reference["buffer"]  # the buffer lives in Redis: nothing was lost


def test_an_actor_gone_for_good_is_replaced_and_the_rollout_redrawn(reference, tmp_path):
    """With no restarts allowed, the killed rollout actor stays dead: the driver replaces it
    and draws the step's rollout again; the numbers are still the reference's."""
    config = build_config(_data(tmp_path, "replaced", run={"name": "replaced",
                                                          "max_actor_restarts": 0}))
    trainer = Trainer(config, tmp_path / "replaced")
    try:
        _run_sabotaged(trainer, [(1, "rollout1")])
        assert ray.get(trainer.rollout.workers[1].ready.remote()) == trainer.version
    finally:
        trainer.shutdown()
    rows = M.read_rows(tmp_path / "replaced" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_rows_match(rows, reference["rows"])


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


def test_async_with_staleness_0_is_the_synchronous_run(reference, tmp_path):
    """`train.mode: async` with s = 0 is the synchronous schedule: the reference's numbers
    step for step (replayed prompts included), no lag, nothing re-scored."""
    config = build_config(_data(tmp_path, "async0", train={"mode": "async",
                                                           "max_staleness": 0}))
    trainer = Trainer(config, tmp_path / "async0")
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    rows = M.read_rows(tmp_path / "async0" / "metrics.jsonl")
    assert any(r[M.BUFFER_REPLAYED_FRACTION] > 0 for r in rows)  # every path compared
    _assert_same_numbers(rows, reference["rows"])
    assert all(r[M.POLICY_STALENESS_MAX] == 0 and r[M.POLICY_RESCORED_FRACTION] == 0
               for r in rows)


def test_async_with_staleness_1_and_a_killed_rollout_actor(reference, tmp_path):
    """s = 1: batch k is drawn by version k - 2 while the learner trains version k - 1, so
    from step 2 on the fresh samples lag by exactly 1 and the learner re-scores them. Rollout
    actor 0 is SIGKILLed while it draws ahead during step 2: Ray restarts it, it loads the
    newest weights from the control actor (a newer version is allowed, an older one refused)
    and redoes its queued chunks. No step is lost or repeated, the lag never exceeds 1, the
    first step (drawn and trained by version 0) is the reference's, and the rollout actors
    end with the learner's weights although no push was waited for."""
    config = build_config(_data(tmp_path, "async1", train={"mode": "async",
                                                           "max_staleness": 1}))
    trainer = Trainer(config, tmp_path / "async1")
    try:
        saboteur = _run_sabotaged(trainer, [(1, "rollout0")])
        now = ray.get(trainer.rollout.workers[0].identity.remote())["pid"]
        assert now != saboteur.killed[0]["pid"]  # Ray restarted it
        learner, held = _learner_and_rollout_weights(trainer)
    finally:
        trainer.shutdown()
    rows = M.read_rows(tmp_path / "async1" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["version"] for r in rows] == list(range(1, STEPS + 1))
    _assert_same_numbers(rows[:1], reference["rows"][:1])
    # rollout actor 1 is never disturbed: its chunks of batch k (k >= 2) were drawn by
    # version k - 2, so the largest lag is exactly 1 from step 2 on, never more
    assert [r[M.POLICY_STALENESS_MAX] for r in rows] == [0] + [1] * (STEPS - 1)
    assert rows[0][M.POLICY_RESCORED_FRACTION] == 0
    for row in rows[1:]:  # stale samples were re-scored and carry a sequence weight
        assert row[M.POLICY_RESCORED_FRACTION] > 0 and row["time/learner_rescore"] > 0
        assert math.isfinite(row[M.LOSS_SEQ_WEIGHT_MEAN]) and row[M.LOSS_SEQ_WEIGHT_MEAN] > 0
        assert row[M.POLICY_VERSION_LAG_MAX] >= 1
    assert held.keys() == learner.keys()
    assert all((held[k] == learner[k]).all() for k in learner)


def test_redis_restarted_between_steps_is_waited_for(reference, tmp_path):
    """A separate redis-server (password, append-only file) stops after step 1 and comes back
    2 s later: step 2 waits for it, then goes on with the buffer intact."""
    with LocalRedis(tmp_path / "redis") as server:
        config = build_config(_data(tmp_path, "restart", buffer={"redis_url": server.url}))
        trainer = Trainer(config, tmp_path / "restart")
        try:
            trainer.prepare()
            iteration = Iteration(trainer.config, trainer.rollout, trainer.rewards,
                                  trainer.buffer)
            first = trainer.step(iteration, 1)
            time.sleep(1.2)  # appendfsync everysec
            server.stop()
            restart = threading.Timer(2.0, server.start)
            restart.start()
            second = trainer.step(iteration, 2)
            restart.join()
        finally:
            trainer.shutdown()
    assert first[M.BUFFER_OUTAGES] == 0 and second[M.BUFFER_OUTAGES] == 1
    assert second[M.BUFFER_SIZE] >= first[M.BUFFER_SIZE] > 0
    _assert_rows_match([first, second], reference["rows"], steps=[1, 2])


def test_redis_down_too_long_stops_with_a_checkpoint_and_resume_continues(reference, tmp_path):
    with LocalRedis(tmp_path / "redis") as server:
        data = _data(tmp_path, "down", buffer={"redis_url": server.url, "redis_timeout_s": 2.0},
                     train={"checkpoint_every": 1})
        trainer = Trainer(build_config(data), tmp_path / "down")
        metrics = tmp_path / "down" / "metrics.jsonl"

        def stop_redis():
            while len(M.read_rows(metrics)) < 2:
                time.sleep(0.05)
            server.stop()

        stopper = threading.Thread(target=stop_redis, daemon=True)
        stopper.start()
        try:
            with pytest.raises(RunStopped, match=r"did not answer.*--resume") as err:
                trainer.run()
        finally:
            trainer.shutdown()
        stopper.join(timeout=10)
        assert server.password not in str(err.value)
        latest = json.loads((tmp_path / "down" / "checkpoints" / "latest.json").read_text())
        rows = M.read_rows(metrics)
        assert [r["step"] for r in rows] == list(range(1, latest["step"] + 1))
        assert 2 <= latest["step"] < STEPS
        _assert_rows_match(rows, reference["rows"], steps=[1, 2])
        server.start()
        resumed = Trainer(build_config(data), tmp_path / "down", resume=True)
        try:
            resumed.run()
        finally:
            resumed.shutdown()
    rows = M.read_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r[M.LOSS_POLICY]) for r in rows)


def _start_driver(tmp_path, name, **sections):
    """`opgrpo train` of the test config in its own process (and session): (process, metrics
    file, environment)."""
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(_data(tmp_path, name, **sections)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-m", "opgrpo", "train", "--config",
                               str(config_file)], cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return driver, tmp_path / name / "metrics.jsonl", env


def _wait_rows(driver, metrics: Path, n: int) -> None:
    deadline = time.monotonic() + 600
    while len(M.read_rows(metrics)) < n:
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_driver_resumes_where_it_left_off(reference, tmp_path):
    """SIGKILL of the `opgrpo train` process during step 3; `--resume` continues from the
    step-2 checkpoint with the same buffer, optimizer state and seeds: every step once, and
    the same numbers as the undisturbed run."""
    driver, metrics, env = _start_driver(tmp_path, "driver", train={"checkpoint_every": 1})
    try:
        _wait_rows(driver, metrics, 2)
        while not (tmp_path / "driver" / "checkpoints" / "step2").is_dir():
            time.sleep(0.05)
        time.sleep(0.5)  # into step 3
        driver.kill()
        driver.wait(timeout=30)
    finally:  # what the driver started (a local Ray) goes with it, as with a lost machine
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    killed_at = len(M.read_rows(metrics))
    assert killed_at < STEPS
    resumed = subprocess.run([sys.executable, "-m", "opgrpo", "train", "--resume",
                              str(tmp_path / "driver")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = M.read_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_rows_match(rows, reference["rows"])


def test_sigterm_stops_the_run_and_everything_it_started(tmp_path):
    """`kill` / `ray job stop` / a container stop send SIGTERM: the driver shuts its actors, the
    embedded Redis and its local Ray down, and leaves no process behind."""
    redis_servers: list[psutil.Process] = []
    driver, metrics, _ = _start_driver(tmp_path, "sigterm", train={"num_steps": 1000,
                                                                   "checkpoint_every": 1000})
    try:
        _wait_rows(driver, metrics, 1)
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
    log = driver.stderr.read().decode()
    assert code == 128 + signal.SIGTERM and "SIGTERM: stopping the run" in log, log[-3000:]


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
