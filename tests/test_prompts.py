"""Prompt files: text and GenEval-style JSONL, stable keys, clear errors."""

import json

import pytest

from opgrpo.prompts import load_prompts, prompt_key


def test_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na red circle\n\n two blue squares \n")
    records = load_prompts(txt)
    assert [r.text for r in records] == ["a red circle", "two blue squares"]
    assert records[0].key == prompt_key("a red circle") != records[1].key
    meta = {"tag": "counting", "include": [{"class": "square", "count": 2}],
            "prompt": "two squares"}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps(meta) + "\n")
    (record,) = load_prompts(jsonl)
    assert record.text == "two squares" and record.metadata["tag"] == "counting"


def test_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="b.jsonl:2"):
        load_prompts(broken)
