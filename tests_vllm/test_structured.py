"""Structured outputs on a real vLLM, through the runner and the journal: a choice constraint
and JSON schemas, answered by the tiny random model through vLLM's server (`kind: openai`,
started by vlpref.vllm_serve) and through the offline engine (`kind: vllm`).

The model is random: unconstrained, its text is gibberish. Under a grammar every answer must still
be exactly one of the choices, or JSON valid against its schema (types, enums, ranges, lengths,
property order). Both paths also show which logprobs a constrained answer carries: the grammar
masks the logits before vLLM computes logprobs, so the alternatives listed are tokens the grammar
allows (renormalised among them), and a forbidden token appears only at -9999.0 when fewer than k
are allowed. The judge's probability maths (`vlpref.judging`) is run on those tokens.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.vllm_tiny import SERVED_NAME, offline_options, workload
from tests_vllm.conftest import REPORT
from vlpref.chat import ChatRequest, ChatResult, OutputConstraint, Sample, SamplingParams
from vlpref.journal import Journal
from vlpref.judging import RATING_OPTIONS, SAFETY_OPTIONS, option_distribution, parse_safety
from vlpref.judging import token_at as token_index_at
from vlpref.providers.vllm_offline import LOGPROB_FLOOR
from vlpref.runner import BatchStats
from vlpref.service import ModelService
from vlpref.vllm_serve import VllmServers

ASPECTS = ("harmlessness", "helpfulness", "faithfulness")
RATIONALE_CHARS = 16  # a random model rambles inside strings: the schema bounds it
RATING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{a: {"type": "integer", "minimum": 1, "maximum": 5} for a in ASPECTS},
        "rationale": {"type": "string", "maxLength": RATIONALE_CHARS},
    },
    "required": [*ASPECTS, "rationale"],
    "additionalProperties": False,
}
SAFETY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": list(SAFETY_OPTIONS)},
        "rationale": {"type": "string", "maxLength": RATIONALE_CHARS},
    },
    "required": ["verdict", "rationale"],
    "additionalProperties": False,
}
# Enough for the JSON to close: keys and punctuation (~30 tokens), the rationale (16 characters,
# up to 3 byte tokens each), and the whitespace vLLM's default JSON grammar lets a random model
# put between tokens (measured: 60-80 tokens per rating answer).
JSON_MAX_TOKENS = 240
IMAGES = 3


def structured_requests(tag: str) -> list[ChatRequest]:
    """Per image: a choice verdict (n=2), a JSON rating and a JSON safety verdict, all sampled
    (temperature 1, seeded) with logprobs."""
    out: list[ChatRequest] = []
    for i, base in enumerate(workload(SERVED_NAME, IMAGES, tag=tag)):
        sampled = SamplingParams(temperature=1.0, seed=i, logprobs=True)
        out += [
            replace(
                base,
                id=f"choice-{i}",
                params=replace(sampled, max_tokens=8, n=2, top_logprobs=5),
                constraint=OutputConstraint.choice(*SAFETY_OPTIONS),
            ),
            replace(
                base,
                id=f"rating-{i}",
                params=replace(sampled, max_tokens=JSON_MAX_TOKENS, top_logprobs=10),
                constraint=OutputConstraint.json_schema("rating", RATING_SCHEMA),
            ),
            replace(
                base,
                id=f"safety-{i}",
                params=replace(sampled, max_tokens=JSON_MAX_TOKENS, top_logprobs=5),
                constraint=OutputConstraint.json_schema("safety", SAFETY_SCHEMA),
            ),
        ]
    return out


def run_batch(
    service: ModelService, endpoint: dict[str, Any], batch: list[ChatRequest], journal: Journal
) -> tuple[dict[str, ChatResult], BatchStats]:
    provider = service.provider(endpoint)
    stats = BatchStats()
    results = {r.request.id: r for r in service.run([(provider, batch)], journal, stats)}
    assert len(results) == len(batch)
    return results, stats


# -- what an answer must be -------------------------------------------------------------------


def prefix_of(options: Sequence[str]) -> Callable[[str], str | None]:
    """Token -> the one option it starts (after JSON quotes and whitespace), else None."""

    def classify(token: str) -> str | None:
        core = token.strip().strip('"')
        hits = [o for o in options if core and o.startswith(core)]
        return hits[0] if len(hits) == 1 else None

    return classify


def classify_digit(token: str) -> str | None:
    """A rating token inside JSON: `3`, ` 3`, `3,` -> "3"."""
    m = re.fullmatch(r"\s*([1-5])[\s,}]*", token)
    return m.group(1) if m else None


def allowed(entry_top: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """The listed alternatives the grammar allowed (a forbidden one is listed at the floor)."""
    return [(t, lp) for t, lp in entry_top if lp > LOGPROB_FLOOR]


def check_choice(sample: Sample) -> float:
    """A choice answer: exactly `safe` or `unsafe`; its first token's alternatives are prefixes of
    a choice; P(unsafe) from them is what `vlpref.judging.parse_safety` reads. Returns it."""
    assert sample.text in SAFETY_OPTIONS, sample.text
    assert sample.finish_reason == "stop"
    assert sample.logprobs, "a choice answer carries its tokens' logprobs"
    first = sample.logprobs[0]
    assert sample.text.startswith(first.token)
    assert len(first.top) == 5 and math.isfinite(first.logprob) and first.logprob <= 0
    inside = allowed(first.top)
    classify = prefix_of(SAFETY_OPTIONS)
    assert inside and all(classify(t) is not None for t, _ in inside), first.top
    if len(inside) < len(first.top):  # every allowed token is listed: they hold all the mass
        assert math.isclose(sum(math.exp(lp) for _, lp in inside), 1.0, abs_tol=1e-3)
    # The judge's maths on the constrained token: options renormalised among themselves.
    verdict = parse_safety(sample)
    assert verdict.verdict == sample.text and verdict.from_logprobs
    mass = {o: sum(math.exp(lp) for t, lp in inside if classify(t) == o) for o in SAFETY_OPTIONS}
    assert all(mass.values()), f"both verdicts should be listed: {first.top}"
    expected = mass["unsafe"] / (mass["safe"] + mass["unsafe"])
    assert math.isclose(verdict.p_unsafe, expected, rel_tol=1e-9)
    return verdict.p_unsafe


def check_json(sample: Sample, schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON answer: closed (`stop`), parses, every property in the schema's order, with the
    schema's types, enums, ranges and lengths."""
    assert sample.finish_reason == "stop", f"the JSON did not close: {sample.text!r}"
    value = json.loads(sample.text)
    properties = schema["properties"]
    assert isinstance(value, dict) and list(value) == list(properties), sample.text
    for name, spec in properties.items():
        item = value[name]
        if spec["type"] == "integer":
            assert type(item) is int and spec["minimum"] <= item <= spec["maximum"], item
        else:
            assert isinstance(item, str) and len(item) <= spec.get("maxLength", len(item)), item
            assert item in spec.get("enum", [item]), item
    return value


