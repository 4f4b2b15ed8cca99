"""Run-wide endpoint limits (vlpref/limits.py) against a real Prefect server: several
`PrefectLimiter`s with one name stand for several worker processes (the Dask test in
tests/flows/test_shared_limits.py runs real ones)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from vlpref import limits
from vlpref.errors import ConfigError
from vlpref.limits import LIMITS_ENV, LocalLimiter, PrefectLimiter, limiter_for, shared_limits


def gcl_names(prefix: str) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [
            str(g.name)
            for g in client.read_global_concurrency_limits(limit=200)
            if str(g.name).startswith(prefix)
        ]


async def drive(
    limiters: list[PrefectLimiter], requests: int, latency_s: float, workers: int
) -> tuple[int, list[float]]:
    """`requests` calls of `latency_s` spread over the limiters, `workers` coroutines each;
    returns the peak of calls inside a slot at once and every call's admission time."""
    in_flight = peak = 0
    starts: list[float] = []
    left = iter(range(requests))

    async def worker(limiter: PrefectLimiter) -> None:
        nonlocal in_flight, peak
        while next(left, None) is not None:
            await limiter.admit(10)
            starts.append(time.monotonic())  # what the rate limits: admissions
            async with limiter.slot():
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(latency_s)
                in_flight -= 1
            limiter.settle(10, 10)

    try:
        await asyncio.gather(*(worker(lim) for lim in limiters for _ in range(workers)))
    finally:
        for lim in limiters:
            await lim.aclose()
    return peak, starts


def test_concurrency_holds_across_limiters_and_slots_are_reused_locally(
    prefect_server: str,
) -> None:
    prefix = f"vlpref-test{os.getpid()}-conc"
    group = [PrefectLimiter(prefix, concurrency=4) for _ in range(3)]
    peak, starts = asyncio.run(drive(group, requests=120, latency_s=0.01, workers=4))
    assert len(starts) == 120
    assert peak == 4  # reached, never passed, with 12 would-be senders
    trips = sum(lim.round_trips for lim in group)
    assert trips < 120 / 2, trips  # leased blocks, reused locally: no round trip per request


def test_rpm_holds_across_limiters(prefect_server: str) -> None:
    prefix = f"vlpref-test{os.getpid()}-rpm"
    group = [PrefectLimiter(prefix, concurrency=64, rpm=1200) for _ in range(3)]  # 20/s
    started = time.monotonic()
    _, starts = asyncio.run(drive(group, requests=80, latency_s=0.0, workers=4))
    took = time.monotonic() - started
    # At most 20 in any one-second window: 80 take >= 3 s.
    assert took >= 2.9, took
    for t in starts:
        assert sum(1 for u in starts if t <= u < t + 1.0) <= 20


def test_a_closing_limiter_keeps_its_spent_rate_slots_for_their_window(
    prefect_server: str,
) -> None:
    """A worker whose provider closes while the others go on: its rpm blocks go back only
    once the units spent from them are out of the window, or the others would spend those
    slots a second time within it (40 in one second here, against 20)."""
    prefix = f"vlpref-test{os.getpid()}-close"
    first, second = (PrefectLimiter(prefix, concurrency=64, rpm=1200) for _ in range(2))

    async def go() -> tuple[list[float], float]:
        starts: list[float] = []
        for _ in range(20):  # the whole window's 20 requests
            await first.admit(0)
            starts.append(time.monotonic())
        closing = time.monotonic()
        await first.aclose()
        waited = time.monotonic() - closing
        for _ in range(20):
            await second.admit(0)
            starts.append(time.monotonic())
        await second.aclose()
        return starts, waited

    starts, waited = asyncio.run(go())
    assert waited <= 1.5, waited  # one rpm window at most
    for t in starts:
        assert sum(1 for u in starts if t <= u < t + 1.0) <= 20


def test_tpm_takes_estimates_and_settles_locally(prefect_server: str) -> None:
    prefix = f"vlpref-test{os.getpid()}-tpm"
    # 1,000 tokens a second, over one-second windows (ten by default)
    limiter = PrefectLimiter(prefix, concurrency=8, tpm=60_000, tpm_window_s=1.0)

    async def go() -> float:
        started = time.monotonic()
        for _ in range(30):
            await limiter.admit(100)
            limiter.settle(100, 100)
        took = time.monotonic() - started
        await limiter.aclose()
        return took

    assert asyncio.run(go()) >= 1.9  # 3,000 tokens: 1,000 in each window


def test_scope_chooses_the_limiter_and_deletes_the_runs_limits(prefect_server: str) -> None:
    assert not limits.scope()
    assert isinstance(limiter_for("e", concurrency=2), LocalLimiter)
    with shared_limits() as value:
        assert os.environ[LIMITS_ENV] == value
        limiter = limiter_for("e", concurrency=2, rpm=600)
        assert isinstance(limiter, PrefectLimiter)

        async def use() -> None:
            await limiter.admit(1)
            async with limiter.slot():
                pass
            await limiter.aclose()

        asyncio.run(use())
        token = value.split(":", 1)[1]
        assert sorted(gcl_names(f"vlpref-{token}-")) == sorted(limiter.names)
    assert LIMITS_ENV not in os.environ
    assert gcl_names(f"vlpref-{token}-") == []


def test_a_bad_scope_is_refused() -> None:
    with pytest.raises(ConfigError):
        limiter_for("e", concurrency=1, limits_scope="redis:x")
