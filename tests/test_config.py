"""Config validation: dotted field paths in errors, YAML files, --set overrides."""

from pathlib import Path

import pytest

from opgrpo.config import ConfigError, build_config, dump_config, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_derive_truncation():
    config = build_config({})
    assert config.learner.correction == "sequence"
    assert config.sampling.noise_level == 0.7 and config.learner.clip_range == 1e-4
    assert config.truncate_step == 7  # round(0.7 * 10)
    assert config.num_train_steps_per_trajectory == 9  # ceil(0.9 * 10)


def test_async_is_the_default_and_a_shared_gpu_layout_is_named():
    config = build_config({})
    assert config.train.mode == "async" and config.staleness == 1
    assert config.shared_gpu_warning() is None  # CPU actors
    shared = build_config({"rollout": {"num_gpus": 0.5}, "learner": {"num_gpus": 0.5}})
    warning = shared.shared_gpu_warning()
    assert "rollout.num_gpus (0.5)" in warning and "learner.num_gpus (0.5)" in warning
    assert "train.mode=sync" in warning
    assert build_config({"rollout": {"num_gpus": 0.5}, "learner": {"num_gpus": 0.5}},
                        ["train.mode=sync"]).shared_gpu_warning() is None
    assert build_config({"rollout": {"num_gpus": 1}, "learner": {"num_gpus": 1}}
                        ).shared_gpu_warning() is None  # a GPU each
    assert build_config({"rollout": {"num_gpus": 0.9}, "learner": {"num_gpus": 0.9}}
                        ).shared_gpu_warning() is None  # cannot share one GPU


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(ConfigError) as err:
        build_config({"learner": {"clip_rnage": 0.1}})
    assert "learner.clip_rnage" in str(err.value) and "unknown key" in str(err.value)


def test_bad_value_names_field_and_reason():
    with pytest.raises(ConfigError) as err:
        build_config({"buffer": {"off_policy_fraction": 1.5}})
    assert "buffer.off_policy_fraction" in str(err.value)
    with pytest.raises(ConfigError, match="learner.correction"):
        build_config({}, ["learner.correction=weird"])


def test_overrides_parse_yaml_values():
    config = build_config({}, ["learner.clip_range=2e-4", "rollout.num_actors=auto",
                               "model.lora_target_modules=[to_q, to_k]", "buffer.max_age=50"])
    assert config.learner.clip_range == 2e-4
    assert config.rollout.num_actors == "auto"
    assert config.model.lora_target_modules == ["to_q", "to_k"]
    assert config.buffer.max_age == 50
    assert parse_override("a.b=") == ("a.b", None)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no-equals-sign")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="truncate_step"):
        build_config({"sampling": {"num_steps": 5}, "buffer": {"truncate_step": 6}})
    with pytest.raises(ConfigError, match="noise_level"):
        build_config({"sampling": {"noise_level": 0}})


def test_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("run:\n  seed: 7\nlearner:\n  zero_stage: 3\n")
    config = load_config(good, ["run.seed=8"])
    assert config.run.seed == 8 and config.learner.zero_stage == 3
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_redis_password_never_reaches_the_run_config():
    config = build_config({"buffer": {"redis_url": "redis://:s3cret@10.0.0.5:6380/2"}})
    dumped = dump_config(config)
    assert "s3cret" not in dumped and "redis://10.0.0.5:6380/2" in dumped
    named = build_config({"buffer": {"redis_url": "redis://opgrpo:s3cret@host/0"}})
    assert "s3cret" not in dump_config(named) and "redis://opgrpo@host/0" in dump_config(named)
    with pytest.raises(ConfigError, match=r"buffer.redis_url.*redis://"):
        build_config({"buffer": {"redis_url": "http://host:6379"}})


def test_batches_that_do_not_split_are_refused_before_work():
    with pytest.raises(ConfigError, match="multiple of learner.num_ranks"):
        build_config({"rollout": {"prompts_per_step": 6}, "learner": {"num_ranks": 4}})
    with pytest.raises(ConfigError, match="optimizer_steps_per_pass"):
        build_config({"rollout": {"prompts_per_step": 3, "group_size": 4},
                      "learner": {"micro_batch_size": 4, "optimizer_steps_per_pass": 2}})
    with pytest.raises(ConfigError, match="rollout.group_size"):
        build_config({"rollout": {"group_size": "eight"}})
