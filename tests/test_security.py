"""Security: what a run exposes and what it hands out. A local Ray's dashboard; Ray's token
authentication on a `ray start` cluster (job API and GCS); credentials kept out of logs and out
of the config objects that actors receive; the GenEval scoring server's limits, over real
sockets on 127.0.0.1."""

import base64
import contextlib
import io
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import psutil
import pytest
import ray
from PIL import Image

from opgrpo.config import (
    SECRET_URLS_ENV,
    build_config,
    dump_config,
    redact_url,
    url_password,
    with_url_secrets,
    without_url_secrets,
)
from opgrpo.train import ray_init_options


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


@pytest.mark.slow
def test_local_ray_has_no_dashboard_unless_asked_and_then_on_loopback():
    options = ray_init_options(build_config({}), None)
    assert options["include_dashboard"] is False and options["address"] == "local"
    assert ray_init_options(build_config({}), "ray://cluster:10001") == {
        "address": "ray://cluster:10001", "namespace": "opgrpo", "log_to_driver": False}
    asked = ray_init_options(build_config({"run": {"dashboard_host": "127.0.0.1"}}), None)
    context = ray.init(num_cpus=1, **asked)
    try:
        host_port = urlsplit(f"http://{context.dashboard_url}")
        assert host_port.hostname == "127.0.0.1"
        assert _listening(host_port.port) == {"127.0.0.1"}  # not 0.0.0.0, not another address
    finally:
        ray.shutdown()


# ----- Ray token authentication -------------------------------------------------------------

TOKEN = "0123456789abcdef" * 4  # what `openssl rand -hex 32` gives: 64 hex digits


