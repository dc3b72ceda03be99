"""Rewards a user brings by import path (`reward.functions: {"pkg.mod:Obj": w}`), checked when
the config is validated and scored by the real RewardWorker; and Flow-GRPO's reward names,
which resolve to ours where we have the reward and are refused by name where we do not."""

import logging
import textwrap

import numpy as np
import pytest
import yaml

from actors.reward import TOTAL, RewardWorker
from actors.rewards import FLOW_GRPO_ALIASES, get_reward
from opgrpo.config import ConfigError, build_config, dump_config

PLUGIN = '''
import numpy as np
from pydantic import BaseModel, ConfigDict

from actors.rewards import RewardSpec


class Brightness:
    key = "brightness"
    description = "mean brightness"

    def score(self, images, prompts):
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        return {"brightness": images.mean(axis=(1, 2, 3)) / 255,
                "n_chars": [len(p) for p in prompts]}


class ScaledOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


class Scaled:
    key = "value"
    image_format = "float"
    Options = ScaledOptions
    built = []

    def __init__(self, options, device="cpu"):
        self.scale = options.scale
        Scaled.built.append((options.scale, device))

    def score(self, images, prompts):
        assert images.dtype == np.float32 and images.shape[1] == 3
        return {"value": self.scale * images.mean(axis=(1, 2, 3))}

    @staticmethod
    def summarize(scores, prompts):
        return {"best": float(np.max(scores["value"])), "n": len(prompts)}


def redness(images, prompts):
    return {"red": images[..., 0].mean(axis=(1, 2)) / 255}


redness.key = "red"

SPEC = RewardSpec("ignored", "ones", lambda images, prompts: {"ones": np.ones(len(prompts))},
                  "a RewardSpec object")


class NoKey:
    def score(self, images, prompts):
        return {}


class NoScore:
    key = "x"


class MethodSummary:
    key = "x"

    def score(self, images, prompts):
        return {"x": np.zeros(len(prompts))}

    def summarize(self, scores, prompts):
        return {}


class WrongKey:
    key = "x"

    def score(self, images, prompts):
        return {"y": np.zeros(len(prompts))}


class WrongLength:
    key = "x"

    def score(self, images, prompts):
        return {"x": np.zeros(len(prompts) + 1)}
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module `myrewards` written to tmp_path and put on sys.path; its name."""
    (tmp_path / "myrewards.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "myrewards", raising=False)
    return "myrewards"


def _images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 5, 4, 3), dtype=np.uint8)


def test_a_class_by_import_path_scores_in_the_reward_worker(plugin):
    path = f"{plugin}:Brightness"
    config = build_config({"reward": {"functions": {path: 2.0, "jpeg": 0.0}}})
    assert list(config.reward.functions) == [path, "jpeg"]
    worker = RewardWorker(config.reward.functions, config.reward.options, device="cpu")
    images = _images()
    out = worker.score(images, ["a", "bb", "ccc"])
    expected = images.mean(axis=(1, 2, 3)) / 255
    np.testing.assert_allclose(out[path], expected)
    np.testing.assert_allclose(out[TOTAL], 2.0 * expected)
    every = worker.score_with(path, images, ["a", "bb", "ccc"])
    np.testing.assert_array_equal(every["n_chars"], [1, 2, 3])
    spec = get_reward(path)
    assert spec.description == "mean brightness" and spec.key == "brightness"
    assert spec.summarize(every, ["a", "bb", "ccc"])["brightness"] == pytest.approx(
        expected.mean())


def test_options_device_float_images_and_summarize(plugin):
    path = f"{plugin}:Scaled"
    config = build_config({"reward": {"functions": {path: 1.0},
                                      "options": {path: {"scale": 3.0}}}})
    worker = RewardWorker(config.reward.functions, config.reward.options, device="cpu")
    images = _images()
    out = worker.score(images, ["a", "b", "c"])
    np.testing.assert_allclose(out[path], 3.0 * images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
    import myrewards

    assert myrewards.Scaled.built == [(3.0, "cpu")]
    summary = get_reward(path).summarize({"value": np.array([0.1, 0.7])}, ["a", "b"])
    assert summary == {"best": 0.7, "n": 2}
    with pytest.raises(ConfigError, match=rf"options.{path}.scale: Input should be a valid"):
        build_config({"reward": {"functions": {path: 1.0}, "options": {path: {"scale": "x"}}}})
    with pytest.raises(ConfigError, match=rf"options.{path}.colour: Extra inputs"):
        build_config({"reward": {"functions": {path: 1.0}, "options": {path: {"colour": 1}}}})


def test_a_function_and_a_reward_spec_by_import_path(plugin):
    images = _images()
    red = RewardWorker({f"{plugin}:redness": 1.0}, device="cpu").score(images, list("abc"))
    np.testing.assert_allclose(red[f"{plugin}:redness"], images[..., 0].mean(axis=(1, 2)) / 255)
    spec = get_reward(f"{plugin}:SPEC")
    assert spec.name == f"{plugin}:SPEC" and spec.key == "ones"
    ones = RewardWorker({f"{plugin}:SPEC": 0.5}, device="cpu").score(images, list("abc"))
    np.testing.assert_allclose(ones[TOTAL], 0.5)


@pytest.mark.parametrize(("attribute", "match"), [
    ("NoKey", "has no `key`"),
    ("NoScore", r"has no score\(self, images, prompts\) method"),
    ("MethodSummary", "summarize on a class must be a @staticmethod or @classmethod"),
    ("Missing", "myrewards has no attribute 'Missing'"),
])
def test_config_errors_name_the_field_and_the_path(plugin, attribute, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_config({"reward": {"functions": {f"{plugin}:{attribute}": 1.0}}})
    assert f"reward.functions: '{plugin}:{attribute}'" in str(err.value)


def test_unimportable_modules_and_options_for_an_optionless_reward(plugin):
    with pytest.raises(ConfigError, match=r"'nowhere.rewards:Thing': cannot import module "
                                          r"'nowhere.rewards' \(ModuleNotFoundError"):
        build_config({"reward": {"functions": {"nowhere.rewards:Thing": 1.0}}})
    with pytest.raises(ConfigError, match="must look like package.module:attribute"):
        build_config({"reward": {"functions": {f"{plugin}:": 1.0}}})
    with pytest.raises(ConfigError, match="this reward takes no options"):
        build_config({"reward": {"functions": {f"{plugin}:Brightness": 1.0},
                                 "options": {f"{plugin}:Brightness": {"scale": 2}}}})


@pytest.mark.parametrize(("attribute", "match"), [
    ("WrongKey", r"must return a dict with 'x' \(got \['y'\]\)"),
    ("WrongLength", "score 'x' has 4 values for 3 images"),
])
def test_a_wrong_score_is_an_error_naming_the_reward(plugin, attribute, match):
    path = f"{plugin}:{attribute}"
    worker = RewardWorker({path: 1.0}, device="cpu")
    with pytest.raises(ValueError, match=match) as err:
        worker.score(_images(), list("abc"))
    assert f"reward {path}" in str(err.value)


# ----- Flow-GRPO's names ----------------------------------------------------------------------
def test_flow_grpo_names_resolve_to_ours_at_validation(caplog):
    data = {"reward": {"functions": {"pickscore_score": 1.0, "jpeg_compressibility": 0.5,
                                     "aesthetic": 0.2},
                       "options": {"pickscore_score": {"model": "/models/PickScore_v1"}}}}
    with caplog.at_level(logging.INFO, logger="opgrpo.config"):
        config = build_config(data)
    assert config.reward.functions == {"pickscore": 1.0, "jpeg": 0.5, "aesthetic": 0.2}
    assert config.reward.options == {"pickscore": {"model": "/models/PickScore_v1"}}
    assert "'pickscore_score' is Flow-GRPO's name of 'pickscore'" in caplog.text
    written = yaml.safe_load(dump_config(config))["reward"]
    assert written["functions"] == {"pickscore": 1.0, "jpeg": 0.5, "aesthetic": 0.2}
    # what a run logs: the worker's names (reward/<name> in metrics.jsonl) are ours
    config = build_config({"reward": {"functions": {"jpeg_compressibility": 1.0}}})
    out = RewardWorker(config.reward.functions, device="cpu").score(_images(), list("abc"))
    assert set(out) == {"jpeg", TOTAL}
    for alias, ours in FLOW_GRPO_ALIASES.items():
        assert get_reward(alias) is get_reward(ours)


def test_flow_grpo_rewards_we_lack_are_refused_by_name():
    for name in ("imagereward", "unifiedreward", "qwenvl", "deqa"):
        with pytest.raises(ConfigError, match=f"'{name}' is a Flow-GRPO reward that opgrpo "
                                              "does not implement"):
            build_config({"reward": {"functions": {name: 1.0}}})
    with pytest.raises(ValueError, match="serve it with the `http` reward"):
        get_reward("imagereward_score")
    with pytest.raises(ConfigError, match="'jpeg_compressibility' and 'jpeg' are the same"):
        build_config({"reward": {"functions": {"jpeg": 1.0, "jpeg_compressibility": 1.0}}})
    with pytest.raises(ConfigError, match="unknown reward 'pickscor'"):
        build_config({"reward": {"functions": {"pickscor": 1.0}}})
