"""The simulated server's batch API: OpenAI's `/v1/files` and `/v1/batches`, for tests.

    POST /v1/files                  multipart upload (`file`, `purpose`); only `purpose: batch`
    GET  /v1/files/{id}             the file object
    GET  /v1/files/{id}/content     the file's bytes (input, output or error file)
    POST /v1/batches                {input_file_id, endpoint, completion_window, metadata?}
    GET  /v1/batches                the batches, newest first (`data`)
    GET  /v1/batches/{id}           the batch object, with `status` and `request_counts`
    POST /v1/batches/{id}/cancel    cancelling, then cancelled (lines not answered are not listed)

A batch is validated when it is created (every line JSON with a unique `custom_id`, `method:
POST`, `url: /v1/chat/completions`, one `model` for the whole file, as OpenAI requires); a file
that breaks a rule makes the batch `failed` with `errors`. Otherwise it is `in_progress` until
`batch.completion_delay_s` has passed, then every line is answered through the server's own chat
answer path (`vlpref.sim.server.answer`) and the batch is `completed` (or `expired`, see
`BatchSimConfig`). Lines answered with 200 go to the output file; failed lines to the error file
(or the output file, `failed_lines_in`). Rate limits and the online `faults` do not apply: a batch
has its own queue, and its failures are `BatchSimConfig`'s.

Counters (under `batch` in GET /sim/counters) are apart from the chat endpoint's, so a test can
tell what went through the batch API from what was sent online: `files` uploaded, `batches`
created, `retrieves` (GET of a batch), `downloads` (file contents read), `lines` answered,
`lines_by_status` (status code, or `expired`), `lines_by_model`, `usage` per model of the 200
lines, and `ended` (batches by final status).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from vlpref.sim.config import BatchSimConfig
from vlpref.sim.faults import unit_hash
from vlpref.sim.server import (
    STATE_KEY,
    ApiError,
    SimState,
    _dumps,
    _loads,
    _unauthorized,
    answer,
    parse_chat,
)

CHAT_URL = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Lines answered between yields to the event loop, so polls are served while a batch finishes.
_LINES_PER_YIELD = 32


@dataclass(slots=True)
class SimFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass(slots=True)
class SimBatch:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: int
    number: int  # 1 for the first batch the server created
    lines: list[dict[str, Any]] = field(default_factory=list)
    status: str = "validating"
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    times: dict[str, int] = field(default_factory=dict)  # `<status>_at` -> unix time

    def as_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": CHAT_URL,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            "request_counts": {
                "total": len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }
        for name in (
            "in_progress",
            "finalizing",
            "completed",
            "failed",
            "expired",
            "cancelling",
            "cancelled",
        ):
            obj[f"{name}_at"] = self.times.get(name)
        return obj


def validate_lines(data: bytes, max_requests: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The lines of a batch input file, and what is wrong with it (empty when nothing)."""
    lines: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    models: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            problems.append(f"line {number}: empty line")
            continue
        try:
            line = _loads(raw)
        except ValueError:
            problems.append(f"line {number}: not JSON")
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            problems.append(f"line {number}: no custom_id")
            continue
        if line["custom_id"] in seen:
            problems.append(f"line {number}: duplicate custom_id {line['custom_id']!r}")
        seen.add(line["custom_id"])
        if line.get("method") != "POST" or line.get("url") != CHAT_URL:
            problems.append(f"line {number}: method must be POST and url {CHAT_URL}")
        body = line.get("body")
        if not isinstance(body, dict):
            problems.append(f"line {number}: body must be an object")
            continue
        models.add(str(body.get("model")))
        lines.append(line)
    if len(models) > 1:
        problems.append(f"a batch serves one model; this file names {len(models)}")
    if not lines and not problems:
        problems.append("the file has no requests")
    if len(lines) > max_requests:
        problems.append(f"{len(lines)} requests: more than the {max_requests} a batch may hold")
    return lines, problems


