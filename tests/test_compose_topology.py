"""The docker-compose topology, reproduced with processes on 127.0.0.1 (there is no Docker engine
here): a redis-server with append-only persistence and a password (the `redis` service), `ray
start --head` (`ray-head`) and two `ray start --address` workers (`ray-worker` scaled to 2), every
Ray node with REDIS_URL and REDIS_PASSWORD in its environment as `deploy/cluster.env` gives them.

The tiny training job goes in with `ray job submit`. Its rollout actors need a `rollout_slot`,
which only the workers advertise, and its learner needs a `learner_slot`, which only the head
advertises. One worker node dies mid-run (its raylet is killed with SIGKILL, as when a machine
goes down: no drain): Ray restarts its rollout actors on the other worker, they load the current
weights, and the job trains on at full size, with its buffer in the external Redis. The test
then stops the job (`ray job stop`) a few steps after the move instead of waiting for a fixed
step count, which would have to be long enough for the slowest failure detection."""

import time

import pytest
import redis
from raynodes import (
    head_node,
    job_logs,
    job_status,
    kill_raylet,
    placement,
    rows,
    start_node,
    stop_job,
    stop_node,
    submit,
    wait_for_node,
)

from buffer_service.local_server import LocalRedis

pytestmark = pytest.mark.slow
# A bound, never reached: the job is stopped AFTER_MOVE steps after its rollout actors moved
# (about 15-30 s after the raylet dies; a step of this small config takes about 0.5 s here).
STEPS = 1000
AFTER_MOVE = 3
PASSWORD = "topology-test-password"


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    server = LocalRedis(tmp_path_factory.mktemp("redis-data"), password=PASSWORD).start()
    env = {"REDIS_URL": server.url_without_password, "REDIS_PASSWORD": PASSWORD}
    try:
        with head_node(env, "--num-gpus=0", '--resources={"learner_slot": 1}') as info:
            yield {**info, "redis": server}
    finally:
        server.stop()


def test_job_survives_losing_a_worker_node(topology, tmp_path):
    # Workers with 0 CPUs: only what asks for `rollout_slot` lands there (the compose workers
    # have CPUs for the user's convenience; here placement must be exact).
    slots = '{"rollout_slot": 2, "node_%s": 1}'
    nodes = {}
    for name in ("a", "b"):  # one after the other: two raylets starting at once can collide
        nodes[name] = start_node(topology["env"], topology["temp_dir"],
                                 f"--address={topology['gcs']}", "--num-cpus=0",
                                 f"--resources={slots % name}")
        wait_for_node(topology, f"node_{name}", nodes[name])
    job_id = f"opgrpo-topology-{int(time.time())}"
    overrides = [f"train.num_steps={STEPS}", "train.eval_prompts_file=null", "run.name=topology",
                 f"run.output_dir={tmp_path}", "rollout.prompts_per_step=4",
                 "rollout.group_size=4", "sampling.num_steps=4", "learner.micro_batch_size=16",
                 "rollout.num_actors=2", "rollout.num_cpus=0", "rollout.chunk_size=4",
                 "rollout.resources={rollout_slot: 1}", "learner.num_cpus=1",
                 "learner.resources={learner_slot: 1}", "reward.num_cpus=0.5",
                 "train.checkpoint_every=1000"]
    run_dir = tmp_path / "topology"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 900
    dead = None
    try:
        submit(topology, job_id, overrides)
        while len(rows(metrics)) < 2:
            assert time.time() < deadline, "the job wrote no metrics"
            assert job_status(topology, job_id) in ("RUNNING", "PENDING"), \
                job_logs(topology, job_id)
            time.sleep(1)
        before = placement(topology)
        assert sum(before.values()) == 2 and set(before) <= {"a", "b"}, before
        assert placement(topology, "LearnerWorker") == {"head": 1}
        # What the run cannot lose stays with the driver on the head node.
        for cls in ("Control", "BufferService"):
            assert placement(topology, cls) == {"head": 1}, cls
        lost = max(before, key=before.get)  # a node that hosts rollout actors
        dead = nodes.pop(lost)
        kill_raylet(dead)
        stopped_at = len(rows(metrics))
        remaining = {next(iter(nodes)): 2}
        while (after := placement(topology)) != remaining:  # restarted over there
            assert time.time() < deadline, f"rollout actors did not move: {after}"
            assert job_status(topology, job_id) == "RUNNING", job_logs(topology, job_id)
            time.sleep(1)
        moved_at = len(rows(metrics))
        while len(rows(metrics)) < moved_at + AFTER_MOVE:  # and the run trains on
            assert time.time() < deadline, "no steps after the move"
            assert job_status(topology, job_id) == "RUNNING", job_logs(topology, job_id)
            time.sleep(1)
        # the dead node's `ray start --block` noticed its raylet was gone and exited
        dead.wait(timeout=120)
        stop_job(topology, job_id)
        while job_status(topology, job_id) in ("RUNNING", "PENDING"):
            assert time.time() < deadline, "the job did not stop"
            time.sleep(1)
        assert job_status(topology, job_id) == "STOPPED", job_logs(topology, job_id)
    finally:
        stop_job(topology, job_id)
        for node in [*nodes.values(), *([dead] if dead else [])]:
            stop_node(node)
    done = rows(metrics)
    assert [r["step"] for r in done] == list(range(1, len(done) + 1))
    assert all(r["actors/rollout"] == 2 for r in done)
    assert stopped_at <= moved_at <= len(done) - AFTER_MOVE  # steps ran after the move

    # The buffer lived in the external Redis (its password from the nodes' environment, never
    # in the run's config), not in an embedded one in the run directory.
    server = topology["redis"]
    client = redis.Redis.from_url(server.url)
    entries = list(client.scan_iter(match="opgrpo:topology:*:entry:*"))
    # at least what the last finished step reported: the step the stop cut short may have
    # admitted more before its row was written
    assert len(entries) >= done[-1]["buffer/size"] > 0
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    # Redis 6 writes appendonly.aof, Redis 7 an appendonlydir/ of files.
    aof = [p for p in server.data_dir.rglob("appendonly*") if p.is_file()]
    assert sum(p.stat().st_size for p in aof) > 100_000  # the trajectories went to disk
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(server.url_without_password).ping()
    assert not (run_dir / "redis").exists()
    assert PASSWORD not in (run_dir / "config.yaml").read_text()
