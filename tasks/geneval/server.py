"""A GenEval scoring server speaking the JSON contract of `actors/rewards/geneval.py`.

    POST /score  {"images": [base64 PNG], "metadata": [GenEval metadata]}
             ->  {"strict": [...], "partial": [...]}

Scorers:
- `shapes`: the shapes task's exact checker (GenEval's metadata format, the shapes classes);
  what the tests and the CPU demo run.
- `geneval`: GenEval's rules (`tasks/geneval/rules.py`) over a Mask2Former instance
  detector (transformers' `Mask2FormerForUniversalSegmentation`, e.g. a local copy of
  facebook/mask2former-swin-small-coco-instance) and a CLIP zero-shot colour classifier
  (e.g. openai/clip-vit-large-patch14): `--detector DIR --clip DIR --device cuda`. GenEval's
  own release runs mmdetection's Mask2Former (Swin-S, COCO) with open_clip ViT-L/14; this is
  the same architecture and classifier through transformers, so scores are close to, not
  identical with, the official GenEval numbers.

Limits (whoever reaches the port can send anything): it listens on 127.0.0.1 unless `--host`
says otherwise; a client silent for `--timeout` seconds (30) is dropped; a body is refused
before it is read when its Content-Length is missing (411) or above `--max-body-mb` (256; 413);
at most `--max-threads` (8) requests are served at once and a connection beyond them is answered
503 at once; an image is refused (400) from its header, before it is decoded, when it has more
than MAX_IMAGE_PIXELS pixels (a decompression bomb: a small PNG of a huge, empty image), and a
request when its images have more than MAX_REQUEST_PIXELS in all.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from actors.rewards.common import clip_features, load_clip

log = logging.getLogger(__name__)
Scorer = Callable[[np.ndarray, list[dict]], dict[str, np.ndarray]]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BODY_MB = 256
DEFAULT_MAX_THREADS = 8
MAX_IMAGE_PIXELS = 4096 * 4096  # model.height / model.width are at most 4096
MAX_REQUEST_PIXELS = 2**28  # 768 MiB of decoded RGB per request
READ_CHUNK = 1 << 20


class RequestError(ValueError):
    """A request refused with an HTTP status (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def shapes_scorer(images: np.ndarray, metadata: list[dict]) -> dict[str, np.ndarray]:
    from actors.rewards.shapes import score_images

    scores = score_images(images, metadata)
    return {"strict": scores["strict"], "partial": scores["partial"]}


SCORERS: dict[str, Scorer] = {"shapes": shapes_scorer}
COLOR_TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}",
                   "a photo of a {color} object")