class BatchStore:
    """Files, batches and the batch counters of one server (they outlive /sim/reset, which
    zeroes the counters only: a batch a killed client submitted is still there to resume)."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.config: BatchSimConfig = state.config.batch
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next = 0
        self._arrivals: dict[bytes, int] = {}  # body -> times it arrived in a batch
        self._failed: dict[bytes, int] = {}  # body -> times a batch answered it with a failure
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, int] = {
            "files": 0,
            "batches": 0,
            "retrieves": 0,
            "downloads": 0,
            "lines": 0,
            "cancels": 0,
        }
        self.lines_by_status: dict[str, int] = {}
        self.lines_by_model: dict[str, int] = {}
        self.usage: dict[str, dict[str, int]] = {}
        self.ended: dict[str, int] = {}

    def counters(self) -> dict[str, Any]:
        return {
            **self.counts,
            "lines_by_status": self.lines_by_status,
            "lines_by_model": self.lines_by_model,
            "usage": self.usage,
            "ended": self.ended,
        }

    def _id(self, prefix: str) -> str:
        self._next += 1
        return f"{prefix}-sim{self._next:08x}"

    def add_file(self, filename: str, purpose: str, data: bytes) -> SimFile:
        file = SimFile(self._id("file"), filename, purpose, data, int(time.time()))
        self.files[file.id] = file
        self.counts["files"] += 1
        return file

    def create(self, input_file: SimFile, window: str, metadata: dict[str, Any] | None) -> SimBatch:
        self.counts["batches"] += 1
        batch = SimBatch(
            id=self._id("batch"),
            input_file_id=input_file.id,
            completion_window=window,
            metadata=metadata,
            created_at=int(time.time()),
            number=len(self.batches) + 1,  # not the counter: /sim/reset zeroes that
        )
        self.batches[batch.id] = batch
        lines, problems = validate_lines(input_file.data, self.config.max_requests)
        if problems:
            batch.errors = [
                {"code": "invalid_request", "message": p, "param": None, "line": None}
                for p in problems[:20]
            ]
            self._end(batch, "failed")
            return batch
        batch.lines = lines
        self._set(batch, "in_progress")
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch

    def _set(self, batch: SimBatch, status: str) -> None:
        batch.status = status
        batch.times[status] = int(time.time())

    def _end(self, batch: SimBatch, status: str) -> None:
        self._set(batch, status)
        self.ended[status] = self.ended.get(status, 0) + 1

    def cancel(self, batch: SimBatch) -> None:
        if batch.status in TERMINAL or batch.status == "cancelling":
            return
        self.counts["cancels"] += 1
        self._set(batch, "cancelling")
        for task in list(self._tasks):
            if task.get_name() == batch.id:
                task.cancel()
        # Cancelling takes a moment on a real API too: a poll sees `cancelling` first.
        asyncio.get_running_loop().call_later(0.05, self._end, batch, "cancelled")

    async def _run(self, batch: SimBatch) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name(batch.id)
        await asyncio.sleep(self.config.completion_delay_s)
        expiring = batch.number <= self.config.expire_batches
        output: list[bytes] = []
        errors: list[bytes] = []
        for i, line in enumerate(batch.lines):
            if i and i % _LINES_PER_YIELD == 0:
                await asyncio.sleep(0)
            status, out = self._answer_line(line, expiring)
            ok = status == "200"
            batch.completed += ok
            batch.failed += not ok
            to_errors = not ok and (
                status == "expired" or self.config.failed_lines_in != "output_file"
            )
            (errors if to_errors else output).append(_dumps(out) + b"\n")
        self._set(batch, "finalizing")
        if output:
            batch.output_file_id = self.add_file(
                f"{batch.id}_output.jsonl", "batch_output", b"".join(output)
            ).id
        if errors:
            batch.error_file_id = self.add_file(
                f"{batch.id}_error.jsonl", "batch_output", b"".join(errors)
            ).id
        self.counts["files"] -= bool(output) + bool(errors)  # `files` counts uploads only
        self._end(batch, "expired" if expiring else "completed")

    def _answer_line(self, line: dict[str, Any], expiring: bool) -> tuple[str, dict[str, Any]]:
        """One line's status (a code, or `expired`) and its line of the output or error file."""
        state = self.state
        body = _dumps(line["body"])
        body_sha = hashlib.sha256(body).digest()
        seed = state.book.seed
        out: dict[str, Any] = {
            "id": self._id("batch_req"),
            "custom_id": line["custom_id"],
            "response": None,
            "error": None,
        }
        model = str(line["body"].get("model"))
        self.counts["lines"] += 1
        if (
            expiring
            and unit_hash(body_sha, 0, "batch-expire", seed) >= self.config.expire_done_rate
        ):
            out["error"] = {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window "
                "expired.",
            }
            return self._count("expired", model), out
        nth = self._arrivals.get(body_sha, 0)
        self._arrivals[body_sha] = nth + 1
        request_id = self._id("req")
        try:
            req = parse_chat(body, state.config, state.images)
        except ApiError as err:
            out["response"] = {
                "status_code": err.status,
                "request_id": request_id,
                "body": _error_body(err),
            }
            return self._count(str(err.status), model), out
        failing = (
            self.config.fail_rate > 0
            and self._failed.get(body_sha, 0) < self.config.fail_max_per_request
            and unit_hash(body_sha, nth, "batch-fail", seed) < self.config.fail_rate
        )
        if failing:
            self._failed[body_sha] = self._failed.get(body_sha, 0) + 1
            refusal = ApiError(
                self.config.fail_status,
                "The server had an error while processing your request (simulated).",
                type_="server_error",
            )
            out["response"] = {
                "status_code": refusal.status,
                "request_id": request_id,
                "body": _error_body(refusal),
            }
            return self._count(str(refusal.status), model), out
        payload = answer(state, req, body_sha, state.book.arrive(body_sha))
        usage = self.usage.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0})
        usage["prompt_tokens"] += payload["usage"]["prompt_tokens"]
        usage["completion_tokens"] += payload["usage"]["completion_tokens"]
        out["response"] = {"status_code": 200, "request_id": request_id, "body": payload}
        return self._count("200", model), out

    def _count(self, status: str, model: str) -> str:
        self.lines_by_status[status] = self.lines_by_status.get(status, 0) + 1
        self.lines_by_model[model] = self.lines_by_model.get(model, 0) + 1
        return status

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _error_body(err: ApiError) -> dict[str, Any]:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


