"""Fault injection, enforced rate limits, latency and counters, with exact counter checks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from vlpref.sim.testing import SimServer, SimServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")

ONCE = {"rate": 1.0, "max_per_request": 1}
CONFIG: dict[str, Any] = {
    "models": {
        "f-429": {"persona": "echo", "faults": {"rate_limit": {**ONCE, "retry_after_s": 0.05}}},
        "f-500": {"persona": "echo", "faults": {"server_error": ONCE}},
        "f-bad": {"persona": "echo", "faults": {"malformed": ONCE}},
        "f-hang": {"persona": "echo", "faults": {"hang": {**ONCE, "hang_s": 5.0}}},
        "rpm-3": {"persona": "echo", "rate_limit": {"rpm": 3}},
        "tpm-40": {"persona": "echo", "rate_limit": {"tpm": 40}},
        "slow": {"persona": "echo", "latency": {"kind": "constant", "ms": 150}},
    }
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(CONFIG) as server:
        yield server


def body(model: str, text: str, **extra: Any) -> dict[str, Any]:
    """A chat-completions request body."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def test_rate_limit_fault_is_honoured_by_the_openai_client(sim: SimServer) -> None:
    n = 6
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=2) as c:
        results = await asyncio.gather(
            *(c.chat.completions.create(**body("f-429", f"q{i}")) for i in range(n))
        )
    assert [r.choices[0].message.content for r in results] == [f"q{i}" for i in range(n)]
    counters = sim.counters()
    assert counters["by_model"]["f-429"] == {"429": n, "200": n}
    assert counters["faults"]["rate_limit"] == n


