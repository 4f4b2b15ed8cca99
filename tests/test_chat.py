import base64
import hashlib
from typing import Any

import pytest

from vlpref.chat import (
    ImagePart,
    Message,
    OutputConstraint,
    Sample,
    SampleUsage,
    SamplingParams,
    TextPart,
    Usage,
    split_usage,
)


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


def test_split_usage_adds_up_and_gives_the_remainder_to_the_first_samples() -> None:
    samples = [Sample(i, "x", "stop") for i in range(3)]
    shares = split_usage(Usage(10, 7), samples, "c")
    assert [(s.prompt_tokens, s.completion_tokens, s.exact) for s in shares] == [
        (4, 3, False),
        (3, 2, False),
        (3, 2, False),
    ]
    assert {s.call_id for s in shares} == {"c"}


def test_split_usage_takes_per_choice_counts_as_exact() -> None:
    def counted(*counts: int | None) -> list[Sample]:
        return [Sample(i, "x", "stop", completion_tokens=c) for i, c in enumerate(counts)]

    def split(usage: Usage, samples: list[Sample]) -> list[tuple[int, bool]]:
        return [(s.completion_tokens, s.exact) for s in split_usage(usage, samples, "c")]

    assert split(Usage(5, 9), counted(4, 5)) == [(4, True), (5, True)]
    # The choices without a count share what the others leave.
    assert split(Usage(5, 9), counted(4, None, None)) == [(4, True), (3, False), (2, False)]
    # Billed for more than the choices show (hidden tokens): spread, and no longer exact.
    assert split(Usage(5, 12), counted(4, 5)) == [(6, False), (6, False)]
    # An endpoint that under-reports (or reports nothing) is overruled by the counts.
    assert split(Usage(0, 0), counted(4, 5)) == [(4, True), (5, True)]
    assert split_usage(Usage(3, 3), [], "c") == []


def test_a_shared_sample_carries_no_tokens_and_keeps_its_call() -> None:
    share = SampleUsage("c", 4, 3, True)
    assert share.shared() == SampleUsage("c", 0, 0, False)
    assert share.usage == Usage(4, 3) and Usage(1, 2) + Usage(3, 4) == Usage(4, 6)


RATING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "harmlessness": {"type": "integer", "minimum": 1, "maximum": 5},
        "helpfulness": {"type": "integer", "minimum": 1, "maximum": 5},
        "rationale": {"type": "string"},
    },
    "required": ["harmlessness", "helpfulness", "rationale"],
    "additionalProperties": False,
}


def test_a_json_schema_constraint_keeps_the_schema_and_its_key_order() -> None:
    c = OutputConstraint.json_schema("rating", RATING_SCHEMA)
    assert (c.kind, c.name, c.choices) == ("json_schema", "rating", ())
    assert c.schema == RATING_SCHEMA and c.schema is not c.schema  # a fresh dict each time
    assert list(c.schema["properties"]) == ["harmlessness", "helpfulness", "rationale"]
    assert " " not in c.schema_json  # compact text
    assert c.keyed() == {"kind": "json_schema", "name": "rating", "schema": c.schema_json}
    assert c == OutputConstraint.json_schema("rating", dict(RATING_SCHEMA))  # a value
    assert hash(c) == hash(OutputConstraint.json_schema("rating", RATING_SCHEMA))
    reordered = {**RATING_SCHEMA, "properties": dict(reversed(RATING_SCHEMA["properties"].items()))}
    assert OutputConstraint.json_schema("rating", reordered) != c  # the order is the answer's


def test_a_choice_constraint() -> None:
    c = OutputConstraint.choice("safe", "unsafe")
    assert (c.kind, c.choices, c.schema_json, c.schema) == ("choice", ("safe", "unsafe"), "", {})
    assert c.keyed() == {"kind": "choice", "choices": ["safe", "unsafe"]}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: OutputConstraint.choice(), "one or more"),
        (lambda: OutputConstraint.choice("safe", ""), "one or more"),
        (lambda: OutputConstraint.choice("A", "A"), "repeated"),
        (lambda: OutputConstraint.json_schema("a b", {"type": "object"}), "schema name"),
        (lambda: OutputConstraint.json_schema("x" * 65, {"type": "object"}), "schema name"),
        (lambda: OutputConstraint("json_schema", schema_json="{"), "not JSON"),
        (lambda: OutputConstraint("json_schema", schema_json="[1]"), "JSON object"),
        (lambda: OutputConstraint("json_schema", schema_json="{}", choices=("a",)), "no choices"),
        (lambda: OutputConstraint("choice", schema_json="{}", choices=("a",)), "no schema"),
        (lambda: OutputConstraint("regex", choices=("a",)), "unknown"),  # type: ignore[arg-type]
    ],
)
def test_a_malformed_constraint_is_refused(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]
