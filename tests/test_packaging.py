"""What a user's `ray job submit --working-dir .` ships, and which Ray the client pins."""

import re
import shutil
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_client_ray_is_pinned_to_the_image_ray():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in deps if d.startswith("ray"))
    image = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "deploy/Dockerfile").read_text(), re.M)
    assert pinned == f"ray[default]=={image.group(1)}", (pinned, image.group(1))


def test_working_dir_upload_leaves_out_weights_data_and_runs(tmp_path):
    """Ray's own packager (the code `ray job submit --working-dir` runs) over a checkout with
    weights in models/, a dataset in data/ and run outputs: only the code and configs go."""
    from ray._private.runtime_env.packaging import create_package

    checkout = tmp_path / "checkout"
    files = ["opgrpo/config.py", "configs/shapes_tiny.yaml", "models/sd35m/transformer/w.bin",
             "data/geneval/train.txt", "runs/demo/metrics.jsonl", "bench/runs/x/ckpt.pt",
             "bench/results/sizing.json", ".venv/bin/python"]
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    for ignore in (".gitignore", ".rayignore"):
        shutil.copy(REPO / ignore, checkout / ignore)
    package = tmp_path / "pkg.zip"
    create_package(str(checkout), package, include_gitignore=True)
    shipped = set(zipfile.ZipFile(package).namelist())
    assert {"opgrpo/config.py", "configs/shapes_tiny.yaml", "bench/results/sizing.json"} <= shipped
    left_out = [n for n in files if n.startswith(("models/", "data/", "runs/", "bench/runs/",
                                                   ".venv/"))]
    assert not shipped & set(left_out), shipped & set(left_out)
