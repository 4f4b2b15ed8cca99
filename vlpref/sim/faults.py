"""Deterministic fault draws, latency draws and the enforced rate-limit window.

Every random decision is a hash of (sha256 of the raw request body, how many times that body
arrived before, a salt naming the decision, the global seed). A retry of the same body is a new
arrival and so gets a fresh draw, yet a whole run is reproducible.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from statistics import NormalDist

from vlpref.sim.config import FaultKind, FaultSpec, LatencyConfig, RateLimitConfig

WINDOW_S = 60.0
# Bodies remembered for arrival counting; beyond this the memory is dropped (and counts restart)
# so that a long-running sim cannot grow without bound.
MAX_TRACKED_BODIES = 1_000_000
_STD_NORMAL = NormalDist()


def unit_hash(body_sha: bytes, arrival: int, salt: str, seed: int) -> float:
    """A uniform float in [0, 1) from the decision's inputs."""
    h = hashlib.sha256(body_sha + f"|{arrival}|{salt}|{seed}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class FaultBook:
    """Arrival counts per body and faults given per (body, kind)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._arrivals: dict[bytes, int] = {}
        self._given: dict[tuple[bytes, str], int] = {}

    def arrive(self, body_sha: bytes) -> int:
        """Record one arrival of `body_sha`; returns how many arrived before it."""
        if len(self._arrivals) >= MAX_TRACKED_BODIES:
            self.reset()
        n = self._arrivals.get(body_sha, 0)
        self._arrivals[body_sha] = n + 1
        return n

    def draw(
        self, body_sha: bytes, arrival: int, specs: Mapping[FaultKind, FaultSpec]
    ) -> FaultKind | None:
        """The fault for this arrival, if any: the first kind (in `specs` order) that fires."""
        for kind, spec in specs.items():
            cap = spec.max_per_request
            key = (body_sha, kind)
            if cap is not None and self._given.get(key, 0) >= cap:
                continue
            if spec.rate >= 1.0 or unit_hash(body_sha, arrival, kind, self.seed) < spec.rate:
                self._given[key] = self._given.get(key, 0) + 1
                return kind
        return None

    def reset(self) -> None:
        """Forget every body."""
        self._arrivals.clear()
        self._given.clear()


def latency_s(cfg: LatencyConfig, body_sha: bytes, arrival: int, seed: int) -> float:
    """The delay in seconds for one arrival."""
    if cfg.kind == "constant":
        return cfg.ms / 1000.0
    u = unit_hash(body_sha, arrival, "latency", seed)
    if cfg.kind == "uniform":
        return (cfg.low_ms + u * (cfg.high_ms - cfg.low_ms)) / 1000.0
    if cfg.kind == "exponential":
        return -cfg.mean_ms * math.log1p(-u) / 1000.0
    if cfg.mean_ms <= 0:
        return 0.0
    # lognormal with the configured arithmetic mean: mu = ln(mean) - sigma^2 / 2
    mu = math.log(cfg.mean_ms) - cfg.sigma**2 / 2
    z = _STD_NORMAL.inv_cdf(min(max(u, 1e-12), 1.0 - 1e-12))
    return math.exp(mu + cfg.sigma * z) / 1000.0


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `120ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    s = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{s}"
    if minutes >= 1:
        return f"{int(minutes)}m{s}"
    return s


# Reported when no limit is enforced. Clients take these headers at their word (as they must with
# real providers), so they are far above anything a benchmark here can reach.
GENEROUS_HEADERS: dict[str, str] = {
    "x-ratelimit-limit-requests": "100000000",
    "x-ratelimit-remaining-requests": "99999999",
    "x-ratelimit-reset-requests": "1ms",
    "x-ratelimit-limit-tokens": "100000000000",
    "x-ratelimit-remaining-tokens": "99999999000",
    "x-ratelimit-reset-tokens": "1ms",
}


class SlidingWindow:
    """Requests and tokens admitted over the last minute, for one model."""

    def __init__(self, limits: RateLimitConfig) -> None:
        self.rpm = limits.rpm
        self.tpm = limits.tpm
        self._entries: deque[list[float]] = deque()  # [admitted_at, tokens]
        self._tokens = 0.0

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0][0] <= now - WINDOW_S:
            self._tokens -= entries.popleft()[1]

    def _wait_for_tokens(self, now: float, need: float, tpm: int) -> float:
        """Seconds until enough old entries expire to fit `need` more tokens."""
        freed = 0.0
        excess = self._tokens + need - tpm
        for at, tokens in self._entries:
            freed += tokens
            if freed >= excess:
                return at + WINDOW_S - now
        # A request larger than tpm is admitted once the window is empty.
        return self._entries[-1][0] + WINDOW_S - now

    def admit(self, now: float, tokens: float) -> tuple[list[float] | None, float]:
        """Admit a request costing `tokens`: (entry, 0.0), or (None, seconds to wait)."""
        self._expire(now)
        if self.rpm is not None and len(self._entries) >= self.rpm:
            return None, self._entries[0][0] + WINDOW_S - now
        if self.tpm is not None and self._entries and self._tokens + tokens > self.tpm:
            return None, self._wait_for_tokens(now, tokens, self.tpm)
        entry = [now, tokens]
        self._entries.append(entry)
        self._tokens += tokens
        return entry, 0.0

    def settle(self, entry: list[float], tokens: float) -> None:
        """Replace an admitted request's estimated tokens by its actual count."""
        self._tokens += tokens - entry[1]
        entry[1] = tokens

    def headers(self, now: float) -> dict[str, str]:
        """The six x-ratelimit-* headers describing the window now."""
        self._expire(now)
        oldest = self._entries[0][0] + WINDOW_S - now if self._entries else 0.0
        h = dict(GENEROUS_HEADERS)
        if self.rpm is not None:
            h["x-ratelimit-limit-requests"] = str(self.rpm)
            h["x-ratelimit-remaining-requests"] = str(max(0, self.rpm - len(self._entries)))
            h["x-ratelimit-reset-requests"] = format_duration(oldest)
        if self.tpm is not None:
            h["x-ratelimit-limit-tokens"] = str(self.tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(0, int(self.tpm - self._tokens)))
            h["x-ratelimit-reset-tokens"] = format_duration(oldest)
        return h

    def reset(self) -> None:
        """Empty the window."""
        self._entries.clear()
        self._tokens = 0.0
