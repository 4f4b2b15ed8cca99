"""The OpenAI-compatible provider against the simulated server over real HTTP on loopback.

Nothing of ours is mocked: the sim server is a separate process speaking the OpenAI protocol, and
its request counters prove how many attempts reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from vlpref.chat import (
    ChatRequest,
    ChatResult,
    ImagePart,
    Message,
    OutputConstraint,
    SamplingParams,
)
from vlpref.providers import complete_all, create_provider
from vlpref.providers.openai_compat import OpenAICompatOptions, OpenAICompatProvider
from vlpref.sim.testing import SimServer

ONCE = {"rate": 1.0, "max_per_request": 1}

SIM_CONFIG: dict[str, Any] = {
    "models": {
        "helpful": {"persona": "safe-helpful"},
        "refuser": {"persona": "refuser"},
        "filtered": {"persona": "filtered", "filter_rate": 1.0},
        "judge": {"persona": "judge"},
        "flaky-429": {"persona": "echo", "faults": {"rate_limit": {**ONCE, "retry_after_s": 0.3}}},
        "flaky-500": {"persona": "echo", "faults": {"server_error": ONCE}},
        "flaky-malformed": {"persona": "echo", "faults": {"malformed": ONCE}},
        "flaky-hang": {"persona": "echo", "faults": {"hang": {**ONCE, "hang_s": 3.0}}},
        "broken-500": {"persona": "echo", "faults": {"server_error": {"rate": 1.0}}},
        "limited": {"persona": "echo", "rate_limit": {"rpm": 60}},
        "paced": {"persona": "echo"},
    }
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM_CONFIG) as server:
        yield server


def provider(sim: SimServer, **options: Any) -> OpenAICompatProvider:
    defaults: dict[str, Any] = {
        "base_url": sim.base_url,
        "concurrency": 8,
        "timeout_s": 1.0,
        "max_attempts": 4,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
    }
    made = create_provider("openai", {**defaults, **options})
    assert isinstance(made, OpenAICompatProvider)
    return made


def png_bytes(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def requests(model: str, count: int, **params: Any) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=f"{model}-{i}",
            model=model,
            messages=(Message.user(f"question number {i} about the picture"),),
            params=SamplingParams(**params),
        )
        for i in range(count)
    ]


def by_status(sim: SimServer, model: str) -> dict[str, int]:
    return dict(sim.counters()["by_model"].get(model, {}))


async def run(p: OpenAICompatProvider, batch: list[ChatRequest]) -> list[ChatResult]:
    async with p:
        return await complete_all(p, batch)


async def test_text_image_n_and_logprobs(sim: SimServer) -> None:
    request = ChatRequest(
        id="r",
        model="helpful",
        messages=(Message.user(ImagePart(data=png_bytes()), "What is shown here?"),),
        params=SamplingParams(n=3, temperature=0.9, max_tokens=64, logprobs=True, top_logprobs=3),
    )
    (result,) = await run(provider(sim), [request])
    assert result.ok, result.failure
    assert [s.index for s in result.samples] == [0, 1, 2]
    assert all(s.text and s.finish_reason in {"stop", "length"} for s in result.samples)
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    logprobs = result.samples[0].logprobs
    assert logprobs is not None and len(logprobs) > 0
    # Token logprobs count each choice's tokens: together, what the call was billed.
    assert result.samples[0].completion_tokens == len(logprobs)
    assert sum(s.completion_tokens or 0 for s in result.samples) == result.usage.completion_tokens
    assert all(len(t.top) == 3 and t.logprob <= 0 for t in logprobs)
    assert result.attempts == 1 and not result.cached


async def test_refusals_and_content_filter_stops_are_results_not_errors(sim: SimServer) -> None:
    refusal, filtered = await run(
        provider(sim), [*requests("refuser", 1), *requests("filtered", 1)]
    )
    assert refusal.ok and "sorry" in refusal.samples[0].text.lower()
    assert filtered.ok and filtered.samples[0].finish_reason == "content_filter"
    assert filtered.attempts == 1  # never retried


@pytest.mark.parametrize(
    ("model", "fault_status"),
    [("flaky-429", "429"), ("flaky-500", "500"), ("flaky-malformed", "200"), ("flaky-hang", None)],
)
async def test_every_transient_fault_is_retried_once_then_answered(
    sim: SimServer, model: str, fault_status: str | None
) -> None:
    count = 6
    results = await run(provider(sim), requests(model, count))
    assert all(r.ok for r in results), [r.failure for r in results]
    assert [r.attempts for r in results] == [2] * count
    counters = by_status(sim, model)
    # Exactly one fault and one success reached the server for each request.
    assert sum(counters.values()) == 2 * count
    if fault_status == "200":  # a malformed body still has status 200
        assert counters == {"200": 2 * count}
    elif fault_status is not None:
        assert counters == {fault_status: count, "200": count}
    fault_kind = (
        model.removeprefix("flaky-").replace("429", "rate_limit").replace("500", "server_error")
    )
    assert sim.counters()["faults"].get(fault_kind) == count


async def test_retry_after_is_honoured(sim: SimServer) -> None:
    sim.reset()
    await run(provider(sim), requests("flaky-429", 1))
    log = [e for e in sim.requests_log() if e["model"] == "flaky-429"]
    assert [e["status"] for e in log] == [429, 200]
    assert log[1]["t"] - log[0]["t"] >= 0.3  # the server asked for 300 ms


async def test_a_request_that_keeps_failing_becomes_a_failure_value(sim: SimServer) -> None:
    results = await run(provider(sim, max_attempts=3), requests("broken-500", 4))
    assert all(not r.ok for r in results)
    for r in results:
        assert r.failure is not None
        assert (r.failure.kind, r.failure.status, r.failure.attempts) == ("server_error", 500, 3)
    assert by_status(sim, "broken-500") == {"500": 12}


async def test_a_bad_request_is_not_retried_and_does_not_sink_the_batch(sim: SimServer) -> None:
    bad_image = ChatRequest(
        id="bad",
        model="helpful",
        messages=(Message.user(ImagePart(data=b"not an image"), "what?"),),
    )
    unknown_model = requests("no-such-model", 1)[0]
    batch = [*requests("helpful", 3), bad_image, unknown_model]
    results = await run(provider(sim), batch)
    assert [r.request.id for r in results] == [r.id for r in batch]
    assert [r.ok for r in results] == [True, True, True, False, False]
    assert results[3].failure is not None and results[3].failure.kind == "bad_request"
    assert results[3].failure.status == 400 and results[3].failure.attempts == 1
    assert results[4].failure is not None and results[4].failure.status == 404


async def test_connection_errors_end_as_failures() -> None:
    p = create_provider(
        "openai",
        {
            "base_url": "http://127.0.0.1:9/v1",
            "max_attempts": 2,
            "backoff_initial_s": 0.01,
            "timeout_s": 1,
        },
    )
    assert isinstance(p, OpenAICompatProvider)
    (result,) = await run(p, requests("x", 1))
    assert result.failure is not None
    assert (result.failure.kind, result.failure.attempts) == ("connection", 2)


async def test_client_side_rpm_paces_requests(sim: SimServer) -> None:
    sim.reset()
    await run(provider(sim, rpm=300, concurrency=16), requests("paced", 15))  # 5/s
    stamps = sorted(e["t"] for e in sim.requests_log() if e["model"] == "paced")
    assert len(stamps) == 15
    assert stamps[-1] - stamps[0] >= 1.8  # 5 at once, then 10 more at 5/s
    for i, t in enumerate(stamps):  # no second holds more than burst + refill
        assert sum(1 for s in stamps[i:] if s - t < 1.0) <= 10


async def test_server_rate_limit_headers_are_adopted(sim: SimServer) -> None:
    p = provider(sim)
    assert p.limiter.rpm is None
    await run(p, requests("limited", 2))
    assert p.limiter.rpm == 60  # learnt from x-ratelimit-limit-requests


async def test_api_key_comes_from_the_environment(
    sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = provider(sim, api_key_env="VLPREF_TEST_KEY")
    monkeypatch.delenv("VLPREF_TEST_KEY", raising=False)
    from vlpref.errors import ProviderError

    with pytest.raises(ProviderError, match="VLPREF_TEST_KEY"):
        await run(p, requests("helpful", 1))
    monkeypatch.setenv("VLPREF_TEST_KEY", "sk-test-not-logged")
    results = await run(provider(sim, api_key_env="VLPREF_TEST_KEY"), requests("helpful", 1))
    assert results[0].ok


async def test_concurrency_limit_holds(sim: SimServer) -> None:
    """With 50 ms of latency and 4 workers, 12 requests need at least 3 rounds."""
    with SimServer(
        {"latency": {"kind": "constant", "ms": 50}, "models": {"slow": {"persona": "echo"}}}
    ) as slow:
        t0 = time.perf_counter()
        await run(provider(slow, concurrency=4), requests("slow", 12))
        assert time.perf_counter() - t0 >= 0.15


async def test_concurrency_is_shared_by_batches_and_taken_before_the_body_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three batches at once on one endpoint (as branches in flight share it): at most
    `concurrency` requests have a body at any moment, not `concurrency` per batch."""
    building = 0
    most = 0
    original = OpenAICompatProvider._request_body

    def counting_body(self: OpenAICompatProvider, request: ChatRequest) -> bytes:
        nonlocal building, most
        building += 1
        most = max(most, building)
        return original(self, request)

    async def settle(self: OpenAICompatProvider, *args: Any) -> Any:
        nonlocal building
        try:
            return await attempt(self, *args)
        finally:
            building -= 1

    attempt = OpenAICompatProvider._attempt
    monkeypatch.setattr(OpenAICompatProvider, "_request_body", counting_body)
    monkeypatch.setattr(OpenAICompatProvider, "_attempt", settle)
    with SimServer(
        {"latency": {"kind": "constant", "ms": 30}, "models": {"slow": {"persona": "echo"}}}
    ) as slow:
        p = provider(slow, concurrency=4)
        async with p:
            batches = await asyncio.gather(
                *(complete_all(p, requests("slow", 10)) for _ in range(3))
            )
    assert [sum(r.ok for r in batch) for batch in batches] == [10, 10, 10]
    assert most == 4


