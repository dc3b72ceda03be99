"""Rewards you bring, named by import path: `reward.functions: {"mypkg.rewards:Brightness": 1}`.

`module:attribute` (the attribute may be dotted, `module:Class.attr`) names one of:

1. a `RewardSpec` (actors/rewards/__init__.py): used as it is.
2. a class with a `key` and a `score(self, images, prompts)` method. Each reward actor makes
   one instance, with keyword arguments: `options=` the validated `Options` when the class
   defines `Options` (a pydantic model of `reward.options["mypkg.rewards:Brightness"]`), and
   `device=` ("cpu" or "cuda") when its `__init__` takes a `device` parameter.
3. any other object with a `key` and a `score(images, prompts)` method (an instance, a
   module), or a function with a `key` attribute, which is then the `score` itself.

`score` returns {name: (N,) numbers}; the `key` entry is the reward, every entry is logged.
Optional attributes: `image_format`: "uint8" (default: images come as a (N, H, W, 3) uint8
array, as PIL wants them) or "float" ((N, 3, H, W) float32 in [0, 1], what the built-in
rewards get); `summarize(scores, prompts) -> dict` (evaluation summary; default: means);
`description`. Video frames are scored as images, each with its video's prompt.

    import numpy as np

    class Brightness:
        key = "brightness"

        def score(self, images, prompts):  # images: (N, H, W, 3) uint8
            return {"brightness": images.mean(axis=(1, 2, 3)) / 255}

The module is imported when the config is validated (an unimportable path, or an object
without `key` / `score`, fails there, naming the field and the path) and again in every
reward actor: it must be importable there too (installed, or on PYTHONPATH on every node).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace

import numpy as np

IMAGE_FORMATS = ("uint8", "float")


def is_import_path(name: str) -> bool:
    return ":" in name


def _fail(path: str, message: str) -> ValueError:
    return ValueError(f"reward.functions: {path!r}: {message}")


def resolve(path: str):
    """The object `module:attribute` names; ValueError naming the path when it cannot."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise _fail(path, "an import path must look like package.module:attribute")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, name the path
        raise _fail(path, f"cannot import module {module_name!r} "
                          f"({type(exc).__name__}: {exc})") from None
    where = module_name
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise _fail(path, f"{where} has no attribute {part!r}")
        obj, where = getattr(obj, part), f"{where}.{part}"
    return obj


def load_plugin(path: str):
    """The `RewardSpec` of the reward at import path `path` (checked, not yet built)."""
    from actors.rewards import RewardSpec, _needs_loading, mean_summary

    obj = resolve(path)
    if isinstance(obj, RewardSpec):
        return replace(obj, name=path)
    key = getattr(obj, "key", None)
    if not isinstance(key, str) or not key:
        raise _fail(path, "has no `key` (a str: the name of the score that is the reward)")
    image_format = getattr(obj, "image_format", "uint8")
    if image_format not in IMAGE_FORMATS:
        raise _fail(path, f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    summarize = getattr(obj, "summarize", None)
    if summarize is not None and not callable(summarize):
        raise _fail(path, "summarize must be callable: summarize(scores, prompts) -> dict")
    description = str(getattr(obj, "description", "") or f"{path} (a reward you brought)")
    if inspect.isclass(obj):
        if not callable(getattr(obj, "score", None)):
            raise _fail(path, "the class has no score(self, images, prompts) method")
        options = getattr(obj, "Options", None)
        if options is not None and not _is_pydantic_model(options):
            raise _fail(path, "Options must be a pydantic BaseModel subclass")
        takes_device = "device" in inspect.signature(obj).parameters

        def build(parsed, device: str):
            kwargs = {"device": device} if takes_device else {}
            if options is not None:
                kwargs["options"] = parsed
            instance = obj(**kwargs)
            return _checked(path, key, image_format, instance.score)

        return RewardSpec(path, key, _needs_loading, description, _summary(path, summarize, obj),
                          build=build, options=options)
    score = getattr(obj, "score", None)
    if not callable(score):
        if not callable(obj):
            raise _fail(path, "has no score(images, prompts) method and is not callable")
        score = obj
    return RewardSpec(path, key, _checked(path, key, image_format, score), description,
                      summarize or mean_summary)


def _is_pydantic_model(cls) -> bool:
    from pydantic import BaseModel

    return inspect.isclass(cls) and issubclass(cls, BaseModel)


def _summary(path: str, summarize, cls):
    """A class's `summarize` is called without an instance (the driver summarises an
    evaluation): it must be a static or class method."""
    from actors.rewards import mean_summary

    if summarize is None:
        return mean_summary
    if not isinstance(inspect.getattr_static(cls, "summarize"), (staticmethod, classmethod)):
        raise _fail(path, "summarize on a class must be a @staticmethod or @classmethod "
                          "(the driver calls it without an instance)")
    return summarize


def _checked(path: str, key: str, image_format: str, score):
    """`score` behind the built-in convention ((N, 3, H, W) floats in [0, 1] in, a dict of
    (N,) float64 arrays out), its reply checked: errors name the reward."""

    def run(images, prompts: list[str]) -> dict[str, np.ndarray]:
        if image_format == "uint8":
            from actors.rewards.http import to_uint8

            images = to_uint8(images)
        out = score(images, list(prompts))
        if not isinstance(out, dict) or key not in out:
            got = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise ValueError(f"reward {path}: score() must return a dict with {key!r} "
                             f"(got {got})")
        result = {}
        for name, values in out.items():
            if hasattr(values, "detach"):  # a torch tensor, maybe on the GPU
                values = values.detach().double().cpu().numpy()
            try:
                array = np.asarray(values, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise ValueError(f"reward {path}: score {name!r} is not numbers") from None
            if array.shape != (len(prompts),):
                raise ValueError(f"reward {path}: score {name!r} has {array.size} values for "
                                 f"{len(prompts)} images")
            result[str(name)] = array
        return result

    return run
