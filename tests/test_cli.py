"""The `opgrpo` command line, run as a user runs it (subprocess of the installed entry point)."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _opgrpo(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "opgrpo", *args], capture_output=True, text=True, cwd=cwd,
        timeout=300,
    )


def _checkout(tmp_path: Path) -> Path:
    """A directory that looks like the repository to the shipped configs' relative paths
    (configs/, tasks/), so that runs write their out/ and runs/ there, not into the repo."""
    here = tmp_path / "checkout"
    here.mkdir()
    for name in ("configs", "tasks"):
        (here / name).symlink_to(REPO / name)
    return here


def _one_step(here: Path, config: str, *sets: str) -> list[dict]:
    """`opgrpo train --config <config>` for one step, as shipped but for the `sets`."""
    args = [a for s in ("train.num_steps=1", *sets) for a in ("--set", s)]
    run = _opgrpo("train", "--config", config, *args, cwd=here)
    assert run.returncode == 0, run.stderr[-3000:]
    name = next(line.split(":", 1)[1].strip() for line in (REPO / config).open()
                if line.strip().startswith("name:"))
    return [json.loads(line) for line in (here / "runs" / name / "metrics.jsonl").open()]


def test_make_tiny_sd3_then_its_config_trains_as_shipped_and_sample_grid(tmp_path):
    """The header of configs/tiny_sd3.yaml, word for word: `opgrpo make-tiny-sd3 out/tiny-sd3`,
    then `opgrpo train --config configs/tiny_sd3.yaml` (one step of it): its Ray requests fit
    this 2-core machine and its prompt file has enough prompts."""
    here = _checkout(tmp_path)
    model = here / "out" / "tiny-sd3"
    made = _opgrpo("make-tiny-sd3", "out/tiny-sd3", cwd=here)
    assert made.returncode == 0, made.stderr
    assert (model / "model_index.json").is_file()
    refused = _opgrpo("make-tiny-sd3", str(model))
    assert refused.returncode != 0 and "not empty" in refused.stderr
    rows = _one_step(here, "configs/tiny_sd3.yaml")
    assert [r["step"] for r in rows] == [1]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle\n\nthree blue squares\n")
    for flag in ([], ["--sde"]):
        out = tmp_path / f"grid{len(flag)}.png"
        run = _opgrpo("sample", "--model", str(model), "--prompts", str(prompts), "--out",
                      str(out), "--steps", "4", "--n-per-prompt", "3", *flag)
        assert run.returncode == 0, run.stderr
        with Image.open(out) as image:
            width, height = image.size
        assert width >= 3 * 128 and height >= 2 * 128  # 2 rows x 3 tiles of 128 px


def test_sample_names_missing_files(tmp_path, tiny_sd3_dir):
    run = _opgrpo("sample", "--model", str(tmp_path / "none"), "--prompts", "x.txt",
                  "--out", "o.png")
    assert run.returncode == 2 and "does not exist" in run.stderr
    run = _opgrpo("sample", "--model", str(tiny_sd3_dir), "--prompts",
                  str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.png"))
    assert run.returncode == 2 and "missing.txt" in run.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"no_prompt": 1}\n')
    run = _opgrpo("sample", "--model", str(tiny_sd3_dir), "--prompts", str(bad),
                  "--out", str(tmp_path / "o.png"))
    assert run.returncode == 2 and "bad.jsonl:2" in run.stderr


def test_config_command_prints_resolved_yaml_and_names_bad_fields():
    ok = _opgrpo("config", "--set", "learner.correction=naive")
    assert ok.returncode == 0 and "correction: naive" in ok.stdout
    bad = _opgrpo("config", "--set", "learner.corection=naive")
    assert bad.returncode == 2 and "learner.corection" in bad.stderr