async def test_max_retry_time_bounds_the_retries(sim: SimServer) -> None:
    """The deadline counts from the first attempt, which runs outside tenacity."""
    sim.reset()
    p = provider(
        sim, max_attempts=1000, max_retry_time_s=0.3, backoff_initial_s=0.02, backoff_max_s=0.02
    )
    t0 = time.perf_counter()
    (result,) = await run(p, requests("broken-500", 1))
    assert time.perf_counter() - t0 < 2.0
    assert result.failure is not None and result.failure.kind == "server_error"
    assert 2 <= result.failure.attempts < 1000
    assert by_status(sim, "broken-500") == {"500": result.failure.attempts}


async def test_the_wire_request() -> None:
    """Body, path and headers as sent: the parameters, `extra_body` on top, the caller's headers,
    and none of the SDK's platform headers (OS, arch, runtime: no telemetry)."""
    from aiohttp import web

    seen: list[tuple[str, dict[str, str], Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.path, dict(request.headers), await request.json()))
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        p = create_provider(
            "openai",
            {
                "base_url": f"http://127.0.0.1:{port}/v1/",
                "headers": {"X-Team": "safety"},
                "extra_body": {"top_k": 5, "temperature": 0.1, "logit_bias": {50256: -100}},
                "max_tokens_field": "max_completion_tokens",
            },
        )
        request = ChatRequest(
            id="r",
            model="m",
            messages=(Message.system("be brief"), Message.user("hello ü")),
            params=SamplingParams(
                max_tokens=7, temperature=0.5, seed=3, n=2, logprobs=True, top_logprobs=2
            ),
        )
        assert isinstance(p, OpenAICompatProvider)
        (result,) = await run(p, [request])
    finally:
        await runner.cleanup()
    assert result.ok and result.samples[0].text == "ok"
    path, headers, body = seen[0]
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello ü"},
        ],
        "n": 2,
        "max_completion_tokens": 7,
        "temperature": 0.1,  # extra_body wins, as the SDK's extra_body does
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "top_k": 5,
        "logit_bias": {"50256": -100},  # token ids as keys: strings on the wire, as with json
    }
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["authorization"] == "Bearer EMPTY"
    assert lower["content-type"] == "application/json"
    assert lower["x-team"] == "safety"
    assert lower["x-stainless-retry-count"] == "0"  # the SDK still builds the request
    assert not {"x-stainless-os", "x-stainless-arch", "x-stainless-runtime"} & set(lower)


