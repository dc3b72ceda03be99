"""The `opgrpo` command line, run as a user runs it (subprocess of the installed entry point)."""

import subprocess
import sys

from PIL import Image


def _opgrpo(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "opgrpo", *args], capture_output=True, text=True, cwd=cwd,
        timeout=300,
    )


def test_make_tiny_sd3_then_sample_grid(tmp_path):
    model = tmp_path / "model"
    made = _opgrpo("make-tiny-sd3", str(model))
    assert made.returncode == 0, made.stderr
    assert (model / "model_index.json").is_file()
    refused = _opgrpo("make-tiny-sd3", str(model))
    assert refused.returncode != 0 and "not empty" in refused.stderr

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
