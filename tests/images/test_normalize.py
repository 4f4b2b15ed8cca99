import concurrent.futures
import contextlib
import hashlib
import io
import random
import struct
import threading
import time
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops, ImageCms, ImageStat

from vlpref.errors import DataError
from vlpref.images.normalize import (
    ImageRejected,
    NormalizedImage,
    NormalizeOptions,
    PixelBudget,
    decode_budget,
    decode_cost,
    normalize_bytes,
    normalize_image,
)


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    rng = random.Random(seed)
    image = Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * bands))
    if mode == "P":
        image.putpalette(rng.randbytes(768))
    return image


def halves(size: tuple[int, int], left: Any, right: Any, mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another: easy to check after rotation."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(result: NormalizedImage) -> Image.Image:
    image = Image.open(io.BytesIO(result.data))
    image.load()
    return image


def rejected(data: bytes, options: NormalizeOptions | None = None) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        normalize_bytes(data, options)
    return info.value


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims any size; the pixel data is a token few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_same_input_gives_same_bytes_and_id(fmt: str) -> None:
    data = encode(noise((300, 200)), fmt)
    a, b = normalize_bytes(data), normalize_bytes(data)
    assert a.data == b.data
    assert a.image_id == b.image_id == hashlib.sha256(a.data).hexdigest()
    assert a.image_name == f"{a.image_id[:16]}.{a.extension}"
    assert a.original["sha256"] == hashlib.sha256(data).hexdigest()


def test_encoding_follows_the_input_unless_forced() -> None:
    image = noise((120, 80))
    jpeg, png = normalize_bytes(encode(image, "JPEG")), normalize_bytes(encode(image, "PNG"))
    assert (jpeg.format, jpeg.extension, decode(jpeg).format) == ("jpeg", "jpg", "JPEG")
    assert (png.format, png.extension, decode(png).format) == ("png", "png", "PNG")
    forced = normalize_bytes(encode(image, "PNG"), NormalizeOptions(encoding="jpeg"))
    assert forced.format == "jpeg"
    # Lossless in, lossless out: the pixels survive exactly.
    assert decode(png).tobytes() == image.tobytes()


def test_no_metadata_reaches_the_output() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCamera"  # Make
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(noise((64, 64)), "JPEG", exif=exif, icc_profile=srgb, comment=b"hello")
    out = normalize_bytes(data)
    info = decode(out).info
    assert not {"exif", "icc_profile", "comment"} & set(info)
    assert b"SecretCamera" not in out.data and b"hello" not in out.data
    assert out.original["icc"] == "srgb"


def test_a_broken_icc_profile_is_ignored_and_recorded() -> None:
    data = encode(noise((64, 64)), "PNG", icc_profile=b"not a profile at all")
    out = normalize_bytes(data)
    assert out.original["icc"].startswith("ignored")
    assert decode(out).tobytes() == noise((64, 64)).tobytes()


# --------------------------------------------------------------------------- modes


def test_rgba_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # transparent red: must become white
    image.paste((0, 0, 255, 255), (0, 0, 32, 64))
    out = decode(normalize_bytes(encode(image, "PNG")))
    assert out.mode == "RGB"
    assert out.getpixel((48, 10)) == (255, 255, 255)
    assert out.getpixel((10, 10)) == (0, 0, 255)


def test_half_transparent_pixels_blend_with_white() -> None:
    image = halves((64, 64), (0, 0, 0, 128), (0, 0, 0, 255), mode="RGBA")
    out = decode(normalize_bytes(encode(image, "PNG")))
    pixel = out.getpixel((5, 5))
    assert isinstance(pixel, tuple)
    assert all(abs(v - 127) <= 1 for v in pixel)


def test_palette_with_transparency() -> None:
    image = halves((64, 64), 0, 1, mode="P")
    image.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    out = decode(normalize_bytes(encode(image, "PNG", transparency=0)))
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((60, 5)) == (0, 200, 0)


def test_grey_and_la_become_rgb() -> None:
    grey = decode(normalize_bytes(encode(halves((64, 64), 30, 220, mode="L"), "PNG")))
    assert grey.mode == "RGB" and grey.getpixel((5, 5)) == (30, 30, 30)
    la = decode(normalize_bytes(encode(halves((64, 64), (0, 0), (0, 255), mode="LA"), "PNG")))
    assert la.getpixel((5, 5)) == (255, 255, 255) and la.getpixel((60, 5)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colours() -> None:
    image = halves((64, 64), (255, 0, 0, 0), (0, 255, 255, 0), mode="CMYK")  # cyan | red
    out = normalize_bytes(encode(image, "JPEG", quality=95))
    assert out.original["mode"] == "CMYK"
    rgb = decode(out)
    left, right = rgb.getpixel((5, 32)), rgb.getpixel((58, 32))
    assert isinstance(left, tuple) and isinstance(right, tuple)
    assert left[0] < 40 and left[1] > 215 and left[2] > 215
    assert right[0] > 215 and right[1] < 40 and right[2] < 40


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("I").point(lambda v: v * 256)
    out = decode(normalize_bytes(encode(ramp.convert("I;16"), "PNG")))
    low, high = out.convert("L").getextrema()
    assert isinstance(high, int) and isinstance(low, int) and high > 240 and low < 8


def test_float_images_are_stretched_to_eight_bits() -> None:
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("F").point(lambda v: v / 255.0)
    out = decode(normalize_bytes(encode(ramp, "TIFF")))
    assert out.convert("L").getextrema() == (0, 255)


def test_lab_is_converted_as_colour() -> None:
    lab = Image.new("LAB", (64, 64), (138, 209, 198))  # sRGB red, in Pillow's LAB encoding
    lab.paste((255, 128, 128), (0, 0, 32, 64))  # L=100, a=b=0: white
    out = decode(normalize_bytes(encode(lab, "TIFF")))
    red, white = out.getpixel((60, 5)), out.getpixel((5, 5))
    assert isinstance(red, tuple) and isinstance(white, tuple)
    assert red[0] > 235 and red[1] < 30 and red[2] < 30
    assert min(white) > 245


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    image = halves((80, 40), (0, 0, 0), (255, 255, 255))  # dark left, light right
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90° clockwise to display
    out = normalize_bytes(encode(image, fmt, exif=exif))
    rotated = decode(out)
    assert (rotated.width, rotated.height) == (40, 80)
    assert out.original["exif_orientation"] == 6
    expected = image.transpose(Image.Transpose.ROTATE_270)
    diff = ImageStat.Stat(ImageChops.difference(rotated, expected).convert("L")).mean[0]
    assert diff < 4
    assert "exif" not in rotated.info  # the orientation tag is not left to be applied twice


def test_first_frame_of_an_animation() -> None:
    frames = [halves((64, 64), 10, 200, mode="L"), halves((64, 64), 200, 10, mode="L")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = normalize_bytes(data)
    assert out.original["frames"] == 2
    assert decode(out).getpixel((5, 5)) == (10, 10, 10)


@given(
    mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"]),
    width=st.integers(32, 90),
    height=st.integers(32, 90),
    seed=st.integers(0, 1000),
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_supported_input_normalises_deterministically(
    mode: str, width: int, height: int, seed: int, fmt: str
) -> None:
    image = noise((width, height), mode, seed)
    try:
        data = encode(image, fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: nothing to normalise
    a, b = normalize_bytes(data), normalize_bytes(data)
    assert a.data == b.data and a.image_id == b.image_id
    out = decode(a)
    assert out.mode == "RGB" and (out.width, out.height) == (width, height)


# --------------------------------------------------------------------------- size


def test_oversized_images_are_bounded_with_aspect_kept() -> None:
    out = normalize_bytes(encode(noise((3000, 1000)), "PNG"), NormalizeOptions(max_side=1024))
    assert (out.width, out.height) == (1024, 341)
    assert out.scores["resized"] == 1.0
    assert (out.original["width"], out.original["height"]) == (3000, 1000)
    assert decode(out).size == (1024, 341)


def test_small_images_are_not_upscaled() -> None:
    out = normalize_bytes(encode(noise((100, 50)), "PNG"))
    assert (out.width, out.height) == (100, 50) and out.scores["resized"] == 0.0


def test_filter_scores_are_recorded() -> None:
    out = normalize_bytes(encode(noise((100, 50)), "PNG"))
    assert {"width", "height", "aspect_ratio", "text_likeness", "two_tone", "edge_density"} <= set(
        out.scores
    )
    assert out.scores["width"] == 100 and out.scores["aspect_ratio"] == 2.0


@pytest.mark.parametrize("size", [(20, 20), (2000, 40)])
def test_too_small_after_bounding(size: tuple[int, int]) -> None:
    error = rejected(encode(noise(size), "PNG"))
    assert error.kind == "too_small" and "under 32" in error.reason


def test_a_flat_colour_is_rejected() -> None:
    assert rejected(encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")).kind == "blank"


# --------------------------------------------------------------------------- refusals


def test_decompression_bombs_are_refused_before_decoding() -> None:
    huge = rejected(png_with_header(100_000, 100_000))
    assert huge.kind == "bomb"
    over_limit = rejected(png_with_header(9000, 9000))  # under Pillow's own limit, over ours
    assert over_limit.kind == "bomb" and "81000000 pixels" in over_limit.reason
    small_limit = rejected(encode(noise((300, 300)), "PNG"), NormalizeOptions(max_pixels=10_000))
    assert small_limit.kind == "bomb"


def test_zero_size_and_empty() -> None:
    assert rejected(b"").kind == "empty"
    zero = rejected(png_with_header(0, 10))
    assert zero.kind == "not_image" and "zero size" in zero.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = encode(noise((200, 200)), fmt)
    error = rejected(data[: len(data) // 2])
    assert error.kind in ("truncated", "corrupt")
    assert "runcated" in error.reason


def test_corrupt_png_checksum_is_refused() -> None:
    data = bytearray(encode(noise((64, 64)), "PNG"))
    data[len(data) // 2] ^= 0xFF  # inside IDAT: the CRC no longer matches
    assert rejected(bytes(data)).kind == "corrupt"


@pytest.mark.parametrize(
    "data",
    [b"hello, world", b"<html><body>404</body></html>", b"%PDF-1.4\n", b"\x89PNG\r\n\x1a\n"],
)
def test_non_images_are_refused(data: bytes) -> None:
    error = rejected(data)
    assert error.kind in ("not_image", "corrupt", "truncated")
    assert isinstance(error, DataError)


def test_formats_outside_the_allow_list_are_refused() -> None:
    # PPM and EPS open in Pillow, but are not accepted (EPS would run Ghostscript).
    assert rejected(encode(noise((64, 64)), "PPM")).kind == "not_image"
    assert rejected(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n").kind == "not_image"


@given(st.binary(max_size=512))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        normalize_bytes(data)
    except ImageRejected as exc:
        assert exc.kind and exc.reason


@given(st.binary(min_size=1, max_size=64), st.integers(0, 10_000))
@settings(max_examples=100, deadline=None)
def test_damaged_real_images_never_raise_anything_else(patch: bytes, at: int) -> None:
    data = bytearray(encode(noise((48, 48)), "PNG"))
    at %= len(data)
    data[at : at + len(patch)] = patch
    with contextlib.suppress(ImageRejected):
        normalize_bytes(bytes(data))


def test_normalize_image_from_memory_is_png() -> None:
    out = normalize_image(noise((80, 80), "RGBA"))
    assert out.format == "png" and out.original["format"] is None
    assert normalize_image(noise((80, 80), "RGBA")).image_id == out.image_id


# --------------------------------------------------------------------------- decode budget


def test_decode_cost_counts_the_full_size_copies_a_mode_needs() -> None:
    assert decode_cost((1000, 1000), "RGB") == 1_000_000
    assert decode_cost((1000, 1000), "L") == decode_cost((1000, 1000), "P") == 1_250_000
    assert decode_cost((1000, 1000), "RGBA") == decode_cost((1000, 1000), "CMYK") == 2_000_000
    assert decode_cost((1000, 1000), "I;16") == 2_500_000
    assert decode_cost((1000, 1000), "RGB", icc=True) == 2_000_000


def test_the_budget_holds_back_what_does_not_fit_first_come_first_served() -> None:
    budget = PixelBudget(100)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def hold(name: str, pixels: int, wait_for: threading.Event | None = None) -> None:
        with budget.hold(pixels):
            order.append(name)
            if wait_for is not None:
                first_in.set()
                wait_for.wait(5)

    a = threading.Thread(target=hold, args=("a", 60, release_first))
    a.start()
    assert first_in.wait(5)
    b = threading.Thread(target=hold, args=("big", 500))  # over the capacity: waits for empty
    b.start()
    time.sleep(0.05)
    c = threading.Thread(target=hold, args=("c", 10))  # would fit, but arrived after "big"
    c.start()
    time.sleep(0.05)
    assert order == ["a"] and budget.used == 60
    release_first.set()
    for thread in (a, b, c):
        thread.join(5)
    assert order == ["a", "big", "c"]
    assert budget.used == 0 and budget.peak == 100


def test_normalising_threads_share_the_process_budget() -> None:
    capacity = 250_000  # a capacity no other test uses: its own budget
    data = [encode(noise((300, 300), seed=i), "PNG") for i in range(8)]  # 90,000 pixels each
    options = NormalizeOptions(pixel_budget=capacity)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda d: normalize_bytes(d, options), data))
    assert len({r.image_id for r in results}) == 8
    budget = decode_budget(capacity)
    assert 90_000 <= budget.peak <= capacity and budget.used == 0
    assert decode_budget(capacity) is budget  # one per capacity, shared
