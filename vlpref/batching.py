"""OpenAI-style batch API bookkeeping without I/O: batch file lines, result lines, poll waits and
the records that let a killed run resume the batches it submitted.

The provider that talks to the API is `vlpref.providers.openai_batch`; docs/batch.md says how a
user sees it.

Batch input line (OpenAI's format, read by `vllm run-batch` too):

    {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {chat request}}

Result line (output and error files): `{"id", "custom_id", "response": {"status_code",
"request_id", "body"} | null, "error": {"code", "message"} | str | null}`. OpenAI puts failed
requests in the error file with their status and error body, and requests a batch never ran
(expired, cancelled) there with `error.code` and no response; `vllm run-batch` writes failures
into its one output file, with `error` the error response (or a string) and no body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHAT_URL = "/v1/chat/completions"
# Statuses after which a batch changes no more (OpenAI: validating, in_progress, finalizing and
# cancelling come before one of these).
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
RECORD_SUFFIX = ".json"
DONE_SUFFIX = ".done.json"


def custom_id(fingerprint: str, n: int) -> str:
    """A request's id in batch files: what it asks (its fingerprint, see `vlpref.keys`) and how
    many samples. The same request gets the same id in every run, which is how a rerun finds the
    batch that already holds it; `n` is in it because a batch that asked for 2 samples does not
    answer a request for 3."""
    return f"{fingerprint[:40]}-n{n}"


def batch_line(cid: str, body: bytes) -> bytes:
    """One line of a batch input file. `body` is the chat request exactly as the provider
    serialises it for an online call, spliced in rather than parsed and dumped again: a batch
    asks precisely what the online request would."""
    head = json.dumps({"custom_id": cid, "method": "POST", "url": CHAT_URL})
    return head[:-1].encode() + b', "body": ' + body + b"}\n"


def starts_new_file(
    count: int, size: int, line_bytes: int, max_requests: int, max_bytes: int
) -> bool:
    """Whether a line of `line_bytes` goes into a new file, given the current file's `count`
    lines and `size` bytes. A line bigger than `max_bytes` still goes, alone in its file: the
    endpoint, not this client, says whether it takes it."""
    if count == 0:
        return False
    return count >= max_requests or size + line_bytes > max_bytes


def poll_delays(first_s: float, max_s: float, factor: float = 2.0) -> Iterator[float]:
    """Waits between polls of one batch: `first_s`, growing by `factor` up to `max_s`. A batch
    takes minutes to hours; polling at a steady fast rate would be thousands of requests."""
    delay = first_s
    while True:
        yield min(delay, max_s)
        delay = min(delay * factor, max_s)


@dataclass(frozen=True, slots=True)
class ResultLine:
    """One line of an output or error file, read as far as vlpref needs it.

    `status` is the HTTP status of the request (None when it never ran); `body` its response
    body (a chat completion when `status` is 200); `code` and `message` the line's error."""

    custom_id: str
    status: int | None
    body: dict[str, Any] | None
    code: str | None = None
    message: str = ""

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.body is not None

    @property
    def never_ran(self) -> bool:
        """Expired or cancelled before it ran, or no status at all: sending it again is the
        remedy, not a failure of the request."""
        return self.status is None


def parse_result_line(raw: str | bytes) -> ResultLine:
    """Read one result line; raise ValueError when it is not one (then the line is skipped and
    its request, never answered, is sent again)."""
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        raise ValueError("not a batch result line (no custom_id)")
    response = data.get("response")
    status: int | None = None
    body: dict[str, Any] | None = None
    if isinstance(response, dict):
        code = response.get("status_code")
        status = int(code) if isinstance(code, int) else None
        raw_body = response.get("body")
        body = raw_body if isinstance(raw_body, dict) else None
    error = data.get("error")
    code_name: str | None = None
    message = ""
    if isinstance(error, dict):
        inner = error.get("error", error)  # vLLM: an ErrorResponse ({"error": {...}})
        if isinstance(inner, dict):
            code_name = None if inner.get("code") is None else str(inner.get("code"))
            message = str(inner.get("message") or "")
    elif isinstance(error, str):
        message = error
    if not message and body is not None and status != 200:
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            message = str(inner["message"])
    if code_name is not None and code_name.isdigit() and status is None:
        status = int(code_name)
    return ResultLine(data["custom_id"], status, body, code_name, message)


def endpoint_key(base_url: str) -> str:
    """What a batch record says about its endpoint: a hash of the base URL, so a record is
    never polled on another endpoint, and the file names no host (nor a token in a URL)."""
    return hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What a run keeps of a batch it submitted, beside the journal (one small JSON file per
    batch), until its results are read: enough for a rerun to poll it again instead of paying
    for its requests twice. No request content and no credentials: ids and hashes only."""

    batch_id: str
    endpoint: str  # endpoint_key of the base URL
    model: str
    custom_ids: tuple[str, ...]
    submitted: float  # unix time
    submission: int  # 1 for a request's first batch, 2 for its first resubmission, ...
    input_file_id: str = ""
    status: str = "submitted"  # the last status seen; terminal once read

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "batch_id": self.batch_id,
                "endpoint": self.endpoint,
                "model": self.model,
                "submitted": round(self.submitted, 3),
                "submission": self.submission,
                "input_file_id": self.input_file_id,
                "status": self.status,
                "custom_ids": list(self.custom_ids),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BatchRecord:
        """Raise ValueError (or KeyError/TypeError) for a file that is not a record."""
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("v") != 1:
            raise ValueError("not a batch record of version 1")
        return cls(
            batch_id=str(obj["batch_id"]),
            endpoint=str(obj["endpoint"]),
            model=str(obj["model"]),
            custom_ids=tuple(str(c) for c in obj["custom_ids"]),
            submitted=float(obj["submitted"]),
            submission=int(obj["submission"]),
            input_file_id=str(obj.get("input_file_id", "")),
            status=str(obj.get("status", "submitted")),
        )


def record_file(batch_id: str, *, done: bool = False) -> str:
    """A record's file name: `<batch id>.json` while its results are due, `.done.json` after."""
    return batch_id + (DONE_SUFFIX if done else RECORD_SUFFIX)


def is_open_record(name: str) -> bool:
    """Whether a file name (of the records folder) is a batch whose results are still due."""
    return name.endswith(RECORD_SUFFIX) and not name.endswith(DONE_SUFFIX)
