import asyncio
import time

import pytest

from vlpref.providers.ratelimit import RateLimiter, parse_duration, retry_after_seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("120ms", 0.12), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("0", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1x", "s1"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    assert parse_duration(text) is None


def test_retry_after_prefers_milliseconds() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None


async def test_requests_per_minute_are_paced() -> None:
    limiter = RateLimiter(rpm=600)  # 10/s, burst of one second's worth
    stamps = []
    for _ in range(25):
        await limiter.acquire()
        stamps.append(time.monotonic())
    elapsed = stamps[-1] - stamps[0]
    # 10 go at once (the burst), the other 15 at 10/s.
    assert elapsed == pytest.approx(1.5, abs=0.25)
    # No one-second window holds more than the burst plus one second's refill.
    for i, t in enumerate(stamps):
        assert sum(1 for s in stamps[i:] if s - t < 1.0) <= 20


async def test_tokens_per_minute_are_paced_and_settled() -> None:
    limiter = RateLimiter(tpm=60_000)  # 1,000 tokens/s
    t0 = time.monotonic()
    await limiter.acquire(1000)
    await limiter.acquire(500)  # must wait ~0.5 s
    assert time.monotonic() - t0 == pytest.approx(0.5, abs=0.15)
    limiter.settle(estimated=500, actual=0)  # the call used nothing: give it back
    t1 = time.monotonic()
    await limiter.acquire(500)
    assert time.monotonic() - t1 < 0.1


async def test_headers_tighten_limits_and_pause_on_exhaustion() -> None:
    limiter = RateLimiter()
    limiter.observe_headers({"x-ratelimit-limit-requests": "120"})
    assert limiter.rpm == 120
    limiter.observe_headers({"x-ratelimit-limit-requests": "1000"})  # looser: ignored
    assert limiter.rpm == 120
    limiter.observe_headers(
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "300ms"}
    )
    t0 = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - t0 == pytest.approx(0.3, abs=0.1)


async def test_cool_down_holds_every_waiter() -> None:
    limiter = RateLimiter()
    limiter.pause_for(0.3)
    t0 = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for _ in range(5)))
    assert time.monotonic() - t0 == pytest.approx(0.3, abs=0.1)
