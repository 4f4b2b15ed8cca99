"""The journal in front of a provider, against the simulated server over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vlpref.chat import ChatRequest, ChatResult, Message, SamplingParams, Usage
from vlpref.journal import Journal
from vlpref.keys import sample_keys
from vlpref.providers import create_provider
from vlpref.providers.base import Provider
from vlpref.runner import BatchStats, call_id, run_all, run_requests
from vlpref.service import ModelService
from vlpref.sim.testing import SimServer


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    config = {
        "models": {
            "mixed": {"persona": "mixed"},
            "flaky": {
                "persona": "echo",
                "faults": {"server_error": {"rate": 1.0, "max_per_request": 3}},
            },
            # A new answer for every call of the same request, as hosted APIs without a seed.
            "fresh": {"persona": "mixed", "nondeterministic": True},
        }
    }
    with SimServer(config) as server:
        yield server


def make_provider(sim: SimServer, **extra: Any) -> Provider:
    options = {"base_url": sim.base_url, "max_attempts": 2, "backoff_initial_s": 0.01, **extra}
    return create_provider("openai", options)


def batch(model: str, count: int, n: int = 1, **params: Any) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=f"{model}-{i}",
            model=model,
            messages=(Message.user(f"tell me about item {i}"),),
            params=SamplingParams(temperature=1.0, n=n, max_tokens=32, **params),
            prompt_version="p1",
        )
        for i in range(count)
    ]


def arrivals(sim: SimServer, model: str) -> int:
    return sum(sim.counters()["by_model"].get(model, {}).values())


def billed(sim: SimServer, model: str) -> Usage:
    """What the server billed `model` so far: the truth a client's token columns must sum to."""
    usage = sim.counters()["usage"].get(model, {})
    return Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def minus(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens - b.prompt_tokens, a.completion_tokens - b.completion_tokens)


def total(results: Iterable[ChatResult]) -> Usage:
    return sum((r.usage for r in results), Usage())


def shares(results: Iterable[ChatResult]) -> Usage:
    usages = [s.usage.usage for r in results for s in r.samples if s.usage is not None]
    return sum(usages, Usage())


async def test_a_rerun_sends_nothing_and_returns_the_same_answers(
    sim: SimServer, tmp_path: Path
) -> None:
    journal = Journal(str(tmp_path / "j"))
    first_stats, second_stats = BatchStats(), BatchStats()
    async with make_provider(sim) as provider:
        first = await run_all(provider, batch("mixed", 10, n=2), journal, first_stats)
    sent = arrivals(sim, "mixed")
    assert sent == 10 and first_stats.sent == 10 and first_stats.samples_sent == 20

    reopened = Journal(str(tmp_path / "j"))  # a new process would see the same
    async with make_provider(sim) as provider:
        second = await run_all(provider, batch("mixed", 10, n=2), reopened, second_stats)
    assert arrivals(sim, "mixed") == sent
    assert (second_stats.cached, second_stats.sent, second_stats.samples_cached) == (10, 0, 20)
    assert [r.texts for r in second] == [r.texts for r in first]
    assert all(r.cached for r in second)


