"""Network exposure of what a run starts: a local Ray's dashboard, the embedded Redis."""

from urllib.parse import urlsplit

import psutil
import pytest
import ray

from opgrpo.config import build_config
from opgrpo.train import ray_init_options

pytestmark = pytest.mark.slow


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


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
