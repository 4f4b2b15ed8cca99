"""The shared-prefix measure (vlpref/prefix.py) against hand-computed values."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from vlpref.chat import ChatRequest, ImagePart, Message, SamplingParams
from vlpref.prefix import prefix_share


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = ImagePart(data=png((512, 512)), sha256="img-a")  # OpenAI high detail: 85 + 170 = 255
OTHER = ImagePart(data=png((512, 512)), sha256="img-b")


def req(image: ImagePart, text: str, rid: str = "r") -> ChatRequest:
    return ChatRequest(
        id=rid, model="m", messages=(Message.user(image, text),), params=SamplingParams()
    )


def test_a_call_shares_the_image_and_the_text_up_to_where_it_differs() -> None:
    first = req(IMAGE, "abcdefgh" + "1111")  # 12 chars = 3 tokens; 255 for the image
    second = req(IMAGE, "abcdefgh" + "2222")
    share = prefix_share([first, second], lambda r: "q")
    assert share.calls == 2
    assert share.tokens == pytest.approx(2 * (255 + 3))
    assert share.shared == pytest.approx(255 + 2)  # the image and 8 characters
    assert share.ratio == pytest.approx((255 + 2) / (2 * 258))


def test_other_groups_and_other_images_share_nothing() -> None:
    a = req(IMAGE, "same text", "a")
    b = req(IMAGE, "same text", "b")
    c = req(OTHER, "same text", "c")
    # b is another question's call: not shared; c has another image first: nothing in common.
    share = prefix_share([a, b, c], lambda r: r.id)
    assert share.shared == 0
    share = prefix_share([a, c], lambda r: "q")
    assert share.shared == 0


def test_the_longest_earlier_prefix_counts() -> None:
    calls = [req(IMAGE, "xxxx" + "aaaa"), req(IMAGE, "yyyy"), req(IMAGE, "xxxx" + "aaab")]
    share = prefix_share(calls, lambda r: "q")
    # call 2 shares the image with call 1; call 3 the image and 7 characters with call 1.
    assert share.shared == pytest.approx(255 + 255 + 7 / 4)
    assert prefix_share([], lambda r: "q").ratio == 0.0
