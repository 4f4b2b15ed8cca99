"""Real-looking test pictures drawn with Pillow, and the edits that make near-copies of them.

A scene is a gradient background with a dozen shapes and a line of text, all from a seed:
structure at every scale, like a photo or a poster, and never a flat colour (a flat image would
test nothing: every hash of it agrees). Distinct seeds share the generator's style, which makes
"distinct images must not match" a fair test rather than an easy one.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

SIZE = (480, 360)


def scene(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    rng = random.Random(seed)
    width, height = size
    top = [rng.randrange(256) for _ in range(3)]
    bottom = [rng.randrange(256) for _ in range(3)]
    gradient = Image.linear_gradient("L").resize(size)
    if rng.random() < 0.5:
        gradient = gradient.transpose(Image.Transpose.ROTATE_90).resize(size)
    image = Image.composite(
        Image.new("RGB", size, tuple(bottom)), Image.new("RGB", size, tuple(top)), gradient
    )
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randrange(20, width // 2))
        y1 = min(height, y0 + rng.randrange(20, height // 2))
        shape = rng.choice(("ellipse", "rectangle", "polygon", "line"))
        if shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0))
        elif shape == "polygon":
            points = [
                (rng.randrange(width), rng.randrange(height)) for _ in range(rng.randint(3, 6))
            ]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randint(2, 9))
    font = ImageFont.load_default(size=rng.randint(22, 40))
    words = " ".join(rng.choice(("SAFE", "KEY", "LOCK", "ALERT", "MAP", "CODE")) for _ in range(3))
    draw.text(
        (rng.randrange(10, width // 3), rng.randrange(10, height - 50)),
        words,
        font=font,
        fill=(255, 255, 255),
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def resized(scale: float) -> Callable[[Image.Image], Image.Image]:
    def edit(image: Image.Image) -> Image.Image:
        size = (round(image.width * scale), round(image.height * scale))
        return image.resize(size, Image.Resampling.BILINEAR)

    return edit


def cropped(share: float) -> Callable[[Image.Image], Image.Image]:
    """`share` of each side cut off (so 0.05 keeps the middle 90% of width and height)."""

    def edit(image: Image.Image) -> Image.Image:
        dx, dy = round(image.width * share), round(image.height * share)
        return image.crop((dx, dy, image.width - dx, image.height - dy))

    return edit


def brighter(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: ImageEnhance.Brightness(image).enhance(factor)


def saturated(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: ImageEnhance.Color(image).enhance(factor)


def tinted(rgb: tuple[int, int, int]) -> Callable[[Image.Image], Image.Image]:
    """Every channel shifted by a constant (a colour cast), clipped to 0..255."""

    def edit(image: Image.Image) -> Image.Image:
        bands = [
            band.point(lambda v, d=d: max(0, min(255, v + d)))
            for band, d in zip(image.split(), rgb, strict=True)
        ]
        return Image.merge("RGB", bands)

    return edit


def jpeg(quality: int) -> Callable[[Image.Image], bytes]:
    return lambda image: encode(image, "JPEG", quality=quality)


# name -> (edit of the pixels, encoding of the result): the copies a crawl or a re-upload makes.
EDITS: dict[str, tuple[Callable[[Image.Image], Image.Image], Callable[[Image.Image], bytes]]] = {
    "resize 0.5": (resized(0.5), encode),
    "resize 0.75": (resized(0.75), encode),
    "resize 1.6": (resized(1.6), encode),
    "jpeg q30": (lambda i: i, jpeg(30)),
    "jpeg q60": (lambda i: i, jpeg(60)),
    "jpeg q90": (lambda i: i, jpeg(90)),
    "crop 2%": (cropped(0.02), encode),
    "brightness +15%": (brighter(1.15), encode),
    "brightness -15%": (brighter(0.85), encode),
    "saturation x1.4": (saturated(1.4), encode),
    "tint +20 red": (tinted((20, 0, -10)), encode),
    "resize 0.6 + jpeg q50": (resized(0.6), jpeg(50)),
}

# Edits the hash catches only sometimes at the default distance (measured over 40 scenes: 30 and
# 38 of 40): cropping moves every frequency the hash keeps.
HARDER: dict[str, tuple[Callable[[Image.Image], Image.Image], Callable[[Image.Image], bytes]]] = {
    "crop 5%": (cropped(0.05), encode),
    "crop 3% + tint + jpeg q70": (lambda i: tinted((0, 12, 12))(cropped(0.03)(i)), jpeg(70)),
}
