"""Durable run files (`opgrpo/durable.py`): atomic writes that leave the old file and no
temporary file when the disk is full or a file-size limit is hit, checkpoint manifests that
catch a flipped byte or a truncated file, and a resume that falls back to the previous
complete checkpoint. Write failures are real: a file-size limit (RLIMIT_FSIZE, which makes
the kernel fail a write with EFBIG as a full disk fails it with ENOSPC) in a subprocess (in a
learner actor of a real run: tests/test_faults.py), and a small tmpfs where this machine allows
mounting one."""

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opgrpo import durable
from opgrpo.config import build_config, dump_config
from opgrpo.train import Trainer, prune_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _limited(script: str, limit: int, *args: str) -> subprocess.CompletedProcess:
    """Run `script` in a Python subprocess whose files may not grow past `limit` bytes."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-c", script, *args], preexec_fn=apply,
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _tmp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.tmp"))


# ----- atomic writes ------------------------------------------------------------------------
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "latest.json"
    target.write_text('{"step": 2}\n')
    script = """
import sys, numpy as np
from opgrpo import durable
from safetensors.numpy import save_file
target = sys.argv[1]
for what, write in [
        ("text", lambda: durable.atomic_write_text(target, "x" * 100_000)),
        ("safetensors", lambda: durable.atomic_write(target, lambda tmp: save_file(
            {"w": np.zeros(100_000, np.float32)}, str(tmp))))]:
    try:
        write()
    except OSError as exc:
        print(what, exc.errno, exc.filename, exc.strerror)
"""
    done = _limited(script, 4096, str(target))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["text", str(errno.EFBIG), str(target)], ["safetensors", str(errno.EFBIG), str(target)]]
    assert all("too large" in line for line in lines)
    assert target.read_text() == '{"step": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json"]
    # an error inside the writer: the same
    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("writer")

    with pytest.raises(RuntimeError, match="writer"):
        durable.atomic_write(target, broken)
    assert target.read_text() == '{"step": 2}\n' and not _tmp_files(tmp_path)
    durable.atomic_write_json(target, {"step": 4})
    assert json.loads(target.read_text()) == {"step": 4} and not _tmp_files(tmp_path)
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_full_disk_leaves_the_old_file(tmp_path):
    """A real ENOSPC on a 64 KiB tmpfs (needs the right to mount; skipped without it)."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        target = small / "config.yaml"
        durable.atomic_write_text(target, "old: 1\n")
        with pytest.raises(OSError) as err:
            durable.atomic_write_bytes(target, b"x" * 200_000)
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
        assert "disk is full" in str(err.value)
        assert target.read_text() == "old: 1\n"
        assert [p.name for p in small.iterdir()] == ["config.yaml"]
        durable.atomic_write_text(target, "new: 2\n")  # the space came back
        assert target.read_text() == "new: 2\n"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_write_error_reads_oserrors_and_safetensors_messages():
    assert durable.write_error(OSError(errno.ENOSPC, "No space", "/x"))[1:] == (
        "no space left on the device (the disk is full)", "/x")
    wrapped = RuntimeError("task failed")
    wrapped.cause = Exception("Error while serializing: I/O error: (os error 122)")
    assert durable.write_error(wrapped)[:2] == (errno.EDQUOT, "the disk quota is exceeded")
    assert durable.write_error(ValueError("shapes differ")) is None


def test_metrics_truncation_under_a_failing_write_keeps_every_row(tmp_path):
    """Resume drops the metric rows after its checkpoint by rewriting the file. Under this
    file-size limit a plain rewrite (`write_text`) left 30 of the 90 rows; now the write fails
    as a whole, the 90 rows stay, no temporary file is left and the run stops with a one-line
    message."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, **{f"metric/{i}": 0.1234567 * i * s for i in range(60)}}
            for s in range(1, 91)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text)
    config = build_config({"model": {"path": str(REPO / "tasks/shapes/shapes-base")},
                           "reward": {"functions": {"shapes_partial": 1.0}},
                           "train": {"prompts_file": str(REPO / "configs/shapes/"
                                                         "train_metadata.jsonl")},
                           "run": {"output_dir": str(tmp_path)}})
    (run / "config.yaml").write_text(dump_config(config))
    script = """
import sys
from pathlib import Path
from opgrpo.config import load_config
from opgrpo.errors import RunStopped
from opgrpo.train import Trainer
run = Path(sys.argv[1])
trainer = Trainer(load_config(run / "config.yaml", []), run, resume=True)
try:
    trainer._truncate_metrics(60)
except RunStopped as exc:
    print(exc)
"""
    limit = len(text) // 3  # under the 60 rows that would be kept
    done = _limited(script, limit, str(run))
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert "\n" not in message and "metrics.jsonl" in message and "too large" in message
    assert (run / "metrics.jsonl").read_text() == text  # all 90 rows
    assert not _tmp_files(run)
    trainer = Trainer(config, run, resume=True)
    trainer._truncate_metrics(60)  # without the limit
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open())] == list(
        range(1, 61))


# ----- manifests and the resume point ------------------------------------------------------
def _checkpoint(directory: Path, step: int, seed: int = 0) -> Path:
    """A checkpoint directory of real files (sizes as a tiny run's), with its manifest."""
    from safetensors.numpy import save_file

    tag_dir = directory / f"step{step}"
    tag_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed + step)
    save_file({"w": rng.standard_normal(50_000).astype(np.float32)},
              str(tag_dir / "trainable.safetensors"))
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(rng.bytes(300_000))
    durable.write_manifest(tag_dir, step=step, tag=tag_dir.name, version=step)
    return tag_dir