async def test_raising_n_asks_only_for_the_new_samples(sim: SimServer, tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"))
    async with make_provider(sim) as provider:
        small = await run_all(provider, batch("mixed", 5, n=2), journal)
        before = arrivals(sim, "mixed")
        stats = BatchStats()
        large = await run_all(provider, batch("mixed", 5, n=4), journal, stats)
    assert arrivals(sim, "mixed") - before == 5
    assert (stats.samples_cached, stats.samples_sent) == (10, 10)
    for old, new in zip(small, large, strict=True):
        assert [s.index for s in new.samples] == [0, 1, 2, 3]
        assert new.texts[:2] == old.texts
    assert len(journal) == 20


async def test_failures_are_not_journaled_and_are_retried_by_a_rerun(
    sim: SimServer, tmp_path: Path
) -> None:
    journal = Journal(str(tmp_path / "j"))
    async with make_provider(sim) as provider:
        first = await run_all(provider, batch("flaky", 3), journal)
        assert all(not r.ok for r in first) and len(journal) == 0
        assert arrivals(sim, "flaky") == 6  # 2 attempts each
        second = await run_all(provider, batch("flaky", 3), journal)
    # The third arrival of each body fails (max 3 faults), the fourth succeeds.
    assert all(r.ok for r in second)
    assert arrivals(sim, "flaky") == 12
    assert len(journal) == 3


async def test_a_changed_prompt_version_is_a_new_request(sim: SimServer, tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"))
    async with make_provider(sim) as provider:
        await run_all(provider, batch("mixed", 2), journal)
        before = arrivals(sim, "mixed")
        changed = [replace(r, prompt_version="p2") for r in batch("mixed", 2)]
        await run_all(provider, changed, journal)
    assert arrivals(sim, "mixed") - before == 2


# -- usage: every call counted once, the same from the journal as fresh -------------------------


async def test_n2_shares_add_up_to_what_the_server_billed(sim: SimServer, tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"))
    before = billed(sim, "mixed")
    async with make_provider(sim) as provider:
        results = await run_all(provider, batch("mixed", 6, n=2, seed=11), journal)
        exact = await run_all(provider, batch("mixed", 3, n=2, seed=12, logprobs=True), journal)
    assert shares(results) + shares(exact) == minus(billed(sim, "mixed"), before)  # no double count
    for result in results:
        first, second = (s.usage for s in result.samples)
        assert first is not None and second is not None
        assert first.call_id == second.call_id  # siblings of one call
        assert not first.exact and abs(first.prompt_tokens - second.prompt_tokens) <= 1
        assert result.usage == first.usage + second.usage  # the call's, counted once
    # With token logprobs each sample's completion tokens are its own.
    for sample in (s for r in exact for s in r.samples):
        assert sample.usage is not None and sample.usage.exact and sample.logprobs is not None
        assert sample.usage.completion_tokens == sample.completion_tokens == len(sample.logprobs)


async def test_journal_hits_carry_the_usage_recorded_with_them(
    sim: SimServer, tmp_path: Path
) -> None:
    journal = Journal(str(tmp_path / "j"))
    async with make_provider(sim) as provider:
        fresh = await run_all(provider, batch("mixed", 5, n=2, seed=13), journal)
        again = await run_all(
            provider, batch("mixed", 5, n=2, seed=13), Journal(str(tmp_path / "j"))
        )
    assert all(r.cached for r in again) and not any(r.cached for r in fresh)
    assert [r.samples for r in again] == [r.samples for r in fresh]  # shares, call ids included
    assert [r.usage for r in again] == [r.usage for r in fresh] and total(fresh).prompt_tokens > 0


async def test_call_ids_name_what_was_asked_so_a_rerun_names_calls_alike(
    sim: SimServer, tmp_path: Path
) -> None:
    (request,) = batch("mixed", 1, n=2, seed=14)
    async with make_provider(sim) as provider:
        (first,) = await run_all(provider, [request], Journal(str(tmp_path / "a")))
        (second,) = await run_all(provider, [request], Journal(str(tmp_path / "b")))
    assert first.samples[0].usage is not None and second.samples[0].usage is not None
    assert first.samples[0].usage.call_id == second.samples[0].usage.call_id
    assert first.samples[0].usage.call_id != call_id("other", [0, 1])


# -- identical requests of one batch: sent once, answer shared ----------------------------------


def fresh_request(rid: str, text: str, n: int = 1) -> ChatRequest:
    return ChatRequest(
        id=rid,
        model="fresh",
        messages=(Message.user(text),),
        params=SamplingParams(temperature=1.0, n=n, max_tokens=32),
    )


async def test_the_sim_model_used_below_answers_each_call_afresh(sim: SimServer) -> None:
    """The premise of the dedupe tests: without the journal, repeating a request to `fresh`
    gets other answers, so equal answers below come from sharing, not luck."""
    request = fresh_request("r", "tell me about the harbour", n=4)
    async with make_provider(sim) as provider:
        (one,) = await run_all(provider, [request])
        (two,) = await run_all(provider, [request])
    assert one.texts != two.texts


async def test_identical_requests_in_a_batch_are_sent_once(sim: SimServer, tmp_path: Path) -> None:
    requests = [
        fresh_request("a1", "tell me about the harbour"),
        fresh_request("b1", "tell me about the bridge", n=2),
        fresh_request("a2", "tell me about the harbour"),
        fresh_request("c1", "tell me about the tower"),
        fresh_request("a3", "tell me about the harbour", n=3),  # covers a1's and a2's sample 0
        fresh_request("b2", "tell me about the bridge", n=2),
    ]
    journal, stats = Journal(str(tmp_path / "j")), BatchStats()
    sent, before = arrivals(sim, "fresh"), billed(sim, "fresh")
    async with make_provider(sim) as provider:
        results = {r.request.id: r for r in await run_all(provider, requests, journal, stats)}
    assert arrivals(sim, "fresh") - sent == 3  # one per distinct request: harbour, bridge, tower
    assert (stats.requests, stats.sent, stats.deduplicated, stats.cached) == (6, 3, 3, 0)
    assert stats.samples_sent == 3 + 2 + 1
    a1, a2, a3, b1, b2 = (results[k] for k in ("a1", "a2", "a3", "b1", "b2"))
    assert a1.texts == a2.texts == a3.texts[:1] and len(a3.texts) == 3 and b1.texts == b2.texts
    assert all(r.request is q for q in requests for r in [results[q.id]])  # each its own request
    # The rows agree with the journal: every answer handed out is the journaled one.
    for request in requests:
        keys = sample_keys(provider.identity, request)
        journaled = [journal.get(k) for k in keys]
        assert [e.sample.text for e in journaled if e is not None] == results[request.id].texts
    # Usage: the first request (in batch order) that covers a sample carries it; repeats carry
    # none, so the total is what the server billed, once.
    assert total(results.values()) == minus(billed(sim, "fresh"), before)
    assert a2.usage == b2.usage == Usage() and a1.usage.prompt_tokens > 0
    assert a3.samples[0].usage is not None and a3.samples[0].usage.prompt_tokens == 0
    assert a3.samples[1].usage is not None and a3.samples[1].usage.prompt_tokens > 0
    assert {s.usage.call_id for s in a1.samples + a2.samples + a3.samples if s.usage} == {
        a1.samples[0].usage.call_id if a1.samples[0].usage else ""
    }
    assert [r.cached for r in (a1, b1, results["c1"])] == [False] * 3
    assert all(r.cached and r.attempts == 0 for r in (a2, a3, b2))

    # From the journal the same rows, the same usage, nothing sent.
    again_stats = BatchStats()
    async with make_provider(sim) as provider:
        again = {
            r.request.id: r
            for r in await run_all(provider, requests, Journal(str(tmp_path / "j")), again_stats)
        }
    assert arrivals(sim, "fresh") - sent == 3 and again_stats.cached == 6
    assert {k: r.samples for k, r in again.items()} == {k: r.samples for k, r in results.items()}


async def test_a_repeat_in_a_later_chunk_is_counted_once_given_the_counted_keys(
    sim: SimServer, tmp_path: Path
) -> None:
    journal, counted = Journal(str(tmp_path / "j")), set[str]()
    first = fresh_request("x1", "tell me about the lighthouse", n=2)
    repeat = fresh_request("x2", "tell me about the lighthouse", n=2)
    async with make_provider(sim) as provider:
        one = [r async for r in run_requests(provider, [first], journal, counted=counted)]
        two = [r async for r in run_requests(provider, [repeat], journal, counted=counted)]
        alone = [r async for r in run_requests(provider, [repeat], journal)]
    assert one[0].texts == two[0].texts == alone[0].texts and two[0].cached
    assert two[0].usage == Usage() and one[0].usage.prompt_tokens > 0
    assert alone[0].usage == one[0].usage  # without the set, a journal hit carries its share


def test_the_model_service_answers_repeats_in_later_chunks_from_the_journal(
    sim: SimServer, tmp_path: Path
) -> None:
    """`ModelService.run` feeds a batch to `run_requests` a chunk at a time; a request repeated
    in a later chunk is answered from the journal, as the earlier chunk finished first."""
    texts = [f"tell me about district {i}" for i in range(20)]
    texts += [texts[9], texts[12]]  # repeats, several chunks after their originals
    requests = [fresh_request(f"q{i}", t) for i, t in enumerate(texts)]
    journal, stats = Journal(str(tmp_path / "j")), BatchStats()
    service = ModelService()
    try:
        provider = service.provider({"kind": "openai", "base_url": sim.base_url})
        sent = arrivals(sim, "fresh")
        results = {
            r.request.id: r
            for r in service.run([(provider, requests)], journal, stats, chunk_size=4)
        }
    finally:
        service.close()
    assert arrivals(sim, "fresh") - sent == 20
    assert (stats.sent, stats.cached) == (20, 2)
    assert results["q20"].texts == results["q9"].texts
    assert results["q21"].texts == results["q12"].texts
