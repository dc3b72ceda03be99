"""`run.loggers`: the TensorBoard and W&B backends run on a temporary run directory and what they
wrote is read back (TensorBoard's event files with its EventAccumulator, W&B's offline run
file record by record). No network: W&B is forced offline."""

import json
import logging
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opgrpo.config import build_config
from opgrpo.loggers import GRID_TAG, Loggers, check_loggers, make_loggers, scalars


def _config(loggers, **run):
    return build_config({"run": {"name": "lg", "loggers": loggers, **run}})


def _rows():
    """Three metric rows as train.py writes them: NaN in the first step's replay share, an
    infinity, a string and a bool that no backend can plot."""
    return [{"step": s, "version": s, "loss/total": 0.5 / s, "reward/mean": 0.1 * s,
             "buffer/replay_rescued_fraction": math.nan if s == 1 else 0.25,
             "loss/seq_weight_max": math.inf if s == 2 else 1.5, "note": "x", "flag": True}
            for s in (1, 2, 3)]


def _grid(path: Path, size=(48, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2, 0] = 255  # left half red
    Image.fromarray(pixels).save(path)
    return path


SUMMARY = {"strict": 0.5, "partial": 0.75, "n_images": 8,
           "per_tag": {"colors": 0.9, "position": math.nan}}


def test_scalars_flatten_and_skip_non_finite():
    got = dict(scalars({"a": 1, "b": math.nan, "c": math.inf, "d": "s", "e": True,
                        "f": {"g": 2.5, "h": {"i": -1}}, "j": [1, 2]}, "eval/"))
    assert got == {"eval/a": 1.0, "eval/f/g": 2.5, "eval/f/h/i": -1.0}


def test_defaults_are_jsonl_only(tmp_path):
    config = build_config({})
    assert config.run.loggers == ["jsonl"]
    assert _config(["tensorboard", "tensorboard"]).run.loggers == ["jsonl", "tensorboard"]
    loggers = make_loggers(config, tmp_path)
    assert loggers.backends == []
    loggers.log_scalars(1, _rows()[0])
    loggers.close()
    assert list(tmp_path.iterdir()) == []  # nothing besides what train.py writes


def _events(run_dir: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0,
                                                                         "images": 0})
    acc.Reload()
    return acc


def _scalar(acc, tag):
    """(step, value) of a tag; TensorBoard stores float32, so values are rounded."""
    return [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_eval_and_grid(tmp_path):
    pytest.importorskip("tensorboard")
    loggers = make_loggers(_config(["tensorboard"]), tmp_path)
    for row in _rows():
        loggers.log_scalars(row["step"], row)
    grid = _grid(tmp_path / "samples" / "step00003.png")
    loggers.log_eval(3, SUMMARY, grid)
    loggers.close()

    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"version", "loss/total", "reward/mean", "buffer/replay_rescued_fraction",
            "loss/seq_weight_max", "eval/strict", "eval/partial", "eval/n_images",
            "eval/per_tag/colors"} <= tags
    assert not tags & {"step", "note", "flag", "eval/per_tag/position"}
    assert _scalar(acc, "loss/total") == [(1, 0.5), (2, 0.25), (3, round(0.5 / 3, 5))]
    # non-finite values are left out, their steps simply have no point
    assert _scalar(acc, "buffer/replay_rescued_fraction") == [(2, 0.25), (3, 0.25)]
    assert _scalar(acc, "loss/seq_weight_max") == [(1, 1.5), (3, 1.5)]
    assert _scalar(acc, "eval/per_tag/colors") == [(3, 0.9)]
    (image,) = acc.Images(GRID_TAG)
    assert (image.step, image.width, image.height) == (3, 48, 24)
    import io

    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, np.asarray(Image.open(grid).convert("RGB")))


def test_tensorboard_resume_replaces_the_steps_run_again(tmp_path):
    """A run resumed at step 3 (checkpoint at 2) runs steps 3-4 again: TensorBoard shows each
    step once, with the values of the resumed run."""
    pytest.importorskip("tensorboard")
    config = _config(["tensorboard"])
    first = make_loggers(config, tmp_path)
    for step in (1, 2, 3, 4):
        first.log_scalars(step, {"step": step, "loss/total": float(step)})
    first.close()
    resumed = make_loggers(config, tmp_path, start_step=3)
    for step in (3, 4, 5):
        resumed.log_scalars(step, {"step": step, "loss/total": 10.0 * step})
    resumed.close()
    assert _scalar(_events(tmp_path), "loss/total") == [(1, 1.0), (2, 2.0), (3, 30.0),
                                                        (4, 40.0), (5, 50.0)]