class DetectorScorer:
    """GenEval's rules over a Mask2Former detector and a CLIP colour classifier."""

    def __init__(self, detector: str, clip: str, device: str = "cpu", settings=None) -> None:
        import torch
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from tasks.geneval.rules import RuleSettings

        self.torch, self.device = torch, torch.device(device)
        self.settings = settings or RuleSettings()
        self.processor = AutoImageProcessor.from_pretrained(detector, local_files_only=True)
        self.detector = Mask2FormerForUniversalSegmentation.from_pretrained(
            detector, local_files_only=True, use_safetensors=True).to(self.device).eval()
        self.names = self.detector.config.id2label
        self.clip, self.clip_processor, _ = load_clip(clip, None, device)
        self._classifiers: dict = {}

    def detect(self, image: np.ndarray) -> dict:
        """All instances the detector proposes (the rules apply the thresholds)."""
        from tasks.geneval.rules import Detection

        height, width = image.shape[:2]
        inputs = self.processor(images=[Image.fromarray(image)], return_tensors="pt")
        with self.torch.no_grad():
            outputs = self.detector(**{k: v.to(self.device) for k, v in inputs.items()})
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[(height, width)], return_binary_maps=True)[0]
        found: dict = {}
        for mask, info in zip(result["segmentation"], result["segments_info"]):
            mask = mask.bool().cpu().numpy()
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
            name = self.names[int(info["label_id"])]
            found.setdefault(name, []).append(Detection(box, float(info["score"]), mask))
        return found

    def _classifier(self, name: str):
        from tasks.geneval.rules import COLORS

        if name not in self._classifiers:
            rows = []
            for color in COLORS:
                texts = [t.format(color=color, name=name) for t in COLOR_TEMPLATES]
                tokens = self.clip_processor(text=texts, padding=True, return_tensors="pt")
                with self.torch.no_grad():
                    emb = clip_features(self.clip.get_text_features(
                        **{k: v.to(self.device) for k, v in tokens.items()}))
                mean = emb.mean(0)
                rows.append(mean / mean.norm())
            self._classifiers[name] = self.torch.stack(rows)
        return self._classifiers[name]

    def colors(self, image: np.ndarray, detections, name: str) -> list[str]:
        """The colour of each detection: its mask over grey, cropped to its box, zero-shot."""
        from tasks.geneval.rules import COLORS

        pil = Image.fromarray(image)
        grey = Image.new("RGB", pil.size, "#999")
        crops = []
        for det in detections:
            shown = pil if det.mask is None else Image.composite(
                pil, grey, Image.fromarray(det.mask.astype(np.uint8) * 255))
            x1, y1, x2, y2 = (int(v) for v in det.box[:4])
            crops.append(shown.crop((x1, y1, x2 + 1, y2 + 1)))
        inputs = self.clip_processor(images=crops, return_tensors="pt")
        with self.torch.no_grad():
            emb = clip_features(self.clip.get_image_features(
                pixel_values=inputs["pixel_values"].to(self.device)))
        picks = (emb @ self._classifier(name).T).argmax(1)
        return [COLORS[int(i)] for i in picks]

    def __call__(self, images: np.ndarray, metadata: list[dict]) -> dict[str, np.ndarray]:
        from tasks.geneval.rules import judge, select

        strict, partial = [], []
        for image, meta in zip(images, metadata):
            objects = select(self.detect(image), meta.get("tag", ""), self.settings)
            ok, fraction, _ = judge(objects, meta,
                                    lambda dets, name, im=image: self.colors(im, dets, name),
                                    self.settings)
            strict.append(float(ok))
            partial.append(fraction)
        return {"strict": np.asarray(strict), "partial": np.asarray(partial)}


