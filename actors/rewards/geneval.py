"""GenEval reward: a client of a GenEval scoring server over HTTP (JSON, no pickles).

GenEval scores an image against its prompt's metadata (objects, counts, colours, positions)
with an object detector, which runs in its own server process (its own GPU and dependencies).
The contract, POST `url`:

    request  {"images": [base64 PNG, ...], "metadata": [GenEval metadata of each image, ...]}
    response {"strict": [0 or 1 per image], "partial": [fraction of constraints met per image]}

The metadata of a prompt comes from the prompt files (`metadata_files`, GenEval-style JSONL;
default: the run's train and eval prompt files). `opgrpo geneval-server` serves this contract:
`--scorer geneval --detector DIR --clip DIR --device cuda` with GenEval's rules over a
Mask2Former detector and CLIP colours (`tasks/geneval/rules.py`), `--scorer shapes` for the
shapes task (tests, demos). Timeouts and failed requests are retried
`retries` times with doubling waits; then the error names the URL.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from pydantic import field_validator

from actors.rewards.common import RewardOptions, require_file, to_pil

NAME, KEY = "geneval", "strict"
DESCRIPTION = "GenEval via a scoring server: 1 if every constraint holds (partial logged)"


class Options(RewardOptions):
    url: str  # e.g. http://geneval:18085/score
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0
    metadata_files: list[str] = []  # GenEval JSONL; default: train + eval prompt files
    key: str = "strict"  # "strict" or "partial": which score is the reward

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        if key not in ("strict", "partial"):
            raise ValueError("must be strict or partial")
        return key

    def check(self, prefix: str) -> None:
        for i, path in enumerate(self.metadata_files):
            require_file(path, f"{prefix}.metadata_files[{i}]", "GenEval-style JSONL prompts")


def load_metadata(files: list[str]) -> dict[str, dict]:
    """prompt text -> its metadata record, from GenEval-style JSONL files."""
    table: dict[str, dict] = {}
    for file in files:
        if not str(file).endswith(".jsonl"):
            continue  # a .txt prompt file has no metadata
        for n, line in enumerate(Path(file).read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    table[record["prompt"]] = record
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{file}:{n}: not a GenEval metadata line ({exc})") from None
    return table


def png_base64(images) -> list[str]:
    out = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


class GenEvalClient:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.metadata = load_metadata(options.metadata_files)

    def request(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        wait, last = self.options.backoff_s, None
        for attempt in range(self.options.retries + 1):
            req = urllib.request.Request(self.options.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.options.timeout_s) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, TimeoutError, ConnectionError,
                    json.JSONDecodeError) as exc:
                last = exc
                if attempt < self.options.retries:
                    time.sleep(wait)
                    wait *= 2
        raise ConnectionError(
            f"GenEval server {self.options.url} failed {self.options.retries + 1} times "
            f"(timeout {self.options.timeout_s:g} s): {last}")

    def score(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        missing = [p for p in prompts if p not in self.metadata]
        if missing:
            raise ValueError(f"no GenEval metadata for prompt {missing[0]!r} in "
                             f"reward.options.geneval.metadata_files "
                             f"({self.options.metadata_files})")
        reply = self.request({"images": png_base64(images),
                              "metadata": [self.metadata[p] for p in prompts]})
        try:
            strict = np.asarray(reply["strict"], dtype=np.float64)
            partial = np.asarray(reply["partial"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"GenEval server {self.options.url}: reply without strict/partial "
                             f"lists ({exc})") from None
        if strict.shape != (len(prompts),) or partial.shape != (len(prompts),):
            raise ValueError(f"GenEval server {self.options.url}: {len(prompts)} images sent, "
                             f"scores of shape {strict.shape} / {partial.shape} received")
        main = strict if self.options.key == "strict" else partial
        return {KEY: main, "strict_score": strict, "partial": partial}


def build(options: Options, device: str):
    return GenEvalClient(options).score
