"""Helpers for tests that run a real multi-node Ray cluster on 127.0.0.1: `ray start` nodes as
child processes, `ray job submit` of the tiny training job, and where Ray placed its actors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from opgrpo.metrics import read_rows as rows  # noqa: F401 - the tests' reader

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(env, temp_dir: str, *args: str) -> subprocess.Popen:
    """`ray start --block`: this node's processes live exactly as long as the returned process
    (SIGTERM drains and stops them), so the tests never touch another Ray on the machine."""
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--block",
         *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def kill_raylet(node: subprocess.Popen) -> int:
    """SIGKILL the raylet of a `start_node` node, as a machine that dies or an OOM killer
    would: no drain, no goodbye to the GCS, which finds the node dead by its missed health
    checks. Returns the raylet's pid. (The node's `ray start --block` process then exits by
    itself; `stop_node` still reaps it.)"""
    import psutil

    raylets = [p for p in psutil.Process(node.pid).children(recursive=True)
               if p.name() == "raylet"]
    assert len(raylets) == 1, f"expected one raylet under {node.pid}, found {raylets}"
    raylets[0].send_signal(signal.SIGKILL)
    return raylets[0].pid


def stop_node(node: subprocess.Popen) -> None:
    node.terminate()
    try:
        node.wait(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait(timeout=30)


@contextlib.contextmanager
def head_node(extra_env: dict[str, str] | None = None, *args: str) -> Iterator[dict]:
    """A `ray start --head` with 2 CPUs and its job API on a free port; yields the cluster's
    env, GCS address, dashboard URL and temp dir."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           **(extra_env or {})}
    gcs, dashboard = free_port(), free_port()
    # A private temp dir: the cluster's address file never lands in /tmp/ray, where a later
    # `ray.init()` on this machine would find it after the cluster is gone.
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    head = start_node(env, temp_dir, "--head", f"--port={gcs}", "--num-cpus=2", *args,
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
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_status(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "disabled"  # the test cluster runs without token auth
    return str(JobSubmissionClient(cluster["dashboard"]).get_job_status(job_id).value)


def job_logs(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["dashboard"]).get_job_logs(job_id)[-4000:]


def submit(cluster, job_id: str, overrides: list[str]) -> None:
    """`ray job submit --no-wait` of the tiny training job with `--set` overrides."""
    run = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--no-wait",
         "--submission-id", job_id, "--working-dir", str(REPO), "--", "python", "-m",
         "opgrpo", "train", "--config", "configs/shapes_tiny.yaml",
         *[arg for o in overrides for arg in ("--set", o)]],
        env=cluster["env"], capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr


def stop_job(cluster, job_id: str) -> None:
    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster["dashboard"], job_id],
                   env=cluster["env"], capture_output=True, timeout=120)


def wait_for_node(cluster, marker: str, process: subprocess.Popen) -> None:
    """Until the node holding resource `marker` is alive in the cluster."""
    from ray.util.state import list_nodes

    deadline = time.time() + 120
    while not any(marker in (n.resources_total or {}) and n.state == "ALIVE"
                  for n in list_nodes(address=cluster["dashboard"])):
        assert process.poll() is None, f"the worker node with {marker} exited"
        assert time.time() < deadline, f"the worker node with {marker} did not join"
        time.sleep(1)


def placement(cluster, class_name: str = "RolloutWorker") -> dict[str, int]:
    """Alive actors of a class per node name ('a' / 'b': the worker nodes' marker resources
    `node_a` / `node_b`; 'head' for any other node)."""
    from ray.util.state import list_actors, list_nodes

    names = {}
    for node in list_nodes(address=cluster["dashboard"]):
        total = node.resources_total or {}
        names[node.node_id] = "a" if "node_a" in total else "b" if "node_b" in total else "head"
    actors = list_actors(address=cluster["dashboard"], filters=[
        ("class_name", "=", class_name), ("state", "=", "ALIVE")])
    found: dict[str, int] = {}
    for actor in actors:
        name = names.get(actor.node_id, "?")
        found[name] = found.get(name, 0) + 1
    return found
