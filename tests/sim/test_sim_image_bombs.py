"""A decompression bomb in a data URL is a client error (400 `image_too_large`), as the API
answers it, never a 500 that clients retry; the sim reads no more than the image's header and
goes on serving (over real HTTP on loopback)."""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from vlpref.sim.testing import SimServer

CONFIG: dict[str, Any] = {"models": {"sim-refuser": {"persona": "refuser"}}}


def png_header(width: int, height: int) -> str:
    """A PNG that claims `width` x `height` (one IHDR, one tiny IDAT, IEND) as a data URL: what
    a bomb shows a server before any pixel is inflated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def small_png() -> str:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(url: str) -> dict[str, Any]:
    parts = [
        {"type": "text", "text": "What is shown?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return {"model": "sim-refuser", "messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(CONFIG) as server:
        yield server


# Past Image.MAX_IMAGE_PIXELS (89,478,485) Pillow warns; past twice that it raises.
BOMBS = {
    "past twice the limit (Pillow raises)": (100_000, 100_000),
    "past the limit (Pillow warns)": (10_000, 9_000),
}


@pytest.mark.parametrize("size", list(BOMBS.values()), ids=list(BOMBS))
def test_a_decompression_bomb_is_a_400_not_a_500(sim: SimServer, size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and size[0] * size[1] > limit
    sim.reset()
    started = time.perf_counter()
    with httpx.Client(timeout=30) as http:
        response = http.post(f"{sim.base_url}/chat/completions", json=body(png_header(*size)))
        elapsed = time.perf_counter() - started
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "image_too_large" and error["param"] == "messages"
        assert "too large" in error["message"] and f"{limit:,}" in error["message"]
        assert elapsed < 5  # the header is read, no pixel is inflated
        # The server goes on serving, and a real image still passes.
        ok = http.post(f"{sim.base_url}/chat/completions", json=body(small_png()))
        assert ok.status_code == 200, ok.text
    counters = sim.counters()
    assert counters["total"] == 2
    statuses = [r["status"] for r in sim.requests_log()]
    assert sorted(statuses) == [200, 400]


def test_the_openai_client_does_not_retry_it(sim: SimServer) -> None:
    """A 400 is final for the official client (a 500 would be retried `max_retries` times)."""
    sim.reset()
    client = openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=3)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body(png_header(100_000, 100_000)))
    client.close()
    assert err.value.code == "image_too_large"
    assert sim.counters()["total"] == 1  # asked once, not retried
