"""Shared fixtures: tiny random SD3 pipelines of the real classes, saved once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from opgrpo.tiny import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory):
    from opgrpo.tiny import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-pixel"), seed=1, with_vae=False)