@contextlib.contextmanager
def _token_head(home):
    """`ray start --head` on 127.0.0.1 with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, as the
    compose file and the RayJob start their nodes. The session's RAY_AUTH_MODE=disabled
    (conftest.py) and the machine's ~/.ray/auth_token never reach it: every process of this
    test gets its environment spelled out, and HOME is a scratch directory. Up means its node
    is ALIVE in the state API (asked with the token); a head whose raylet died starting (it
    waits a fixed time for its agents, which a loaded machine can miss) is started again."""
    from raynodes import BIN, free_port, start_node, stop_node

    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(home))
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    for attempt in range(2):
        gcs, dashboard = free_port(), free_port()
        temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
        head = start_node(with_token, temp_dir, "--head", f"--port={gcs}", "--num-cpus=1",
                          "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while b'"ALIVE"' not in _get(f"{url}/api/v0/nodes", TOKEN)[1]:
            if head.poll() is not None or time.time() > deadline:
                break
            time.sleep(1)
        else:
            break
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert attempt == 0, "the Ray head did not come up twice"
    try:
        yield {"base": base, "with_token": with_token, "gcs": f"127.0.0.1:{gcs}",
               "dashboard": url}
    finally:
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _empty_token_refused(home) -> None:
    """A node of an unfilled deploy/cluster.env (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN empty)
    refuses to start: no cluster without a token."""
    from raynodes import BIN, free_port, stop_node

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(home), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN="")
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    node = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = node.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_node(node)
        raise AssertionError("ray start with an empty token started a cluster") from None
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert node.returncode != 0 and "no authentication token was found" in stderr, stderr[-2000:]
    assert not (home / ".ray" / "auth_token").exists()  # none was made up either


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def _run(argv: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


# The job: a detached control actor for run `sec`, which `opgrpo scale` then talks to.
JOB = ("import ray; from actors.control import NAMESPACE, Control, control_name; "
       "ray.init(namespace=NAMESPACE); "
       "c = ray.remote(Control).options(name=control_name('sec'), lifetime='detached', "
       "num_cpus=0).remote(); print('control status', ray.get(c.status.remote()))")


@pytest.mark.slow
def test_token_auth_refuses_jobs_and_clients_without_the_token(tmp_path):
    from raynodes import BIN

    ray_cli, opgrpo_cli = str(BIN / "ray"), str(BIN / "opgrpo")
    _empty_token_refused(tmp_path)
    with _token_head(tmp_path) as cluster:
        api = f"{cluster['dashboard']}/api/jobs/"
        no_token = {**cluster["base"], "RAY_AUTH_MODE": "disabled"}
        wrong = {**cluster["base"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}
        # the job API: without a token 401, a wrong one 403, neither runs anything
        assert _get(api)[0] == 401
        assert _get(api, "f" * 64)[0] == 403
        refused = _run([ray_cli, "job", "submit", "--address", cluster["dashboard"],
                        "--submission-id", "sec-refused", "--", "python", "-c", JOB], no_token)
        assert refused.returncode != 0 and "Unauthorized" in refused.stderr, (
            refused.stderr[-2000:])
        refused = _run([ray_cli, "job", "list", "--address", cluster["dashboard"]], wrong)
        assert refused.returncode != 0 and "Forbidden" in refused.stderr, refused.stderr[-2000:]
        # with the token: submitted, run to the end, listed
        done = _run([ray_cli, "job", "submit", "--address", cluster["dashboard"],
                     "--submission-id", "sec-1", "--", "python", "-c", JOB],
                    cluster["with_token"], timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "control status (None, -1)" in done.stdout
        status, body = _get(api, TOKEN)
        jobs = {job["submission_id"]: job["status"] for job in json.loads(body)
                if job.get("submission_id")}
        assert status == 200 and jobs == {"sec-1": "SUCCEEDED"}  # the refused one never ran
        # The docs' bare-metal commands on a machine that ran `make demo`: the token is in
        # ~/.ray/auth_token (`ray get-auth-token --generate` makes it where none exists). A
        # client with RAY_AUTH_MODE=token sends it; one without the variable sends none.
        home = tmp_path / "client-home"
        made = _run([ray_cli, "get-auth-token", "--generate"], {**cluster["base"],
                                                                "HOME": str(home)})
        written = (home / ".ray" / "auth_token").read_text().strip()
        assert made.returncode == 0 and len(written) >= 32 and written in made.stdout
        (home / ".ray" / "auth_token").write_text(TOKEN)  # this cluster's token, in the file
        from_file = {**cluster["base"], "HOME": str(home), "RAY_AUTH_MODE": "token"}
        listed = _run([ray_cli, "job", "list", "--address", cluster["dashboard"]], from_file)
        assert listed.returncode == 0 and "sec-1" in listed.stdout, listed.stderr[-2000:]
        unset = _run([ray_cli, "job", "list", "--address", cluster["dashboard"]],
                     {**cluster["base"], "HOME": str(home)})
        assert unset.returncode != 0, unset.stdout[-2000:]

        # a client joining through the GCS (`opgrpo scale`): works with the token ...
        scale = _run([opgrpo_cli, "scale", "--rollout", "2", "--run", "sec", "--address",
                      cluster["gcs"]], cluster["with_token"])
        assert scale.returncode == 0, scale.stderr[-2000:]
        assert "run sec: rollout actors -> 2" in scale.stdout
        # ... and is refused without it (RAY_gcs_server_port_wait_time_s: give up after 3
        # tries instead of Ray's 20)
        refused = _run([opgrpo_cli, "scale", "--rollout", "3", "--run", "sec", "--address",
                        cluster["gcs"]], {**no_token, "RAY_gcs_server_port_wait_time_s": "3"})
        assert refused.returncode != 0
        assert "InvalidAuthToken" in refused.stderr or "Unauthenticated" in refused.stderr, (
            refused.stderr[-2000:])


# ----- credentials in URLs ------------------------------------------------------------------

@pytest.mark.parametrize(("url", "masked", "removed"), [
    ("redis://:s3cret@10.0.0.5:6380/2", "redis://:***@10.0.0.5:6380/2",
     "redis://10.0.0.5:6380/2"),
    ("redis://opgrpo:s3cret@host/0", "redis://opgrpo:***@host/0", "redis://opgrpo@host/0"),
    ("redis://opgrpo@host/0", "redis://opgrpo@host/0", "redis://opgrpo@host/0"),  # ACL user
    ("redis://host:6379/0?password=s3cret&db=2", "redis://host:6379/0?password=***&db=2",
     "redis://host:6379/0?db=2"),
    ("rediss://host/0?ssl_keyfile=/k.pem&PASS=s3cret", "rediss://host/0?ssl_keyfile=/k.pem&PASS=***",
     "rediss://host/0?ssl_keyfile=/k.pem"),  # a path named *keyfile is not a key
    ("https://s3cret@scorer/score", "https://***@scorer/score", "https://scorer/score"),
    ("http://alice:s3cret@[::1]:8080/s?api_key=s3cret&n=1#s3cret",
     "http://***@[::1]:8080/s?api_key=***&n=1#***", "http://[::1]:8080/s?n=1"),
    ("http://h/s?Token=s3cret&X-Amz-Signature=s3cret&accessToken=s3cret&Secret=s3cret&keep=1",
     "http://h/s?Token=***&X-Amz-Signature=***&accessToken=***&Secret=***&keep=1",
     "http://h/s?keep=1"),
    ("http://scorer:8000/score?batch=4", "http://scorer:8000/score?batch=4",
     "http://scorer:8000/score?batch=4"),
])
def test_redact_url_removes_passwords_user_info_and_secret_query_parameters(
        url, masked, removed):
    assert redact_url(url) == masked
    assert redact_url(url, mask=None) == removed
    assert "s3cret" not in masked + removed
    assert redact_url(removed, mask=None) == removed  # nothing left to take


def test_the_run_config_and_the_redis_password_in_a_query():
    config = build_config({"buffer": {"redis_url": "redis://h:6379/0?password=s3cret"}})
    assert "s3cret" not in dump_config(config) and "redis://h:6379/0" in dump_config(config)
    assert url_password("redis://h:6379/0?password=s3cret") == "s3cret"
    assert url_password("redis://:p%40ss@h/0?password=other") == "p@ss"  # user info first
    assert url_password("redis://opgrpo@h/0") is None


def test_config_yaml_keeps_no_url_credentials_and_a_resume_is_told_what_to_give_again(
        tmp_path):
    from opgrpo.config import credentials_missing, load_config

    config = build_config({
        "buffer": {"redis_url": "redis://:r3dis@h:6379/0"},
        "reward": {"functions": {"http": 1.0},
                   "options": {"http": {"url": "https://alice:pa55@scores.example/s?token=t0k"}}},
    })
    text = dump_config(config)
    for secret in ("r3dis", "pa55", "t0k"):
        assert secret not in text
    assert "# reward.options.http.url: credentials removed (give them again with --set " \
           "reward.options.http.url=...)" in text
    assert "# buffer.redis_url: credentials removed (REDIS_PASSWORD" in text
    (tmp_path / "config.yaml").write_text(text)
    reloaded = load_config(tmp_path / "config.yaml")  # the comments are YAML comments
    assert reloaded.reward.options["http"]["url"] == "https://scores.example/s"
    assert credentials_missing(text, []) == ["reward.options.http.url"]
    assert credentials_missing(text, ["reward.options.http.url=https://a:b@x/s"]) == []
    assert credentials_missing(text, ["reward.options={http: {url: 'https://a:b@x/s'}}"]) == []
    assert credentials_missing(dump_config(build_config({})), []) == []


class _FakeActorClass:
    """Stands in for `ray.remote(cls)`: records what each `.options(...).remote(...)` would
    hand to Ray (options and constructor arguments) instead of starting an actor."""

    created: list = []

    def __init__(self, cls):
        self.cls, self._options = cls, {}

    def options(self, **options):
        self._options = options
        return self

    def remote(self, *args):
        _FakeActorClass.created.append((self.cls.__name__, self._options, args))
        return _FakeHandle()


class _FakeHandle:
    def __getattr__(self, name):
        return self

    def options(self, **_):
        return self

    def remote(self, *_):
        return None, None


class _BasicAuthScorer(BaseHTTPRequestHandler):
    """An `http` reward server that wants alice's password and a token in the query."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - the name http.server calls
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        wanted = "Basic " + base64.b64encode(f"alice:{self.server.password}".encode()).decode()
        ok = (self.headers.get("Authorization") == wanted
              and self.path == f"/score?token={self.server.password}")
        reply = json.dumps({"scores": [0.5] * len(body["prompts"])} if ok else {}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@contextlib.contextmanager
def _stopping(server):
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_actor_arguments_carry_no_credentials_which_arrive_by_environment(
        tmp_path, monkeypatch):
    """The real constructors of the rollout pool, the learner group and the reward pool, and
    the trainer's buffer arguments, with `ray.remote` recorded instead of run: no password in
    any pickled argument; the buffer actor's REDIS_PASSWORD and the reward actor's URLs reach
    them through their own runtime_env. Then the buffer (against a real redis-server with a
    password) and the reward (against an HTTP server that checks basic auth and a query token)
    connect with exactly those arguments and that environment, and fail without it."""
    import learner.group
    from actors.pool import RewardPool, RolloutPool
    from actors.reward import RewardWorker
    from buffer_service.actor import BufferService
    from buffer_service.local_server import LocalRedis
    from learner.group import LearnerGroup
    from opgrpo.train import buffer_actor_args, runtime_env

    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    monkeypatch.delenv(SECRET_URLS_ENV, raising=False)
    scorer = ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthScorer)
    threading.Thread(target=scorer.serve_forever, daemon=True).start()
    with LocalRedis(tmp_path / "redis") as redis_server, _stopping(scorer):
        password = scorer.password = redis_server.password
        reward_url = (f"http://alice:{password}@127.0.0.1:{scorer.server_port}/score"
                      f"?token={password}")
        config = build_config({
            "buffer": {"redis_url": redis_server.url},
            "reward": {"functions": {"http": 1.0},
                       "options": {"http": {"url": reward_url, "retries": 0}}}})
        env = runtime_env(config)

        monkeypatch.setattr(ray, "remote", _FakeActorClass)
        monkeypatch.setattr(learner.group, "get_within", lambda *a, **k: None)
        _FakeActorClass.created = []
        RolloutPool(config, env)._new_worker()
        LearnerGroup(config, env)
        RewardPool(config, env)
        buffer_args, buffer_env = buffer_actor_args(config, tmp_path, env)
        monkeypatch.undo()  # ray.remote back; the environment as the test started
        monkeypatch.delenv("REDIS_PASSWORD", raising=False)
        monkeypatch.delenv(SECRET_URLS_ENV, raising=False)

        created = {name: (options, args) for name, options, args in _FakeActorClass.created}
        assert set(created) == {"RolloutWorker", "LearnerWorker", "RewardWorker"}
        created["BufferService"] = ({"runtime_env": buffer_env}, buffer_args)
        for name, (options, args) in created.items():
            assert password.encode() not in pickle.dumps(args), name
            secrets = options["runtime_env"].get("env_vars", {})
            if name == "BufferService":
                assert secrets["REDIS_PASSWORD"] == password
            elif name == "RewardWorker":
                assert json.loads(secrets[SECRET_URLS_ENV]) == {"reward.options.http.url":
                                                                reward_url}
            else:
                assert password not in json.dumps(options), name
        assert buffer_args[0]["redis_url"] == redis_server.url_without_password
        assert env == runtime_env(config)  # the shared runtime_env gained no secret

        # the buffer actor as Ray would construct it: its arguments, its environment
        with pytest.raises(ConnectionError, match="needs a password"):
            BufferService(*buffer_args)
        for key, value in buffer_env["env_vars"].items():
            monkeypatch.setenv(key, value)
        service = BufferService(*buffer_args)
        assert service.stats()["size"] == 0 and password not in service.where

        # the reward actor likewise: without its environment the server refuses it
        reward_args = created["RewardWorker"][1]
        images = np.zeros((2, 8, 8, 3), np.uint8)
        with pytest.raises(Exception, match="401"):
            RewardWorker(*reward_args).score(images, ["a", "b"])
        monkeypatch.setenv(SECRET_URLS_ENV,
                           created["RewardWorker"][0]["runtime_env"]["env_vars"][SECRET_URLS_ENV])
        scores = RewardWorker(*reward_args).score(images, ["a", "b"])
        np.testing.assert_allclose(scores["http"], [0.5, 0.5])


def test_url_secrets_come_back_only_where_they_were_taken():
    tree = {"http": {"url": "http://u:pw@h/s", "other": "http://h/s"},
            "list": ["x", "https://tok@h/y"]}
    clean, secrets = without_url_secrets(tree, "reward.options")
    assert "pw" not in json.dumps(clean) and "tok" not in json.dumps(clean)
    env = {SECRET_URLS_ENV: json.dumps(secrets)}
    assert with_url_secrets(clean, "reward.options", env) == tree
    assert with_url_secrets(clean, "reward.options", {}) == clean  # no variable, no change
    moved = {**clean, "http": {**clean["http"], "url": "http://elsewhere/s"}}
    assert with_url_secrets(moved, "reward.options", env)["http"]["url"] == "http://elsewhere/s"


# ----- the GenEval scoring server -----------------------------------------------------------

def _png(width: int, height: int) -> bytes:
    """A black 1-bit PNG built row by row, so that a 20000 x 20000 one (400 M pixels, 1.2 GB
    as RGB) takes a few hundred KB here and on disk: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    row, packer = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def _zeros(images, metadata):
    return {"strict": np.zeros(len(images)), "partial": np.zeros(len(images))}


@contextlib.contextmanager
def _geneval(**limits):
    from tasks.geneval.server import make_server

    server = make_server("127.0.0.1", 0, _zeros, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with _stopping(server):
        yield server


def _post(server, payload: dict) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/score", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _raw(server, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=20)
    sock.sendall(data)
    return sock


def _answer(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


def _small_png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_geneval_server_defaults_to_loopback():
    from opgrpo.cli import build_parser
    from tasks.geneval.server import DEFAULT_HOST, make_server, serve

    args = build_parser().parse_args(["geneval-server"])
    assert (args.host, args.timeout, args.max_body_mb, args.max_threads) == (
        "127.0.0.1", 30.0, 256.0, 8)
    assert DEFAULT_HOST == "127.0.0.1"
    assert serve.__defaults__[0] == make_server.__defaults__[0] == "127.0.0.1"
    server = make_server(port=0, scorer=_zeros)
    try:
        assert _listening(server.server_port) == {"127.0.0.1"}
    finally:
        server.server_close()


def _served(server) -> None:
    """A real request is served (200); 503 while a closing connection still holds a thread."""
    deadline = time.monotonic() + 30  # generous: a loaded CI machine was seen over 10 s
    while (status := _post(server, {"images": [_small_png()], "metadata": [{}]})[0]) != 200:
        assert status == 503, status
        assert time.monotonic() < deadline, "the thread was not freed in 30 s"
        time.sleep(0.1)


def _dropped_after_timeout(server, payload: bytes) -> None:
    """The server closes a connection that stops sending, without a reply, after its timeout.
    A 503 means the thread that served the previous request has sent its reply but not yet
    given its slot back: wait and send again."""
    deadline = time.monotonic() + 30
    while True:
        started = time.monotonic()
        answer = _answer(_raw(server, payload))
        if not answer.startswith(b"HTTP/1.0 503 "):
            break
        assert time.monotonic() < deadline, "the thread was not freed in 30 s"
        time.sleep(0.1)
    assert answer == b""  # closed, no reply: nothing to answer
    waited = time.monotonic() - started
    assert 0.8 < waited < 10, waited


def test_geneval_server_drops_a_silent_client_and_frees_its_thread():
    with _geneval(timeout_s=1.0, max_threads=1) as server:
        _dropped_after_timeout(server, b"POST /score HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Length: 100000\r\n"
                                       b"Content-Type: application/json\r\n\r\n{")
        _served(server)  # the only thread is free again
        # a client that never finishes its headers is dropped the same way
        _dropped_after_timeout(server, b"POST /score HTTP/1.1\r\nHost:")
        _served(server)


def test_geneval_server_refuses_oversized_and_unsized_bodies_at_once():
    with _geneval(max_body_mb=1) as server:  # the default 30 s timeout: no waiting for it
        started = time.monotonic()
        big = _raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n"
                           b"\r\n")
        answer = _answer(big)
        assert answer.startswith(b"HTTP/1.0 413 ") and b"1073741824 bytes" in answer
        unsized = _answer(_raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert unsized.startswith(b"HTTP/1.0 411 ")
        chunked = _answer(_raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n"))
        assert chunked.startswith(b"HTTP/1.0 411 ")
        assert time.monotonic() - started < 10
        # under the limit: served
        status, _ = _post(server, {"images": [_small_png()], "metadata": [{}]})
        assert status == 200


def test_geneval_server_caps_its_threads():
    with _geneval(max_threads=2) as server:
        holders = [_raw(server, b"POST /score HTTP/1.1\r\n") for _ in range(2)]
        time.sleep(0.5)  # both accepted, each holding a thread in its header read
        started = time.monotonic()
        answer = _answer(_raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 2\r\n\r\n{}"))
        assert answer.startswith(b"HTTP/1.0 503 ") and b"--max-threads" in answer
        assert time.monotonic() - started < 5
        for sock in holders:
            sock.close()  # their threads see the end of input and finish
        _served(server)


@pytest.mark.parametrize("size", [(8192, 8192), (20000, 20000)])
def test_geneval_server_refuses_a_decompression_bomb(size):
    """8192 x 8192 (67 M pixels) is below PIL's own bomb limit (89 M), so only the server's
    check refuses it; 20000 x 20000 is above both."""
    bomb = _png(*size)
    assert len(bomb) < 400_000
    assert Image.open(io.BytesIO(_png(64, 64))).convert("RGB").size == (64, 64)  # a real PNG
    with _geneval() as server:
        started = time.monotonic()
        status, reply = _post(server, {"images": [base64.b64encode(bomb).decode()],
                                       "metadata": [{}]})
        assert status == 400 and "decompression bomb" in reply["error"].lower()
        if size == (8192, 8192):  # PIL lets it through: the server's own check refuses it
            assert "8192x8192 pixels, more than the 16777216 allowed" in reply["error"]
        assert time.monotonic() - started < 5  # refused from the header, nothing decoded
        status, reply = _post(server, {"images": [_small_png()] * 2, "metadata": [{}]})
        assert status == 400 and "metadata" in reply["error"]