def _latest(directory: Path, step: int) -> None:
    durable.atomic_write_json(directory / "latest.json", {
        "step": step, "tag": f"step{step}", "version": step, "manifest": durable.MANIFEST})


def test_manifest_catches_a_flipped_byte_a_truncated_file_and_a_missing_one(tmp_path):
    tag_dir = _checkpoint(tmp_path, 2)
    manifest = durable.verify_checkpoint(tag_dir)
    assert manifest["step"] == 2 and set(manifest["files"]) == {
        "trainable.safetensors", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    states = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(states.read_bytes())
    data[123_456] ^= 0x01  # one bit
    states.write_bytes(bytes(data))
    with pytest.raises(durable.DamagedCheckpoint, match=f"{states}.*sha256"):
        durable.verify_checkpoint(tag_dir)
    data[123_456] ^= 0x01
    states.write_bytes(bytes(data[:-1000]))
    with pytest.raises(durable.DamagedCheckpoint, match=f"{states} has 299000 bytes.*300000"):
        durable.verify_checkpoint(tag_dir)
    states.write_bytes(bytes(data))
    durable.verify_checkpoint(tag_dir)  # whole again
    (tag_dir / "trainable.safetensors").unlink()
    with pytest.raises(durable.DamagedCheckpoint, match="trainable.safetensors is missing"):
        durable.verify_checkpoint(tag_dir)
    (tag_dir / durable.MANIFEST).unlink()
    with pytest.raises(durable.DamagedCheckpoint, match="manifest.json is missing"):
        durable.verify_checkpoint(tag_dir)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    _latest(tmp_path, 6)
    assert durable.resume_checkpoint(tmp_path) == (
        {"step": 6, "tag": "step6", "version": 6, "fallback": False}, [])
    bad = tmp_path / "step6" / "trainable.safetensors"
    bad.write_bytes(bad.read_bytes()[:-8])
    (tmp_path / "step4" / durable.MANIFEST).unlink()  # a save that never completed
    state, problems = durable.resume_checkpoint(tmp_path)
    assert state == {"step": 2, "tag": "step2", "version": 2, "fallback": True}
    assert str(bad) in problems[0] and "manifest.json is missing" in problems[1]
    damaged = tmp_path / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])
    with pytest.raises(durable.DamagedCheckpoint) as err:
        durable.resume_checkpoint(tmp_path)
    message = str(err.value)
    assert str(bad) in message and str(damaged) in message and "\n" not in message
    assert "backup" in message and "new run.name" in message
    # a latest.json written before manifests existed: taken unverified, with a warning
    legacy = tmp_path / "legacy"
    (legacy / "step3").mkdir(parents=True)
    (legacy / "latest.json").write_text(json.dumps({"step": 3, "tag": "step3", "version": 3}))
    state, problems = durable.resume_checkpoint(legacy)
    assert state["step"] == 3 and "predates checkpoint manifests" in problems[0]


def test_a_refused_resume_leaves_config_yaml_as_it_was(tmp_path):
    """No checkpoint verifies: resume stops before any actor starts, and the run's
    config.yaml keeps the settings it was started with (the override is not written)."""
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints", 2)
    _latest(run / "checkpoints", 2)
    (run / "checkpoints" / "step2" / "trainable.safetensors").write_bytes(b"")
    config = _service_config(tmp_path)
    (run / "config.yaml").write_text(dump_config(config))
    before = (run / "config.yaml").read_bytes()
    trainer = Trainer(_service_config(tmp_path, "train.num_steps=9"), run, resume=True)
    with pytest.raises(durable.DamagedCheckpoint, match="trainable.safetensors has 0 bytes"):
        trainer.prepare()
    assert (run / "config.yaml").read_bytes() == before and not hasattr(trainer, "learners")


def test_pruning_keeps_complete_checkpoints_before_incomplete_ones(tmp_path):
    for step in (2, 4, 8):
        _checkpoint(tmp_path, step)
    (tmp_path / "step6").mkdir()  # no manifest: a save that never completed
    (tmp_path / "step10").mkdir()  # newer than latest.json (a run resumed at step 8)
    assert prune_checkpoints(tmp_path, 2, "step8") == ["step2", "step6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10", "step4", "step8"]


# ----- a real service run's config (the refused resume above) ------------------------------
# A real run whose learner cannot write a checkpoint, and the resume that falls back from a
# damaged one, share their runs with other faults in tests/test_faults.py.


def _service_config(tmp_path, *overrides: str):
    data = {
        "model": {"path": str(REPO / "tasks/shapes/shapes-base"), "height": 32, "width": 32},
        "sampling": {"num_steps": 4, "guidance_scale": 1.0},
        "rollout": {"num_actors": 1, "num_cpus": 0.25, "prompts_per_step": 4, "group_size": 4,
                    "chunk_size": 16},
        "reward": {"functions": {"shapes_partial": 1.0}, "num_actors": 1, "num_cpus": 0.25},
        "buffer": {"off_policy_fraction": 0.25, "capacity": 16, "truncate_step": 2},
        "learner": {"num_ranks": 1, "num_cpus": 0.25, "zero_stage": 2, "micro_batch_size": 16,
                    "learning_rate": 3e-3},
        "train": {"num_steps": 3, "checkpoint_every": 1, "mode": "sync",
                  "prompts_file": str(REPO / "configs/shapes/train_metadata.jsonl")},
        "run": {"name": "durable", "output_dir": str(tmp_path), "seed": 0},
    }
    return build_config(data, list(overrides))
