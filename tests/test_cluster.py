"""A real Ray cluster on 127.0.0.1 (`ray start --head`): a training job submitted with
`ray job submit --working-dir .` succeeds, `opgrpo scale` from another process changes the
number of rollout actors of the running job, and `rollout.num_actors: auto` grows onto a node
that joins. (Losing a worker node mid-job: tests/test_compose_topology.py.)"""

import subprocess
import time

import pytest
from raynodes import BIN, head_node, job_status, rows, start_node, stop_job, stop_node, submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with head_node() as info:
        yield info


STEPS = 8


def test_job_submit_and_scale(cluster, tmp_path):
    """configs/shapes_tiny.yaml as shipped (its model, prompts, async mode and Ray requests,
    which must fit this 2-CPU head; only the step count, the run's name and place, and no
    evaluations differ), submitted as a job and scaled from 1 to 2 rollout actors."""
    job_id = f"opgrpo-test-{int(time.time())}"
    overrides = [f"train.num_steps={STEPS}", "train.eval_prompts_file=null",
                 "run.name=clusterjob", f"run.output_dir={tmp_path}"]
    submit(cluster, job_id, overrides)
    metrics = tmp_path / "clusterjob" / "metrics.jsonl"
    deadline = time.time() + 600
    while len(rows(metrics)) < 2:
        assert time.time() < deadline, "the job wrote no metrics"
        assert job_status(cluster, job_id) in ("RUNNING", "PENDING"), "the job ended early"
        time.sleep(2)
    scale = subprocess.run(
        [str(BIN / "opgrpo"), "scale", "--rollout", "2", "--run", "clusterjob", "--address",
         cluster["gcs"]], env=cluster["env"], capture_output=True, text=True, timeout=120,
    )
    assert scale.returncode == 0, scale.stderr
    while job_status(cluster, job_id) in ("RUNNING", "PENDING"):
        assert time.time() < deadline, "the job did not finish"
        time.sleep(2)
    assert job_status(cluster, job_id) == "SUCCEEDED"
    done = rows(metrics)
    assert [r["step"] for r in done] == list(range(1, STEPS + 1))
    assert done[0]["actors/rollout"] == 1 and done[-1]["actors/rollout"] == 2


def test_scale_names_an_unknown_run(cluster):
    run = subprocess.run(
        [str(BIN / "opgrpo"), "scale", "--rollout", "2", "--run", "no-such-run", "--address",
         cluster["gcs"]], env=cluster["env"], capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0 and "no-such-run" in run.stderr


def test_auto_rollout_grows_when_a_node_joins(cluster, tmp_path):
    """`rollout.num_actors: auto` fills the free CPUs, and a Ray worker node that joins the
    running job adds rollout actors at the next iteration (the learner keeps running)."""
    job_id = f"opgrpo-auto-{int(time.time())}"
    overrides = ["train.num_steps=400", "train.eval_prompts_file=null", "run.name=autojob",
                 f"run.output_dir={tmp_path}", "rollout.prompts_per_step=4",
                 "rollout.group_size=4", "sampling.num_steps=4", "learner.micro_batch_size=16",
                 "rollout.num_actors=auto", "rollout.num_cpus=1", "learner.num_cpus=0.5",
                 "reward.num_cpus=0.25", "train.checkpoint_every=1000"]
    submit(cluster, job_id, overrides)
    metrics = tmp_path / "autojob" / "metrics.jsonl"
    deadline = time.time() + 600
    worker = None
    try:
        while len(rows(metrics)) < 2:
            assert time.time() < deadline, "the job wrote no metrics"
            assert job_status(cluster, job_id) in ("RUNNING", "PENDING"), "the job ended early"
            time.sleep(2)
        # The head has 2 CPUs: learner 0.5 + reward 0.25 leave room for one 1-CPU actor.
        assert rows(metrics)[-1]["actors/rollout"] == 1
        worker = start_node(cluster["env"], cluster["temp_dir"],
                            f"--address={cluster['gcs']}", "--num-cpus=1")
        while not any(r["actors/rollout"] == 2 for r in rows(metrics)):
            assert time.time() < deadline, "rollout did not grow onto the new node"
            assert job_status(cluster, job_id) == "RUNNING", "the job ended early"
            time.sleep(2)
        done = rows(metrics)
        assert [r["step"] for r in done] == list(range(1, len(done) + 1))
        assert len({r["actors/learner"] for r in done}) == 1
    finally:
        stop_job(cluster, job_id)
        if worker is not None:
            stop_node(worker)
