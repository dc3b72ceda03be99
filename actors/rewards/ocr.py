"""OCR reward (Flow-GRPO's text rendering task): how exactly the image spells the text that
the prompt quotes.

reward = 1 - min(d, n) / n, with d the edit distance between the recognised text and the
first quoted text of the prompt, both lower-cased with spaces removed, and n the target's
length. Nothing recognised (a blank image) scores 0; a prompt without quoted text scores 0.

Engines (`reward.options.ocr.engine`): `tesseract` (pytesseract and the `tesseract` binary,
Debian's tesseract-ocr: CPU, no torch vision stack), `easyocr` and `paddleocr` (as GPU users
run them; installed separately).
"""

from __future__ import annotations

import re
import shutil
from typing import Literal

import numpy as np

from actors.rewards.common import RewardOptions, to_pil

NAME, KEY = "ocr", "ocr"
DESCRIPTION = "1 - normalised edit distance between the recognised and the quoted text"
QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')


class Options(RewardOptions):
    engine: Literal["tesseract", "easyocr", "paddleocr"] = "tesseract"
    languages: list[str] = ["en"]
    tesseract_config: str = "--psm 6"  # one uniform block of text

    def check(self, prefix: str) -> None:
        if self.engine == "tesseract" and shutil.which("tesseract") is None:
            raise FileNotFoundError(f"{prefix}.engine is tesseract but the tesseract binary is "
                                    "not on PATH (apt-get install tesseract-ocr)")


def quoted_text(prompt: str) -> str | None:
    """The first text in double quotes ("..." or curly quotes), or None."""
    match = QUOTED.search(prompt)
    return None if match is None else (match.group(1) or match.group(2))


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_reward(recognised: str, prompt: str) -> float:
    target = quoted_text(prompt)
    if not target or not _normalise(target):
        return 0.0
    gt, pred = _normalise(target), _normalise(recognised)
    return 1.0 - min(edit_distance(pred, gt), len(gt)) / len(gt)


def _reader(options: Options, device: str):
    """A function PIL image -> recognised text, for the configured engine."""
    if options.engine == "tesseract":
        import pytesseract

        lang = "+".join({"en": "eng"}.get(code, code) for code in options.languages)
        return lambda image: pytesseract.image_to_string(image, lang=lang,
                                                         config=options.tesseract_config)
    if options.engine == "easyocr":
        import easyocr

        reader = easyocr.Reader(options.languages, gpu=device == "cuda")
        return lambda image: " ".join(reader.readtext(np.asarray(image), detail=0))
    from paddleocr import PaddleOCR  # paddleocr >= 3

    engine = PaddleOCR(lang=options.languages[0], device="gpu" if device == "cuda" else "cpu",
                       use_doc_orientation_classify=False, use_doc_unwarping=False,
                       use_textline_orientation=False)

    def read(image) -> str:
        texts = []
        for result in engine.predict(np.asarray(image)):
            texts.extend(result["rec_texts"])
        return " ".join(texts)

    return read


def build(options: Options, device: str):
    read = _reader(options, device)

    def score(images, prompts: list[str]) -> dict[str, np.ndarray]:
        recognised = [read(image) for image in to_pil(images)]
        return {KEY: np.asarray([text_reward(r, p) for r, p in zip(recognised, prompts)],
                                dtype=np.float64)}

    return score
