"""Shared fixtures: tiny random SD3 pipelines of the real classes, saved once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One Ray auth mode for the whole session, set before any Ray starts: the in-process clusters
# of the service tests and the `ray start` clusters of tests/raynodes.py all run without token
# auth. A mode that changed mid-session (raynodes.py sets it for its job client) left the
# driver and a later in-process cluster disagreeing ("Missing authorization header").
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from opgrpo.tiny import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory):
    from opgrpo.tiny import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-pixel"), seed=1, with_vae=False)
