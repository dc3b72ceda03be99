"""The `http` reward against a real HTTP server on 127.0.0.1 (a thread of this process): both
image encodings arrive pixel-exact, batches are split and joined in order, 5xx answers and
timeouts are retried under a total deadline, and a wrong reply is an error that names the
reward and the URL, never the URL's credentials."""

import base64
import io
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from actors.reward import TOTAL, RewardWorker
from actors.rewards import get_reward
from actors.rewards.http import decode_images, encode_images, safe_url
from opgrpo.config import ConfigError, build_config


class Scorer(BaseHTTPRequestHandler):
    """Scores each image by its mean brightness; `server.mode` makes it misbehave."""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_POST(self):  # noqa: N802 - the name http.server calls
        server = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with server.lock:
            server.requests.append({"headers": dict(self.headers), "body": body})
            count = len(server.requests)
        mode = server.mode
        if mode == "sleep":
            server.release.wait(10)
        if mode == "503" and count <= server.failures:
            return self._reply(503, b"busy")
        if mode == "400":
            return self._reply(400, b"bad request: images missing")
        request = json.loads(body)
        images = _decode(request["images"])  # independent of the client's helpers
        server.seen.append(images)
        n = len(request["prompts"])
        scores = (images.reshape(n, -1).mean(axis=1) / 255).tolist()
        reply = {"scores": scores, "red": images[..., 0].mean(axis=(1, 2)).tolist(),
                 "prompt_len": [len(p) for p in request["prompts"]], "server": "test/1"}
        if mode == "short":
            reply["scores"] = scores[:-1]
        elif mode == "text":
            reply["scores"] = ["high"] + scores[1:]
        elif mode == "null":
            reply["scores"] = [None] + scores[1:]
        elif mode == "missing":
            del reply["scores"]
        elif mode == "html":
            return self._reply(200, b"<html>proxy error</html>", "text/html")
        self._reply(200, json.dumps(reply).encode())

    def _reply(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _decode(field):
    """The contract's two encodings, decoded with PIL and numpy alone."""
    if isinstance(field, dict):
        assert field["dtype"] == "uint8" and len(field["shape"]) == 4
        raw = base64.b64decode(field["data"])
        return np.frombuffer(raw, dtype=np.uint8).reshape(field["shape"])
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in field])


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    httpd.mode, httpd.failures = "ok", 0
    httpd.requests, httpd.seen = [], []
    httpd.lock, httpd.release = threading.Lock(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def _images(n=5, h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _worker(url, name="http", **options):
    return RewardWorker({name: 1.0}, {name: {"url": url, **options}}, device="cpu")


@pytest.mark.parametrize("image_format", ["png", "uint8"])
def test_images_arrive_pixel_exact_in_batches(server, image_format):
    images = _images()
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    worker = _worker(server.url, image_format=image_format, batch_size=2)
    out = worker.score(images, prompts)
    assert len(server.requests) == 3  # 2 + 2 + 1
    np.testing.assert_array_equal(np.concatenate(server.seen), images)
    expected = images.reshape(5, -1).mean(axis=1) / 255
    np.testing.assert_allclose(out["http"], expected)
    np.testing.assert_allclose(out[TOTAL], expected)
    every = worker.score_with("http", images, prompts)  # the logged arrays, in order
    np.testing.assert_allclose(every["red"], images[..., 0].mean(axis=(1, 2)))
    np.testing.assert_array_equal(every["prompt_len"], [1, 2, 3, 4, 5])
    assert "server" not in every  # not a list: metadata, ignored
    sent = json.loads(server.requests[0]["body"])
    assert sent["prompts"] == ["a", "bb"]
    if image_format == "png":
        assert isinstance(sent["images"], list) and len(sent["images"]) == 2
    else:
        assert sent["images"]["shape"] == [2, 6, 7, 3]


def test_decode_images_inverts_encode_images():
    images = _images(3)
    for image_format in ("png", "uint8"):
        np.testing.assert_array_equal(decode_images(encode_images(images, image_format)),
                                      images)


def test_503_is_retried_then_succeeds(server):
    server.mode, server.failures = "503", 2
    worker = _worker(server.url, retries=3, backoff_s=0.01)
    out = worker.score(_images(2), ["a", "b"])
    assert len(server.requests) == 3 and out["http"].shape == (2,)


def test_503_past_the_retries_names_reward_and_url(server):
    server.mode, server.failures = "503", 100
    worker = _worker(server.url, name="http_judge", retries=2, backoff_s=0.01)
    with pytest.raises(ConnectionError) as err:
        worker.score(_images(2), ["a", "b"])
    assert len(server.requests) == 3
    message = str(err.value)
    assert "http_judge" in message and server.url in message and "HTTP 503" in message


def test_a_slow_server_stops_at_the_deadline(server):
    server.mode = "sleep"
    worker = _worker(server.url, timeout_s=0.3, deadline_s=1.0, retries=50, backoff_s=0.05)
    began = time.monotonic()
    with pytest.raises(ConnectionError, match="deadline_s 1") as err:
        worker.score(_images(2), ["a", "b"])
    elapsed = time.monotonic() - began
    assert 0.9 < elapsed < 2.5, elapsed
    assert 2 <= len(server.requests) < 50  # retried, and stopped by the deadline
    assert "Timeout" in str(err.value)


def test_4xx_is_not_retried(server):
    server.mode = "400"
    with pytest.raises(ValueError, match="HTTP 400") as err:
        _worker(server.url, retries=3, backoff_s=0.01).score(_images(2), ["a", "b"])
    assert len(server.requests) == 1 and "images missing" in str(err.value)


@pytest.mark.parametrize(("mode", "match"), [
    ("short", "2 images sent, 1 'scores' received"),
    ("text", r"scores\[0\] is 'high', not a number"),
    ("null", r"scores\[0\] is None, not a number"),
    ("missing", "no 'scores' list"),
    ("html", "not JSON"),
])
def test_a_wrong_reply_is_an_error_naming_reward_and_url(server, mode, match):
    server.mode = mode
    worker = _worker(server.url, name="http_vqa", retries=3, backoff_s=0.01)
    with pytest.raises(ValueError, match=match) as err:
        worker.score(_images(2), ["a", "b"])
    assert f"reward http_vqa ({server.url})" in str(err.value)
    assert len(server.requests) == 1  # a wrong reply is not retried


def test_credentials_are_sent_but_never_shown(server, monkeypatch):
    port = server.server_address[1]
    url = f"http://alice:s3cr3tpw@127.0.0.1:{port}/score?api_key=k3yk3y"
    monkeypatch.setenv("OPGRPO_TEST_TOKEN", "b3arer-t0ken")
    tokened = f"http://127.0.0.1:{port}/score?api_key=k3yk3y"
    worker = _worker(tokened, token_env="OPGRPO_TEST_TOKEN", headers={"X-Team": "vision"})
    worker.score(_images(1), ["a"])
    headers = server.requests[0]["headers"]
    assert headers["Authorization"] == "Bearer b3arer-t0ken"
    assert headers["X-Team"] == "vision"
    with pytest.raises(ValueError, match="keep one"):
        get_reward("http").check_options({"url": url, "token_env": "OPGRPO_TEST_TOKEN"})
    assert safe_url(url) == f"http://***@127.0.0.1:{port}/score?***"
    # a server that is down: requests quotes the URL in its error, the message must not
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = f"http://alice:s3cr3tpw@127.0.0.1:{closed}/score?api_key=k3yk3y"
    with pytest.raises(ConnectionError) as err:
        _worker(down, retries=1, backoff_s=0.01).score(_images(1), ["a"])
    for secret in ("s3cr3tpw", "k3yk3y", "alice"):
        assert secret not in str(err.value)
    assert f"127.0.0.1:{closed}/score" in str(err.value)
    server.mode = "short"
    with pytest.raises(ValueError) as err:
        _worker(url).score(_images(2), ["a", "b"])
    assert "s3cr3tpw" not in str(err.value) and "k3yk3y" not in str(err.value)


def test_basic_auth_from_the_url(server):
    port = server.server_address[1]
    _worker(f"http://alice:pw@127.0.0.1:{port}/score").score(_images(1), ["a"])
    expected = "Basic " + base64.b64encode(b"alice:pw").decode()
    assert server.requests[0]["headers"]["Authorization"] == expected


def test_options_are_checked_with_the_config():
    config = build_config({"reward": {"functions": {"http": 1.0, "http_ocr": 0.5},
                                      "options": {"http": {"url": "http://a:1/s"},
                                                  "http_ocr": {"url": "http://b:2/s",
                                                               "image_format": "uint8"}}}})
    assert config.reward.functions == {"http": 1.0, "http_ocr": 0.5}
    with pytest.raises(ConfigError, match="options.http.url: .*http:// or https://"):
        build_config({"reward": {"functions": {"http": 1.0},
                                 "options": {"http": {"url": "ftp://a/s"}}}})
    with pytest.raises(ConfigError, match="options.http.image_format"):
        build_config({"reward": {"functions": {"http": 1.0},
                                 "options": {"http": {"url": "http://a:1/s",
                                                      "image_format": "jpeg"}}}})
    with pytest.raises(ValueError, match=r"reward.options.http.url: Field required"):
        get_reward("http").check_options({})  # what the trainer checks before it starts
    os.environ.pop("OPGRPO_UNSET_TOKEN", None)
    with pytest.raises(ValueError, match="OPGRPO_UNSET_TOKEN is not set"):
        get_reward("http").check_options({"url": "http://a:1/s",
                                          "token_env": "OPGRPO_UNSET_TOKEN"})