def decode_images(encoded: list[str], max_pixels: int = MAX_IMAGE_PIXELS,
                  max_total_pixels: int = MAX_REQUEST_PIXELS) -> np.ndarray:
    """base64 PNGs -> (N, H, W, 3) uint8. Every image's size is read from its header and
    checked before anything is decoded: one above `max_pixels`, or all of them together above
    `max_total_pixels`, is refused (ValueError), as is whatever PIL takes for a decompression
    bomb."""
    if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
        raise ValueError("images must be a list of base64 strings")
    opened, total = [], 0
    for i, text in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image {i}: {exc}") from None
        width, height = image.size
        total += width * height
        if width * height > max_pixels:
            raise ValueError(f"image {i} is {width}x{height} pixels, more than the "
                             f"{max_pixels} allowed (a decompression bomb?)")
        if total > max_total_pixels:
            raise ValueError(f"the images have more than {max_total_pixels} pixels in all")
        opened.append(image)
    try:
        return np.stack([np.asarray(image.convert("RGB")) for image in opened])
    except Image.DecompressionBombError as exc:
        raise ValueError(str(exc)) from None


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def handler_for(scorer: Scorer, timeout_s: float = DEFAULT_TIMEOUT_S,
                max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # every read and write of the connection (request line, headers, body, reply)
        timeout = timeout_s

        def _body(self) -> bytes:
            """The request body, read only after its declared length was checked."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise RequestError(411, "send a Content-Length (chunked bodies are refused)")
            declared = self.headers.get("Content-Length")
            if declared is None:
                raise RequestError(411, "Content-Length is required")
            try:
                length = int(declared)
            except ValueError:
                raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number"
                                   ) from None
            if length < 0:
                raise RequestError(400, "Content-Length is negative")
            if length > max_body_bytes:
                raise RequestError(413, f"body of {length} bytes is over the limit of "
                                   f"{max_body_bytes} bytes (--max-body-mb)")
            chunks, left = [], length
            while left:
                chunk = self.rfile.read(min(left, READ_CHUNK))  # socket timeout: TimeoutError
                if not chunk:
                    raise RequestError(400, f"body ended after {length - left} of {length} "
                                       "bytes")
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            try:
                request = json.loads(self._body())
                if not isinstance(request, dict):
                    raise ValueError("the body must be a JSON object")
                images = decode_images(request["images"])
                metadata = request["metadata"]
                if not isinstance(metadata, list) or len(metadata) != len(images):
                    raise ValueError(f"{len(images)} images but metadata is not a list of "
                                     f"{len(images)}")
                scores = scorer(images, metadata)
                status, body = 200, json.dumps({k: [float(v) for v in scores[k]]
                                                for k in ("strict", "partial")}).encode()
            except TimeoutError:
                log.warning("geneval-server: %s sent no data for %g s: connection dropped",
                            self.client_address[0], timeout_s)
                self.close_connection = True
                return
            except RequestError as exc:
                status, body = exc.status, _error_body(str(exc))
                self.close_connection = True  # an unread body must not be taken for a request
            except (ValueError, KeyError, TypeError, OSError) as exc:
                status, body = 400, _error_body(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # the scorer failed: say so, keep serving
                log.exception("geneval-server: scoring failed")
                status, body = 500, _error_body(f"scoring failed: {type(exc).__name__}")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("geneval-server: " + fmt, *args)

    return Handler


_BUSY_BODY = _error_body("busy: the server's threads (--max-threads) are all serving")
BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              b"Retry-After: 1\r\nConnection: close\r\n"
              + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode() + _BUSY_BODY)


class BoundedThreadingHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_threads` at once: a connection beyond them is
    answered 503 by the accepting thread and closed, without a thread of its own."""

    def __init__(self, address, handler, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self._slots = threading.BoundedSemaphore(max_threads)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.settimeout(0.5)  # never let a slow client hold the accepting thread
            request.sendall(BUSY_REPLY)
            request.shutdown(socket.SHUT_WR)
            request.recv(65536)  # what the client sent, so that closing sends no reset
        except OSError:
            pass
        finally:
            request.close()


def make_server(host: str = DEFAULT_HOST, port: int = 0, scorer: str | Scorer = "shapes",
                timeout_s: float = DEFAULT_TIMEOUT_S, max_body_mb: float = DEFAULT_MAX_BODY_MB,
                max_threads: int = DEFAULT_MAX_THREADS) -> BoundedThreadingHTTPServer:
    function = SCORERS[scorer] if isinstance(scorer, str) else scorer
    handler = handler_for(function, timeout_s, int(max_body_mb * (1 << 20)))
    return BoundedThreadingHTTPServer((host, port), handler, max_threads)


def serve(host: str = DEFAULT_HOST, port: int = 18085, scorer: str = "shapes",
          detector: str | None = None, clip: str | None = None, device: str = "cpu",
          timeout_s: float = DEFAULT_TIMEOUT_S, max_body_mb: float = DEFAULT_MAX_BODY_MB,
          max_threads: int = DEFAULT_MAX_THREADS) -> None:
    limits = {"timeout_s": timeout_s, "max_body_mb": max_body_mb, "max_threads": max_threads}
    if scorer == "geneval":
        if not detector or not clip:
            raise ValueError("--scorer geneval needs --detector DIR and --clip DIR")
        server = make_server(host, port, DetectorScorer(detector, clip, device), **limits)
    else:
        server = make_server(host, port, scorer, **limits)
    print(f"GenEval scoring ({scorer}) on http://{host}:{server.server_port}/score", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
