"""One event loop per process for every model request, shared by all concurrent stage tasks.

Prefect runs (stage, branch) tasks in worker threads. If each task opened its own providers, an
endpoint's `concurrency` and `rpm` would be multiplied by the number of branches in flight. The
service instead keeps one provider per endpoint on one background event loop; tasks hand it a
batch and iterate over the results from their own thread. Limits therefore hold per endpoint in
the process; across Dask worker processes the provider's shared limiter (`vlpref.limits`, Prefect
global concurrency limits) holds them for the whole run.

Each batch (one stage's requests for one model) starts with a probe (`vlpref.earlystop`): its first
`early_stop_after` sent requests go out alone, and if they all fail with the same cause that
retrying cannot heal (a wrong key, an unknown model, answers that never parse) the rest of the
batch is answered without being sent, as failures of kind `stopped`. Once the probe has decided
(the first usable answer, a transient failure or a different cause passes it) and its requests
have finished, the batch goes on at full speed. That hold-back costs one answer's latency, so a
model (with the same answer check) whose batch passed in the last `TRUST_S` seconds skips it: its
batches start at full speed and are watched the same way, stopping after the chunk in flight.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from vlpref import request_events
from vlpref.chat import ChatRequest, ChatResult, Failure
from vlpref.earlystop import DEFAULT_EARLY_STOP_AFTER, Check, EarlyStop, cause_of
from vlpref.journal import Journal
from vlpref.keys import canonical_json
from vlpref.providers.base import Provider
from vlpref.providers.registry import create_provider
from vlpref.runner import BatchStats, run_requests

_DONE = object()
logger = logging.getLogger(__name__)

# A model whose batch passed its probe lately is trusted: its next batches start at full speed,
# watched the same way (the first N sent results), so a key revoked mid-run still stops a batch,
# after the chunk in flight. Holding every batch back for one answer's latency cost up to 14 % of
# the rate with many small batches at once (50 ms answers, 4 x 12 batches of 57 requests).
TRUST_S = 600.0


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


@dataclass(frozen=True, slots=True)
class Batch:
    """One stage's requests for one model on one provider. `check` (optional) says why a
    successful answer is unusable (it does not parse); the early-stop probe counts such answers
    as failures. A plain `(provider, requests)` tuple is a batch without a check."""

    provider: Provider
    requests: Iterable[ChatRequest]
    check: Check | None = None


@dataclass(frozen=True, slots=True)
class _StopNotice:
    """Put on the result queue once a stopped batch has answered all its requests."""

    reason: str
    not_sent: int


class _NotSent(Provider):
    """Answers every request with one failure, sending nothing: the tail of a stopped batch.
    It has its provider's identity, so the journal still answers what it holds."""

    kind = "not-sent"

    def __init__(self, identity: str, failure: Failure) -> None:
        self._identity = identity
        self.failure = failure
        self.answered = 0

    @property
    def identity(self) -> str:
        return self._identity

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        raise NotImplementedError("built by the model service only")

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        for request in requests:
            self.answered += 1
            yield ChatResult(request, failure=self.failure)


