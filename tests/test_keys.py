from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from vlpref.chat import ChatRequest, ImagePart, Message, OutputConstraint, SamplingParams
from vlpref.keys import request_fingerprint, sample_key, sample_keys, unique_ids

IMAGE = ImagePart(data=b"\x89PNG one image")


def make(**overrides: object) -> ChatRequest:
    base = ChatRequest(
        id="r1",
        model="m",
        messages=(Message.user(IMAGE, "question?"),),
        params=SamplingParams(temperature=0.7, max_tokens=64, n=2),
        prompt_version="v1",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_key_ignores_the_callers_id_and_n() -> None:
    a = make()
    assert request_fingerprint("openai", a) == request_fingerprint("openai", make(id="other"))
    more = make(params=replace(a.params, n=5))
    assert sample_keys("openai", more)[:2] == sample_keys("openai", a)


def test_key_changes_with_everything_that_changes_the_answer() -> None:
    base = request_fingerprint("openai", make())
    variants = [
        request_fingerprint("vllm", make()),
        request_fingerprint("openai", make(model="m2")),
        request_fingerprint("openai", make(prompt_version="v2")),
        request_fingerprint(
            "openai", make(params=SamplingParams(temperature=0.8, max_tokens=64, n=2))
        ),
        request_fingerprint(
            "openai", make(params=SamplingParams(temperature=0.7, max_tokens=64, seed=1))
        ),
        request_fingerprint("openai", make(messages=(Message.user(IMAGE, "question!"),))),
        request_fingerprint(
            "openai", make(messages=(Message.user(ImagePart(data=b"other"), "question?"),))
        ),
        request_fingerprint(
            "openai", make(messages=(Message.system("s"), Message.user(IMAGE, "question?")))
        ),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_an_unconstrained_key_is_the_one_from_before_constraints_existed() -> None:
    # Computed with vlpref/keys.py as of commit e0e4e3c, before `ChatRequest.constraint`: every
    # journal written until then must keep answering.
    pinned = "3a25a8a9192c0e28f6a362307f3221b46ee263545e5b64e781e015ef09900e9c"
    assert request_fingerprint("openai", make()) == pinned
    assert request_fingerprint("openai", make(constraint=None)) == pinned


def test_a_constraint_is_part_of_the_request() -> None:
    schema = {"type": "object", "properties": {"verdict": {"enum": ["safe", "unsafe"]}}}
    reordered = {"properties": schema["properties"], "type": "object"}
    keys = [
        request_fingerprint("openai", make()),
        request_fingerprint("openai", make(constraint=OutputConstraint.json_schema("s", schema))),
        request_fingerprint("openai", make(constraint=OutputConstraint.choice("safe", "unsafe"))),
        request_fingerprint("openai", make(constraint=OutputConstraint.choice("unsafe", "safe"))),
        request_fingerprint("openai", make(constraint=OutputConstraint.json_schema("t", schema))),
        request_fingerprint(
            "openai", make(constraint=OutputConstraint.json_schema("s", reordered))
        ),
    ]
    assert len(set(keys)) == len(keys)
    again = make(id="other", constraint=OutputConstraint.json_schema("s", dict(schema)))
    assert request_fingerprint("openai", again) == keys[1]


def test_image_enters_the_key_by_content_hash_not_by_transport() -> None:
    same_bytes = ImagePart(data=IMAGE.data, mime="image/jpeg")
    assert request_fingerprint("openai", make()) == request_fingerprint(
        "openai", make(messages=(Message.user(same_bytes, "question?"),))
    )


@given(st.text(max_size=50), st.integers(min_value=0, max_value=1000))
def test_sample_keys_are_distinct_per_index(text: str, index: int) -> None:
    fp = request_fingerprint("openai", make(messages=(Message.user(text),)))
    assert sample_key(fp, index) != sample_key(fp, index + 1)
    assert sample_key(fp, index) == sample_key(fp, index)


def test_unique_ids_share_a_tag_and_never_repeat() -> None:
    make = unique_ids("vlpref-")
    first, second = make(), make()
    assert first != second and first.startswith("vlpref-")
    assert first.rsplit("-", 1)[0] == second.rsplit("-", 1)[0]  # one tag per maker
    assert unique_ids()()[:16] != unique_ids()()[:16]  # each maker draws its own tag
