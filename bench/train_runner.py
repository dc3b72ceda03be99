"""Start or resume one `opgrpo train` run as a child process (the long benchmarks' runner)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from opgrpo.metrics import read_rows  # noqa: F401 - the benchmarks' reader


def train_or_resume(root: Path, run_dir: Path, config: str, overrides: list[str]) -> None:
    """Resume `run_dir` from its latest checkpoint, or start `config` with `overrides` there
    (a run that stopped before its first checkpoint is started again). Raises
    CalledProcessError when the run fails; an interrupted runner stops the run too, and the
    run resumes next time."""
    opgrpo = [sys.executable, "-m", "opgrpo", "train"]
    if (run_dir / "checkpoints" / "latest.json").is_file():
        command = [*opgrpo, "--resume", str(run_dir)]
        print(f"[{run_dir.name}] resuming", flush=True)
    else:
        if run_dir.exists():  # started, no checkpoint yet: nothing worth keeping
            shutil.rmtree(run_dir)
        command = [*opgrpo, "--config", config, *[a for o in overrides for a in ("--set", o)]]
        print(f"[{run_dir.name}] starting: {' '.join(overrides)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    process = subprocess.Popen(command, cwd=root, env=env)
    try:
        code = process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=300)
    if code:
        raise subprocess.CalledProcessError(code, command)