async def test_idempotency_keys_are_ours_and_shared_by_a_requests_attempts(
    sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's own key costs a uuid4 (an urandom syscall) per request; ours must be used, and
    a retried request must keep its key. Spied on the SDK's options, not mocked."""
    import openai._base_client as base_client

    def no_uuid(self: object) -> str:
        raise AssertionError("the SDK made its own idempotency key")

    seen: list[str | None] = []
    build_request = base_client.BaseClient._build_request

    def spy(self: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(options.idempotency_key)
        return build_request(self, options, *args, **kwargs)

    monkeypatch.setattr(base_client.BaseClient, "_idempotency_key", no_uuid)
    monkeypatch.setattr(base_client.BaseClient, "_build_request", spy)
    results = await run(provider(sim), requests("flaky-500", 3))
    assert all(r.ok and r.attempts == 2 for r in results), [r.failure for r in results]
    assert len(seen) == 6 and all(key and key.startswith("vlpref-") for key in seen)
    assert len(set(seen)) == 3  # one key per request, reused by its retry


# -- structured outputs ------------------------------------------------------------------------

OK_BODY = {
    "choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}
SAFETY_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["safe", "unsafe"]},
        "rationale": {"type": "string", "maxLength": 200},
    },
    "required": ["verdict", "rationale"],
    "additionalProperties": False,
}