def value_token(sample: Sample, name: str) -> int:
    """The index of the token that holds property `name`'s value's first character."""
    m = re.search(rf'"{name}"\s*:\s*"?', sample.text)
    assert m is not None and sample.logprobs is not None
    index = token_index_at(sample.text, (t.token for t in sample.logprobs), m.end())
    assert index is not None, (name, sample.text)
    return index


def check_rating_logprobs(sample: Sample, value: dict[str, Any]) -> None:
    """Each aspect's digit is a token of its own whose alternatives (those the grammar allows)
    are digits 1-5 or whitespace before one; the rating distribution comes from them."""
    assert sample.logprobs is not None
    for aspect in ASPECTS:
        entry = sample.logprobs[value_token(sample, aspect)]
        assert classify_digit(entry.token) == str(value[aspect]), (aspect, entry)
        for token, _ in allowed(entry.top):
            assert classify_digit(token) is not None or not token.strip(), (aspect, entry.top)
        dist = option_distribution(entry, RATING_OPTIONS, classify_digit)
        assert dist is not None and math.isclose(sum(dist.values()), 1.0)
        assert dist[str(value[aspect])] > 0


def check_verdict_logprobs(sample: Sample, value: dict[str, Any]) -> None:
    """The verdict inside the JSON starts with a token that is a prefix of one verdict; its
    allowed alternatives are prefixes of a verdict too (the enum, masked by the grammar)."""
    assert sample.logprobs is not None
    entry = sample.logprobs[value_token(sample, "verdict")]
    classify = prefix_of(SAFETY_OPTIONS)
    assert classify(entry.token) == value["verdict"], entry
    assert all(classify(t) is not None for t, _ in allowed(entry.top)), entry.top
    dist = option_distribution(entry, SAFETY_OPTIONS, classify)
    assert dist is not None and 0.0 <= dist["unsafe"] <= 1.0


