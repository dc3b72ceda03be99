"""Prompt files: plain text (one prompt a line) or GenEval-style JSONL (`{"prompt": ..., ...}`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PromptRecord:
    """A prompt, its stable key (buffer identity) and any metadata that came with it."""

    key: str
    text: str
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def prompt_key(text: str) -> str:
    """Stable short key of a prompt text (same text, same key, in every process)."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read prompts from `.txt` (blank lines and `#` comments skipped) or `.jsonl`.

    Raises FileNotFoundError/ValueError naming the file and line when the file is unusable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records: list[PromptRecord] = []
    is_jsonl = path.suffix in (".jsonl", ".json")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                         f"offset {exc.start}); save the file as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or (not is_jsonl and line.startswith("#")):
            continue
        if is_jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{lineno}: each JSONL line needs a "prompt" string')
            text, metadata = row["prompt"], row
        else:
            text, metadata = line, {}
        records.append(PromptRecord(prompt_key(text), text, metadata))
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records
