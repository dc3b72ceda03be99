"""The buffer actor's class against real Redis servers: a separate redis-server with a password
and an append-only file (stopped and restarted under it), and the embedded one."""

import logging
import random
import threading
import time

import numpy as np
import pytest

from buffer_service.actor import BufferService, RedisUnavailable, connect_redis
from buffer_service.local_server import LocalRedis, free_port
from opgrpo.config import BufferConfig
from opgrpo.trajectory import Trajectory


def _config(url, **extra):
    return BufferConfig(**{"capacity": 8, "redis_url": url, "redis_timeout_s": 30.0,
                           **extra}).model_dump()


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


@pytest.fixture
def server(tmp_path):
    with LocalRedis(tmp_path / "redis") as server:
        yield server


def test_password_errors_name_the_url_but_never_the_password(server, monkeypatch):
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    wrong = f"redis://:not-{server.password}@127.0.0.1:{server.port}/0"
    with pytest.raises(ConnectionError, match="refused the password") as err:
        connect_redis(wrong, None)
    assert server.password not in str(err.value) and "not-" not in str(err.value)
    assert f"127.0.0.1:{server.port}" in str(err.value)
    with pytest.raises(ConnectionError, match="needs a password"):
        connect_redis(server.url_without_password, None)
    monkeypatch.setenv("REDIS_PASSWORD", server.password)  # the password from the environment
    client, embedded = connect_redis(server.url_without_password, None)
    assert client.ping() and embedded is None
    closed = free_port()
    with pytest.raises(ConnectionError, match=f"cannot reach Redis at redis://127.0.0.1:{closed}"):
        connect_redis(f"redis://127.0.0.1:{closed}/0", None)


def test_restarted_redis_is_waited_for_and_keeps_the_buffer(server, tmp_path, caplog):
    service = BufferService(_config(server.url), str(tmp_path), "t-restart")
    trajs = _trajectories(4)
    _admit_all(service, trajs, 1)
    before = service.stats()
    time.sleep(1.2)  # appendfsync everysec: the admissions are on disk
    server.stop()
    restarter = threading.Timer(2.0, server.start)
    restarter.start()
    with caplog.at_level(logging.WARNING, logger="buffer_service.actor"):
        meta, payloads = service.sample(4, 2, seed=0)  # blocks until Redis is back
    restarter.join()
    assert sorted(m["prompt_key"] for m in meta) == ["p0", "p1", "p2", "p3"]
    assert len(payloads) == 4
    after = service.stats()
    assert {k: after[k] for k in ("size", "admissions")} == {
        k: before[k] for k in ("size", "admissions")}
    assert after["outages"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("is not answering" in m for m in messages)
    assert any("is back after" in m for m in messages)
    assert all(server.password not in m for m in messages)


def test_redis_down_past_the_timeout_raises_a_clear_error(server, tmp_path):
    service = BufferService(_config(server.url, redis_timeout_s=1.0), str(tmp_path), "t-down")
    _admit_all(service, _trajectories(2), 1)
    server.kill()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"did not answer .*redis_timeout_s = 1") as err:
        service.stats()
    assert 1.0 <= time.monotonic() - started < 10
    assert server.password not in str(err.value)


def test_a_payload_that_does_not_decode_is_evicted_and_counted(server, tmp_path):
    service = BufferService(_config(server.url), str(tmp_path), "t-decode")
    _admit_all(service, _trajectories(3), 1)
    # valid checksum, but not a trajectory: written as the store would write it
    service.store.admit("junk", 0.9, 1.0, 1, 1, b"\x00garbage", prompt="junk")
    meta, _ = service.sample(4, 2, seed=random.Random(0).randrange(100))
    assert sorted(m["prompt_key"] for m in meta) == ["p0", "p1", "p2"]
    stats = service.stats()
    assert stats["corrupted"] == 1 and stats["size"] == 3