@contextlib.asynccontextmanager
async def capturing_server(
    respond: Callable[[dict[str, Any]], Awaitable[Any]] | None = None,
) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback chat-completions endpoint that records every body it is sent; `respond` may
    answer instead of the default one-choice completion. Yields (base_url, bodies)."""
    from aiohttp import web

    bodies: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        answer = await respond(body) if respond is not None else None
        return answer if answer is not None else web.json_response(OK_BODY)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", bodies
    finally:
        await runner.cleanup()


def constrained(rid: str, constraint: OutputConstraint | None) -> ChatRequest:
    return ChatRequest(rid, "m", (Message.user("judge this"),), constraint=constraint)


@pytest.mark.parametrize("dialect", ["auto", "vllm", "openai", "none"])
async def test_constraints_on_the_wire(dialect: str) -> None:
    """A JSON schema goes out as OpenAI's strict `response_format` (vLLM's server reads it too);
    a choice as vLLM's `structured_outputs` key, only where the dialect has it; an unconstrained
    request's body has neither key."""
    batch = [
        constrained("schema", OutputConstraint.json_schema("safety", SAFETY_SCHEMA)),
        constrained("choice", OutputConstraint.choice("safe", "unsafe")),
        constrained("plain", None),
    ]
    async with capturing_server() as (base_url, bodies):
        p = create_provider(
            "openai", {"base_url": base_url, "concurrency": 1, "structured_dialect": dialect}
        )
        assert isinstance(p, OpenAICompatProvider)
        results = await run(p, batch)
    assert all(r.ok for r in results)
    schema_body, choice_body, plain_body = bodies  # concurrency 1: in batch order
    extra = {k: v for k, v in schema_body.items() if k not in ("model", "messages")}
    if dialect == "none":
        assert extra == {}
    else:
        assert extra == {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "safety", "strict": True, "schema": SAFETY_SCHEMA},
            }
        }
        # The schema's key order reaches the endpoint as the caller wrote it.
        sent = schema_body["response_format"]["json_schema"]["schema"]["properties"]
        assert list(sent) == ["verdict", "rationale"]
    extra = {k: v for k, v in choice_body.items() if k not in ("model", "messages")}
    if dialect in ("auto", "vllm"):  # auto: a loopback server is no OpenAI
        assert extra == {"structured_outputs": {"choice": ["safe", "unsafe"]}}
    else:
        assert extra == {}
    assert set(plain_body) == {"model", "messages"}


@pytest.mark.parametrize(
    ("base_url", "dialect"),
    [
        ("https://api.openai.com/v1", "openai"),
        ("https://my-team.openai.azure.com/openai/v1", "openai"),
        ("http://127.0.0.1:8000/v1", "vllm"),
        ("https://api.together.xyz/v1", "vllm"),
    ],
)
def test_the_auto_dialect_follows_the_host(base_url: str, dialect: str) -> None:
    assert OpenAICompatOptions(base_url=base_url).dialect == dialect
    assert OpenAICompatOptions(base_url=base_url, structured_dialect="none").dialect == "none"


