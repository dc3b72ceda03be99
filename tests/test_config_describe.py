"""`opgrpo config --describe [SECTION]`: every key with type, default and description, read from
the pydantic models; and the help of `--set`."""

import pytest

from opgrpo.cli import main
from opgrpo.config import Config, build_config, describe_config


def _keys(text: str) -> dict[str, str]:
    """dotted key -> its `key: type = default` line."""
    return {line.split(":", 1)[0]: line for line in text.splitlines()
            if line and not line.startswith(" ")}


def test_describe_a_section(capsys):
    assert main(["config", "--describe", "buffer"]) == 0
    out = capsys.readouterr().out
    keys = _keys(out)
    assert keys["buffer.off_policy_fraction"] == (
        "buffer.off_policy_fraction: float (>= 0, < 1) = 0.125")
    assert "    Fraction rho of prompts from the buffer (0 = on-policy)." in out
    assert keys["buffer.replay_draw"] == (
        'buffer.replay_draw: uniform | fail_rate | rescue = "uniform"')
    assert keys["buffer.max_age"] == "buffer.max_age: int | null (>= 1) = null"
    assert all(key.startswith("buffer.") for key in keys)
    assert set(keys) == {f"buffer.{name}" for name in Config.model_fields["buffer"]
                         .annotation.model_fields}


def test_every_key_is_listed_with_a_default_that_validates():
    keys = _keys(describe_config())
    sections = Config.model_fields
    expected = {f"{s}.{k}" for s in sections for k in sections[s].annotation.model_fields}
    assert set(keys) == expected
    assert keys["learner.zero_stage"] == "learner.zero_stage: 0 | 1 | 2 | 3 = 2"
    assert keys["run.name"].startswith("run.name: str (matching ^[A-Za-z0-9_.-]+$)")
    # each printed default, given back as a --set override, is the default config
    overrides = [f"{key}={line.rsplit(' = ', 1)[1]}" for key, line in keys.items()]
    assert build_config({}, overrides) == Config()


def test_one_key_and_unknown_sections(capsys):
    assert main(["config", "--describe", "sampling.noise_level"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "sampling.noise_level: float (>= 0) = 0.7")
    assert main(["config", "--describe", "bufer"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section or key 'bufer'" in err and "buffer" in err
    assert main(["config", "--describe", "buffer.capacityy"]) == 2


def test_set_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "SECTION.KEY=VALUE, a dotted path" in out and "YAML value" in out
    assert "repeatable" in out and "--set learner.learning_rate=1e-5" in out