def test_embedded_redis_has_no_tcp_port_and_survives_its_client(tmp_path):
    first = BufferService(_config(None), str(tmp_path), "t-embedded")
    assert first.client.config_get("port") == {"port": "0"}  # unix socket only
    assert first.client.config_get("appendonly") == {"appendonly": "yes"}
    _admit_all(first, _trajectories(3), 1)
    # a second actor on the same run directory (a restarted buffer actor) sees the same data
    second = BufferService(_config(None), str(tmp_path), "t-embedded")
    try:
        assert second.stats()["size"] == 3
    finally:
        second.shutdown()
        first._embedded = None  # the shared server is stopped once


def test_checkpoint_commit_and_rollback_through_the_service(server, tmp_path):
    service = BufferService(_config(server.url, capacity=2), str(tmp_path), "t-ckpt")
    _admit_all(service, _trajectories(2, step=1), 1)
    assert service.checkpoint(1)
    service.checkpoint_done(1)
    keep = {m["prompt_key"]: m["reward"] for m in service.sample(2, 1, seed=0)[0]}
    # step 2 replaces both entries with better ones, then the run resumes from step 1
    service.admit(_trajectories(2, step=2), [
        {"index": i, "reward": 0.9, "advantage": 1.0, "step": 2} for i in range(2)])
    assert {m["reward"] for m in service.sample(2, 2, seed=0)[0]} == {0.9}
    changes = service.rollback_to(1)
    assert changes["restored"] == 2
    assert {m["prompt_key"]: m["reward"] for m in service.sample(2, 1, seed=0)[0]} == keep
    assert service.stats()["admissions"] == 2


class _Handle:
    """Stands in for the buffer actor's Ray handle: `admit.remote` calls the real service now."""

    def __init__(self, service):
        self.admit = self
        self.remote = service.admit


def _replay_step(service, step, fresh_reward=0.0):
    """One iteration's admission for prompt p0 as the driver does it: the buffer's entry is
    replayed (its mixed trajectory wins its group) and the group's winners are offered."""
    import torch

    from learner.advantages import group_advantages
    from opgrpo.driver import Rollout, SampleInfo, admit_winners, replayed_samples
    from opgrpo.trajectory import decode_trajectories

    meta, payloads = service.sample(1, step, seed=step)
    if not meta:
        return None
    (replayed,) = replayed_samples(0, meta)
    replayed.reward = meta[0]["reward"] + 0.1  # better than before: the group's winner
    mixed = decode_trajectories(payloads[0])[0].with_updates(replayed=True)
    fresh = SampleInfo(1, 0, 0, "p0", False, step, reward=fresh_reward)
    samples = [replayed, fresh]
    adv = group_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([0, 0]))
    rollout = Rollout([[mixed], _trajectories(1, step)], [], [], samples, [])
    return admit_winners(_Handle(service), rollout, samples, adv, step)


def test_replays_through_the_driver_keep_the_prefixs_age_and_max_age_evicts(server, tmp_path):
    service = BufferService(_config(server.url, max_age=5, decay_gamma=0.99), str(tmp_path),
                            "t-age")
    try:
        service.admit(_trajectories(1), [{"index": 0, "reward": 0.2, "advantage": 1.0,
                                          "step": 0}])
        present = []
        for step in range(1, 30):
            service.evict_expired(step)
            outcomes = _replay_step(service, step)
            assert outcomes in (None, [["replaced_same_prompt"]])
            entry = service.store.get("p0")
            present.append(entry is not None)
            if entry is not None:  # replaced by its replays, but as old as its first prefix
                assert (entry.insert_step, entry.weight_version) == (0, 0)
        assert present == [True] * 5 + [False] * 24
    finally:
        service.shutdown()


def test_exclude_admits_nothing_for_a_group_a_replayed_sample_wins(server, tmp_path):
    service = BufferService(_config(server.url, replayed_winners="exclude"), str(tmp_path),
                            "t-excl")
    try:
        service.admit(_trajectories(1), [{"index": 0, "reward": 0.2, "advantage": 1.0,
                                          "step": 0}])
        before = service.store.get("p0")
        assert _replay_step(service, 1) == [["rejected_replayed"]]
        assert service.store.get("p0") == before and service.stats()["rejections"] == 1
        # the same group won by its fresh sample is admitted as before
        assert _replay_step(service, 2, fresh_reward=5.0) == [["replaced_same_prompt"]]
        assert service.store.get("p0").insert_step == 2
    finally:
        service.shutdown()
