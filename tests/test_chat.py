import base64
import hashlib

import pytest

from vlpref.chat import ImagePart, Message, SamplingParams, TextPart


def test_image_part_hashes_its_bytes_and_builds_a_data_url() -> None:
    data = b"\x89PNG fake bytes"
    part = ImagePart(data=data)
    assert part.sha256 == hashlib.sha256(data).hexdigest()
    prefix = "data:image/png;base64,"
    assert part.as_url().startswith(prefix)
    assert base64.b64decode(part.as_url()[len(prefix) :]) == data


def test_image_part_by_url_is_identified_by_its_url() -> None:
    part = ImagePart(url="https://example.org/a.png")
    assert part.as_url() == "https://example.org/a.png"
    assert part.sha256 == hashlib.sha256(b"https://example.org/a.png").hexdigest()


@pytest.mark.parametrize("kwargs", [{}, {"data": b"x", "url": "http://x"}])
def test_image_part_needs_exactly_one_of_data_or_url(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImagePart(**kwargs)  # type: ignore[arg-type]


def test_message_helpers() -> None:
    image = ImagePart(data=b"img")
    message = Message.user(image, "what is this?", TextPart("be brief"))
    assert message.role == "user"
    assert message.images == (image,)
    assert message.text == "what is this?\nbe brief"


def test_sampling_params_key_excludes_n_and_unset_fields() -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, n=4)
    assert params.keyed() == {"max_tokens": 10, "temperature": 0.0}
    assert SamplingParams(logprobs=True, top_logprobs=5).keyed() == {
        "logprobs": True,
        "top_logprobs": 5,
    }
