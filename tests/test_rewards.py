"""The rewards of `actors/rewards/`: JPEG on real images, PickScore and aesthetic on tiny random
CLIP models of the real classes (saved and loaded by path), OCR with the real Tesseract engine
on text that PIL renders, GenEval against a scoring server on 127.0.0.1."""

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from actors.reward import RewardWorker
from actors.rewards import get_reward
from actors.rewards.aesthetic import convert_head, load_head
from actors.rewards.ocr import edit_distance, quoted_text, text_reward
from opgrpo.config import ConfigError, build_config
from tasks.geneval.server import make_server

REPO = Path(__file__).resolve().parents[1]


def _floats(pil_images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255
                     for im in pil_images]).transpose(0, 3, 1, 2)


def _noise_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


# ----- JPEG -----------------------------------------------------------------------------------
def test_jpeg_rewards_simple_images():
    """On real pictures (a benchmark plot of this repo, a rendered shapes scene) against
    noise: the size is PIL's JPEG at quality 95, and simpler pictures score higher."""
    import io

    from tasks.shapes.render import render_batch

    plot = Image.open(sorted((REPO / "bench" / "results").glob("*.png"))[0]).convert("RGB")
    plot = plot.resize((128, 96))
    scene = Image.fromarray(render_batch(_shapes_rows(1), seed=0)[0]).resize((128, 96))
    noise = Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255)
                            .astype(np.uint8))
    images = _floats([plot, scene, noise])
    scores = get_reward("jpeg").load().score(images, ["a", "b", "c"])
    for pil, kb in zip((plot, scene, noise), scores["jpeg_kb"]):
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=95)
        assert kb == pytest.approx(len(buffer.getvalue()) / 1000)
    assert scores["compressibility"][1] > scores["compressibility"][2]  # a scene beats noise
    assert scores["compressibility"][0] > scores["compressibility"][2]
    inverse = get_reward("jpeg_incompressibility").load().score(images, ["a", "b", "c"])
    np.testing.assert_allclose(inverse["incompressibility"], -scores["compressibility"])