def check_all(results: dict[str, ChatResult]) -> list[float]:
    p_unsafe: list[float] = []
    for i in range(IMAGES):
        choice = results[f"choice-{i}"]
        assert choice.ok, choice.failure
        assert [s.index for s in choice.samples] == [0, 1]
        p_unsafe += [check_choice(s) for s in choice.samples]
        rating = results[f"rating-{i}"]
        assert rating.ok, rating.failure
        (sample,) = rating.samples
        check_rating_logprobs(sample, check_json(sample, RATING_SCHEMA))
        safety = results[f"safety-{i}"]
        assert safety.ok, safety.failure
        (sample,) = safety.samples
        check_verdict_logprobs(sample, check_json(sample, SAFETY_SCHEMA))
    assert all(0.0 < p < 1.0 for p in p_unsafe)
    return p_unsafe


def run_and_rerun(
    label: str, service: ModelService, endpoint: dict[str, Any], tmp_path: Path, tag: str
) -> None:
    """The batch through the runner with a journal, checked; then again: all from the journal."""
    batch = structured_requests(tag)
    started = time.perf_counter()
    results, stats = run_batch(service, endpoint, batch, Journal(str(tmp_path / "journal")))
    elapsed = time.perf_counter() - started
    assert (stats.sent, stats.failed, stats.cached) == (len(batch), 0, 0)
    p_unsafe = check_all(results)
    tokens = sum(r.usage.completion_tokens for r in results.values())
    REPORT.append(
        f"{label}: structured outputs, {len(batch)} requests ({IMAGES} choice n=2, "
        f"{2 * IMAGES} JSON), {tokens} completion tokens: {elapsed:.2f}s; "
        f"P(unsafe) from the choice token: {', '.join(f'{p:.2f}' for p in p_unsafe)}"
    )
    journal = Journal(str(tmp_path / "journal"))
    assert len(journal) == IMAGES * 4  # every sample, keyed with its constraint
    again, stats = run_batch(service, endpoint, batch, journal)
    assert (stats.sent, stats.cached) == (0, len(batch))
    assert {k: r.texts for k, r in again.items()} == {k: r.texts for k, r in results.items()}


@pytest.fixture(scope="module")
def service() -> Any:
    svc = ModelService()
    yield svc
    svc.close()


def test_structured_outputs_through_a_vllm_server(
    served: VllmServers, tmp_path: Path, service: ModelService
) -> None:
    endpoint = dict(served.config.endpoints["tiny"])
    run_and_rerun("server", service, endpoint, tmp_path, "so-server")
    served.check_alive()


async def test_a_schema_the_server_rejects_is_a_bad_request(served: VllmServers) -> None:
    from vlpref.providers.base import complete_all
    from vlpref.providers.openai_compat import OpenAICompatProvider

    base = workload(SERVED_NAME, 1, tag="so-reject")[0]
    bad = replace(
        base,
        params=SamplingParams(max_tokens=8),
        constraint=OutputConstraint.json_schema("bad", {"type": "no-such-type"}),
    )
    provider = OpenAICompatProvider.from_config(dict(served.config.endpoints["tiny"]))
    try:
        (result,) = await complete_all(provider, [bad])
    finally:
        await provider.aclose()
    assert result.failure is not None, result.texts
    assert (result.failure.kind, result.failure.status, result.attempts) == ("bad_request", 400, 1)
    assert "no-such-type" in result.failure.message  # vLLM's grammar error, passed on
    served.check_alive()


def test_structured_outputs_on_the_offline_engine(
    tiny_model: Path, tmp_path: Path, service: ModelService
) -> None:
    run_and_rerun("offline", service, offline_options(tiny_model), tmp_path, "so-offline")