def test_a_failing_backend_is_reported_and_the_rest_goes_on(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    loggers = make_loggers(_config(["tensorboard"]), tmp_path)
    torn = tmp_path / "samples" / "step00001.png"
    torn.parent.mkdir()
    torn.write_bytes(_grid(tmp_path / "ok.png").read_bytes()[:40])  # a half-written grid
    with caplog.at_level(logging.WARNING, logger="opgrpo.loggers"):
        loggers.log_eval(1, {"strict": 0.25}, torn)
    assert "TensorBoardLogger.log_eval failed" in caplog.text
    loggers.log_scalars(2, {"loss/total": 1.0})
    loggers.close()
    acc = _events(tmp_path)
    assert _scalar(acc, "eval/strict") == [(1, 0.25)]
    assert _scalar(acc, "loss/total") == [(2, 1.0)]


def _wandb_records(run_file: Path):
    """Every record of a W&B run file: its LevelDB-style log (a 7-byte header ':W&B', magic,
    version; 32 KiB blocks of chunks with a crc32/length/type header) of Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or the LAST chunk of a record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    """History or summary items as a dict (an image's fields come as nested keys)."""
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = build_config({
        "run": {"name": "lg", "loggers": ["wandb"], "wandb_project": "opgrpo-test"},
        "buffer": {"redis_url": "redis://:hunter2@cache:6379/0"},
        "reward": {"functions": {"geneval": 1.0},
                   "options": {"geneval": {"url": "http://u:hunter4@h:80"}}}})
    loggers = make_loggers(config, tmp_path)
    for row in _rows():
        loggers.log_scalars(row["step"], row)
    grid = _grid(tmp_path / "samples" / "step00003.png")
    loggers.log_eval(3, SUMMARY, grid)
    loggers.close()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(run_file)
    deadline = time.monotonic() + 30
    # `finish()` returns once wandb's service has the exit record, and its writer flushes the
    # file a moment later (seen: a 7-byte file, header only, under load): wait for the exit
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after 30 s"
        time.sleep(0.2)
        records = _wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert (run.project, run.display_name, run.run_group) == ("opgrpo-test", "lg", "lg")
    logged = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert logged["run"]["loggers"] == ["jsonl", "wandb"]
    assert logged["buffer"]["redis_url"] == "redis://cache:6379/0"
    assert logged["reward"]["options"]["geneval"]["url"] == "http://h:80"  # no user info
    assert "hunter" not in run_file.read_bytes().decode("latin-1")

    history = [_items(r.history.item) for r, k in zip(records, kinds) if k == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["loss/total"] for h in history] == pytest.approx([0.5, 0.25, 0.5 / 3])
    assert "buffer/replay_rescued_fraction" not in history[0]  # NaN: skipped
    assert "loss/seq_weight_max" not in history[1]  # inf: skipped
    assert not {"step", "note", "flag"} & set(history[0])
    last = history[-1]  # step 3: the metrics row and the evaluation in one history row
    assert last["eval/strict"] == 0.5 and last["eval/per_tag/colors"] == pytest.approx(0.9)
    assert "eval/per_tag/position" not in last
    image = last[GRID_TAG]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (48, 24)
    assert (run_dir / "files" / image["path"]).read_bytes() == grid.read_bytes()
    summary = {}
    for r, k in zip(records, kinds):
        if k == "summary":
            summary.update(_items(r.summary.update))
    assert summary["loss/total"] == pytest.approx(0.5 / 3) and summary["eval/strict"] == 0.5


def test_a_backend_not_installed_fails_before_ray(tmp_path, monkeypatch):
    """`run.loggers: [wandb]` without wandb: the Trainer refuses at construction (train()
    builds it before ray.init), naming the field and the pip extra."""
    import ray

    from opgrpo.train import Trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError, match=r"run\.loggers.*opgrpo\[loggers\]"):
        check_loggers(["jsonl", "wandb"])
    data = {"run": {"name": "x", "output_dir": str(tmp_path), "loggers": ["wandb"]}}
    with pytest.raises(ValueError, match=r"run\.loggers includes 'wandb'"):
        Trainer(build_config(data), tmp_path / "x")  # the first thing it checks
    assert not ray.is_initialized()
    check_loggers(["jsonl"])  # jsonl needs nothing


def test_a_loggers_group_is_safe_to_close_twice(tmp_path):
    pytest.importorskip("tensorboard")
    loggers = Loggers([])
    loggers.close()
    loggers = make_loggers(_config(["tensorboard"]), tmp_path)
    loggers.close()
    loggers.close()
    assert loggers.backends == []
