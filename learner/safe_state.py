"""Checkpoint state without pickle: tensors in safetensors, everything else as JSON.

DeepSpeed writes its checkpoints with `torch.save` and reads them with `torch.load`, which
unpickles: a checkpoint file from an untrusted place can run code. This module encodes the
nested state DeepSpeed hands to its checkpoint engine (dicts, lists, tuples, numbers, strings,
tensors and a short allowlist of DeepSpeed's small state objects) into one safetensors file:
the tensors as safetensors tensors, the structure as JSON in the file's metadata. Reading it
back builds only the allowlisted types; anything else is refused with the type's name.

`SafeCheckpointEngine` plugs the codec into DeepSpeed (`engine.checkpoint_engine`), so
`save_checkpoint` / `load_checkpoint` keep their layout and file names (`*_states.pt`) but
every file is safetensors.
"""

from __future__ import annotations

import enum
import importlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

METADATA_KEY = "opgrpo_state"
FORMAT = "opgrpo-safe-state/1"

# DeepSpeed's small state objects that appear inside its checkpoints (found by walking the
# state of ZeRO 0-3 checkpoints). They are rebuilt from their attribute dicts, never by
# calling code named in the file: a name outside this list is refused.
ALLOWED_OBJECTS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler.LossScaleConfig",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
ALLOWED_ENUMS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaleProfile",
})


class UnsafeStateError(ValueError):
    """A checkpoint file holds something this codec will not read or write."""


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(name: str, allowed: frozenset[str], path: Path | str) -> type:
    if name not in allowed:
        raise UnsafeStateError(f"{path}: type {name!r} is not on the allowlist of "
                               "learner/safe_state.py; refusing to build it")
    module, _, qualname = name.rpartition(".")
    return getattr(importlib.import_module(module), qualname)


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, enum.Enum):  # before int: IntEnum is an int
            name = _type_name(type(obj))
            if name not in ALLOWED_ENUMS:
                raise UnsafeStateError(f"{where}: enum {name} is not allowlisted")
            return {"__enum__": name, "value": self.encode(obj.value, where)}
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.Tensor):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.Size):
            return {"__size__": list(obj)}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            items = [[self.encode(k, f"{where} key"), self.encode(v, f"{where}.{k}")]
                     for k, v in obj.items()]
            return {"__dict__": items, "ordered": isinstance(obj, OrderedDict)}
        name = _type_name(type(obj))
        if name in ALLOWED_OBJECTS:
            return {"__object__": name, "state": self.encode(dict(vars(obj)), where)}
        raise UnsafeStateError(f"{where}: cannot store a {name} without pickle; add it to "
                               "ALLOWED_OBJECTS in learner/safe_state.py if it is plain data")


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: Path | str) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__float__" in node:
        return float(node["__float__"])
    if "__dtype__" in node:
        dtype = getattr(torch, node["__dtype__"], None)
        if not isinstance(dtype, torch.dtype):
            raise UnsafeStateError(f"{path}: unknown dtype {node['__dtype__']!r}")
        return dtype
    if "__size__" in node:
        return torch.Size(node["__size__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors, path) for v in node["__tuple__"])
    if "__dict__" in node:
        pairs = [(_decode(k, tensors, path), _decode(v, tensors, path))
                 for k, v in node["__dict__"]]
        return OrderedDict(pairs) if node.get("ordered") else dict(pairs)
    if "__enum__" in node:
        cls = _resolve(node["__enum__"], ALLOWED_ENUMS, path)
        return cls(_decode(node["value"], tensors, path))
    if "__object__" in node:
        cls = _resolve(node["__object__"], ALLOWED_OBJECTS, path)
        obj = cls.__new__(cls)
        obj.__dict__.update(_decode(node["state"], tensors, path))
        return obj
    raise UnsafeStateError(f"{path}: unrecognised node with keys {sorted(node)}")


def save_state(state: Any, path: str | Path) -> None:
    """Write `state` to `path` as safetensors + JSON structure (atomically: tmp + rename)."""
    encoder = _Encoder()
    structure = encoder.encode(state, "state")
    metadata = {METADATA_KEY: json.dumps(structure, allow_nan=False), "format": FORMAT}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(encoder.tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_state(path: str | Path, map_location: Any = None) -> Any:
    """Read a file written by `save_state`; refuse anything else (a pickle included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    device = "cpu" if map_location is None or callable(map_location) else str(map_location)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for a foreign file
        raise UnsafeStateError(
            f"{path} is not an opgrpo safetensors checkpoint file ({exc}); checkpoints written "
            "by DeepSpeed's default engine are pickles, which opgrpo does not load") from None
    if metadata.get("format") != FORMAT or METADATA_KEY not in metadata:
        raise UnsafeStateError(f"{path} has no {FORMAT} structure in its metadata")
    return _decode(json.loads(metadata[METADATA_KEY]), tensors, path)


def _engine_base():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


class SafeCheckpointEngine(_engine_base()):
    """DeepSpeed checkpoint engine that writes and reads with `save_state` / `load_state`."""

    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.name = "OpgrpoSafeCheckpointEngine"

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        save_state(state_dict, path)

    def load(self, path: str, map_location=None):
        return load_state(path, map_location)

    def commit(self, info) -> bool:
        return True