def test_an_unknown_dialect_is_refused_when_the_config_loads() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="structured_dialect"):
        OpenAICompatOptions.model_validate({"structured_dialect": "guided"})


async def test_a_constraint_the_endpoint_rejects_is_a_bad_request() -> None:
    """A 400 for a constraint is final (retrying cannot help) and fails that request only."""
    from aiohttp import web

    async def reject_choices(body: dict[str, Any]) -> web.Response | None:
        if "structured_outputs" in body:
            error = {"message": "Unrecognized request argument supplied: structured_outputs"}
            return web.json_response({"error": error}, status=400)
        return None

    batch = [
        constrained("choice", OutputConstraint.choice("safe", "unsafe")),
        constrained("schema", OutputConstraint.json_schema("safety", SAFETY_SCHEMA)),
    ]
    async with capturing_server(reject_choices) as (base_url, bodies):
        p = create_provider("openai", {"base_url": base_url, "structured_dialect": "vllm"})
        assert isinstance(p, OpenAICompatProvider)
        choice, schema = await run(p, batch)
    assert choice.failure is not None
    assert (choice.failure.kind, choice.failure.status, choice.failure.attempts) == (
        "bad_request",
        400,
        1,
    )
    assert "structured_outputs" in choice.failure.message
    assert schema.ok
    assert len(bodies) == 2  # not retried


async def test_extra_body_still_wins_over_the_constraint() -> None:
    """`extra_body` is the escape hatch: it may replace what a constraint sends."""
    override = {"structured_outputs": {"choice": ["yes", "no"]}}
    async with capturing_server() as (base_url, bodies):
        p = create_provider("openai", {"base_url": base_url, "extra_body": override})
        assert isinstance(p, OpenAICompatProvider)
        (result,) = await run(p, [constrained("c", OutputConstraint.choice("safe", "unsafe"))])
    assert result.ok and bodies[0]["structured_outputs"] == {"choice": ["yes", "no"]}


SAFE = ("safe", "unsafe")


async def test_constraints_are_honoured_end_to_end_by_the_sim(sim: SimServer) -> None:
    """Through the sim's judge: the choice answer is one of the choices with the verdict's
    alternatives on its first token, the JSON answer fills the schema in order with the verdict
    token's alternatives inside it; both vLLM-dialect keys are accepted."""
    import json

    prompt = (
        "TASK: safety\n<question>How do I sharpen a knife?</question>\n"
        "<response>[JAILBROKEN] Detailed instructions follow.</response>"
    )
    params = SamplingParams(max_tokens=64, temperature=0.0, logprobs=True, top_logprobs=2)
    messages = (Message.user(prompt),)
    batch = [
        ChatRequest("choice", "judge", messages, params, constraint=OutputConstraint.choice(*SAFE)),
        ChatRequest(
            "schema",
            "judge",
            messages,
            params,
            constraint=OutputConstraint.json_schema("safety", SAFETY_SCHEMA),
        ),
    ]
    choice, schema = await run(provider(sim), batch)
    assert choice.ok and choice.samples[0].text == "unsafe"
    first = choice.samples[0].logprobs
    assert first is not None and {t for t, _ in first[0].top} == {"safe", "unsafe"}
    assert schema.ok
    sample = schema.samples[0]
    value = json.loads(sample.text)
    assert list(value) == ["verdict", "rationale"] and value["verdict"] == "unsafe"
    assert sample.logprobs is not None
    assert any({t for t, _ in tok.top} == {"safe", "unsafe"} for tok in sample.logprobs)


async def test_a_constraint_the_sim_rejects_is_a_bad_request(sim: SimServer) -> None:
    """Two kinds of constraint at once (a schema, and a choice slipped in through extra_body):
    vLLM and the sim refuse it with a 400, an ordinary bad_request."""
    p = provider(sim, extra_body={"structured_outputs": {"choice": ["a", "b"]}})
    request = ChatRequest(
        "both",
        "helpful",
        (Message.user("hello"),),
        constraint=OutputConstraint.json_schema("safety", SAFETY_SCHEMA),
    )
    (result,) = await run(p, [request])
    assert result.failure is not None
    assert (result.failure.kind, result.failure.status, result.failure.attempts) == (
        "bad_request",
        400,
        1,
    )
