"""Early stop in the model service, against the simulated server (real HTTP on loopback): a batch
whose first N sent requests all fail alike for a lasting reason sends nothing more, and every
request is still accounted for; transient storms and journal hits do not trip it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlpref.chat import ChatRequest, ChatResult, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.runner import BatchStats
from vlpref.service import Batch, ModelService
from vlpref.sim.testing import SimServer

KEY = "sim-key-0123"
N = 8  # the default limit
SIM: dict[str, Any] = {
    "require_api_key": KEY,
    "models": {
        "echo": {"persona": "echo"},
        "storm-500": {"persona": "echo", "faults": {"server_error": {"rate": 1.0}}},
        "storm-429": {
            "persona": "echo",
            "faults": {"rate_limit": {"rate": 1.0, "retry_after_s": 0.01}},
        },
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


@pytest.fixture
def service() -> Iterator[ModelService]:
    """A service of its own per test: no model is trusted yet (TRUST_S)."""
    svc = ModelService()
    yield svc
    svc.close()


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch, sim: SimServer) -> None:
    monkeypatch.setenv("SIM_GOOD_KEY", KEY)
    monkeypatch.setenv("SIM_WRONG_KEY", "not-the-key")
    sim.reset()


def endpoint(sim: SimServer, key_env: str = "SIM_GOOD_KEY", **extra: Any) -> dict[str, Any]:
    return {
        "kind": "openai",
        "base_url": sim.base_url,
        "api_key_env": key_env,
        "concurrency": 64,
        "max_attempts": 1,  # a transient failure fails at once: the storms stay fast
        **extra,
    }


def requests(model: str, count: int, start: int = 0) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=f"{model}:{i}",
            model=model,
            messages=(Message.user(f"question {i}"),),
            params=SamplingParams(max_tokens=8),
        )
        for i in range(start, start + count)
    ]


def arrivals(sim: SimServer, model: str) -> dict[str, int]:
    by_model: dict[str, dict[str, int]] = sim.counters()["by_model"]
    return by_model.get(model, {})


def kinds(results: list[ChatResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        kind = r.failure.kind if r.failure else "ok"
        out[kind] = out.get(kind, 0) + 1
    return out


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_model_the_endpoint_does_not_serve_costs_n_requests(
    sim: SimServer, service: ModelService
) -> None:
    provider = service.provider(endpoint(sim))
    stats = BatchStats()
    log, handler = logging.getLogger("vlpref.service"), _Lines()
    log.addHandler(handler)  # outside a Prefect run the warning goes to this module's logger
    try:
        results = list(service.run([(provider, requests("no-such-model", 200))], None, stats))
    finally:
        log.removeHandler(handler)
    # Exactly N reached the server: the probe holds the rest back until it has decided.
    assert arrivals(sim, "no-such-model") == {"404": N}
    assert len(results) == 200 and {r.request.id for r in results} == {
        f"no-such-model:{i}" for i in range(200)
    }
    assert kinds(results) == {"bad_request": N, "stopped": 200 - N}
    stopped = [r.failure for r in results if r.failure and r.failure.kind == "stopped"]
    assert {f.message for f in stopped} == {
        "not sent: the first 8 requests to no-such-model all failed: bad_request 404: "
        "The model `no-such-model` does not exist or you do not have access to it."
    }
    assert {(f.status, f.attempts) for f in stopped} == {(404, 0)}
    assert (stats.requests, stats.sent, stats.failed, stats.cached) == (200, N, 200, 0)
    (line,) = handler.lines
    assert line.startswith(
        "early stop: not sent: the first 8 requests to no-such-model all failed: bad_request 404"
    )
    assert f"({200 - N} more request(s) of the batch not sent" in line


def test_a_wrong_key_costs_n_requests_per_batch(sim: SimServer, service: ModelService) -> None:
    provider = service.provider(endpoint(sim, "SIM_WRONG_KEY"))
    batches = [(provider, requests("echo", 200)), (provider, requests("storm-500", 50))]
    results = list(service.run(batches, None))
    assert arrivals(sim, "echo") == {"401": N} and arrivals(sim, "storm-500") == {"401": N}
    assert kinds(results) == {"auth": 2 * N, "stopped": 250 - 2 * N}
    assert all(
        "all failed: auth 401: Incorrect API key provided (simulated)." in r.failure.message
        for r in results
        if r.failure and r.failure.kind == "stopped"
    )


def test_transient_storms_do_not_trip_it(sim: SimServer, service: ModelService) -> None:
    provider = service.provider(endpoint(sim))
    batches = [(provider, requests("storm-500", 100)), (provider, requests("storm-429", 100))]
    results = list(service.run(batches, None))
    assert kinds(results) == {"server_error": 100, "rate_limit": 100}
    assert arrivals(sim, "storm-500") == {"500": 100}
    assert arrivals(sim, "storm-429") == {"429": 100}


def test_a_healthy_batch_is_sent_whole(sim: SimServer, service: ModelService) -> None:
    provider = service.provider(endpoint(sim))
    stats = BatchStats()
    results = list(service.run([(provider, requests("echo", 500))], None, stats, chunk_size=64))
    assert kinds(results) == {"ok": 500} and len({r.request.id for r in results}) == 500
    assert arrivals(sim, "echo") == {"200": 500} and stats.sent == 500


@pytest.mark.parametrize("chunk_size", [2048, 3])  # 3: the probe spans chunks
def test_journal_hits_do_not_count_toward_the_probe(
    sim: SimServer, service: ModelService, tmp_path: Path, chunk_size: int
) -> None:
    """Journaled answers (from the right key) come first; the wrong key's batch still probes
    N *sent* requests, and journaled requests after the stop still come from the journal."""
    journal = Journal(str(tmp_path / "journal"))
    good = service.provider(endpoint(sim))
    # 0-19, 22 and 25 (among the probe's), 100-109 (after the stop)
    warm = [*requests("echo", 20), *requests("echo", 1, 22), *requests("echo", 1, 25)]
    warm += requests("echo", 10, start=100)
    assert kinds(list(service.run([(good, warm)], journal))) == {"ok": 32}
    sim.reset()
    wrong = service.provider(endpoint(sim, "SIM_WRONG_KEY"))  # same identity: same journal keys
    stats = BatchStats()
    results = list(
        service.run([(wrong, requests("echo", 200))], journal, stats, chunk_size=chunk_size)
    )
    assert arrivals(sim, "echo") == {"401": N}
    assert kinds(results) == {"ok": 32, "auth": N, "stopped": 200 - 32 - N}
    assert all(r.cached for r in results if r.ok)
    assert (stats.requests, stats.cached, stats.sent, stats.failed) == (200, 32, N, 168)
    # The probe sent 20, 21, 23, 24, 26..29: the first 8 requests not in the journal.
    auth = sorted(
        int(r.request.id.split(":")[1]) for r in results if r.failure and r.failure.kind == "auth"
    )
    assert auth == [20, 21, 23, 24, 26, 27, 28, 29]


def test_a_check_turns_unusable_answers_into_a_cause(sim: SimServer, service: ModelService) -> None:
    provider = service.provider(endpoint(sim))
    batch = Batch(provider, requests("echo", 100), check=lambda r: "not JSON")
    results = list(service.run([batch], None))
    # The answers themselves are handed over as they are: the stage decides what they mean.
    assert kinds(results) == {"ok": N, "stopped": 100 - N}
    assert arrivals(sim, "echo") == {"200": N}
    (reason,) = {r.failure.message for r in results if r.failure}
    assert reason == "not sent: the first 8 requests to echo all failed: unparseable: not JSON"


def test_the_limit_is_configurable_and_zero_turns_it_off(
    sim: SimServer, service: ModelService
) -> None:
    provider = service.provider(endpoint(sim, "SIM_WRONG_KEY"), early_stop_after=3)
    results = list(service.run([(provider, requests("echo", 40))], None))
    assert kinds(results) == {"auth": 3, "stopped": 37}
    sim.reset()
    off = service.provider(endpoint(sim, "SIM_WRONG_KEY", concurrency=8), early_stop_after=0)
    results = list(service.run([(off, requests("echo", 40))], None))
    assert kinds(results) == {"auth": 40} and arrivals(sim, "echo") == {"401": 40}


def test_a_model_that_passed_lately_is_watched_without_holding_back(
    sim: SimServer, service: ModelService
) -> None:
    """After a batch passed its probe, the next batches of that model (and check) start at full
    speed and are watched the same way: a stop then comes after the chunk in flight, and the
    model has to pass a held-back probe again."""
    provider = service.provider(endpoint(sim))
    parses = {"now": True}

    def check(result: ChatResult) -> str | None:
        return None if parses["now"] else "no verdict"

    passed = list(service.run([Batch(provider, requests("echo", 20), check)], None))
    assert kinds(passed) == {"ok": 20}
    sim.reset()
    parses["now"] = False  # the judge "broke" mid-run
    watched = list(
        service.run([Batch(provider, requests("echo", 200, 100), check)], None, chunk_size=50)
    )
    assert arrivals(sim, "echo") == {"200": 50}  # the chunk in flight, then nothing
    assert kinds(watched) == {"ok": 50, "stopped": 150}
    sim.reset()
    probed = list(service.run([Batch(provider, requests("echo", 100, 300), check)], None))
    assert arrivals(sim, "echo") == {"200": N} and kinds(probed) == {"ok": N, "stopped": 100 - N}
