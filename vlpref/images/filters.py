"""Image filters: screens that score an image, or reject it with a reason, before any model sees it.

A filter is an `ImageFilter`: built from its options once per branch (`from_options`), then asked
`check(image)` for each normalised image of the branch, from several threads at once (so it must
be thread-safe; a model session that runs concurrently is). It returns a `Verdict`: a score (kept
in the images table's `filter_scores` JSON under the filter's name) and, to reject, a reason. A
rejected image is a failure of kind `filter_<name>` (`rejection_kind`); an exception raised by a
filter is a failure of kind `filter_error` naming it, not a crashed stage.

Filters are configured in order (`stages.images.filters: [{name: min_size, min_side: 224}, ...]`)
and run in that order; the first rejection stops the image's screening, so cheap filters go
first and a model-based one only sees what they let through.

Where they come from: the built-ins below (no weights, pure Pillow), the optional `nsfw` built-in
(`vlpref.images.filters_nsfw`, when its package is installed) and the `vlpref.image_filters`
entry-point group, the way providers plug in (`vlpref.providers.registry`). A team adds one by
publishing, in its own package,

    [project.entry-points."vlpref.image_filters"]
    faces = "my_package.screens:FaceFilter"

where `FaceFilter` subclasses `ImageFilter`; a config then says `filters: [{name: faces}]`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self

from PIL import Image, ImageStat
from PIL import ImageFilter as PILFilter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlpref.plugins import available, load_class

__all__ = [
    "ENTRY_POINT_GROUP",
    "FILTER_ERROR",
    "MEASURES",
    "SCREEN_SIDE",
    "AspectFilter",
    "FilterImage",
    "ImageFilter",
    "MinSizeFilter",
    "NearBlankFilter",
    "Screening",
    "TextCoverageFilter",
    "Verdict",
    "available_filters",
    "build_filters",
    "check_specs",
    "filter_class",
    "rejection_kind",
    "screen",
    "text_coverage",
]

ENTRY_POINT_GROUP: Final = "vlpref.image_filters"
FILTER_ERROR: Final = "filter_error"
# Filters see a thumbnail this size (longest side): what they measure does not need more, and a
# 1024-pixel image would cost each filter four times the work.
SCREEN_SIDE: Final = 512
# The measures vlpref.images.normalize already writes into `filter_scores`: a filter may not be
# named like one, or its score would overwrite it (tests check this list against normalize).
MEASURES: Final = frozenset(
    {
        "width",
        "height",
        "aspect_ratio",
        "resized",
        "two_tone",
        "edge_density",
        "text_likeness",
        "luma_mean",
        "luma_std",
    }
)


@dataclass(frozen=True)
class FilterImage:
    """What a filter is shown: a thumbnail to look at, and facts about the stored image."""

    image: Image.Image  # RGB, longest side at most SCREEN_SIDE
    width: int  # of the normalised image (what models are sent)
    height: int
    data: bytes  # the normalised image as stored (PNG or JPEG)
    format: str
    measures: Mapping[str, float] = field(default_factory=dict)  # normalize's, see MEASURES


@dataclass(frozen=True)
class Verdict:
    """A filter's answer: a score to keep (None: nothing to keep) and a reason to reject."""

    score: float | None = None
    reject: str | None = None


class ImageFilter(ABC):
    """A screen for images; subclass it in a plug-in (module docstring)."""

    @classmethod
    @abstractmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """Build the filter from its options (the config's entry without `name`); raise
        ValueError (a pydantic ValidationError is one) for options it does not accept."""

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        """Called when the config loads; by default builds the filter once and drops it."""
        cls.from_options(options)

    @abstractmethod
    def check(self, image: FilterImage) -> Verdict:
        """Score `image`, or reject it with a reason."""


def rejection_kind(name: str) -> str:
    """The failure kind of an image the filter `name` rejected."""
    return f"filter_{name}"


# --------------------------------------------------------------------------- built-ins


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OptionsFilter(ImageFilter):
    """A filter whose options are a pydantic model (`Options`)."""

    Options: ClassVar[type[_Options]]

    def __init__(self, options: _Options) -> None:
        self.options = options

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        return cls(cls.Options.model_validate(dict(options)))


class _MinSizeOptions(_Options):
    min_side: int = Field(default=224, ge=1, le=8192)


