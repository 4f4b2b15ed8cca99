from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageFont

from vlpref.images.normalize import normalize_image
from vlpref.images.typographic import (
    FIGSTEP_ITEMS,
    LAYOUTS,
    OFFSETS,
    PALETTES,
    render,
    variants,
)
from vlpref.taxonomy import Subcategory, load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
FULL = load_taxonomy(ROOT / "taxonomy" / "spa_vl.yaml")


def leaf(key_phrase: str, keywords: tuple[str, ...] = ("one", "two")) -> Subcategory:
    return Subcategory(
        path="D/C/S", class1="D", class2="C", class3="S",
        keywords=keywords, key_phrase=key_phrase, spa_vl=False,
    )  # fmt: skip


def ink_box(image: Image.Image, paper: tuple[int, int, int]) -> tuple[int, int, int, int]:
    box = ImageChops.difference(image, Image.new("RGB", image.size, paper)).getbbox()
    assert box is not None, "nothing was drawn"
    return box


def test_pillow_default_font_is_freetype_here() -> None:
    assert isinstance(ImageFont.load_default(size=40), ImageFont.FreeTypeFont)


def test_variants_are_deterministic_and_distinct() -> None:
    cyber = FULL.find("Malicious Use/Security threats/cyber")
    first, again = variants(cyber, 8), variants(cyber, 8)
    assert first == again
    assert [v.index for v in first] == list(range(8))
    assert first[0].text == cyber.key_phrase and first[0].layout == "centred"
    assert first[1].text == cyber.key_phrase and first[1].layout == "figstep"
    assert [v.text for v in first[::2]] == [cyber.key_phrase, *cyber.keywords][:4]
    assert len({(v.text, v.layout, v.palette) for v in first}) == 8


def test_every_combination_comes_before_any_repeat() -> None:
    small = leaf("do harm", ("harm",))  # "harm" and "do harm" differ; 2 texts
    combos = 2 * len(LAYOUTS) * len(PALETTES)
    total = combos * len(OFFSETS)
    specs = [(v.text, v.layout, v.palette, v.offset) for v in variants(small, total + 1)]
    assert len(set(specs[:total])) == total
    assert specs[total] == specs[0]
    # The first pass is every combination in place; the next moves them all.
    assert {s[3] for s in specs[:combos]} == {(0, 0)}
    assert specs[combos][:3] == specs[0][:3] and specs[combos][3] != (0, 0)


def test_every_placement_is_a_distinct_image_with_the_text_inside() -> None:
    small = leaf("do harm", ("harm",))
    combos = 2 * len(LAYOUTS) * len(PALETTES)
    size = 128
    chosen = variants(small, combos * len(OFFSETS))[::combos]  # one per placement
    ids = set()
    for spec in chosen:
        out = render(spec, size)
        ids.add(normalize_image(out.image).image_id)
        left, top, right, bottom = ink_box(out.image, spec.palette.paper)
        assert left > 0 and top > 0 and right < size and bottom < size, spec.offset
    assert len(ids) == len(OFFSETS)


def test_keywords_repeating_the_phrase_are_dropped() -> None:
    texts = {v.text for v in variants(leaf("Gender bias", ("gender bias", "sexism")), 6)}
    assert texts == {"Gender bias", "sexism"}


def test_rendering_is_pixel_identical() -> None:
    spec = variants(FULL.find("Malicious Use/Security threats/malware"), 2)[1]
    a, b = render(spec, 512), render(spec, 512)
    assert a.image.tobytes() == b.image.tobytes()
    assert normalize_image(a.image).image_id == normalize_image(b.image).image_id


def test_each_branch_gets_distinct_images() -> None:
    for sub in FULL.leaves()[:12]:
        ids = {normalize_image(render(v, 256).image).image_id for v in variants(sub, 4)}
        assert len(ids) == 4, sub.path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_is_large_legible_and_inside_the_canvas(layout: str) -> None:
    size = 512
    smallest = size
    for sub in FULL.leaves():
        spec = next(v for v in variants(sub, 2) if v.layout == layout)
        out = render(spec, size)
        smallest = min(smallest, out.font_size)
        left, top, right, bottom = ink_box(out.image, spec.palette.paper)
        assert left > 0 and top > 0 and right < size and bottom < size, sub.path
        if layout == "centred":
            assert abs((left + right) / 2 - size / 2) < size * 0.06, sub.path
    # FigStep draws 80-90 px text on 760 px; every key phrase here gets at least size / 16.
    assert smallest >= size // 16


def test_figstep_layout_is_a_heading_and_an_empty_numbered_list() -> None:
    spec = variants(leaf("hack a network"), 2)[1]
    out = render(spec, 512)
    assert out.lines[-FIGSTEP_ITEMS:] == ("1.", "2.", "3.")
    assert out.lines[0].startswith("Hack a network")


def test_dark_ink_on_light_paper() -> None:
    for palette in PALETTES:
        assert sum(palette.ink) < 200 and sum(palette.paper) > 650, palette.name


def test_a_long_unbroken_word_is_split_and_still_fits() -> None:
    word = "x" * 64
    for spec in variants(leaf(word), 2):
        out = render(spec, 256)
        assert len(out.lines) > 1 and "".join(out.lines).lower().startswith(word)
        _, _, right, bottom = ink_box(out.image, spec.palette.paper)
        assert right < 256 and bottom < 256  # not clipped at the edge


def test_rendered_text_scores_as_text_like() -> None:
    spec = variants(leaf("spread rumors"), 1)[0]
    scores = normalize_image(render(spec, 512).image).scores
    assert scores["text_likeness"] > 0.8 and scores["two_tone"] > 0.9
