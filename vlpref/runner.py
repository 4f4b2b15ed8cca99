"""Run a batch through a provider with the request journal in front of it.

For each request the runner looks up the keys of samples 0..n-1. If all are journaled, the result
is built from the journal and nothing is sent. Otherwise only the missing samples are asked for (a
request with `n` = the number missing) and every answer is journaled the moment it arrives, before
it is handed to the caller. Raising `n` in a config therefore costs only the new samples, and a
killed run loses only what was in flight.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace

from vlpref.chat import ChatRequest, ChatResult, Sample, Usage
from vlpref.journal import Journal, JournalEntry
from vlpref.keys import request_fingerprint, sample_key, unique_ids
from vlpref.providers.base import Provider

# Call ids only need to be unique (usage is counted once per call).
_new_call_id = unique_ids()


@dataclass(slots=True)
class BatchStats:
    """What a batch cost: requests asked for, served from the journal, sent, failed."""

    requests: int = 0
    cached: int = 0
    sent: int = 0
    failed: int = 0
    samples_sent: int = 0
    samples_cached: int = 0


@dataclass(slots=True)
class _Pending:
    original: ChatRequest
    keys: list[str]
    missing: list[int]
    have: dict[int, Sample]


async def run_requests(
    provider: Provider,
    requests: Iterable[ChatRequest],
    journal: Journal | None = None,
    stats: BatchStats | None = None,
) -> AsyncIterator[ChatResult]:
    """Yield one result per request (journaled ones first, then sent ones as they finish)."""
    stats = stats if stats is not None else BatchStats()
    to_send: list[ChatRequest] = []
    pending: dict[int, _Pending] = {}
    for request in requests:
        stats.requests += 1
        fingerprint = request_fingerprint(provider.identity, request)
        keys = [sample_key(fingerprint, i) for i in range(request.params.n)]
        have: dict[int, Sample] = {}
        if journal is not None:
            for i, key in enumerate(keys):
                entry = journal.get(key)
                if entry is not None:
                    have[i] = replace(entry.sample, index=i)
        missing = [i for i in range(request.params.n) if i not in have]
        if not missing:
            stats.cached += 1
            stats.samples_cached += len(have)
            yield ChatResult(request, samples=tuple(have[i] for i in range(len(keys))), cached=True)
            continue
        stats.samples_cached += len(have)
        sent = request
        if len(missing) != request.params.n:
            sent = replace(request, params=replace(request.params, n=len(missing)))
        pending[id(sent)] = _Pending(request, keys, missing, have)
        to_send.append(sent)

    if not to_send:
        return
    async for result in provider.complete(to_send):
        job = pending.pop(id(result.request))
        stats.sent += 1
        if not result.ok:
            stats.failed += 1
            yield replace(result, request=job.original, samples=tuple(job.have.values()))
            continue
        call_id = _new_call_id()
        now = time.time()
        entries = []
        merged = dict(job.have)
        # The n' returned choices fill the missing indices in order.
        for slot, sample in zip(job.missing, result.samples, strict=False):
            merged[slot] = replace(sample, index=slot)
            entries.append(
                JournalEntry(
                    key=job.keys[slot],
                    sample=merged[slot],
                    model=job.original.model,
                    usage=result.usage,
                    call_id=call_id,
                    latency_s=result.latency_s,
                    created=now,
                )
            )
        stats.samples_sent += len(entries)
        if journal is not None:
            journal.append(entries)
        yield replace(
            result,
            request=job.original,
            samples=tuple(merged[i] for i in sorted(merged)),
            usage=result.usage if result.usage else Usage(),
        )


async def run_all(
    provider: Provider,
    requests: Iterable[ChatRequest],
    journal: Journal | None = None,
    stats: BatchStats | None = None,
) -> list[ChatResult]:
    """`run_requests` collected in request order."""
    batch = list(requests)
    order = {id(r): i for i, r in enumerate(batch)}
    out: list[ChatResult | None] = [None] * len(batch)
    async for result in run_requests(provider, batch, journal, stats):
        out[order[id(result.request)]] = result
    return [r for r in out if r is not None]
