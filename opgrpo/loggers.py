"""Metric loggers users already watch (`run.loggers`): TensorBoard and Weights & Biases.

`metrics.jsonl` and `eval.jsonl`, written by `opgrpo/train.py`, are always on and are the run's
record (`opgrpo report`, resume and the benchmarks read them). The backends here are extras
that receive the same numbers: every finite numeric value of each step's metrics row, the
evaluation summary (nested dicts such as `per_tag` flattened to `eval/per_tag/<tag>`) and the
evaluation image grid. Non-finite values (a step without replay logs NaN shares) are skipped.

- `tensorboard`: torch's `SummaryWriter` into `RUN/tensorboard/` (`tensorboard --logdir
  runs/`). A resumed run opens it with `purge_step` = its first step, so the steps it runs again
  replace the old ones instead of doubling them.
- `wandb`: `wandb.init(dir=RUN, project=run.wandb_project, name=run.name)` with the resolved
  config (secrets removed). Offline unless `WANDB_MODE` says otherwise (`WANDB_MODE=online`
  after `wandb login`; `wandb sync RUN/wandb/offline-run-*` uploads an offline run later). Each
  start of the run, `--resume` included, is its own W&B run, grouped under `run.name`.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# backend -> (module that must import, pip extra that installs it)
BACKENDS = {"tensorboard": ("tensorboard", "loggers"), "wandb": ("wandb", "loggers")}
GRID_TAG = "eval/samples"


def check_loggers(names: list[str]) -> None:
    """Raise a ValueError naming `run.loggers` and the pip extra if a backend asked for is not
    installed (called before Ray starts)."""
    for name in names:
        if name not in BACKENDS:
            continue
        module, extra = BACKENDS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"run.loggers includes {name!r}, but {module} cannot be imported ({exc}): "
                f"pip install 'opgrpo[{extra}]' (or pip install {module}), or remove {name!r} "
                "from run.loggers") from None


def scalars(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in `values`, nested dicts flattened with '/';
    booleans, strings, lists, NaN and infinities are left out."""
    for key, value in values.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif math.isfinite(value):
            yield tag, float(value)


def public_config(config) -> dict:
    """The resolved config as written to config.yaml: without any URL's credentials (the
    Redis URL's, a reward server's; see `dump_config`)."""
    import yaml

    from opgrpo.config import dump_config

    return yaml.safe_load(dump_config(config))


class TensorBoardLogger:
    """Scalars and the evaluation grid into `run_dir/tensorboard/` (torch's SummaryWriter)."""

    def __init__(self, config, run_dir: Path, start_step: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of earlier files at steps >= start_step,
        # which a resumed run writes again
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), flush_secs=30,
                                    purge_step=start_step if start_step > 1 else None)

    def log_scalars(self, step: int, row: Mapping[str, Any]) -> None:
        for tag, value in scalars({k: v for k, v in row.items() if k != "step"}):
            self.writer.add_scalar(tag, value, step)

    def log_eval(self, step: int, summary: Mapping[str, Any], grid_png_path) -> None:
        import numpy as np
        from PIL import Image

        for tag, value in scalars(summary, "eval/"):
            self.writer.add_scalar(tag, value, step)
        if grid_png_path is not None and Path(grid_png_path).is_file():
            with Image.open(grid_png_path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(GRID_TAG, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Scalars, evaluation metrics and the grid as a W&B run stored in `run_dir/wandb/`."""

    def __init__(self, config, run_dir: Path, start_step: int = 1) -> None:
        import wandb

        self.wandb = wandb
        data = public_config(config)
        if start_step > 1:
            data["resumed_at_step"] = start_step
        self.run = wandb.init(
            dir=str(run_dir), project=config.run.wandb_project, name=config.run.name,
            group=config.run.name, config=data, mode=os.environ.get("WANDB_MODE", "offline"),
            # the driver's console (progress bar, logs) is left as it is
            settings=wandb.Settings(console="off"), reinit="create_new")

    def log_scalars(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log(dict(scalars({k: v for k, v in row.items() if k != "step"})), step=step)

    def log_eval(self, step: int, summary: Mapping[str, Any], grid_png_path) -> None:
        data: dict[str, Any] = dict(scalars(summary, "eval/"))
        if grid_png_path is not None and Path(grid_png_path).is_file():
            data[GRID_TAG] = self.wandb.Image(str(grid_png_path), caption=f"step {step}")
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The run's extra backends behind the same interface. A backend that fails to log is
    reported and the run goes on: `metrics.jsonl` is the record."""

    def __init__(self, backends: list) -> None:
        self.backends = backends

    def _each(self, method: str, *args) -> None:
        for backend in self.backends:
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # noqa: BLE001 - an extra must not stop the training
                log.warning("%s.%s failed: %s: %s", type(backend).__name__, method,
                            type(exc).__name__, exc)

    def log_scalars(self, step: int, row: Mapping[str, Any]) -> None:
        self._each("log_scalars", step, row)

    def log_eval(self, step: int, summary: Mapping[str, Any], grid_png_path) -> None:
        self._each("log_eval", step, summary, grid_png_path)

    def close(self) -> None:
        self._each("close")
        self.backends = []


def make_loggers(config, run_dir: str | Path, start_step: int = 1) -> Loggers:
    """The backends `config.run.loggers` names besides `jsonl` (which train.py writes itself).
    `start_step`: the first step this process runs (> 1 on resume)."""
    check_loggers(config.run.loggers)
    classes = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
    return Loggers([classes[name](config, Path(run_dir), start_step)
                    for name in config.run.loggers if name in classes])
