"""Typographic images: a subcategory's key phrase drawn as text, the MM-SafetyBench/FigStep way.

MM-SafetyBench renders the harmful key phrase as large dark text on a light background; FigStep
renders an instruction turned statement followed by an empty numbered list ("1. 2. 3.") for the
model to fill in. Either way the image, not the prompt, carries the harm. Here a branch gets
`per_branch` variants that differ in text (the key phrase, then each keyword), layout (`centred`
or `figstep`) and palette, so they normalise to distinct images. Once every text × layout ×
palette combination has been drawn, the next rounds move the text block by half a margin (right,
down, left, up, then the diagonals), so a branch with few keywords still gets hundreds of
distinct images: 9 placements × the combinations (a SPA-VL-sized run needs ~190 per branch).

The font is Pillow's bundled Aileron Regular (`ImageFont.load_default(size=...)`, FreeType
required), drawn with a same-colour stroke to make it bold; the layout engine is pinned to BASIC so
the pixels do not depend on whether libraqm is installed. Same variant, same size, same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from vlpref.errors import DataError
from vlpref.taxonomy import Subcategory

__all__ = [
    "FIGSTEP_ITEMS",
    "FONT_NAME",
    "LAYOUTS",
    "OFFSETS",
    "PALETTES",
    "RENDERER",
    "Palette",
    "Rendered",
    "TypographicVariant",
    "render",
    "variants",
]

RENDERER = "vlpref-typographic/2"  # bump when the pixels for a given variant change
FONT_NAME = "Pillow load_default (Aileron Regular)"
FIGSTEP_ITEMS = 3

Layout = Literal["centred", "figstep"]
LAYOUTS: tuple[Layout, ...] = ("centred", "figstep")


@dataclass(frozen=True)
class Palette:
    name: str
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]


# Where the text block sits, in half-margins from its place: one per round of combinations. The
# margin is at least 8 px and a twelfth of the canvas, so a half-margin shift stays inside it.
OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (1, 0),
    (0, 1),
    (-1, 0),
    (0, -1),
    (1, 1),
    (-1, 1),
    (1, -1),
    (-1, -1),
)

# Dark ink on light paper only: contrast stays high whichever palette a variant gets.
PALETTES: tuple[Palette, ...] = (
    Palette("black-on-white", (0, 0, 0), (255, 255, 255)),
    Palette("navy-on-cream", (20, 24, 70), (250, 246, 232)),
    Palette("maroon-on-ivory", (92, 14, 24), (255, 251, 240)),
    Palette("charcoal-on-grey", (30, 30, 30), (228, 228, 228)),
    Palette("green-on-mint", (8, 58, 30), (230, 246, 236)),
    Palette("brown-on-sand", (62, 36, 14), (244, 235, 218)),
)


@dataclass(frozen=True)
class TypographicVariant:
    """What one typographic image shows: text, layout, palette, and where the text sits."""

    index: int
    text: str
    layout: Layout
    palette: Palette
    offset: tuple[int, int] = (0, 0)  # in half-margins; see OFFSETS


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    font_size: int
    lines: tuple[str, ...]


def variants(leaf: Subcategory, count: int) -> list[TypographicVariant]:
    """The first `count` variants of a branch, in a fixed order.

    Texts are the key phrase then the keywords (case-insensitive duplicates dropped); variant i
    takes text and layout from i mod (2 × texts) and shifts the palette every round, so all
    texts × layouts × palettes combinations come out distinct before any repeats; each later
    pass over the combinations takes the next placement from OFFSETS. Past combinations ×
    placements, variants repeat and the stage counts them as duplicates.
    """
    seen: set[str] = set()
    unique: list[str] = []
    for text in (leaf.key_phrase, *leaf.keywords):
        if text.casefold() not in seen:
            seen.add(text.casefold())
            unique.append(text)
    per_round = len(unique) * len(LAYOUTS)
    combinations = per_round * len(PALETTES)
    out: list[TypographicVariant] = []
    for i in range(count):
        j, round_ = i % per_round, i // per_round
        out.append(
            TypographicVariant(
                index=i,
                text=unique[j // len(LAYOUTS)],
                layout=LAYOUTS[j % len(LAYOUTS)],
                palette=PALETTES[(j + round_) % len(PALETTES)],
                offset=OFFSETS[(i // combinations) % len(OFFSETS)],
            )
        )
    return out


def render(variant: TypographicVariant, size: int) -> Rendered:
    """Draw a variant on a `size`×`size` canvas, with the largest font that fits."""
    margin = max(8, size // 12)
    box_w, box_h = size - 2 * margin, size - 2 * margin
    lo, hi = max(10, size // 32), max(12, size // 6)
    fitted = _fit(variant, box_w, box_h, lo, hi)
    image = Image.new("RGB", (size, size), variant.palette.paper)
    draw = ImageDraw.Draw(image)
    font, lines, heading_lines = fitted
    stroke = _stroke(font)
    ascent, descent = font.getmetrics()
    line_h = round((ascent + descent) * 1.15)
    item_h = round(line_h * 1.6)  # FigStep leaves room under each list number
    block_h = _block_height(len(lines), heading_lines, line_h, item_h)
    shift_x, shift_y = (step * (margin // 2) for step in variant.offset)
    top = margin if variant.layout == "figstep" else (size - block_h) // 2
    y = top + shift_y
    for n, line in enumerate(lines):
        width = round(font.getlength(line)) + 2 * stroke
        x = shift_x + (margin if variant.layout == "figstep" else (size - width) // 2)
        draw.text(
            (x + stroke, y + ascent),
            line,
            font=font,
            fill=variant.palette.ink,
            anchor="ls",
            stroke_width=stroke,
            stroke_fill=variant.palette.ink,
        )
        y += line_h if n < heading_lines else item_h
    return Rendered(image=image, font_size=int(font.size), lines=tuple(lines))


def _font(size: int) -> ImageFont.FreeTypeFont:
    # A fresh object per call: FreeType faces must not be shared between threads.
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise DataError("Pillow was built without FreeType; typographic images need it")
    return font.font_variant(layout_engine=ImageFont.Layout.BASIC)


def _stroke(font: ImageFont.FreeTypeFont) -> int:
    return max(1, round(font.size / 28))


def _lines(variant: TypographicVariant, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    if variant.layout == "centred":
        return _wrap(variant.text, font, width)
    heading = variant.text[:1].upper() + variant.text[1:] + ":"
    return [*_wrap(heading, font, width), *(f"{n}." for n in range(1, FIGSTEP_ITEMS + 1))]


def _block_height(n_lines: int, heading_lines: int, line_h: int, item_h: int) -> int:
    items = n_lines - heading_lines
    return heading_lines * line_h + items * item_h


def _fit(
    variant: TypographicVariant, box_w: int, box_h: int, lo: int, hi: int
) -> tuple[ImageFont.FreeTypeFont, list[str], int]:
    """Largest font size in [lo, hi] whose wrapped text fits the box (binary search)."""
    best: tuple[ImageFont.FreeTypeFont, list[str], int] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        font = _font(mid)
        stroke = _stroke(font)
        lines = _lines(variant, font, box_w - 2 * stroke)
        heading = len(lines) - (FIGSTEP_ITEMS if variant.layout == "figstep" else 0)
        ascent, descent = font.getmetrics()
        line_h = round((ascent + descent) * 1.15)
        height = _block_height(len(lines), heading, line_h, round(line_h * 1.6))
        widest = max(font.getlength(line) for line in lines) + 2 * stroke
        if height <= box_h and widest <= box_w:
            best, lo = (font, lines, heading), mid + 1
        else:
            hi = mid - 1
    if best is None:  # even the smallest size overflows: draw it anyway, clipped, but legible
        font = _font(lo)
        lines = _lines(variant, font, box_w - 2 * _stroke(font))
        heading = len(lines) - (FIGSTEP_ITEMS if variant.layout == "figstep" else 0)
        best = (font, lines, heading)
    return best


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap by pixel width; a word wider than a line is split by characters."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and font.getlength(current + char) > width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines or [""]