class MinSizeFilter(_OptionsFilter):
    """Rejects an image whose shorter side is under `min_side` (default 224, the input side of
    CLIP-style vision encoders: smaller images are upscaled and models see mush). Measured on the
    normalised image, after `max_side` bounding: the size models are sent. Score: shorter side."""

    Options = _MinSizeOptions

    def check(self, image: FilterImage) -> Verdict:
        assert isinstance(self.options, _MinSizeOptions)
        side = min(image.width, image.height)
        if side < self.options.min_side:
            return Verdict(side, f"{image.width}x{image.height}: under {self.options.min_side}")
        return Verdict(side)


class _AspectOptions(_Options):
    max_ratio: float = Field(default=3.0, ge=1.0, le=100.0)


class AspectFilter(_OptionsFilter):
    """Rejects banners and strips: long side over short side above `max_ratio` (default 3;
    encoders that centre-crop to a square would drop most of such an image). Score: the ratio."""

    Options = _AspectOptions

    def check(self, image: FilterImage) -> Verdict:
        assert isinstance(self.options, _AspectOptions)
        ratio = round(max(image.width, image.height) / min(image.width, image.height), 4)
        if ratio > self.options.max_ratio:
            return Verdict(ratio, f"aspect ratio {ratio:g}:1 is over {self.options.max_ratio:g}")
        return Verdict(ratio)


class _NearBlankOptions(_Options):
    min_std: float = Field(default=6.0, ge=0.0, le=128.0)


class NearBlankFilter(_OptionsFilter):
    """Rejects an image with almost no variation: the largest standard deviation of its R, G and
    B values under `min_std` (default 6, of 0..255). Normalisation already refuses a single flat
    colour; this catches a blank page with scanner noise, a black frame with a timestamp, a faint
    gradient. Per channel, so an image that varies in colour only is not blank. Score: that
    deviation."""

    Options = _NearBlankOptions

    def check(self, image: FilterImage) -> Verdict:
        assert isinstance(self.options, _NearBlankOptions)
        std = round(max(ImageStat.Stat(image.image).stddev), 3)
        if std < self.options.min_std:
            return Verdict(
                std, f"near-blank: colour deviation {std:g} under {self.options.min_std:g}"
            )
        return Verdict(std)


# Text coverage, measured on a 256-pixel grey thumbnail cut into 8x8 cells: a cell is text-like
# when many of its pixels are strong edges (strokes) and its values are two-tone (ink on a
# plain ground). Natural texture (foliage, fabric) has the edges but not the two tones; a flat
# area or a single shape boundary has the tones but not the edges.
_TEXT_SIDE = 256
_CELL = 8
_EDGE_LEVEL = 64  # FIND_EDGES response from which a pixel counts as on an edge
_CELL_EDGES = 0.25  # share of a cell's pixels on an edge
_CELL_TWO_TONE = 0.7  # share of its pixels in its two most common of 16 grey bins


def text_coverage(image: Image.Image) -> float:
    """Share of an image's area that looks like text (0..1); a heuristic, not OCR."""
    gray = image.convert("L")
    gray.thumbnail((_TEXT_SIDE, _TEXT_SIDE), Image.Resampling.BOX)
    width, height = gray.size
    edges = gray.filter(PILFilter.FIND_EDGES).point(lambda v: 255 if v >= _EDGE_LEVEL else 0)
    cells = text = 0
    for top in range(0, height - _CELL + 1, _CELL):
        for left in range(0, width - _CELL + 1, _CELL):
            box = (left, top, left + _CELL, top + _CELL)
            cells += 1
            edge_share = edges.crop(box).histogram()[255] / (_CELL * _CELL)
            if edge_share < _CELL_EDGES:
                continue
            hist = gray.crop(box).histogram()
            bins = sorted(sum(hist[i : i + 16]) for i in range(0, 256, 16))
            if (bins[-1] + bins[-2]) / (_CELL * _CELL) >= _CELL_TWO_TONE:
                text += 1
    return round(text / cells, 4) if cells else 0.0


class _TextOptions(_Options):
    max_coverage: float = Field(default=0.2, ge=0.0, le=1.0)


