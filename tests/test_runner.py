"""The journal in front of a provider, against the simulated server over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vlpref.chat import ChatRequest, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.providers.base import Provider
from vlpref.runner import BatchStats, run_all
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
        }
    }
    with SimServer(config) as server:
        yield server


def make_provider(sim: SimServer, **extra: Any) -> Provider:
    options = {"base_url": sim.base_url, "max_attempts": 2, "backoff_initial_s": 0.01, **extra}
    return create_provider("openai", options)


def batch(model: str, count: int, n: int = 1) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=f"{model}-{i}",
            model=model,
            messages=(Message.user(f"tell me about item {i}"),),
            params=SamplingParams(temperature=1.0, n=n, max_tokens=32),
            prompt_version="p1",
        )
        for i in range(count)
    ]


def arrivals(sim: SimServer, model: str) -> int:
    return sum(sim.counters()["by_model"].get(model, {}).values())


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
