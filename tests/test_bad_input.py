"""Bad input is refused by the driver before Ray or any actor starts, with a message that names
the field, file or URL, and an existing run directory is left exactly as it was."""

import json
from pathlib import Path

import pytest

from buffer_service.local_server import free_port
from opgrpo.cli import main
from opgrpo.config import build_config, dump_config
from opgrpo.train import Trainer

REPO = Path(__file__).resolve().parents[1]


def _data(tmp_path, **sections):
    data = {"model": {"path": str(REPO / "tasks/shapes/shapes-base"), "height": 32, "width": 32},
            "reward": {"functions": {"shapes_partial": 1.0}},
            "train": {"prompts_file": str(REPO / "configs/shapes/train_metadata.jsonl")},
            "run": {"output_dir": str(tmp_path)}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def _trainer(tmp_path, **sections):
    return Trainer(build_config(_data(tmp_path, **sections)), tmp_path / "run")


def test_each_bad_input_is_named_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ValueError, match=r"unknown reward 'pickscor'.*known: \[.*'shapes'"):
        _trainer(tmp_path, reward={"functions": {"pickscor": 1.0}})
    with pytest.raises(ValueError, match="reward.functions is empty"):
        Trainer(build_config({**_data(tmp_path), "reward": {"functions": {}}}), tmp_path / "r")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt"):
        _trainer(tmp_path, train={"prompts_file": str(empty)})
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        _trainer(tmp_path, model={"path": str(tmp_path)})
    port = free_port()
    shown = rf"redis://:\*\*\*@127.0.0.1:{port}"  # the password is never shown
    with pytest.raises(ConnectionError, match=f"cannot reach Redis at {shown}"):
        _trainer(tmp_path, buffer={"redis_url": f"redis://:pw@127.0.0.1:{port}/0"})
    assert not (tmp_path / "run").exists()  # nothing was created


def test_a_bad_override_on_resume_leaves_the_run_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(build_config(_data(tmp_path))))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2)))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "tag": "step2"}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--resume", str(run), "--set", "learner.clip_range=-1"])
    assert code == 2
    assert "learner.clip_range" in capsys.readouterr().err
    # starting a new run over it is refused too
    code = main(["train", "--config", str(run / "config.yaml")])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    """Its directory has metrics but no checkpoint: --resume says why there is nothing to
    resume, and a new run under the same name is refused (it would append to the metrics);
    both before Ray starts, and the files stay as they were."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(build_config(_data(tmp_path))))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2)))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "stopped before its first checkpoint" in err
    assert "train.checkpoint_every" in err
    code = main(["train", "--config", str(run / "config.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "stopped before its first checkpoint" in err and "run.name" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_row_torn_by_a_killed_driver_is_dropped_on_resume(tmp_path):
    """A driver SIGKILLed while it wrote a metrics row leaves a torn last line. Resuming
    rolls the metrics back to the checkpoint's step (that row's step is run again) and reads
    the clock of the last complete row, instead of failing on the torn JSON."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "time/elapsed": 10.0 * s} for s in (1, 2, 3)]
    torn = json.dumps({"step": 4, "time/elapsed": 40.0})[:15]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    (run / "eval.jsonl").write_text(json.dumps({"step": 2, "strict": 0.5}) + "\n" + torn)
    trainer = Trainer(build_config(_data(tmp_path)), run, resume=True)
    assert trainer._last_elapsed() == 30.0
    trainer._truncate_metrics(2)
    assert (run / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    assert (run / "eval.jsonl").read_text() == json.dumps({"step": 2, "strict": 0.5}) + "\n"
