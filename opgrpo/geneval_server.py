"""A GenEval scoring server speaking the JSON contract of `actors/rewards/geneval.py`.

    POST /score  {"images": [base64 PNG], "metadata": [GenEval metadata]}
             ->  {"strict": [...], "partial": [...]}

`--scorer shapes` scores with the shapes task's exact checker (GenEval's metadata format, the
shapes classes): what the tests and the CPU demo run. A detector-backed scorer for real
GenEval (Mask2Former through mmdetection, on a GPU) plugs in behind the same contract.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
Scorer = Callable[[np.ndarray, list[dict]], dict[str, np.ndarray]]


def shapes_scorer(images: np.ndarray, metadata: list[dict]) -> dict[str, np.ndarray]:
    from actors.rewards.shapes import score_images

    scores = score_images(images, metadata)
    return {"strict": scores["strict"], "partial": scores["partial"]}


SCORERS: dict[str, Scorer] = {"shapes": shapes_scorer}


def decode_images(encoded: list[str]) -> np.ndarray:
    """base64 PNGs -> (N, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(e))).convert("RGB"))
                     for e in encoded])


def handler_for(scorer: Scorer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                images = decode_images(request["images"])
                metadata = request["metadata"]
                if len(metadata) != len(images):
                    raise ValueError(f"{len(images)} images but {len(metadata)} metadata")
                scores = scorer(images, metadata)
                body = json.dumps({k: [float(v) for v in scores[k]]
                                   for k in ("strict", "partial")}).encode()
                self.send_response(200)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("geneval-server: " + fmt, *args)

    return Handler


def make_server(host: str, port: int, scorer: str | Scorer = "shapes") -> ThreadingHTTPServer:
    function = SCORERS[scorer] if isinstance(scorer, str) else scorer
    return ThreadingHTTPServer((host, port), handler_for(function))


def serve(host: str, port: int, scorer: str = "shapes") -> None:
    server = make_server(host, port, scorer)
    print(f"GenEval scoring ({scorer}) on http://{host}:{server.server_port}/score", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
