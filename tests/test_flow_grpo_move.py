"""A Flow-GRPO user moves over with one edit: the README's YAML block (the paths) on top of
`configs/sd35m_geneval.yaml` validates and keeps every Flow-GRPO setting."""

import re
from pathlib import Path

import yaml

from opgrpo.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _merge(base: dict, edit: dict) -> dict:
    out = dict(base)
    for key, value in edit.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return out


def test_readme_path_edit_of_the_geneval_recipe_validates(tmp_path):
    from test_shipped_configs import FLOW_GRPO_SD35M

    from opgrpo.tiny import save_tiny

    block = re.search(r"```yaml\n(# configs/my_geneval.yaml.*?)```", (REPO / "README.md")
                      .read_text(), re.S)
    assert block, "README lost its GPU quickstart YAML block"
    shared = tmp_path / "shared"
    save_tiny("sd35", shared / "models" / "sd35m")
    dataset = shared / "flow_grpo" / "dataset" / "geneval"
    dataset.mkdir(parents=True)
    # Flow-GRPO's GenEval metadata lines, as its dataset/geneval files hold them
    line = ('{"tag": "two_object", "include": [{"class": "bench", "count": 1}, '
            '{"class": "clock", "count": 1}], "exclude": [], "prompt": "a photo of a bench '
            'and a clock"}\n')
    for name in ("train_metadata.jsonl", "test_metadata.jsonl"):
        (dataset / name).write_text(line * 3)
    edit = yaml.safe_load(block.group(1).replace("/shared", str(shared)))
    shipped = yaml.safe_load((REPO / "configs/sd35m_geneval.yaml").read_text())
    mine = tmp_path / "my_geneval.yaml"
    mine.write_text(yaml.safe_dump(_merge(shipped, edit)))
    config = load_config(mine)
    assert config.model.path == str(shared / "models" / "sd35m")
    assert config.train.prompts_file.endswith("dataset/geneval/train_metadata.jsonl")
    assert config.reward.options["geneval"]["key"] == "partial"
    for dotted, expected in FLOW_GRPO_SD35M.items():
        section, key = dotted.split(".")
        assert getattr(getattr(config, section), key) == expected, dotted
    # the edit touched paths and the scorer's address only
    changed = {f"{s}.{k}" for s, keys in edit.items() for k in keys}
    assert changed == {"model.path", "train.prompts_file", "train.eval_prompts_file",
                       "reward.options", "run.output_dir"}
