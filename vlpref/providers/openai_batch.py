"""`mode: batch` of an OpenAI-compatible endpoint: a stage's requests go out as batch files.

For users whose judge or response model is a paid API that sells a batch tier (OpenAI's Batch API
is half price; results within `batch_completion_window`). docs/batch.md is the user's page.

The runner hands this provider what the journal does not answer (`vlpref.runner`: one call per
fingerprint, `n` = the samples missing). Here they are written as JSONL batch files (one model
per file, at most `batch_max_requests` lines and `batch_max_bytes` bytes each), uploaded (`POST
/v1/files`, purpose `batch`) and submitted (`POST /v1/batches`); each batch is polled with
growing waits (`batch_poll_s` up to `batch_poll_max_s`), and once it ends its output and error
files are read line by line, each answer handed back (and so journaled by the runner) as it is
read. Answers go through `parse_completion`, the online path's parser, so logprobs, usage and
finish reasons are read alike; a batch answer and an online answer are the same journal line.

Requests a batch did not answer (expired, cancelled, lost, a retryable line status such as 429
or 5xx, a body that is not a chat completion) are submitted again in a new batch, at most
`batch_max_submissions` times in all; a request refused for good (400, 401, 404) fails at once.

Resume. Every batch submitted gets a small record (`vlpref.batching.BatchRecord`: its id, its
endpoint's hash, the custom ids it holds) in `batches/` under the journal's folder, written right
after the batch is created. A later run asking any of those requests polls that batch instead of
submitting them again; once a batch's results are read its record is renamed `.done.json`. The
records are files beside the journal rather than lines in it because the journal's lines are
answers keyed by request (its readers, old versions included, refuse anything else) and a
record changes state (open, then done), which an append-only line cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Self, cast

import httpx2
import openai

from vlpref.batching import (
    TERMINAL_STATUSES,
    BatchRecord,
    ResultLine,
    batch_line,
    custom_id,
    endpoint_key,
    is_open_record,
    parse_result_line,
    poll_delays,
    record_file,
    starts_new_file,
)
from vlpref.chat import ChatRequest, ChatResult, Failure, FailureKind, Sample, Usage
from vlpref.fs import AbstractFileSystem, is_local, join, resolve
from vlpref.keys import request_fingerprint
from vlpref.providers.base import Provider
from vlpref.providers.openai_compat import (
    OpenAICompatOptions,
    OpenAICompatProvider,
    _classify,
    _dumps,
    _FinalError,
    _RetryableError,
    classify_status,
    parse_completion,
)
from vlpref.redact import redact

logger = logging.getLogger(__name__)

RECORDS_FOLDER = "batches"
# Uploads and result files can be 200 MB: the endpoint's `timeout_s` (one chat answer) is too
# short for them.
FILE_TIMEOUT_S = 900.0
# How many of a stage's requests the model service hands over at once (per model). A batch API
# answers within its window however many there are, so the service's small chunks and its
# early-stop probe (which waits for the first answers before sending the rest) would only make a
# stage wait one window per chunk; a wrong key fails at the upload, before anything is paid.
CHUNK_REQUESTS = 500_000


@dataclass(slots=True)
class _Wanted:
    """The requests of one `complete` call that share a custom id (one line of a batch)."""

    requests: list[ChatRequest]
    submissions: int = 0  # batches it was sent in (in this run and, resumed, the one before)
    first_sent: float = 0.0  # perf_counter of its first batch in this run (its latency's start)
    last_reason: Failure | None = None


@dataclass(frozen=True, slots=True)
class _Done:
    """Queued after a batch's results: its record may be closed once they are handed back."""

    record: BatchRecord


@dataclass(slots=True)
class _Tracked:
    """A batch being waited for, and the custom ids this call expects from it."""

    record: BatchRecord
    expected: set[str]
    resumed: bool = False
    answered: set[str] = field(default_factory=set)


class OpenAIBatchProvider(OpenAICompatProvider):
    """An OpenAI-compatible endpoint's batch API; the same kind and journal keys as online."""

    chunk_requests = CHUNK_REQUESTS

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        """Without a journal folder there is nowhere to keep batch records: no resume."""
        async for result in self.complete_resumable(list(requests), None):
            yield result

    async def complete_resumable(
        self, requests: Sequence[ChatRequest], state: str | None
    ) -> AsyncIterator[ChatResult]:
        """Answer `requests` through batches; `state` is the journal's folder, under which the
        batches submitted are recorded (and found again by a rerun)."""
        if not requests:
            return
        run = _BatchRun(self, await self._get_client(), state)
        async for result in run.results(requests):
            yield result