async def test_rate_limit_fault_headers(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        first = await http.post("/chat/completions", json=body("f-429", "headers"))
        second = await http.post("/chat/completions", json=body("f-429", "headers"))
    assert first.status_code == 429 and second.status_code == 200
    assert first.headers["retry-after"] == "1" and first.headers["retry-after-ms"] == "50"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"


async def test_server_error_once_per_body(sim: SimServer) -> None:
    n = 5
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        first = [
            await http.post("/chat/completions", json=body("f-500", f"q{i}")) for i in range(n)
        ]
        again = [
            await http.post("/chat/completions", json=body("f-500", f"q{i}")) for i in range(n)
        ]
    assert {r.status_code for r in first} == {500} and {r.status_code for r in again} == {200}
    assert set(first[0].json()["error"]) == {"message", "type", "param", "code"}
    assert sim.counters()["by_model"]["f-500"] == {"500": n, "200": n}


async def test_malformed_once_per_body(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        first = await http.post("/chat/completions", json=body("f-bad", "x"))
        second = await http.post("/chat/completions", json=body("f-bad", "x"))
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(first.content)
    assert second.json()["choices"][0]["message"]["content"] == "x"
    counters = sim.counters()
    assert counters["by_model"]["f-bad"] == {"200": 2}
    assert counters["faults"]["malformed"] == 1


async def test_hang_outlives_client_timeout_then_retry_succeeds(sim: SimServer) -> None:
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/chat/completions", json=body("f-hang", "wait"))
        retry = await http.post("/chat/completions", json=body("f-hang", "wait"))
    assert retry.status_code == 200 and time.monotonic() - start < 2.0
    # The hung handler is dropped when the client disconnects and is counted as 499.
    for _ in range(50):
        if sim.counters()["by_model"]["f-hang"].get("499") == 1:
            break
        await asyncio.sleep(0.02)
    assert sim.counters()["by_model"]["f-hang"] == {"499": 1, "200": 1}
    assert sim.counters()["faults"]["hang"] == 1


async def test_enforced_rpm(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        oks = [await http.post("/chat/completions", json=body("rpm-3", f"q{i}")) for i in range(3)]
        limited = await http.post("/chat/completions", json=body("rpm-3", "q3"))
    assert [r.headers["x-ratelimit-remaining-requests"] for r in oks] == ["2", "1", "0"]
    assert oks[0].headers["x-ratelimit-limit-requests"] == "3"
    assert limited.status_code == 429
    assert 58 <= int(limited.headers["retry-after"]) <= 60
    assert 58_000 <= int(limited.headers["retry-after-ms"]) <= 60_000
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
    assert sim.counters()["by_model"]["rpm-3"] == {"200": 3, "429": 1}


async def test_enforced_tpm(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        ok = await http.post("/chat/completions", json=body("tpm-40", "one two three four five"))
        limited = await http.post("/chat/completions", json=body("tpm-40", "x " * 30))
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-tokens"] == "40"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 40
    assert limited.status_code == 429 and "retry-after" in limited.headers


async def test_latency_is_honoured(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        await http.post("/chat/completions", json=body("f-500", "warm"))
        start = time.monotonic()
        resp = await http.post("/chat/completions", json=body("slow", "x"))
        elapsed = time.monotonic() - start
    assert resp.status_code == 200 and 0.14 <= elapsed < 0.6


async def test_counters_log_and_reset(sim_server: SimServerFactory) -> None:
    sim = sim_server({"models": {"a": {"persona": "echo"}, "b": {"persona": "refuser"}}})
    before = time.monotonic()
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        for model in ("a", "a", "b", "nope"):
            await http.post("/chat/completions", json=body(model, "hi"))
        await http.post("/chat/completions", content=b"{not json")
    counters = sim.counters()
    assert counters["total"] == 5
    assert counters["by_model"] == {
        "a": {"200": 2},
        "b": {"200": 1},
        "nope": {"404": 1},
        "<invalid>": {"400": 1},
    }
    assert counters["by_status"] == {"200": 3, "404": 1, "400": 1}
    log = sim.requests_log()
    assert [e["model"] for e in log] == ["a", "a", "b", "nope", "<invalid>"]
    assert all(before <= e["t"] <= time.monotonic() and e["fault"] is None for e in log)
    sim.reset()
    counters = sim.counters()
    assert counters.pop("batch")["lines"] == 0  # the batch API's (vlpref/sim/batches.py)
    assert counters == {
        "total": 0,
        "by_model": {},
        "by_status": {},
        "faults": {},
        "usage": {},
    }
    assert sim.requests_log() == []


async def test_usage_counters_sum_the_bill_of_well_formed_answers(
    sim_server: SimServerFactory,
) -> None:
    sim = sim_server(
        {
            "models": {
                "a": {"persona": "refuser"},
                "bad": {"persona": "echo", "faults": {"malformed": ONCE}},
            }
        }
    )
    billed = [0, 0]
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        for text in ("hi", "tell me more"):
            usage = (await http.post("/chat/completions", json=body("a", text, n=2))).json()
            billed[0] += usage["usage"]["prompt_tokens"]
            billed[1] += usage["usage"]["completion_tokens"]
        truncated = await http.post("/chat/completions", json=body("bad", "x"))
    assert truncated.status_code == 200  # but malformed: nothing a client could bill
    assert sim.counters()["usage"] == {
        "a": {"prompt_tokens": billed[0], "completion_tokens": billed[1]}
    }


async def test_a_nondeterministic_model_answers_an_unseeded_request_afresh(
    sim_server: SimServerFactory,
) -> None:
    sim = sim_server({"models": {"m": {"persona": "mixed", "nondeterministic": True}}})

    async def answers(**extra: Any) -> list[str]:
        async with httpx.AsyncClient(base_url=sim.base_url) as http:
            out = []
            for _ in range(2):
                data = (await http.post("/chat/completions", json=body("m", "q", **extra))).json()
                out.append(json.dumps([c["message"]["content"] for c in data["choices"]]))
            return out

    first, second = await answers(n=4)
    assert first != second  # the same body, another call, other answers
    seeded = await answers(n=4, seed=3)
    assert seeded[0] == seeded[1]  # a seed still pins them
