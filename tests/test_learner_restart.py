"""A learner rank killed inside a running job (issue 24 item 1, docs/reliability.md): the driver
rebuilds the learner group, restores the last checkpoint as `--resume` does and trains on;
past learner.max_group_restarts the run stops with the --resume command, and
`opgrpo train --resume-if-exists` (what a re-applied KubeRay RayJob runs) resumes it.

Synchronous mode: rollout seeds depend only on (seed, step, prompt) and the restore puts the
weights, the optimizer and the buffer back as they were at the checkpoint, so the steps redone
after the restore are the undisturbed run's steps; a fresh learner process may pick other
matmul kernels, so the learner's numbers are compared to float noise (as tests/test_faults.py
does), the batch's exactly.
"""

import logging
import os
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
import yaml
from test_faults import _data as _fault_data
from test_faults import _same

from opgrpo import metrics as M
from opgrpo.config import build_config
from opgrpo.errors import RunStopped
from opgrpo.train import GROUP_RESTARTS, Trainer, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 4
EXACT = (M.REWARD_MEAN, M.REWARD_STD, M.REWARD_DATASET_MEAN, M.REWARD_REPLAYED_MEAN,
         M.ADV_MASKED_FRACTION, "version")
CLOSE = (M.LOSS_POLICY, M.LOSS_KL, M.LOSS_APPROX_KL)


def _data(tmp_path, name, **sections):
    """tests/test_faults.py's run, with one rollout actor and this file's step count."""
    rollout = {"num_actors": 1, **sections.pop("rollout", {})}
    train = {"num_steps": STEPS, **sections.pop("train", {})}
    return _fault_data(tmp_path, name, rollout=rollout, train=train, **sections)


def _weights(trainer) -> tuple[dict, dict]:
    """The learner's trainable weights and those rollout actor 0 holds."""
    state_ref, refs = trainer.learners.export_weights_async()
    ray.get(refs)
    return ray.get(state_ref), ray.get(trainer.rollout.workers[0].weights.remote())


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="opgrpo")
    yield
    ray.shutdown()


class LearnerKiller(threading.Thread):
    """SIGKILL learner rank 0's process while it trains the step after `after_rows` metrics
    rows (the first time it is seen computing with that many rows and a checkpoint written)."""

    def __init__(self, trainer: Trainer, after_rows: int) -> None:
        super().__init__(daemon=True)
        self.trainer, self.after_rows = trainer, after_rows
        self.metrics = trainer.run_dir / "metrics.jsonl"
        self.latest = trainer.run_dir / "checkpoints" / "latest.json"
        self.killed: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 400
            while not hasattr(self.trainer, "loggers"):  # prepared: the learner group is up
                assert time.monotonic() < deadline, "the run never started"
                time.sleep(0.1)
            pid = ray.get(self.trainer.learners.workers[0].identity.remote())["pid"]
            process = psutil.Process(pid)
            while True:
                assert time.monotonic() < deadline, "no chance to kill the learner"
                rows = len(M.read_rows(self.metrics))
                assert rows <= self.after_rows, f"step {self.after_rows + 1} ended unkilled"
                before = sum(process.cpu_times()[:2])
                time.sleep(0.05)
                busy = sum(process.cpu_times()[:2]) - before >= 0.025
                # not while it saves the checkpoint of step `after_rows`: once it is written
                if rows == self.after_rows and busy and self.latest.is_file():
                    break
            os.kill(pid, signal.SIGKILL)
            self.killed = {"pid": pid, "rows": len(M.read_rows(self.metrics))}
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_killed_learner_rank_is_rebuilt_and_the_run_goes_on(ray_session, tmp_path, caplog):
    """Reference: 4 undisturbed steps. Then the same run with learner rank 0 SIGKILLed while
    it trains step 4: the group is rebuilt, checkpoint step2 restored (row 3 dropped), steps
    3 and 4 trained again. Every step is in metrics.jsonl once, with the reference's numbers,
    the restart is counted from step 3 on, and the final weights (learner and rollout actor)
    are the reference's."""
    caplog.set_level(logging.INFO, logger="opgrpo.train")
    started = time.monotonic()
    trainer = Trainer(build_config(_data(tmp_path, "reference")), tmp_path / "reference")
    try:
        trainer.run()
        expected, _ = _weights(trainer)
    finally:
        trainer.shutdown()
    reference = M.read_rows(tmp_path / "reference" / "metrics.jsonl")
    reference_s = time.monotonic() - started

    trainer = Trainer(build_config(_data(tmp_path, "killed")), tmp_path / "killed")
    killer = LearnerKiller(trainer, after_rows=3)
    try:
        killer.start()
        summary = trainer.run()
        killer.join(timeout=30)
        assert killer.error is None, killer.error
        assert killer.killed == {"pid": killer.killed["pid"], "rows": 3}, killer.killed
        now = ray.get(trainer.learners.workers[0].identity.remote())["pid"]
        assert now != killer.killed["pid"]  # a new learner process
        learner, held = _weights(trainer)
    finally:
        trainer.shutdown()
    assert summary["steps"] == STEPS
    assert "Rebuilding the learner group (restart 1 of learner.max_group_restarts = 2)" in (
        caplog.text)
    assert "resumed at step 2" in caplog.text
    rows = M.read_rows(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r[GROUP_RESTARTS] for r in rows] == [0, 0, 1, 1]
    assert [r[GROUP_RESTARTS] for r in reference] == [0] * STEPS
    wrong = [(r["step"], key, r[key], ref[key]) for r, ref in zip(rows, reference)
             for key in (*EXACT, *CLOSE) if not _same(r[key], ref[key], key in CLOSE)]
    assert not wrong, wrong
    # The rollout actor got the restored weights and every later version: it ends with the
    # learner's. The learner ends where the undisturbed one did, to float noise.
    assert held.keys() == learner.keys() == expected.keys()
    assert all((held[k] == learner[k]).all() for k in learner)
    assert max(float(np.abs(learner[k] - expected[k]).max()) for k in learner) < 1e-5
    print(f"reference run {reference_s:.0f} s, whole test {time.monotonic() - started:.0f} s")


def test_restarts_used_up_stop_with_the_resume_command_and_resume_if_exists(
        ray_session, tmp_path):
    """learner.max_group_restarts 0: a learner rank killed during step 3 stops the run
    (RunStopped naming the limit and `opgrpo train --resume RUN`); metrics hold steps 1-2.
    `opgrpo train --config C` is then refused, and `--resume-if-exists` resumes the run from
    checkpoint step2 to its end."""
    data = _data(tmp_path, "limit", learner={"max_group_restarts": 0},
                 train={"num_steps": 3})
    run_dir = tmp_path / "limit"
    trainer = Trainer(build_config(data), run_dir)
    killer = LearnerKiller(trainer, after_rows=2)
    try:
        killer.start()
        with pytest.raises(RunStopped) as stopped:
            trainer.run()
        killer.join(timeout=30)
        assert killer.error is None, killer.error
    finally:
        trainer.shutdown()
    message = str(stopped.value)
    assert "a learner rank failed at step 3" in message, message
    assert "learner.max_group_restarts = 0" in message, message
    assert f"opgrpo train --resume {run_dir}" in message, message
    assert [r["step"] for r in M.read_rows(run_dir / "metrics.jsonl")] == [1, 2]

    config = tmp_path / "limit.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(str(config), [], None, None)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "opgrpo", "train", "--config", str(config),
                           "--resume-if-exists"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming it (--resume-if-exists)" in done.stderr, done.stderr[-3000:]
    rows = M.read_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
