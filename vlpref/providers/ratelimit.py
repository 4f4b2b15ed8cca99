"""Per-endpoint rate limiting: request and token buckets that also listen to the server.

Two token buckets (requests per minute, tokens per minute) refill continuously. Their burst is one
second's worth, not a minute's: providers enforce per-minute limits over shorter sub-windows too,
so smooth pacing avoids the 429s a full-minute burst would earn.

The server's view wins when it is stricter: `x-ratelimit-limit-*` lowers the configured rate,
`x-ratelimit-remaining-* == 0` pauses until `x-ratelimit-reset-*`, and a 429's `Retry-After`
pauses every worker of the endpoint, not just the one that got it (a cool-down).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Mapping

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Parse OpenAI's reset durations ("1s", "6m0s", "120ms", "1h2m3.5s") or plain seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        value, unit = float(match.group(1)), match.group(2)
        total += value * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds a server asked us to wait: `retry-after-ms`, else `Retry-After` (seconds)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    seconds = headers.get("retry-after")
    if seconds is not None:
        try:
            return max(0.0, float(seconds))
        except ValueError:
            return None  # an HTTP date: rare for APIs; fall back to our own backoff
    return None


class _Bucket:
    """A continuously refilled token bucket (not thread-safe; one event loop)."""

    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)  # one second's worth
        self.level = self.capacity
        self.updated = clock()

    def set_rate(self, per_minute: float) -> None:
        self._refill()
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = min(self.level, self.capacity)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0 if now). A request larger than the whole
        capacity waits for a full bucket, then drives the level negative: it must not starve."""
        self._refill()
        need = min(amount, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Paces one endpoint's requests. `acquire` before sending, `settle` after the answer."""

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._configured_rpm = rpm
        self._configured_tpm = tpm
        self._requests = _Bucket(rpm, clock) if rpm else None
        self._tokens = _Bucket(tpm, clock) if tpm else None
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time spent waiting, for reports

    def pause_for(self, seconds: float) -> None:
        """Hold every new request of this endpoint for `seconds` (a cool-down after a 429)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of about `tokens` tokens may be sent, then take it."""
        # Fast path without the lock (nothing awaits between the check and the take, so this is
        # atomic on the event loop); skipped while others queue, so nobody jumps the line.
        if not self._lock.locked() and self._wait_time(tokens) <= 0:
            self._take(tokens)
            return
        async with self._lock:
            while (wait := self._wait_time(tokens)) > 0:
                self.waited_s += wait
                await asyncio.sleep(wait)
            self._take(tokens)

    def _wait_time(self, tokens: int) -> float:
        wait = self._paused_until - self._clock() if self._paused_until else 0.0
        if self._requests is not None:
            wait = max(wait, self._requests.wait_time(1))
        if self._tokens is not None and tokens:
            wait = max(wait, self._tokens.wait_time(tokens))
        return wait

    def _take(self, tokens: int) -> None:
        if self._requests is not None:
            self._requests.take(1)
        if self._tokens is not None and tokens:
            self._tokens.take(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the real usage is known."""
        if self._tokens is None:
            return
        if actual < estimated:
            self._tokens.give_back(estimated - actual)
        elif actual > estimated:
            self._tokens.take(actual - estimated)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Adopt the server's stricter limits; pause when it says nothing is left."""
        for kind in ("requests", "tokens"):
            limit = _as_float(headers.get(f"x-ratelimit-limit-{kind}"))
            if limit is not None and limit > 0:
                self._tighten(kind, limit)
            remaining = _as_float(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is not None and remaining <= 0:
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
                if reset:
                    self.pause_for(reset)

    def _tighten(self, kind: str, limit: float) -> None:
        if kind == "requests":
            if self._configured_rpm is None or limit < self._configured_rpm:
                self._configured_rpm = limit
                if self._requests is None:
                    self._requests = _Bucket(limit, self._clock)
                else:
                    self._requests.set_rate(limit)
        else:
            if self._configured_tpm is None or limit < self._configured_tpm:
                self._configured_tpm = limit
                if self._tokens is None:
                    self._tokens = _Bucket(limit, self._clock)
                else:
                    self._tokens.set_rate(limit)

    @property
    def rpm(self) -> float | None:
        return self._configured_rpm

    @property
    def tpm(self) -> float | None:
        return self._configured_tpm


def _as_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) else None
