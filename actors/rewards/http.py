"""A reward served over HTTP by any program: your scorer behind a small JSON contract.

`reward.functions: {http: 1.0}` with `reward.options.http: {url: http://scorer:8000/score}`
sends each batch of decoded images and their prompts to `url` and trains on the scores the
server returns. For several servers in one run name them `http_<label>` (`http_aesthetic`,
`http_vqa`), each with its own `reward.options.http_<label>`.

The contract, POST `url` with `Content-Type: application/json`:

    request  {"prompts": ["a red cube", ...],                   # N prompts
              "images": ["<base64 PNG>", ...]}                  # image_format: png (default)
          or {"prompts": [...],
              "images": {"dtype": "uint8", "shape": [N, H, W, 3],  # image_format: uint8
                         "data": "<base64 of the N*H*W*3 bytes, row-major>"}}
    response {"scores": [0.7, 0.1, ...],                        # N numbers: the reward
              "<name>": [N numbers], ...}                       # optional, logged as well

Images are RGB, 8 bits per channel, in prompt order; a video is sent as its frames (each with
its video's prompt) and scores the mean of its frames. Batches of more than `batch_size`
images are split into several requests. Other top-level values of the reply that are not
lists (a version string, a dict of timings) are ignored.

Failures: a request that fails to connect, times out (`timeout_s`, per request: connecting
and each read), or is answered 5xx or 429 is retried up to `retries` times with exponential
backoff (`backoff_s`, doubling, at most `backoff_max_s`) while the total time of the batch
stays under `deadline_s`; then the error names the reward, the URL and the last failure. A
4xx answer, a body that is not JSON, a reply without `scores`, a score that is missing or not
a number (null, a string) or a list of the wrong length is an error at once, never a silent 0.
JSON's NaN is passed on: the trainer drops a sample with a non-finite reward (and warns).

Credentials: `http://user:password@host/...` is sent as HTTP basic auth, and `token_env`
names an environment variable whose value is sent as `Authorization: Bearer <value>` (keeps
the token out of config.yaml; the variable must be set where the reward actors run). Errors
and logs never show a URL's user, password or query string.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import time
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import requests
from pydantic import Field, field_validator, model_validator
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
)

from actors.rewards.common import RewardOptions

log = logging.getLogger(__name__)

NAME, KEY = "http", "scores"
DESCRIPTION = "a scorer served over HTTP (JSON contract in actors/rewards/http.py)"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class Options(RewardOptions):
    url: str = Field(description="http(s)://host:port/path the batches are POSTed to")
    timeout_s: float = Field(60.0, gt=0, description="per request: connect and each read")
    deadline_s: float = Field(300.0, gt=0, description="one batch, all retries included")
    retries: int = Field(3, ge=0, description="retries after the first attempt")
    backoff_s: float = Field(0.5, ge=0, description="first wait between attempts (doubles)")
    backoff_max_s: float = Field(30.0, ge=0, description="longest wait between attempts")
    image_format: Literal["png", "uint8"] = Field(
        "png", description="png: a list of base64 PNGs; uint8: one base64 array + shape")
    batch_size: int = Field(64, ge=1, description="images per request")
    token_env: str | None = Field(
        None, description="environment variable holding a bearer token for the server")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got "
                             f"{safe_url(url)!r}")
        return url

    @model_validator(mode="after")
    def _one_credential(self) -> Options:
        if self.token_env and "@" in urlsplit(self.url).netloc:
            raise ValueError("token_env and a user/password in url both give credentials: "
                             "keep one")
        return self

    def check(self, prefix: str) -> None:
        if self.token_env is not None and not os.environ.get(self.token_env):
            raise ValueError(f"{prefix}.token_env: environment variable {self.token_env} is "
                             "not set (or empty)")


def safe_url(url: str) -> str:
    """`url` as errors and logs may show it: no user, password or query string."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port: show the scheme only
        return url.split("://", 1)[0] + "://***"
    netloc = ("***@" if "@" in parts.netloc else "") + host + port
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _secrets(url: str) -> list[str]:
    """The parts of `url` that must not appear in a message, longest first."""
    parts = urlsplit(url)
    found = {parts.username, parts.password, parts.query, parts.fragment}
    found |= {unquote(s) for s in found if s}
    return sorted((s for s in found if s and len(s) > 2), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` (an exception message that may quote the URL) without the URL's secrets."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8, as the rollout actors made them."""
    pixels = (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round()
    return np.ascontiguousarray(pixels.astype(np.uint8).transpose(0, 2, 3, 1))


def encode_images(pixels: np.ndarray, image_format: str) -> list[str] | dict:
    """(N, H, W, 3) uint8 -> the `images` field of a request."""
    if image_format == "uint8":
        return {"dtype": "uint8", "shape": list(pixels.shape),
                "data": base64.b64encode(pixels.tobytes()).decode("ascii")}
    from PIL import Image

    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def decode_images(field: list[str] | dict) -> np.ndarray:
    """The inverse of `encode_images`, for servers written in Python: (N, H, W, 3) uint8."""
    if isinstance(field, dict):
        if field.get("dtype") != "uint8":
            raise ValueError(f"images.dtype must be uint8, got {field.get('dtype')!r}")
        shape = tuple(int(n) for n in field["shape"])
        return np.frombuffer(base64.b64decode(field["data"]), dtype=np.uint8).reshape(shape)
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB"))
                     for s in field])


class RetryableError(Exception):
    """An attempt that may succeed if repeated: 5xx / 429 answer, a timeout, no connection."""


class HttpReward:
    """The client of one `http` reward: `score(images, prompts) -> {"scores": (N,), ...}`."""

    def __init__(self, name: str, options: Options) -> None:
        self.name, self.options = name, options
        self.where = f"reward {name} ({safe_url(options.url)})"
        self.session = requests.Session()
        self.session.headers.update({"Content-Type": "application/json", **options.headers})
        if options.token_env:
            token = os.environ.get(options.token_env)
            if not token:
                raise ValueError(f"reward.options.{name}.token_env: environment variable "
                                 f"{options.token_env} is not set (or empty)")
            self.session.headers["Authorization"] = f"Bearer {token}"

    def score(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        if len(images) != len(prompts):
            raise ValueError(f"{self.where}: {len(images)} images but {len(prompts)} prompts")
        pixels = to_uint8(images)
        size = self.options.batch_size
        parts = [self.score_batch(pixels[i:i + size], prompts[i:i + size])
                 for i in range(0, len(prompts), size)]
        names = set(parts[0])
        for part in parts[1:]:
            if set(part) != names:
                raise ValueError(f"{self.where}: the score names changed between batches of "
                                 f"one call ({sorted(names)} then {sorted(part)})")
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def score_batch(self, pixels: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        payload = {"prompts": list(prompts),
                   "images": encode_images(pixels, self.options.image_format)}
        return self.parse(self.post(json.dumps(payload).encode()), len(prompts))

    def post(self, body: bytes) -> bytes:
        """POST `body`, retried as the options say; the reply's body (2xx only)."""
        opts = self.options
        deadline = time.monotonic() + opts.deadline_s
        attempts = 0
        retrying = Retrying(
            stop=stop_after_attempt(opts.retries + 1) | stop_before_delay(opts.deadline_s),
            wait=wait_exponential(multiplier=opts.backoff_s, max=opts.backoff_max_s),
            retry=retry_if_exception_type(RetryableError))
        try:
            for attempt in retrying:
                with attempt:
                    attempts += 1
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RetryableError(f"deadline_s {opts.deadline_s:g} reached")
                    timeout = min(opts.timeout_s, left)
                    try:
                        response = self.session.post(opts.url, data=body, timeout=timeout)
                    except (requests.ConnectionError, requests.Timeout) as exc:
                        raise RetryableError(f"{type(exc).__name__}: {exc}") from None
                    if response.status_code in RETRY_STATUS:
                        raise RetryableError(f"HTTP {response.status_code}: "
                                             f"{response.text[:200]!r}")
                    if not 200 <= response.status_code < 300:
                        raise ValueError(
                            f"{self.where} answered HTTP {response.status_code}: "
                            f"{scrub(response.text[:300], opts.url)!r}")
                    return response.content
        except RetryError as exc:
            last = exc.last_attempt.exception()
            spent = opts.deadline_s - max(0.0, deadline - time.monotonic())
            raise ConnectionError(
                f"{self.where} failed {attempts} time(s) in {spent:.1f} s (retries "
                f"{opts.retries}, timeout_s {opts.timeout_s:g}, deadline_s "
                f"{opts.deadline_s:g}); last: {scrub(str(last), opts.url)}") from None
        raise AssertionError("unreachable")  # tenacity either returns or raises

    def parse(self, body: bytes, n: int) -> dict[str, np.ndarray]:
        """The reply's score arrays, each (n,) float64; errors name the reward and the URL."""
        try:
            reply = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{self.where}: the reply is not JSON: "
                             f"{scrub(body[:200].decode(errors='replace'), self.options.url)!r}"
                             ) from None
        if not isinstance(reply, dict) or KEY not in reply:
            got = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
            raise ValueError(f"{self.where}: the reply has no {KEY!r} list (got {got})")
        out = {}
        for name, values in reply.items():
            if name != KEY and not isinstance(values, list):
                continue  # not a score array: metadata of the reply
            out[name] = self._numbers(name, values, n)
        return out

    def _numbers(self, name: str, values, n: int) -> np.ndarray:
        if not isinstance(values, list):
            raise ValueError(f"{self.where}: {name!r} must be a list of {n} numbers, got "
                             f"{type(values).__name__}")
        if len(values) != n:
            raise ValueError(f"{self.where}: {n} images sent, {len(values)} {name!r} "
                             "received")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{self.where}: {name}[{i}] is {value!r}, not a number")
        array = np.asarray(values, dtype=np.float64)
        if not all(math.isfinite(v) for v in array):
            log.warning("%s: %d non-finite %r values", self.where,
                        int((~np.isfinite(array)).sum()), name)
        return array


def build(name: str, options: Options, device: str):
    return HttpReward(name, options).score
