"""A real Ray cluster on 127.0.0.1 (`ray start --head`): a training job submitted with
`ray job submit --working-dir .` succeeds, and `opgrpo scale` from another process changes the
number of rollout actors of the running job."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_node(env, temp_dir: str, *args: str) -> subprocess.Popen:
    """`ray start --block`: this node's processes live exactly as long as the returned process
    (SIGTERM drains and stops them), so the tests never touch another Ray on the machine."""
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}", "--block",
         *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _stop_node(node: subprocess.Popen) -> None:
    node.terminate()
    try:
        node.wait(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dashboard = _free_port(), _free_port()
    # A private temp dir: the cluster's address file never lands in /tmp/ray, where a later
    # `ray.init()` on this machine would find it after the cluster is gone.
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    head = _start_node(env, temp_dir, "--head", f"--port={gcs}", "--num-cpus=2",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:  # the job API answers once the head is fully up
            assert head.poll() is None, "ray start --head exited"
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, "the Ray head did not come up"
                time.sleep(1)
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": url, "temp_dir": temp_dir}
    finally:
        _stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _job_status(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "disabled"  # the test cluster runs without token auth
    return str(JobSubmissionClient(cluster["dashboard"]).get_job_status(job_id).value)


def _job_logs(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["dashboard"]).get_job_logs(job_id)[-4000:]


def _submit(cluster, job_id: str, overrides: list[str]) -> None:
    """`ray job submit --no-wait` of the tiny training job with `--set` overrides."""
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--no-wait",
         "--submission-id", job_id, "--working-dir", str(REPO), "--", "python", "-m",
         "opgrpo", "train", "--config", "configs/shapes_tiny.yaml",
         *[arg for o in overrides for arg in ("--set", o)]],
        env=cluster["env"], capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stderr


def test_job_submit_and_scale(cluster, tmp_path):
    job_id = f"opgrpo-test-{int(time.time())}"
    overrides = ["train.num_steps=14", "train.eval_prompts_file=null", "run.name=clusterjob",
                 f"run.output_dir={tmp_path}", "rollout.prompts_per_step=4",
                 "rollout.group_size=4", "sampling.num_steps=4", "learner.micro_batch_size=16",
                 "rollout.num_cpus=0.25"]
    _submit(cluster, job_id, overrides)
    metrics = tmp_path / "clusterjob" / "metrics.jsonl"
    deadline = time.time() + 600
    while len(_rows(metrics)) < 2:
        assert time.time() < deadline, "the job wrote no metrics"
        assert _job_status(cluster, job_id) in ("RUNNING", "PENDING"), "the job ended early"
        time.sleep(2)
    scale = subprocess.run(
        [str(BIN / "opgrpo"), "scale", "--rollout", "2", "--run", "clusterjob", "--address",
         cluster["gcs"]], env=cluster["env"], capture_output=True, text=True, timeout=120,
    )
    assert scale.returncode == 0, scale.stderr
    while _job_status(cluster, job_id) in ("RUNNING", "PENDING"):
        assert time.time() < deadline, "the job did not finish"
        time.sleep(2)
    assert _job_status(cluster, job_id) == "SUCCEEDED"
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert rows[0]["actors/rollout"] == 1 and rows[-1]["actors/rollout"] == 2


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
    _submit(cluster, job_id, overrides)
    metrics = tmp_path / "autojob" / "metrics.jsonl"
    deadline = time.time() + 600
    worker = None
    try:
        while len(_rows(metrics)) < 2:
            assert time.time() < deadline, "the job wrote no metrics"
            assert _job_status(cluster, job_id) in ("RUNNING", "PENDING"), "the job ended early"
            time.sleep(2)
        # The head has 2 CPUs: learner 0.5 + reward 0.25 leave room for one 1-CPU actor.
        assert _rows(metrics)[-1]["actors/rollout"] == 1
        worker = _start_node(cluster["env"], cluster["temp_dir"],
                             f"--address={cluster['gcs']}", "--num-cpus=1")
        while not any(r["actors/rollout"] == 2 for r in _rows(metrics)):
            assert time.time() < deadline, "rollout did not grow onto the new node"
            assert _job_status(cluster, job_id) == "RUNNING", "the job ended early"
            time.sleep(2)
        rows = _rows(metrics)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        assert len({r["actors/learner"] for r in rows}) == 1
    finally:
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster["dashboard"],
                        job_id], env=cluster["env"], capture_output=True, timeout=120)
        if worker is not None:
            _stop_node(worker)


def _wait_for_node(cluster, marker: str, process: subprocess.Popen) -> None:
    """Until the node holding resource `marker` is alive in the cluster."""
    from ray.util.state import list_nodes

    deadline = time.time() + 120
    while not any(marker in (n.resources_total or {}) and n.state == "ALIVE"
                  for n in list_nodes(address=cluster["dashboard"])):
        assert process.poll() is None, f"the worker node with {marker} exited"
        assert time.time() < deadline, f"the worker node with {marker} did not join"
        time.sleep(1)


def _placement(cluster, class_name: str = "RolloutWorker") -> dict[str, int]:
    """Alive actors of a class per node name ('a' / 'b': the worker nodes' marker resources;
    'head')."""
    from ray.util.state import list_actors, list_nodes

    names = {}
    for node in list_nodes(address=cluster["dashboard"]):
        total = node.resources_total or {}
        names[node.node_id] = "a" if "node_a" in total else "b" if "node_b" in total else "head"
    actors = list_actors(address=cluster["dashboard"], filters=[
        ("class_name", "=", class_name), ("state", "=", "ALIVE")])
    placement: dict[str, int] = {}
    for actor in actors:
        name = names.get(actor.node_id, "?")
        placement[name] = placement.get(name, 0) + 1
    return placement


STEPS_NODE_LOSS = 40


def test_rollout_continues_when_a_worker_node_is_lost(cluster, tmp_path):
    """Two worker nodes hold the rollout actors (only they have the `rollout_slot` resource;
    with 0 CPUs nothing else lands there). Stopping one mid-run: Ray restarts its actors on
    the other node, which load the current weights, and the job finishes every step."""
    slots = '{"rollout_slot": 2, "node_%s": 1}'
    nodes = {}
    for name in ("a", "b"):  # one after the other: two raylets starting at once can collide
        nodes[name] = _start_node(cluster["env"], cluster["temp_dir"],
                                  f"--address={cluster['gcs']}", "--num-cpus=0",
                                  f"--resources={slots % name}")
        _wait_for_node(cluster, f"node_{name}", nodes[name])
    job_id = f"opgrpo-nodeloss-{int(time.time())}"
    overrides = [f"train.num_steps={STEPS_NODE_LOSS}", "train.eval_prompts_file=null",
                 "run.name=nodeloss",
                 f"run.output_dir={tmp_path}", "rollout.prompts_per_step=4",
                 "rollout.group_size=4", "sampling.num_steps=4", "learner.micro_batch_size=16",
                 "rollout.num_actors=2", "rollout.num_cpus=0", "rollout.chunk_size=4",
                 "rollout.resources={rollout_slot: 1}", "learner.num_cpus=1",
                 "reward.num_cpus=0.5", "train.checkpoint_every=1000"]
    metrics = tmp_path / "nodeloss" / "metrics.jsonl"
    deadline = time.time() + 900
    try:
        _submit(cluster, job_id, overrides)
        while len(_rows(metrics)) < 2:
            assert time.time() < deadline, "the job wrote no metrics"
            assert _job_status(cluster, job_id) in ("RUNNING", "PENDING"), "the job ended early"
            time.sleep(1)
        before = _placement(cluster)
        assert sum(before.values()) == 2 and set(before) <= {"a", "b"}, before
        # What the run cannot lose stays with the driver on the head node.
        for cls in ("Control", "BufferService"):
            assert _placement(cluster, cls) == {"head": 1}, cls
        lost = max(before, key=before.get)  # a node that hosts rollout actors
        _stop_node(nodes.pop(lost))
        stopped_at = len(_rows(metrics))
        remaining = {next(iter(nodes)): 2}
        while (after := _placement(cluster)) != remaining:  # restarted over there
            assert time.time() < deadline, f"rollout actors did not move: {after}"
            assert _job_status(cluster, job_id) == "RUNNING", _job_logs(cluster, job_id)
            time.sleep(1)
        moved_at = len(_rows(metrics))
        while _job_status(cluster, job_id) in ("RUNNING", "PENDING"):
            assert time.time() < deadline, "the job did not finish"
            time.sleep(1)
        assert _job_status(cluster, job_id) == "SUCCEEDED", _job_logs(cluster, job_id)
        rows = _rows(metrics)
        assert [r["step"] for r in rows] == list(range(1, STEPS_NODE_LOSS + 1))
        assert all(r["actors/rollout"] == 2 for r in rows)
        assert stopped_at <= moved_at < STEPS_NODE_LOSS  # steps ran after the move
    finally:
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster["dashboard"],
                        job_id], env=cluster["env"], capture_output=True, timeout=120)
        for node in nodes.values():
            _stop_node(node)
