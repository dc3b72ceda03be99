"""Reward functions behind one registry: `get_reward(name)` returns a `RewardSpec`.

A scorer maps decoded images (N, 3, H, W) floats in [0, 1] and their prompts to a dict of
(N,) float arrays; its `key` entry is the reward the trainer uses, the others are logged.
`summarize` turns per-image scores into the numbers an evaluation reports.

Rewards with a model or a server (pickscore, aesthetic, ocr, geneval) take options from
`reward.options.<name>` (model paths, engine, URL), validated by their pydantic model, and
load once per reward actor: `get_reward(name).load(options, device)` returns a spec whose
`score` is ready. One module each in this package.

Beyond the registry (README, "Rewards you bring"):
- `http` (and `http_<label>` for more servers): any scorer behind a JSON contract over HTTP,
  `actors/rewards/http.py`.
- `module:object` import paths: a reward class or object of your own, `actors/rewards/
  plugins.py`.
- Flow-GRPO's reward names (`pickscore_score`, `jpeg_compressibility`, ...) resolve to ours
  (`FLOW_GRPO_ALIASES`) where we have the same reward; the others are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np


def mean_summary(scores: dict[str, np.ndarray], prompts: list[str]) -> dict:
    summary = {name: float(np.mean(values)) for name, values in scores.items()}
    summary["n_images"] = len(prompts)
    return summary


def _needs_loading(images, prompts):
    raise RuntimeError("this reward loads a model or connects to a server first: use "
                       "get_reward(name).load(options, device)")


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: `score(images, prompts) -> {name: (N,) array}` and its main key.

    `build(options, device) -> score` makes the scorer of a reward that needs a model or a
    server; `options` is its pydantic options model (None: the reward takes no options).
    """

    name: str
    key: str
    score: Callable[..., dict[str, np.ndarray]]
    description: str
    summarize: Callable[[dict[str, np.ndarray], list[str]], dict] = field(default=mean_summary)
    build: Callable[[Any, str], Callable[..., dict[str, np.ndarray]]] | None = None
    options: Any = None  # a pydantic model class

    def check_options(self, options: dict | None) -> Any:
        """Validated options (files are checked to exist); raises ValueError naming
        `reward.options.<name>.<field>`."""
        if self.options is None:
            if options:
                raise ValueError(f"reward.options.{self.name}: this reward takes no options")
            return None
        from pydantic import ValidationError

        try:
            parsed = self.options.model_validate(options or {})
        except ValidationError as err:
            problems = "; ".join(
                f"reward.options.{self.name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in err.errors())
            raise ValueError(problems) from None
        if hasattr(parsed, "check"):
            parsed.check(f"reward.options.{self.name}")
        return parsed

    def load(self, options: dict | None = None, device: str = "cpu") -> RewardSpec:
        """This spec with a ready `score` (models loaded on `device`, clients connected)."""
        parsed = self.check_options(options)
        if self.build is None:
            return self
        return replace(self, score=self.build(parsed, device))


def _shapes_score(images, prompts: list[str]) -> dict[str, np.ndarray]:
    from actors.rewards.shapes import score_images, to_uint8
    from tasks.shapes.grammar import metadata_for

    return score_images(to_uint8(images), [metadata_for(p) for p in prompts])


def _shapes_summary(scores: dict[str, np.ndarray], prompts: list[str]) -> dict:
    from actors.rewards.shapes import summarize
    from tasks.shapes.grammar import metadata_for

    return summarize(scores, [metadata_for(p) for p in prompts])


def _jpeg(images, prompts: list[str]) -> dict[str, np.ndarray]:
    from actors.rewards.jpeg import compressibility

    return compressibility(np.asarray(images), prompts)


def _jpeg_inverse(images, prompts: list[str]) -> dict[str, np.ndarray]:
    from actors.rewards.jpeg import incompressibility

    return incompressibility(np.asarray(images), prompts)


REGISTRY: dict[str, RewardSpec] = {
    "shapes": RewardSpec("shapes", "strict", _shapes_score,
                         "shapes task: 1 if every GenEval-style constraint holds, else 0",
                         _shapes_summary),
    "shapes_partial": RewardSpec("shapes_partial", "partial", _shapes_score,
                                 "shapes task: fraction of constraints that hold",
                                 _shapes_summary),
    "jpeg": RewardSpec("jpeg", "compressibility", _jpeg,
                       "JPEG compressibility: minus the kB of the image at quality 95"),
    "jpeg_incompressibility": RewardSpec("jpeg_incompressibility", "incompressibility",
                                         _jpeg_inverse, "JPEG size in kB at quality 95"),
}


def _register_model_rewards() -> None:
    from actors.rewards import aesthetic, geneval, ocr, pickscore

    for module in (pickscore, aesthetic, ocr, geneval):
        REGISTRY[module.NAME] = RewardSpec(
            module.NAME, module.KEY, _needs_loading, module.DESCRIPTION,
            getattr(module, "summarize", mean_summary), build=module.build,
            options=module.Options)


_register_model_rewards()

HTTP_NAME = re.compile(r"http(_[A-Za-z0-9_]+)?")


def http_spec(name: str) -> RewardSpec:
    """The `http` reward under `name` (`http` or `http_<label>`: one server each)."""
    from actors.rewards import http

    return RewardSpec(name, http.KEY, _needs_loading, http.DESCRIPTION,
                      build=partial(http.build, name), options=http.Options)


REGISTRY["http"] = http_spec("http")

# Flow-GRPO's reward names (flow_grpo/rewards.py: its scorer functions, and the keys of its
# `config.reward_fn`, multi_score) -> ours, where we implement the same reward. The names we
# share (`jpeg_incompressibility`, `aesthetic`, `pickscore`, `ocr`, `geneval`) need none.
# Flow-GRPO's jpeg_compressibility is -kB/500, ours (`jpeg`) is -kB: per-group normalised
# advantages are the same, but weight it 1/500 as much in a sum with other rewards.
FLOW_GRPO_ALIASES: dict[str, str] = {
    "jpeg_compressibility": "jpeg",
    "aesthetic_score": "aesthetic",
    "pickscore_score": "pickscore",
    "ocr_score": "ocr",
    "geneval_score": "geneval",
}
# Flow-GRPO's rewards that opgrpo does not implement.
FLOW_GRPO_MISSING = frozenset({
    "imagereward", "imagereward_score", "qwenvl", "qwenvl_score", "deqa",
    "deqa_score_remote", "unifiedreward", "unifiedreward_score_remote",
    "unifiedreward_score_sglang"})


def canonical_name(name: str) -> str:
    """Our name of reward `name` (a Flow-GRPO alias resolved; others unchanged); ValueError for
    a Flow-GRPO reward we do not implement."""
    if name in FLOW_GRPO_MISSING:
        raise ValueError(
            f"{name!r} is a Flow-GRPO reward that opgrpo does not implement: serve it with "
            "the `http` reward (a JSON contract, actors/rewards/http.py) or load your own "
            "scorer by import path ('package.module:object', actors/rewards/plugins.py); "
            f"built in: {sorted(REGISTRY)}")
    return FLOW_GRPO_ALIASES.get(name, name)


def score_frames(spec: RewardSpec, images, prompts: list[str]) -> dict[str, np.ndarray]:
    """`spec.score` on images (N, 3, H, W), or on video frames (N, F, 3, H, W): every frame
    is scored with its video's prompt and a video's score is the mean over its frames."""
    if images.ndim == 4:
        return spec.score(images, prompts)
    n, frames = images.shape[:2]
    flat = images.reshape(n * frames, *images.shape[2:])
    scores = spec.score(flat, [p for p in prompts for _ in range(frames)])
    return {name: np.asarray(values, dtype=np.float64).reshape(n, frames).mean(axis=1)
            for name, values in scores.items()}


def get_reward(name: str) -> RewardSpec:
    """The spec of reward `name`: a registered name, a Flow-GRPO alias of one, `http_<label>`,
    or an import path `package.module:object` (imported and checked here)."""
    from actors.rewards.plugins import is_import_path, load_plugin

    name = canonical_name(name)
    if is_import_path(name):
        return load_plugin(name)
    if name in REGISTRY:
        return REGISTRY[name]
    if HTTP_NAME.fullmatch(name):
        return http_spec(name)
    raise ValueError(
        f"unknown reward {name!r} in reward.functions; known: {sorted(REGISTRY)}, "
        "http_<label> (more HTTP scorers), 'package.module:object' (your own), and "
        f"Flow-GRPO's names {sorted(FLOW_GRPO_ALIASES)}")