class _BatchRun:
    """One `complete_resumable` call: its requests, the batches holding them, their results."""

    def __init__(
        self, provider: OpenAIBatchProvider, client: openai.AsyncOpenAI, state: str | None
    ) -> None:
        self.provider = provider
        self.options = provider.options
        # Control calls (upload, create, poll, download) are few: the SDK's own retries (backoff,
        # Retry-After) are enough, unlike the online path's per-request ones.
        self.client = client.with_options(max_retries=max(self.options.max_attempts - 1, 0))
        self.endpoint = endpoint_key(self.options.base_url)
        self.fs: AbstractFileSystem | None = None
        self.folder = ""
        if state is not None:
            self.fs, root = resolve(state)
            self.folder = join(root, RECORDS_FOLDER)
        self.wanted: dict[str, _Wanted] = {}
        self.queue: asyncio.Queue[ChatResult | _Done | None] = asyncio.Queue()
        self.live = 0  # trackers running; each puts one None on the queue when it ends
        self.tasks: set[asyncio.Task[None]] = set()

    # -- the call ------------------------------------------------------------------------------

    async def results(self, requests: Sequence[ChatRequest]) -> AsyncIterator[ChatResult]:
        identity = self.provider.identity
        for request in requests:
            cid = custom_id(request_fingerprint(identity, request), request.params.n)
            self.wanted.setdefault(cid, _Wanted([])).requests.append(request)
        try:
            fresh = set(self.wanted)
            for tracked in self._resumable(fresh):
                fresh -= tracked.expected
                self._track(tracked)
            await self._submit([cid for cid in self.wanted if cid in fresh], submission=1)
            # Failures of requests that never made it into a batch are queued with no tracker.
            while self.live or not self.queue.empty():
                item = await self.queue.get()
                if item is None:
                    self.live -= 1
                elif isinstance(item, _Done):
                    # Only now, with every result read from it handed back (and journaled by
                    # the runner before it asked for the next), is the batch closed: a kill
                    # before this point makes the rerun read it again, never pay for it again.
                    self._write_record(item.record, done=True)
                else:
                    yield item
        finally:
            # Closed early (a cancelled task, a killed flow): the batches go on server-side and
            # their records stay open, so the next run polls them.
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _track(self, tracked: _Tracked) -> None:
        self.live += 1
        task = asyncio.get_running_loop().create_task(self._follow(tracked))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- records -------------------------------------------------------------------------------

    def _resumable(self, fresh: set[str]) -> list[_Tracked]:
        """Open records of this endpoint holding requests of this call, each request assigned to
        the newest batch that holds it (a resubmission is newer than the batch it repeats)."""
        if self.fs is None or not self.fs.exists(self.folder):
            return []
        records = []
        for path in self.fs.ls(self.folder, detail=False):
            name = posixpath.basename(str(path))
            if not is_open_record(name):
                continue
            try:
                with self.fs.open(str(path), "rb") as handle:
                    record = BatchRecord.from_json(handle.read())
            except (ValueError, KeyError, TypeError, OSError) as exc:
                # A record torn by a kill while it was written: its batch is submitted again.
                logger.warning("batch record %s unreadable (%s); ignored", name, exc)
                continue
            if record.endpoint == self.endpoint:
                records.append(record)
        records.sort(key=lambda r: r.submitted, reverse=True)
        tracked = []
        left = set(fresh)
        for record in records:
            expected = left.intersection(record.custom_ids)
            if not expected:
                continue
            left -= expected
            # Its latency runs from when the killed run submitted it.
            started = time.perf_counter() - max(time.time() - record.submitted, 0.0)
            for cid in expected:
                self.wanted[cid].submissions = record.submission
                self.wanted[cid].first_sent = started
            tracked.append(_Tracked(record, expected, resumed=True))
            logger.info(
                "resuming batch %s (%d of its requests wanted)", record.batch_id, len(expected)
            )
        return tracked

    def _write_record(self, record: BatchRecord, *, done: bool = False) -> None:
        if self.fs is None:
            return
        self.fs.makedirs(self.folder, exist_ok=True)
        path = join(self.folder, record_file(record.batch_id, done=done))
        if is_local(self.fs):
            # Written whole, then renamed: a kill leaves the old file or the new one, never half.
            tmp = path + ".tmp"
            with open(tmp, "wb") as handle:
                handle.write(record.to_json())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as handle:  # object stores put whole objects
                handle.write(record.to_json())
        if done:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(join(self.folder, record_file(record.batch_id)))

    # -- submitting ----------------------------------------------------------------------------

    async def _submit(self, cids: list[str], submission: int) -> None:
        """Write `cids` as batch files (one model per file, within the size limits), upload and
        submit each, record it, and start following it."""
        by_model: dict[str, list[str]] = {}
        for cid in cids:
            by_model.setdefault(self.wanted[cid].requests[0].model, []).append(cid)
        for model, group in by_model.items():
            with tempfile.TemporaryDirectory(prefix="vlpref-batch-") as tmp:
                # Serialising bodies (images as base64) and writing up to 200 MB is blocking
                # work: off the service's event loop, which other stages' requests share.
                files, refused = await asyncio.to_thread(self._write_files, group, tmp)
                for cid, failure in refused:
                    self._fail(cid, failure)
                for number, (path, members) in enumerate(files):
                    await self._submit_file(model, path, members, submission, number)

    def _write_files(
        self, cids: list[str], folder: str
    ) -> tuple[list[tuple[str, list[str]]], list[tuple[str, Failure]]]:
        """The batch files of `cids` (path, custom ids), written one line at a time (a body with
        its image as base64 exists only while its line is written), and the requests whose body
        could not be built."""
        opts = self.options
        files: list[tuple[str, list[str]]] = []
        refused: list[tuple[str, Failure]] = []
        count, size = 0, 0
        out: BinaryIO | None = None
        for cid in cids:
            try:
                line = batch_line(cid, self.provider._request_body(self.wanted[cid].requests[0]))
            except Exception as exc:  # e.g. an extra_body value that is not JSON
                refused.append(
                    (cid, Failure("bad_request", redact(f"{type(exc).__name__}: {exc}")))
                )
                continue
            if out is None or starts_new_file(
                count, size, len(line), opts.batch_max_requests, opts.batch_max_bytes
            ):
                if out is not None:
                    out.close()
                path = os.path.join(folder, f"batch-{len(files):04d}.jsonl")
                files.append((path, []))
                out = open(path, "wb")  # noqa: SIM115 - closed when the next file starts, or below
                count, size = 0, 0
            out.write(line)
            count += 1
            size += len(line)
            files[-1][1].append(cid)
        if out is not None:
            out.close()
        return files, refused

    async def _submit_file(
        self, model: str, path: str, members: list[str], submission: int, number: int
    ) -> None:
        timeout = httpx2.Timeout(FILE_TIMEOUT_S, connect=self.options.connect_timeout_s)
        try:
            uploaded = await self.client.files.create(
                file=(os.path.basename(path), Path(path), "application/jsonl"),
                purpose="batch",
                timeout=timeout,
            )
            batch = await self.client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                # The SDK's type says "24h" (OpenAI's only window); other batch APIs take more.
                completion_window=cast(Any, self.options.batch_completion_window),
                metadata={"created_by": "vlpref"},
            )
        except openai.OpenAIError as exc:
            failure = _failure_of(exc)
            for cid in members:
                self._fail(cid, failure)
            return
        now = time.perf_counter()
        for cid in members:
            wanted = self.wanted[cid]
            wanted.submissions = submission
            if not wanted.first_sent:
                wanted.first_sent = now
        record = BatchRecord(
            batch_id=batch.id,
            endpoint=self.endpoint,
            model=model,
            custom_ids=tuple(members),
            submitted=time.time(),
            submission=submission,
            input_file_id=uploaded.id,
        )
        self._write_record(record)
        if self.options.batch_keep_files and self.fs is not None:
            self.fs.makedirs(self.folder, exist_ok=True)
            self.fs.put_file(path, join(self.folder, f"{batch.id}.input.jsonl"))
        logger.info(
            "batch %s submitted: %d request(s) for %s (file %d, submission %d)",
            batch.id,
            len(members),
            model,
            number + 1,
            submission,
        )
        self._track(_Tracked(record, set(members)))

    # -- following -----------------------------------------------------------------------------

    async def _follow(self, tracked: _Tracked) -> None:
        """Poll one batch until it ends, hand back its results, resubmit what it did not
        answer. Always ends with one None on the queue."""
        try:
            await self._follow_batch(tracked)
        except Exception as exc:  # a bug here must not leave the call waiting forever
            failure = Failure("other", redact(f"batch {tracked.record.batch_id}: {exc!r}"))
            for cid in tracked.expected - tracked.answered:
                self._fail(cid, failure)
            logger.exception("following batch %s failed", tracked.record.batch_id)
        finally:
            self.queue.put_nowait(None)

    async def _follow_batch(self, tracked: _Tracked) -> None:
        record = tracked.record
        delays = poll_delays(self.options.batch_poll_s, self.options.batch_poll_max_s)
        if not tracked.resumed:
            await asyncio.sleep(next(delays))
        while True:
            try:
                batch = await self.client.batches.retrieve(record.batch_id)
            except openai.NotFoundError:
                # Gone (deleted, another account's key): its requests go out again.
                self._finish(tracked, "lost")
                await self._retry(tracked, _never_ran("the batch is no longer known"))
                return
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    # The record stays open: with the key fixed, a rerun polls it again.
                    failure = _failure_of(exc)
                    for cid in tracked.expected - tracked.answered:
                        self._fail(cid, failure)
                    return
                logger.warning("polling batch %s: %s", record.batch_id, _failure_of(exc).message)
            except openai.APIConnectionError as exc:
                logger.warning("polling batch %s: %s", record.batch_id, redact(str(exc)))
            else:
                if batch.status in TERMINAL_STATUSES:
                    break
            await asyncio.sleep(next(delays))
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                await self._read_results(tracked, file_id)
        self._finish(tracked, batch.status)
        if batch.status == "failed":
            # The file was refused as a whole (OpenAI validates it before running any line):
            # sending it again would be refused again. The errors say why.
            errors = batch.errors.data if batch.errors and batch.errors.data else []
            detail = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
            failure = Failure("bad_request", redact(f"batch {record.batch_id} failed: {detail}"))
            for cid in tracked.expected - tracked.answered:
                self._fail(cid, failure)
            return
        await self._retry(tracked, _never_ran(f"the batch ended {batch.status}"))

    async def _read_results(self, tracked: _Tracked, file_id: str) -> None:
        """Hand back each result of a file as its line is read."""
        async with self.client.files.with_streaming_response.content(
            file_id, timeout=httpx2.Timeout(FILE_TIMEOUT_S, connect=self.options.connect_timeout_s)
        ) as response:
            async for raw in response.iter_lines():
                if not raw.strip():
                    continue
                try:
                    line = parse_result_line(raw)
                except ValueError as exc:
                    logger.warning(
                        "batch %s: skipped a result line (%s)", tracked.record.batch_id, exc
                    )
                    continue
                cid = line.custom_id
                if cid not in tracked.expected or cid in tracked.answered:
                    continue  # answered before (a resumed batch), or another call's request
                self._take(tracked, cid, line)

    def _take(self, tracked: _Tracked, cid: str, line: ResultLine) -> None:
        """One result line: answers, a failure for good, or a reason to send it again."""
        wanted = self.wanted[cid]
        outcome = outcome_of(line, wanted.submissions)
        if outcome.failure is not None and not outcome.final:
            wanted.last_reason = outcome.failure
            return
        tracked.answered.add(cid)
        if outcome.failure is not None:
            self._fail(cid, outcome.failure)
            return
        latency = time.perf_counter() - wanted.first_sent if wanted.first_sent else 0.0
        for request in wanted.requests:
            self.queue.put_nowait(
                ChatResult(
                    request,
                    samples=outcome.samples,
                    usage=outcome.usage,
                    latency_s=latency,
                    attempts=wanted.submissions,
                )
            )

    def _finish(self, tracked: _Tracked, status: str) -> None:
        self.queue.put_nowait(_Done(replace(tracked.record, status=status)))

    async def _retry(self, tracked: _Tracked, reason: Failure) -> None:
        """Send again what the batch did not answer, within `batch_max_submissions`."""
        again = []
        left = tracked.expected - tracked.answered
        for cid in [cid for cid in tracked.record.custom_ids if cid in left]:
            wanted = self.wanted[cid]
            if wanted.submissions < self.options.batch_max_submissions:
                again.append(cid)
            else:
                last = wanted.last_reason or reason
                self._fail(cid, Failure(last.kind, last.message, last.status, wanted.submissions))
        if not again:
            return
        submission = 1 + max(self.wanted[cid].submissions for cid in again)
        logger.info(
            "batch %s left %d request(s) unanswered; submitting them again",
            tracked.record.batch_id,
            len(again),
        )
        await self._submit(again, submission)

    def _fail(self, cid: str, failure: Failure) -> None:
        wanted = self.wanted[cid]
        latency = time.perf_counter() - wanted.first_sent if wanted.first_sent else 0.0
        for request in wanted.requests:
            self.queue.put_nowait(
                ChatResult(request, failure=failure, latency_s=latency, attempts=wanted.submissions)
            )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one result line means for its request: samples and usage, or a failure that is
    `final` (refused: sending it again cannot help) or not (it may be answered next time)."""

    samples: tuple[Sample, ...] = ()
    usage: Usage = field(default_factory=Usage)
    failure: Failure | None = None
    final: bool = True


def outcome_of(line: ResultLine, attempts: int = 1) -> Outcome:
    """Read a result line as the online path reads an answer: the body through
    `parse_completion`, an error status through `classify_status`."""
    if line.answered:
        assert line.body is not None
        try:
            samples, usage = parse_completion(_dumps(line.body))
        except _RetryableError as exc:  # not a chat completion: asked again, as online
            return Outcome(failure=Failure(exc.kind, str(exc), exc.status, attempts), final=False)
        return Outcome(samples, usage)
    if line.never_ran:
        failure = _never_ran(line.message or line.code or "not run")
        return Outcome(failure=replace(failure, attempts=attempts), final=False)
    assert line.status is not None
    err = classify_status(line.status, redact(line.message)[:300] or "no message")
    failure = Failure(err.kind, str(err), err.status, attempts)
    return Outcome(failure=failure, final=isinstance(err, _FinalError))


def write_batch_file(
    options: Mapping[str, Any], requests: Iterable[ChatRequest], path: str | Path
) -> int:
    """Write `requests` as one batch input file, exactly as `mode: batch` on the endpoint of
    `options` would (same custom ids, same bodies), e.g. for `vllm run-batch`; returns the
    number of lines. Requests with one fingerprint and `n` become one line."""
    provider = OpenAIBatchProvider(OpenAICompatOptions.model_validate(dict(options)))
    seen: set[str] = set()
    with open(path, "wb") as out:
        for request in requests:
            cid = custom_id(request_fingerprint(provider.identity, request), request.params.n)
            if cid not in seen:
                seen.add(cid)
                out.write(batch_line(cid, provider._request_body(request)))
    return len(seen)


class BatchResultsFile(Provider):
    """Answers requests from a batch result file already on disk: the output of `vllm
    run-batch` over a file `write_batch_file` wrote, or an output file downloaded by hand.
    Its identity is the endpoint's (`options`), so `run_requests` journals the answers under
    the keys an online or batch run of that endpoint looks up. A request the file does not
    answer fails (kind `other`): nothing is sent anywhere."""

    kind = "batch-results"

    def __init__(self, options: Mapping[str, Any], path: str | Path) -> None:
        self._endpoint = OpenAICompatProvider(OpenAICompatOptions.model_validate(dict(options)))
        self.path = Path(path)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        raise NotImplementedError("built with the endpoint's options and a file path")

    @property
    def identity(self) -> str:
        return self._endpoint.identity

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        lines: dict[str, ResultLine] = {}
        data = await asyncio.to_thread(self.path.read_bytes)
        for raw in data.splitlines():
            if raw.strip():
                line = parse_result_line(raw)
                lines.setdefault(line.custom_id, line)
        for request in requests:
            cid = custom_id(request_fingerprint(self.identity, request), request.params.n)
            line_of = lines.get(cid)
            if line_of is None:
                failure = Failure("other", f"{self.path.name} has no result for {cid}")
                yield ChatResult(request, failure=failure)
                continue
            outcome = outcome_of(line_of)
            if outcome.failure is not None:
                yield ChatResult(request, failure=outcome.failure, attempts=1)
            else:
                yield ChatResult(request, samples=outcome.samples, usage=outcome.usage, attempts=1)


def _never_ran(message: str) -> Failure:
    """A request that a batch never ran (expired, cancelled, lost): `timeout`, as a request that
    never got its answer in time online."""
    return Failure("timeout", redact(message)[:300], None)


def _failure_of(exc: openai.OpenAIError) -> Failure:
    """A control call's error (upload, create, poll) as a failure of the requests it carried."""
    err = _classify(exc)
    kind: FailureKind = err.kind
    return Failure(kind, redact(str(err)), err.status)
