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

from actors.rewards.common import clip_features, load_clip

log = logging.getLogger(__name__)
Scorer = Callable[[np.ndarray, list[dict]], dict[str, np.ndarray]]


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


def serve(host: str, port: int, scorer: str = "shapes", detector: str | None = None,
          clip: str | None = None, device: str = "cpu") -> None:
    if scorer == "geneval":
        if not detector or not clip:
            raise ValueError("--scorer geneval needs --detector DIR and --clip DIR")
        server = make_server(host, port, DetectorScorer(detector, clip, device))
    else:
        server = make_server(host, port, scorer)
    print(f"GenEval scoring ({scorer}) on http://{host}:{server.server_port}/score", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