# ----- CLIP-based: PickScore and aesthetic ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random `CLIPModel` and its `CLIPProcessor` (real classes), saved by path."""
    from opgrpo.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_pickscore_is_the_scaled_clip_logit(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    reward = get_reward("pickscore").load({"model": str(tiny_clip), "batch_size": 2})
    images, prompts = _noise_images(3, 48), ["a red circle", "two squares", "a cat"]
    scores = reward.score(images, prompts)
    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    pil = [Image.fromarray((im.transpose(1, 2, 0) * 255).round().astype(np.uint8))
           for im in images]
    inputs = processor(text=prompts, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    expected = out.logits_per_image.diagonal().numpy()  # logit_scale * cosine
    np.testing.assert_allclose(scores["pickscore_logit"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores["pickscore"], expected / 26, rtol=1e-4, atol=1e-5)


def test_aesthetic_linear_and_mlp_heads(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(1)
    linear = {"weight": torch.randn(1, 16), "bias": torch.randn(1)}
    save_file(linear, str(tmp_path / "linear.safetensors"))
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2),
                              torch.nn.Linear(32, 8), torch.nn.Dropout(0.2),
                              torch.nn.Linear(8, 8), torch.nn.Dropout(0.1),
                              torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pth")
    names = convert_head(str(tmp_path / "mlp.pth"), str(tmp_path / "mlp.safetensors"))
    assert "layers.7.weight" in names

    images = _noise_images(2, 40)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    pil = [Image.fromarray((im.transpose(1, 2, 0) * 255).round().astype(np.uint8))
           for im in images]
    with torch.no_grad():
        features = model.get_image_features(**processor(images=pil, return_tensors="pt"))
        if not isinstance(features, torch.Tensor):
            features = features.pooler_output
        embedding = features / features.norm(dim=-1, keepdim=True)
        expected_linear = (embedding @ linear["weight"].T + linear["bias"]).squeeze(-1)
        expected_mlp = mlp.eval()(embedding).squeeze(-1)
    for head, expected in (("linear", expected_linear), ("mlp", expected_mlp)):
        reward = get_reward("aesthetic").load({"clip": str(tiny_clip),
                                               "head": str(tmp_path / f"{head}.safetensors")})
        np.testing.assert_allclose(reward.score(images, ["x", "y"])["aesthetic"],
                                   expected.numpy(), rtol=1e-4, atol=1e-5)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="linear head"):
        load_head(str(tmp_path / "odd.safetensors"))


def test_missing_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward.options.pickscore.model: directory"):
        get_reward("pickscore").load({"model": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match=r"reward.options.aesthetic.head: file"):
        get_reward("aesthetic").load({"clip": str(tmp_path), "head": str(tmp_path / "h.st")})
    with pytest.raises(ValueError, match=r"reward.options.pickscore.modle"):
        get_reward("pickscore").load({"modle": "x"})


# ----- OCR ------------------------------------------------------------------------------------
def _text_image(text: str, size=(360, 80)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    if text:
        ImageDraw.Draw(image).text((10, 15), text, fill="black",
                                   font=ImageFont.load_default(size=40))
    return image


def test_ocr_text_rules():
    assert quoted_text('a sign that says "Open Late" in neon') == "Open Late"
    assert quoted_text("a sign with \u201ccurly\u201d quotes") == "curly"
    assert quoted_text("no quotes here") is None
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert text_reward("open late", 'says "Open Late"') == 1.0
    assert text_reward("", 'says "Open Late"') == 0.0
    assert text_reward("open lat", 'says "Open Late"') == pytest.approx(1 - 1 / 8)
    assert text_reward("anything", "no quotes") == 0.0


def test_ocr_with_tesseract_scores_the_right_text_higher():
    reward = get_reward("ocr").load({"engine": "tesseract"})
    images = _floats([_text_image("hello world"), _text_image("hello world"),
                      _text_image("")])
    prompts = ['a sign that says "hello world"', 'a sign that says "goodbye moon"',
               'a sign that says "hello world"']
    scores = reward.score(images, prompts)["ocr"]
    assert scores[0] >= 0.9  # read back exactly or nearly
    assert scores[1] < scores[0] - 0.5  # the wrong text scores far lower
    assert scores[2] == 0.0  # a blank image reads as nothing


# ----- GenEval client against a server on 127.0.0.1 -------------------------------------------
@pytest.fixture
def shapes_server():
    server = make_server("127.0.0.1", 0, "shapes")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/score"
    server.shutdown()
    server.server_close()


def _shapes_rows(n: int) -> list[dict]:
    lines = (REPO / "configs/shapes/test_metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_geneval_client_scores_through_the_server(shapes_server):
    from tasks.shapes.render import render_batch

    rows = _shapes_rows(3)
    good = render_batch(rows, seed=0).astype(np.float32) / 255
    blank = np.ones_like(good[:1])
    images = np.concatenate([good, blank]).transpose(0, 3, 1, 2)
    prompts = [row["prompt"] for row in rows] + [rows[0]["prompt"]]
    options = {"url": shapes_server,
               "metadata_files": [str(REPO / "configs/shapes/test_metadata.jsonl")]}
    scores = get_reward("geneval").load(options).score(images, prompts)
    np.testing.assert_array_equal(scores["strict"], [1, 1, 1, 0])
    assert scores["partial"][3] < 1
    with pytest.raises(ValueError, match="no GenEval metadata for prompt 'a dragon'"):
        get_reward("geneval").load(options).score(images[:1], ["a dragon"])


class _Flaky(BaseHTTPRequestHandler):
    """503 for the first request, then the reply of a server that scores everything 1."""

    calls = 0

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls == 1:
            self.send_response(503)
            self.end_headers()
            return
        n = len(body["images"])
        reply = json.dumps({"strict": [1.0] * n, "partial": [1.0] * n}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class _Slow(_Flaky):
    def do_POST(self):  # noqa: N802
        time.sleep(1.0)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_POST()  # the client gave up waiting, as it should


@pytest.mark.parametrize("handler", [_Flaky, _Slow])
def test_geneval_client_retries_and_times_out(handler, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/score"
    metadata = tmp_path / "m.jsonl"
    metadata.write_text(json.dumps({"prompt": "a circle", "include": []}) + "\n")
    options = {"url": url, "metadata_files": [str(metadata)], "timeout_s": 0.3,
               "retries": 1, "backoff_s": 0.05}
    try:
        reward = get_reward("geneval").load(options)
        if handler is _Flaky:  # the retry gets through
            assert reward.score(_noise_images(2, 16), ["a circle"] * 2)["strict"].tolist() == [1, 1]
            assert _Flaky.calls == 2
        else:  # never within the timeout: the error names the URL and the attempts
            with pytest.raises(ConnectionError, match=f"{url} failed 2 times"):
                reward.score(_noise_images(1, 16), ["a circle"])
    finally:
        server.shutdown()
        server.server_close()


# ----- configuration and the reward actor's weighted sum -------------------------------------
def test_reward_options_are_validated_with_their_path(tmp_path):
    base = {"reward": {"functions": {"pickscore": 1.0}}}
    with pytest.raises(ConfigError, match=r"options.ocr.*not in reward.functions"):
        build_config({"reward": {"functions": {"pickscore": 1.0},
                                 "options": {"ocr": {"engine": "tesseract"}}}})
    with pytest.raises(ConfigError, match=r"options.pickscore.model.*[Ff]ield required"):
        build_config({**base, "reward": {**base["reward"], "options": {"pickscore": {}}}})
    with pytest.raises(ConfigError, match=r"options.jpeg: this reward takes no options"):
        build_config({"reward": {"functions": {"jpeg": 1.0}, "options": {"jpeg": {"q": 1}}}})
    with pytest.raises(ConfigError, match=r"unknown reward 'pikscore'"):
        build_config({"reward": {"functions": {"pikscore": 1.0}}})


def test_reward_worker_weighted_sum_on_cpu():
    worker = RewardWorker({"jpeg": 2.0, "shapes_partial": 0.5}, {}, "auto", 0.0)
    assert worker.device == "cpu"
    images = (_noise_images(2, 32).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    out = worker.score(images, ["a circle", "a square"])
    np.testing.assert_allclose(out["total"], 2 * out["jpeg"] + 0.5 * out["shapes_partial"])
