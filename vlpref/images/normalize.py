"""Decode, validate and normalise one image, so that the same input always gives the same bytes.

Steps: refuse what is not a plain raster image (empty, unknown format, too many pixels, truncated,
corrupt, a single flat colour); apply the EXIF orientation; convert to sRGB RGB (embedded ICC
profiles honoured, alpha flattened on white, 16-bit scaled to 8-bit); bound the longest side to
`max_side` with LANCZOS; re-encode without any metadata (PNG for lossless inputs and rendered
images, JPEG quality 95 for lossy inputs). `image_id` is the sha256 of the re-encoded bytes.

Every refusal is an `ImageRejected` (a `DataError`) with a short `kind` and a readable reason; no
other exception escapes `normalize_bytes`, whatever the bytes.

Memory: the header is read first (size and mode, no pixel decoded); then the image waits for its
share of the process's decode budget (`PixelBudget`, `pixel_budget` pixels shared by every thread
and branch), holds it while it is decoded, converted, bounded and encoded, and gives it back. An
image counts `width x height x` a factor for its mode (`decode_cost`): an RGB image is held as
4 bytes a pixel and converted in place, an image with alpha or a palette needs about three such
copies to be flattened. One image over the whole budget waits until no other is decoding, then
decodes alone. So a 7,999 x 7,999 PNG of 62 KB (~256 MB decoded) costs its 256 MB once, not
once per worker thread.
"""

from __future__ import annotations

import collections
import hashlib
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from PIL import (
    ExifTags,
    Image,
    ImageCms,
    ImageFilter,
    ImageOps,
    ImageStat,
    UnidentifiedImageError,
)

from vlpref import heap
from vlpref.errors import DataError

__all__ = [
    "ALLOWED_FORMATS",
    "JPEG_QUALITY",
    "Encoding",
    "ImageRejected",
    "NormalizeOptions",
    "NormalizedImage",
    "PixelBudget",
    "decode_budget",
    "decode_cost",
    "image_scores",
    "normalize_bytes",
    "normalize_image",
]

Encoding = Literal["auto", "png", "jpeg"]

# Pillow opens many more formats (EPS runs Ghostscript, others are rarely exercised); a dataset
# needs none of them, and every plugin we do not load is attack surface we do not have.
# (Multi-picture JPEGs, MPO, come in through the JPEG opener.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Re-encoding these as PNG would only store their compression artefacts losslessly.
_LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
JPEG_QUALITY = 95
_WHITE = (255, 255, 255)
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
# Modes flattened on white (alpha, or a palette that may hold transparency).
_FLATTENED = frozenset({"P", "PA", "LA", "La", "RGBa", "RGBA"})
_FLATTEN_STRIP = 1 << 20  # pixels a strip when flattening (16 MB of RGBA)
_TRIM_AFTER = 8_000_000  # budget (RGB pixels, 32 MB) from which a decode gives memory back
# Scores are measured on a thumbnail: cheap, and stable across input sizes.
_SCORE_SIDE = 256


class ImageRejected(DataError):
    """An item that cannot become a dataset image; `kind` is a short machine-readable class."""

    def __init__(self, kind: str, reason: str, *, attempts: int = 1) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.attempts = attempts


@dataclass(frozen=True)
class NormalizeOptions:
    """Limits and output encoding; `ImagesStage` carries the same fields."""

    max_side: int = 1024
    min_side: int = 32
    max_pixels: int = 64_000_000
    encoding: Encoding = "auto"
    pixel_budget: int = 64_000_000  # pixels decoding at once in this process (see the module doc)


@dataclass(frozen=True)
class NormalizedImage:
    """A normalised image: its bytes, id, size, where it came from and what was measured."""

    image_id: str
    data: bytes
    format: Literal["png", "jpeg"]
    width: int
    height: int
    original: dict[str, Any]
    scores: dict[str, float]

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else "png"

    @property
    def image_name(self) -> str:
        """SPA-VL's `image_name`: `<image_id[:16]>.<ext>`."""
        return f"{self.image_id[:16]}.{self.extension}"