def warn(message: str) -> None:
    """One warning line: on the Prefect run's logger inside a flow or task run, else logging."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            get_run_logger().warning(message)
            return
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - a process without Prefect (the vLLM tier)
        pass
    logger.warning(message)


class ModelService:
    applies_budget = True  # a planning service never sends, so no budget applies to it

    """Providers keyed by their endpoint options, living on one background event loop."""

    _shared: ModelService | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vlpref-models", daemon=True
        )
        self._thread.start()
        self._providers: dict[str, Provider] = {}
        self._early_stop: dict[int, int] = {}  # id(provider) -> its batches' early-stop limit
        # (id(provider), model, check) -> when a batch of it last passed its probe (loop thread)
        self._passed: dict[tuple[int, str, str], float] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> ModelService:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = ModelService()
                atexit.register(cls._shared.close)
            return cls._shared

    def provider(
        self, options: Mapping[str, Any], *, early_stop_after: int | None = None
    ) -> Provider:
        """The provider for an endpoint entry (same options, same provider). `early_stop_after`
        (the run config's) sets how many sent failures alike stop its batches (0: never)."""
        key = canonical_json(dict(options))
        with self._lock:
            if key not in self._providers:
                kind = str(options.get("kind", "openai"))
                self._providers[key] = create_provider(kind, options)
            provider = self._providers[key]
            if early_stop_after is not None:
                self._early_stop[id(provider)] = early_stop_after
            return provider

    def alias(self, wrapper: Provider, inner: Provider) -> None:
        """Treat `wrapper` (a provider wrapping one of this service's, e.g. under a budget) as
        `inner` for the early-stop settings."""
        with self._lock:
            if id(inner) in self._early_stop:
                self._early_stop[id(wrapper)] = self._early_stop[id(inner)]

    def run(
        self,
        batches: Iterable[Batch | tuple[Provider, Iterable[ChatRequest]]],
        journal: Journal | None,
        stats: BatchStats | None = None,
        *,
        chunk_size: int = 2048,
        early_stop_after: int | None = None,
    ) -> Iterator[ChatResult]:
        """Run batches (each on its provider) concurrently; yield results in this thread as they
        arrive. The journal is written from the service loop, as results arrive.

        Requests are pulled from each batch lazily, `chunk_size` at a time, and a new chunk starts
        only once the caller has taken most of the previous chunk's results: memory holds a few
        chunks of requests and results however large the batch (a branch of a SPA-VL-sized run
        has tens of thousands of judge calls).

        Each batch is probed first (module docstring): `early_stop_after` sets the probe's size
        for every batch of this call (0: no probe); by default the limit given to `provider()`,
        else `DEFAULT_EARLY_STOP_AFTER`. A stopped batch's remaining requests come back as
        failures of kind `stopped` (journaled answers still come from the journal), count as
        failed and not as sent in `stats`, and one warning is logged."""
        results: queue.Queue[object] = queue.Queue()
        batch_list = [b if isinstance(b, Batch) else Batch(*b) for b in batches]
        if not batch_list:
            return
        counts = stats if stats is not None else BatchStats()

        async def wait_for_caller() -> None:
            # Backpressure: let the caller catch up before asking for more. The caller is
            # another thread reading a queue.Queue, so polling is simpler than an Event it
            # would have to set through the loop for every result.
            while results.qsize() > chunk_size:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        async def send(
            provider: Provider,
            iterator: Iterator[ChatRequest],
            counted: set[str],
            guard: EarlyStop | None = None,
            check: Check | None = None,
            *,
            hold_back: bool = False,
        ) -> None:
            # One chunk after the other: a request repeated in a later chunk is answered from
            # the journal, and `counted` (the batch's sample keys whose usage was handed out)
            # lets it carry no usage a second time (vlpref/runner.py).
            # With a guard, the first sent results are watched until it decides; then this
            # returns. `hold_back` (the probe): chunks of at most `guard.remaining` requests, so
            # no more than the limit is sent before the decision (journal hits do not count).
            # Without it (a trusted model) chunks are full, and a stop comes after the chunk.
            whole = getattr(provider, "chunk_requests", None)
            while guard is None or guard.probing:
                size = whole if isinstance(whole, int) else chunk_size
                if hold_back and guard is not None:
                    size = min(guard.remaining, chunk_size)
                chunk = list(itertools.islice(iterator, size))
                if not chunk:
                    return
                async for result in run_requests(provider, chunk, journal, counts, counted=counted):
                    if guard is not None and guard.probing and not result.cached:
                        guard.observe(cause_of(result, check), result.request.model)
                    results.put(result)
                await wait_for_caller()

        async def pump(batch: Batch) -> None:
            iterator = iter(batch.requests)
            counted: set[str] = set()
            limit = early_stop_after
            if limit is None:
                limit = self._early_stop.get(id(batch.provider), DEFAULT_EARLY_STOP_AFTER)
            first = next(iterator, None)
            if first is None:
                return
            iterator = itertools.chain((first,), iterator)
            # A batch API (`chunk_requests`, vlpref/providers/openai_batch.py) gets the whole
            # stage: a probe would submit a first small batch and wait hours for it.
            if limit <= 0 or hasattr(batch.provider, "chunk_requests"):
                await send(batch.provider, iterator, counted)
                return
            guard = EarlyStop(limit)
            # Trust is per check too: answers that arrive are no sign that they parse.
            check = batch.check
            key = (id(batch.provider), first.model, getattr(check, "__qualname__", repr(check)))
            trusted = time.monotonic() - self._passed.get(key, -math.inf) < TRUST_S
            await send(batch.provider, iterator, counted, guard, check, hold_back=not trusted)
            if guard.stopped:
                self._passed.pop(key, None)
                not_sent = _NotSent(batch.provider.identity, guard.failure())
                await send(not_sent, iterator, counted)
                counts.sent -= not_sent.answered  # run_requests counted them as sent
                results.put(_StopNotice(guard.reason(), not_sent.answered))
                return
            if guard.state == "passed":
                self._passed[key] = time.monotonic()
            await send(batch.provider, iterator, counted)  # the rest (if any) at full speed

        async def pump_all() -> None:
            try:
                await asyncio.gather(*(pump(b) for b in batch_list))
            except BaseException as exc:  # handed to the caller's thread, raised there
                results.put(_Raised(exc))
            finally:
                results.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump_all(), self._loop)
        try:
            while True:
                item = results.get()
                if isinstance(item, ChatResult):
                    request_events.observe(item)  # the live progress (a no-op unless watched)
                    yield item
                elif item is _DONE:
                    break
                elif isinstance(item, _Raised):
                    raise item.error
                elif isinstance(item, _StopNotice):
                    warn(
                        f"early stop: {item.reason} ({item.not_sent} more request(s) of the "
                        "batch not sent: failures of kind 'stopped', which a rerun asks again)"
                    )
        finally:
            if not future.done():
                future.cancel()

    def close(self) -> None:
        async def close_all() -> None:
            for provider in self._providers.values():
                await provider.aclose()

        if self._loop.is_running():
            # A provider under run-wide limits may wait out its rate windows (a tpm window is
            # ten seconds) before it hands its blocks back: vlpref/limits.py, CLOSE_WAIT_S.
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=45)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._providers.clear()
