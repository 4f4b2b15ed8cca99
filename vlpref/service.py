"""One event loop per process for every model request, shared by all concurrent stage tasks.

Prefect runs (stage, branch) tasks in worker threads. If each task opened its own providers, an
endpoint's `concurrency` and `rpm` would be multiplied by the number of branches in flight. The
service instead keeps one provider per endpoint on one background event loop; tasks hand it a
batch and iterate over the results from their own thread. Limits therefore hold per endpoint per
process (with several worker processes, e.g. Dask, divide the limits among them).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from vlpref.chat import ChatRequest, ChatResult
from vlpref.journal import Journal
from vlpref.keys import canonical_json
from vlpref.providers.base import Provider
from vlpref.providers.registry import create_provider
from vlpref.runner import BatchStats, run_requests

_DONE = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class ModelService:
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
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> ModelService:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = ModelService()
                atexit.register(cls._shared.close)
            return cls._shared

    def provider(self, options: Mapping[str, Any]) -> Provider:
        """The provider for an endpoint entry (same options, same provider)."""
        key = canonical_json(dict(options))
        with self._lock:
            if key not in self._providers:
                kind = str(options.get("kind", "openai"))
                self._providers[key] = create_provider(kind, options)
            return self._providers[key]

    def run(
        self,
        batches: Iterable[tuple[Provider, Iterable[ChatRequest]]],
        journal: Journal | None,
        stats: BatchStats | None = None,
        *,
        chunk_size: int = 2048,
    ) -> Iterator[ChatResult]:
        """Run batches (each on its provider) concurrently; yield results in this thread as they
        arrive. The journal is written from the service loop, as results arrive.

        Requests are pulled from each batch lazily, `chunk_size` at a time, and a new chunk starts
        only once the caller has taken most of the previous chunk's results: memory holds a few
        chunks of requests and results however large the batch (a branch of a SPA-VL-sized run
        has tens of thousands of judge calls)."""
        results: queue.Queue[object] = queue.Queue()
        batch_list = list(batches)
        if not batch_list:
            return

        async def pump(provider: Provider, requests: Iterable[ChatRequest]) -> None:
            iterator = iter(requests)
            while chunk := list(itertools.islice(iterator, chunk_size)):
                async for result in run_requests(provider, chunk, journal, stats):
                    results.put(result)
                # Backpressure: let the caller catch up before asking for more. The caller is
                # another thread reading a queue.Queue, so polling is simpler than an Event it
                # would have to set through the loop for every result.
                while results.qsize() > chunk_size:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

        async def pump_all() -> None:
            try:
                await asyncio.gather(*(pump(p, r) for p, r in batch_list))
            except BaseException as exc:  # handed to the caller's thread, raised there
                results.put(_Raised(exc))
            finally:
                results.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump_all(), self._loop)
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    break
                if isinstance(item, _Raised):
                    raise item.error
                assert isinstance(item, ChatResult)
                yield item
        finally:
            if not future.done():
                future.cancel()

    def close(self) -> None:
        async def close_all() -> None:
            for provider in self._providers.values():
                await provider.aclose()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._providers.clear()