def normalize_bytes(data: bytes, options: NormalizeOptions | None = None) -> NormalizedImage:
    """Decode and normalise encoded image bytes; raises `ImageRejected` for anything unusable."""
    options = options or NormalizeOptions()
    if not data:
        raise ImageRejected("empty", "zero bytes")
    original: dict[str, Any] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    with _rejecting():
        size, mode, icc = _probe(data, options, original)
    lossy = original["format"] in _LOSSY_FORMATS
    cost = decode_cost(size, mode, icc=icc)
    # The decoded pixels live until the output is encoded: the budget is held that long.
    with decode_budget(options.pixel_budget).hold(cost):
        result = _decode_and_finish(data, options, original, lossy=lossy)
        if cost >= _TRIM_AFTER:
            # Its copies are freed now; without a trim glibc keeps them in the arena of the
            # thread that decoded, and the next large image, decoded by another thread, adds
            # its own (measured: 4 threads one after another, +395 MB instead of +280).
            heap.trim()
    return result


def _decode_and_finish(
    data: bytes, options: NormalizeOptions, original: dict[str, Any], *, lossy: bool
) -> NormalizedImage:
    with _rejecting():
        image = _load(data, original)
    return _finish(image, options, original, lossy=lossy)


@contextmanager
def _rejecting() -> Iterator[None]:
    """Whatever Pillow raises on hostile bytes becomes an `ImageRejected`."""
    try:
        yield
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("bomb", f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        allowed = ", ".join(ALLOWED_FORMATS)
        raise ImageRejected(
            "not_image", f"not an image, or an invalid header (e.g. zero size); known: {allowed}"
        ) from None
    except Exception as exc:  # Pillow raises many types on hostile input; all mean "corrupt".
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageRejected(kind, _describe(exc)) from None


def normalize_image(
    image: Image.Image, options: NormalizeOptions | None = None, *, lossy: bool = False
) -> NormalizedImage:
    """Normalise an image already in memory (a rendered one); `auto` encodes it as PNG."""
    options = options or NormalizeOptions()
    original: dict[str, Any] = {
        "format": None,
        "width": image.width,
        "height": image.height,
        "mode": image.mode,
    }
    try:
        prepared = _to_rgb(image, original)
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected("corrupt", _describe(exc)) from None
    return _finish(prepared, options, original, lossy=lossy)


def image_scores(image: Image.Image) -> dict[str, float]:
    """Cheap content measures of an RGB image, stored as `filter_scores`.

    `two_tone`: share of pixels in the two most common of 32 luminance bins (flat graphics and
    text on a plain background score near 1, photos far lower). `edge_density`: share of pixels on
    a strong edge. `text_likeness` = two_tone × min(1, edge_density / 0.03): high only for a
    two-tone image with many sharp strokes. A heuristic, not OCR: it tells typographic images
    from photos, which is what SPA-VL's OCR text count was used for.
    """
    gray = image.convert("L")
    gray.thumbnail((_SCORE_SIDE, _SCORE_SIDE), Image.Resampling.BOX)
    total = gray.width * gray.height
    hist = gray.histogram()
    bins = sorted(sum(hist[i : i + 8]) for i in range(0, 256, 8))
    two_tone = (bins[-1] + bins[-2]) / total
    edges = gray.filter(ImageFilter.FIND_EDGES).histogram()
    edge_density = sum(edges[64:]) / total
    stat = ImageStat.Stat(gray)
    return {
        "two_tone": round(two_tone, 4),
        "edge_density": round(edge_density, 4),
        "text_likeness": round(two_tone * min(1.0, edge_density / 0.03), 4),
        "luma_mean": round(stat.mean[0], 2),
        "luma_std": round(stat.stddev[0], 2),
    }


# --------------------------------------------------------------------------- decode budget

# Full-size copies, in units of 4 bytes a pixel (RGB as Pillow stores it), that converting an
# image of this mode to RGB holds at its peak (Pillow keeps 1, L and P in 1 byte a pixel, I;16 in
# 2, every other mode in 4). RGB: the decoded image is the output. 1, L, P: the source and the
# RGB output. Alpha: the source and the output (flattened strip by strip). 16-bit: the source,
# its 32-bit form and the scaled one. CMYK, YCbCr, LAB, I, F: the source and the conversion.
# An embedded ICC profile adds the converted copy.
_COPIES = {"RGB": 1.0, "RGBX": 1.0, "1": 1.25, "L": 1.25, "P": 1.25}
_OTHER_COPIES = 2.0
_SIXTEEN_BIT_COPIES = 2.5


def decode_cost(size: tuple[int, int], mode: str, *, icc: bool = False) -> int:
    """What decoding an image of this size and mode takes from the budget, in RGB pixels."""
    pixels = size[0] * size[1]
    if mode in _COPIES:
        factor = _COPIES[mode]
    elif mode.startswith("I;16"):
        factor = _SIXTEEN_BIT_COPIES
    else:
        factor = _OTHER_COPIES
    return int(pixels * (factor + (1.0 if icc else 0.0)))


class PixelBudget:
    """Pixels being decoded at once, shared by threads; first come, first served.

    `hold(n)` waits until `n` more pixels fit (`n` over the capacity waits for an empty budget
    and then takes all of it), and gives them back on exit. Waiters are served in arrival order,
    so a large image is not starved by a stream of small ones.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a pixel budget needs a positive capacity")
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most ever held at once (for tests and measurements)
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        amount = max(1, min(pixels, self.capacity))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(
                    lambda: self._queue[0] is ticket and self.used + amount <= self.capacity
                )
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            self.used += amount
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= amount
                self._cond.notify_all()


_BUDGETS: dict[int, PixelBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def decode_budget(capacity: int) -> PixelBudget:
    """The process's budget of this capacity: every branch and thread with it shares one."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(capacity)
        if budget is None:
            budget = _BUDGETS[capacity] = PixelBudget(capacity)
        return budget


# --------------------------------------------------------------------------- decoding


def _probe(
    data: bytes, options: NormalizeOptions, original: dict[str, Any]
) -> tuple[tuple[int, int], str, bool]:
    """The header only (size check before any pixel is decoded), then verify().

    Returns the size, the mode and whether an ICC profile is embedded."""
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
        original["format"] = probe.format
        original["width"], original["height"] = probe.size
        original["mode"] = probe.mode
        _check_pixels(probe.size, options)
        icc = bool(probe.info.get("icc_profile"))
        probe.verify()
        return probe.size, probe.mode, icc


def _load(data: bytes, original: dict[str, Any]) -> Image.Image:
    # verify() left the probe unusable; decode again for real. load() raises on truncation.
    # Not closed here: an RGB image is returned as it is (no copy), and closing would free it.
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        original["frames"] = frames  # the first frame is kept
    image.load()
    return _to_rgb(image, original)


def _check_pixels(size: tuple[int, int], options: NormalizeOptions) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected("empty", f"zero-size image ({width}x{height})")
    if width * height > options.max_pixels:
        raise ImageRejected(
            "bomb",
            f"{width}x{height} = {width * height} pixels is over the limit of {options.max_pixels}",
        )


def _to_rgb(image: Image.Image, original: dict[str, Any]) -> Image.Image:
    """EXIF orientation, then 8-bit sRGB RGB with alpha flattened on white."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        # Only an image that needs turning is copied (a full-size copy is what memory is short of).
        out = image if orientation == 1 else ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not cost an otherwise good image
        original["exif"] = f"ignored: {_describe(exc)}"
        orientation, out = 1, image
    if orientation != 1:
        original["exif_orientation"] = orientation
    icc = image.info.get("icc_profile")
    out = _eight_bit(out)
    if out.mode in _FLATTENED:
        out = _flatten(out)
    if icc and out.mode in ("RGB", "CMYK", "L"):
        out, original["icc"] = _to_srgb(out, icc)
    if out.mode == "LAB":  # Pillow's plain convert would copy the channels, not convert colour
        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        out = ImageCms.applyTransform(out, lab_to_srgb) or out
    if out.mode != "RGB":
        try:
            out = out.convert("RGB")
        except ValueError:
            raise ImageRejected("unsupported", f"cannot convert mode {out.mode} to RGB") from None
    out.info = {}  # nothing of the source's metadata may reach the encoder
    return out


def _flatten(image: Image.Image) -> Image.Image:
    """As RGBA composited on white, then RGB; strip by strip, so that only the source and the
    output are held at full size (the result is the same, pixel for pixel: each step is)."""
    out = Image.new("RGB", image.size, _WHITE)
    step = max(1, _FLATTEN_STRIP // max(1, image.width))
    for top in range(0, image.height, step):
        box = (0, top, image.width, min(image.height, top + step))
        strip = image.crop(box)  # keeps the palette and the transparency
        if strip.mode != "RGBA":
            strip = strip.convert("RGBA")
        background = Image.new("RGBA", strip.size, (*_WHITE, 255))
        out.paste(Image.alpha_composite(background, strip).convert("RGB"), box[:2])
    return out


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 8-bit grey (Pillow's own convert would clip them)."""
    if image.mode in _SIXTEEN_BIT:
        wide = image.convert("I")
        low, high = wide.getextrema()
        assert isinstance(high, int | float)
        scale = 1 / 256 if high > 255 else 1.0
        return wide.point(lambda v: v * scale).convert("L")
    if image.mode == "F":
        low, high = image.getextrema()
        assert isinstance(low, int | float) and isinstance(high, int | float)
        span = (high - low) or 1.0
        return image.point(lambda v: (v - low) * 255.0 / span).convert("L")
    return image


def _to_srgb(image: Image.Image, icc: bytes) -> tuple[Image.Image, str]:
    """Convert through the embedded ICC profile; a broken profile is ignored, and recorded."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = ImageCms.getProfileDescription(source).strip()
        if description.lower().startswith("srgb"):
            return image, "srgb"  # already the target space; skip a needless transform
        target = ImageCms.createProfile("sRGB")
        converted = ImageCms.profileToProfile(image, source, target, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        return image, f"ignored: {_describe(exc)}"
    assert converted is not None
    return converted, f"converted from {description or 'unnamed profile'}"


# --------------------------------------------------------------------------- output


def _finish(
    image: Image.Image, options: NormalizeOptions, original: dict[str, Any], *, lossy: bool
) -> NormalizedImage:
    image = _bound(image, options.max_side)
    if min(image.size) < options.min_side:
        raise ImageRejected(
            "too_small",
            f"{image.width}x{image.height} after bounding to {options.max_side}: "
            f"a side is under {options.min_side} pixels",
        )
    if all(isinstance(band, tuple) and band[0] == band[1] for band in image.getextrema()):
        raise ImageRejected("blank", "the image is a single flat colour")
    auto: Literal["png", "jpeg"] = "jpeg" if lossy else "png"
    fmt = auto if options.encoding == "auto" else options.encoding
    data = _encode(image, fmt)
    scores: dict[str, float] = {
        "width": image.width,
        "height": image.height,
        "aspect_ratio": round(image.width / image.height, 4),
        "resized": float(image.size != (original.get("width"), original.get("height"))),
        **image_scores(image),
    }
    return NormalizedImage(
        image_id=hashlib.sha256(data).hexdigest(),
        data=data,
        format=fmt,
        width=image.width,
        height=image.height,
        original=original,
        scores=scores,
    )


def _bound(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _encode(image: Image.Image, fmt: Literal["png", "jpeg"]) -> bytes:
    buffer = io.BytesIO()
    image.info = {}
    if fmt == "png":
        image.save(buffer, "PNG", optimize=False, compress_level=6)
    else:
        # 4:4:4 chroma: re-encoding should not halve colour resolution again.
        image.save(
            buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False, progressive=False
        )
    return buffer.getvalue()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