class TextCoverageFilter(_OptionsFilter):
    """Rejects text-heavy images (screenshots of documents, posters that are mostly words) whose
    `text_coverage` is over `max_coverage` (default 0.2; measured in docs/images.md: pages of
    text 0.35, drawn scenes with a caption at most 0.07). It measures dense small text: the
    typographic source's large rendered phrases score 0.02-0.05 (their strokes are wide, edges
    only at their borders), so it leaves them alone. Score: the coverage."""

    Options = _TextOptions

    def check(self, image: FilterImage) -> Verdict:
        assert isinstance(self.options, _TextOptions)
        coverage = text_coverage(image.image)
        if coverage > self.options.max_coverage:
            return Verdict(
                coverage,
                f"text covers {coverage:.0%} of the image, over {self.options.max_coverage:.0%}",
            )
        return Verdict(coverage)


# --------------------------------------------------------------------------- registry


def _builtin_filters() -> dict[str, str]:
    return {
        "min_size": "vlpref.images.filters:MinSizeFilter",
        "aspect": "vlpref.images.filters:AspectFilter",
        "near_blank": "vlpref.images.filters:NearBlankFilter",
        "text_coverage": "vlpref.images.filters:TextCoverageFilter",
        # Imported only when configured: it needs the optional `nsfw` extra (onnxruntime).
        "nsfw": "vlpref.images.filters_nsfw:OpenNsfwFilter",
    }


def available_filters() -> list[str]:
    """The built-in filters and the installed plug-ins, by name."""
    return available(_builtin_filters(), ENTRY_POINT_GROUP)


def filter_class(name: str) -> type[ImageFilter]:
    """The class registered for `name`: a built-in first, then an entry point. ValueError when
    there is none or it cannot be loaded (the config reports it with the field)."""
    return load_class(
        name,
        _builtin_filters(),
        ENTRY_POINT_GROUP,
        ImageFilter,
        what="image filter named",
        label="image filter",
        unknown=ValueError,
        broken=ValueError,
    )


def _split(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    options = dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("each filter needs a `name`")
    return name, options


def check_specs(specs: Sequence[Mapping[str, Any]]) -> None:
    """Validate the configured filters when the config loads: known names, accepted options, no
    name twice, none named like a measure. Raises ValueError with the filter named."""
    seen: set[str] = set()
    for spec in specs:
        name, options = _split(spec)
        if name in seen:
            raise ValueError(f"filter {name!r} is configured twice (its score has one key)")
        if name in MEASURES:
            raise ValueError(f"a filter may not be named {name!r}: filter_scores has that measure")
        seen.add(name)
        try:
            filter_class(name).validate_options(options)
        except ValidationError as exc:
            raise ValueError(f"filter {name!r}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error['msg']}" if where else str(error["msg"])


_BUILT: dict[tuple[str, str], ImageFilter] = {}
_BUILT_LOCK = threading.Lock()


def build_filters(specs: Sequence[Mapping[str, Any]]) -> list[tuple[str, ImageFilter]]:
    """The configured filters, in order, built once per process for the same options: branches
    run in parallel and a model-based filter's session is worth sharing."""
    out = []
    for spec in specs:
        name, options = _split(spec)
        key = (name, repr(sorted(options.items())))
        with _BUILT_LOCK:
            built = _BUILT.get(key)
            if built is None:
                built = _BUILT[key] = filter_class(name).from_options(options)
        out.append((name, built))
    return out


@dataclass(frozen=True)
class Screening:
    """One image's screening: the scores (filter name -> score), and the rejection if any."""

    scores: dict[str, float]
    kind: str | None = None  # failure kind: filter_<name> or filter_error
    filter: str | None = None
    reason: str | None = None


def screen(filters: Sequence[tuple[str, ImageFilter]], image: FilterImage) -> Screening:
    """Run the filters in order; the first rejection (or error) ends the screening."""
    scores: dict[str, float] = {}
    for name, screen_filter in filters:
        try:
            verdict = screen_filter.check(image)
        except Exception as exc:  # a plug-in's bug costs one image, and says so
            reason = f"filter {name!r} raised {type(exc).__name__}: {exc}"
            return Screening(scores, FILTER_ERROR, name, reason)
        if verdict.score is not None:
            scores[name] = float(verdict.score)
        if verdict.reject is not None:
            return Screening(scores, rejection_kind(name), name, f"{name}: {verdict.reject}")
    return Screening(scores)
