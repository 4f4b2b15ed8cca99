"""Run a batch through a provider with the request journal in front of it.

For each request the runner looks up the keys of samples 0..n-1. If all are journaled, the result
is built from the journal and nothing is sent. Otherwise only the missing samples are asked for (a
request with `n` = the number missing) and every answer is journaled the moment it arrives, before
it is handed to the caller. Raising `n` in a config therefore costs only the new samples, and a
killed run loses only what was in flight.

Requests of one batch with the same fingerprint (everything but `n` and the caller's id) are sent
once: one call asks for the missing samples of the largest `n` among them, and each request gets
its own first `n` samples, under its own `request` (callers map results back by `request.id`).
Samples are keyed by index, so a request for n=2 is covered by one for n=4 of the same fingerprint.

Usage. Each sample carries its share of the call that produced it (`Sample.usage`, see
`SampleUsage` and `split_usage`); the shares of a call add up to what the endpoint billed for it,
and they are journaled with the sample, so a sample answered from the journal carries the tokens
it carried when it was answered. A sample key that several requests of a batch share is counted
once, on the first of them in batch order; the others get the same sample with no tokens
(`SampleUsage.shared`). Summing `usage` over a batch's results therefore counts every call once,
and the assignment depends only on the batch, not on what the journal already held: a build
resumed after a kill carries the same usage as a clean one.

Failures are not journaled. Their messages are redacted here (`vlpref.redact`), whichever
provider built them, before anything downstream (early stop, stages, logs) sees them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from vlpref.chat import ChatRequest, ChatResult, Sample, Usage, split_usage
from vlpref.journal import Journal, JournalEntry
from vlpref.keys import request_fingerprint, sample_key
from vlpref.providers.base import Provider
from vlpref.redact import redact


@runtime_checkable
class ResumableProvider(Protocol):
    """A provider whose calls outlive the process (a batch API, vlpref/providers/openai_batch.py):
    `state` is the journal's folder, where it records what it submitted, so a rerun after a kill
    waits for those calls instead of sending them again."""

    def complete_resumable(
        self, requests: Sequence[ChatRequest], state: str | None
    ) -> AsyncIterator[ChatResult]: ...


@dataclass(slots=True)
class BatchStats:
    """What a batch cost, in requests: `requests` = `cached` + `sent` + `deduplicated`.

    - `cached`: answered wholly from the journal;
    - `sent`: sent to the provider (one per distinct fingerprint with missing samples);
    - `deduplicated`: had missing samples, answered by the call of another request of the batch
      with the same fingerprint (nothing sent for them);
    - `failed`: results that carry a failure (a failed call fails its duplicates too);
    - `samples_sent`: samples the calls returned (each journaled once);
    - `samples_cached`: journaled samples handed to results.
    """

    requests: int = 0
    cached: int = 0
    sent: int = 0
    deduplicated: int = 0
    failed: int = 0
    samples_sent: int = 0
    samples_cached: int = 0


def call_id(fingerprint: str, indices: Sequence[int]) -> str:
    """The id of the call that asks for samples `indices` of a request: a hash of what it asked,
    so every build that makes this call names it the same (a resumed build equals a clean one)."""
    asked = ",".join(str(i) for i in indices)
    return hashlib.sha256(f"{fingerprint}:call:{asked}".encode()).hexdigest()[:24]


@dataclass(slots=True)
class _Member:
    """One request of a group, and the sample indices whose usage it carries."""

    request: ChatRequest
    carries: frozenset[int]


@dataclass(slots=True)
class _Group:
    """The requests of a batch that share a fingerprint, answered by (at most) one call."""

    fingerprint: str
    keys: list[str] = field(default_factory=list)  # of samples 0..max n - 1
    have: dict[int, Sample] = field(default_factory=dict)  # journaled, with their shares
    requests: list[ChatRequest] = field(default_factory=list)  # in batch order
    members: list[_Member] = field(default_factory=list)  # those waiting for the call
    missing: list[int] = field(default_factory=list)


def _journaled(entry: JournalEntry, index: int) -> Sample:
    sample = entry.sample
    if sample.usage is None or sample.index != index:  # a line from before shares were recorded
        sample = replace(sample, index=index, usage=entry.share)
    return sample


def _handed(sample: Sample, carries: bool) -> Sample:
    """`sample` as one request gets it: with its share, or (a repeat in the batch) with none."""
    if carries or sample.usage is None:
        return sample
    return replace(sample, completion_tokens=None, usage=sample.usage.shared())


def _usage_of(samples: Iterable[Sample]) -> Usage:
    prompt = completion = 0
    for sample in samples:
        if sample.usage is not None:
            prompt += sample.usage.prompt_tokens
            completion += sample.usage.completion_tokens
    return Usage(prompt, completion)


async def run_requests(
    provider: Provider,
    requests: Iterable[ChatRequest],
    journal: Journal | None = None,
    stats: BatchStats | None = None,
    *,
    counted: set[str] | None = None,
) -> AsyncIterator[ChatResult]:
    """Yield one result per request: those answered wholly from the journal first, then the
    others as their calls finish.

    `counted`: sample keys whose usage earlier batches already handed out (updated here). A caller
    that feeds one logical batch in chunks passes the same set to every chunk, so a key repeated
    across chunks (answered from the journal the second time) is counted once too.
    """
    stats = stats if stats is not None else BatchStats()
    counted = counted if counted is not None else set()
    groups: dict[str, _Group] = {}
    for request in requests:
        stats.requests += 1
        fingerprint = request_fingerprint(provider.identity, request)
        group = groups.get(fingerprint)
        if group is None:
            group = groups[fingerprint] = _Group(fingerprint)
        group.requests.append(request)
        for i in range(len(group.keys), request.params.n):
            key = sample_key(fingerprint, i)
            group.keys.append(key)
            if journal is not None and (entry := journal.get(key)) is not None:
                group.have[i] = _journaled(entry, i)

    to_send: list[ChatRequest] = []
    pending: dict[int, _Group] = {}
    for group in groups.values():
        # Usage goes to the first request (in batch order) that covers a sample, unless an
        # earlier chunk of the batch already handed that key out.
        unclaimed = {i for i, key in enumerate(group.keys) if key not in counted}
        counted.update(group.keys[i] for i in group.have)
        owner: ChatRequest | None = None
        for request in group.requests:
            n = request.params.n
            carries = frozenset(i for i in range(n) if i in unclaimed)
            unclaimed -= carries
            journaled = sum(1 for i in range(n) if i in group.have)
            stats.samples_cached += journaled
            if journaled == n:
                stats.cached += 1
                samples = tuple(_handed(group.have[i], i in carries) for i in range(n))
                yield ChatResult(request, samples=samples, usage=_usage_of(samples), cached=True)
                continue
            if owner is None:
                owner = request
            else:
                stats.deduplicated += 1
            group.members.append(_Member(request, carries))
        if owner is None:
            continue
        group.missing = [i for i in range(len(group.keys)) if i not in group.have]
        sent = owner
        if len(group.missing) != owner.params.n:
            sent = replace(owner, params=replace(owner.params, n=len(group.missing)))
        pending[id(sent)] = group
        to_send.append(sent)

    if not to_send:
        return
    if isinstance(provider, ResumableProvider) and journal is not None:
        # A batch API: it keeps what it submitted beside the journal, so a rerun resumes it.
        stream = provider.complete_resumable(to_send, journal.location)
    else:
        stream = provider.complete(to_send)
    async for result in stream:
        if result.failure is not None:
            # Every provider's failures enter vlpref here, a plug-in's too: a message that quotes
            # a key (an endpoint's echo) is redacted before a stage, a log or a table has it.
            clean = redact(result.failure.message)
            if clean != result.failure.message:
                result = replace(result, failure=replace(result.failure, message=clean))
        group = pending.pop(id(result.request))
        stats.sent += 1
        merged = dict(group.have)
        if result.ok:
            merged.update(_answer(group, result, journal, counted))
            stats.samples_sent += len(merged) - len(group.have)
        for position, member in enumerate(group.members):
            n = member.request.params.n
            samples = tuple(
                _handed(merged[i], i in member.carries) for i in range(n) if i in merged
            )
            if not result.ok:
                stats.failed += 1
            own = replace(result, request=member.request, samples=samples, usage=_usage_of(samples))
            if position:  # a duplicate: nothing was sent for it
                own = replace(own, latency_s=0.0, attempts=0, cached=True)
            yield own


def _answer(
    group: _Group, result: ChatResult, journal: Journal | None, counted: set[str]
) -> dict[int, Sample]:
    """The call's samples in the group's missing slots, with their shares; journaled first."""
    # The n' returned choices fill the missing indices in order.
    slots = list(zip(group.missing, result.samples, strict=False))
    cid = call_id(group.fingerprint, group.missing)
    shares = split_usage(result.usage, [sample for _, sample in slots], cid)
    answered: dict[int, Sample] = {}
    entries = []
    now = time.time()
    for (slot, sample), share in zip(slots, shares, strict=True):
        answered[slot] = replace(
            sample,
            index=slot,
            completion_tokens=share.completion_tokens if share.exact else None,
            usage=share,
        )
        counted.add(group.keys[slot])
        entries.append(
            JournalEntry(
                key=group.keys[slot],
                sample=answered[slot],
                model=result.request.model,
                usage=result.usage,
                call_id=cid,
                latency_s=result.latency_s,
                created=now,
            )
        )
    if journal is not None:
        journal.append(entries)
    return answered


async def run_all(
    provider: Provider,
    requests: Iterable[ChatRequest],
    journal: Journal | None = None,
    stats: BatchStats | None = None,
) -> list[ChatResult]:
    """`run_requests` collected in request order."""
    batch = list(requests)
    positions: dict[int, list[int]] = {}
    for i, request in enumerate(batch):
        positions.setdefault(id(request), []).append(i)
    out: list[ChatResult | None] = [None] * len(batch)
    async for result in run_requests(provider, batch, journal, stats):
        out[positions[id(result.request)].pop(0)] = result
    return [r for r in out if r is not None]