BATCHES_KEY = web.AppKey("vlpref_sim_batches", BatchStore)


def _guarded(
    handler: Callable[[web.Request, BatchStore], Any],
) -> Callable[[web.Request], Any]:
    """The handler behind the sim's key check, with ApiErrors as OpenAI-style responses."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        refused = _unauthorized(request, request.app[STATE_KEY])
        if refused is not None:
            return refused
        try:
            response: web.StreamResponse = await handler(request, request.app[BATCHES_KEY])
        except ApiError as err:
            return err.response()
        return response

    return wrapped


def _file(store: BatchStore, file_id: str) -> SimFile:
    file = store.files.get(file_id)
    if file is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
    return file


def _batch(store: BatchStore, batch_id: str) -> SimBatch:
    batch = store.batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="id")
    return batch


async def upload_file(request: web.Request, store: BatchStore) -> web.Response:
    """POST /v1/files (multipart/form-data: `purpose`, `file`)."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "Expected a multipart/form-data upload.")
    reader = await request.multipart()
    purpose, filename, data = None, "upload.jsonl", None
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.read()).decode()
        elif part.name == "file":
            filename = part.filename or filename
            data = bytes(await part.read())
    if purpose != "batch":
        raise ApiError(
            400, "The simulator accepts files with purpose 'batch' only.", param="purpose"
        )
    if data is None:
        raise ApiError(400, "Missing the 'file' part.", param="file")
    return web.json_response(store.add_file(filename, purpose, data).as_object())


async def get_file(request: web.Request, store: BatchStore) -> web.Response:
    """GET /v1/files/{id}."""
    return web.json_response(_file(store, request.match_info["id"]).as_object())


async def file_content(request: web.Request, store: BatchStore) -> web.Response:
    """GET /v1/files/{id}/content."""
    file = _file(store, request.match_info["id"])
    store.counts["downloads"] += 1
    return web.Response(body=file.data, content_type="application/octet-stream")


async def create_batch(request: web.Request, store: BatchStore) -> web.Response:
    """POST /v1/batches."""
    try:
        data = _loads(await request.read())
    except ValueError as exc:
        raise ApiError(400, "We could not parse the JSON body of your request.") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if data.get("endpoint") != CHAT_URL:
        raise ApiError(400, f"The simulator batches {CHAT_URL} only.", param="endpoint")
    window = data.get("completion_window")
    if not isinstance(window, str) or not window:
        raise ApiError(400, "'completion_window' is required.", param="completion_window")
    metadata = data.get("metadata")
    input_file = _file(store, str(data.get("input_file_id")))
    if input_file.purpose != "batch":
        raise ApiError(400, "The input file's purpose must be 'batch'.", param="input_file_id")
    batch = store.create(input_file, window, metadata if isinstance(metadata, dict) else None)
    return web.json_response(batch.as_object())


async def list_batches(request: web.Request, store: BatchStore) -> web.Response:
    """GET /v1/batches (all of them, newest first; no paging)."""
    data = [b.as_object() for b in reversed(store.batches.values())]
    return web.json_response({"object": "list", "data": data, "has_more": False})


async def retrieve_batch(request: web.Request, store: BatchStore) -> web.Response:
    """GET /v1/batches/{id}."""
    batch = _batch(store, request.match_info["id"])
    store.counts["retrieves"] += 1
    return web.json_response(batch.as_object())


async def cancel_batch(request: web.Request, store: BatchStore) -> web.Response:
    """POST /v1/batches/{id}/cancel."""
    batch = _batch(store, request.match_info["id"])
    store.cancel(batch)
    return web.json_response(batch.as_object())


def add_batch_routes(app: web.Application) -> None:
    """Serve the batch API on `app` (made by `vlpref.sim.server.create_app`)."""
    store = BatchStore(app[STATE_KEY])
    app[BATCHES_KEY] = store

    async def close(_: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close)
    app.router.add_post("/v1/files", _guarded(upload_file))
    app.router.add_get("/v1/files/{id}", _guarded(get_file))
    app.router.add_get("/v1/files/{id}/content", _guarded(file_content))
    app.router.add_post("/v1/batches", _guarded(create_batch))
    app.router.add_get("/v1/batches", _guarded(list_batches))
    app.router.add_get("/v1/batches/{id}", _guarded(retrieve_batch))
    app.router.add_post("/v1/batches/{id}/cancel", _guarded(cancel_batch))
