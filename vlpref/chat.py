"""The vocabulary of the model seam: chat requests in, chat results out.

Plain, immutable values with no I/O (like httpx's `Request`/`Response`). Every provider — an
OpenAI-compatible endpoint, vLLM's offline engine, a plug-in — consumes `ChatRequest`s and produces
`ChatResult`s, so the stages above never know which one answered.

A request asks for `params.n` samples. A result carries one `Sample` per returned choice, or a
`Failure` saying why none came back. A refusal or a `content_filter` stop is a `Sample` like any
other: for safety data it is the signal, not an error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]

FailureKind = Literal[
    "rate_limit",  # 429 that outlived its retries
    "server_error",  # 5xx that outlived its retries
    "timeout",  # no answer within the client timeout, every attempt
    "connection",  # could not connect / connection dropped, every attempt
    "malformed",  # a body that is not a chat completion, every attempt
    "bad_request",  # 400/404/422: retrying cannot help (bad image, unknown model, ...)
    "auth",  # 401/403
    "engine",  # an in-process engine raised
    "stopped",  # not sent: the batch's first N requests all failed alike (vlpref/earlystop.py)
    "other",
]


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image inside a message: raw bytes (sent as a data URL) or an http(s) URL.

    `sha256` identifies the image in request keys, so a key never depends on how the image is
    transported, and never embeds megabytes of base64.
    """

    data: bytes | None = None
    url: str | None = None
    mime: str = "image/png"
    sha256: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.url is None):
            raise ValueError("ImagePart needs exactly one of data or url")
        if not self.sha256:
            digest = hashlib.sha256(self.data if self.data is not None else self.url.encode())  # type: ignore[union-attr]
            object.__setattr__(self, "sha256", digest.hexdigest())

    def as_url(self) -> str:
        """The image as the OpenAI protocol wants it: its http(s) URL or a base64 data URL."""
        if self.url is not None:
            return self.url
        assert self.data is not None
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


Part = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: tuple[Part, ...]

    @classmethod
    def user(cls, *parts: Part | str) -> Message:
        return cls("user", tuple(TextPart(p) if isinstance(p, str) else p for p in parts))

    @classmethod
    def system(cls, text: str) -> Message:
        return cls("system", (TextPart(text),))

    @property
    def text(self) -> str:
        """All text parts joined; images left out."""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.content if isinstance(p, ImagePart))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What changes the answer besides the messages. All of it enters the request key except `n`:
    samples are keyed one by one through their index, so raising `n` later only asks for the new
    samples."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    stop: tuple[str, ...] = ()

    def keyed(self) -> dict[str, Any]:
        """The fields that enter the request key (everything but `n`), None-valued ones dropped
        so that adding a new optional field does not invalidate every existing journal."""
        out: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "logprobs": self.logprobs or None,
            "top_logprobs": self.top_logprobs,
            "stop": list(self.stop) or None,
        }
        return {k: v for k, v in out.items() if v is not None}


_SCHEMA_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI accepts as a schema's name


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """Asks the endpoint to constrain the answer's text (structured outputs).

    - `json_schema`: the answer is a JSON object valid against `schema`. `schema_json` is the
      schema as compact JSON text with its keys in the caller's order: property order is part of
      the request (a grammar-constrained model writes the properties in that order), so two
      schemas that differ only in key order are two requests.
    - `choice`: the answer is exactly one of `choices`.

    How each endpoint kind enforces it, and which token logprobs a constrained answer carries, is
    in docs/models.md. It enters the request key (`keyed()`), so a
    constrained request never shares journal entries with an unconstrained one.
    """

    kind: Literal["json_schema", "choice"]
    name: str = "answer"  # json_schema: the schema's name (OpenAI requires one)
    schema_json: str = ""  # json_schema: the JSON schema as compact JSON text (hashable)
    choices: tuple[str, ...] = ()  # choice: the exact strings the answer must be one of

    def __post_init__(self) -> None:
        if self.kind == "json_schema":
            if not _SCHEMA_NAME_RE.fullmatch(self.name):
                raise ValueError(
                    f"schema name {self.name!r}: 1-64 letters, digits, '_' or '-' (OpenAI's rule)"
                )
            if self.choices:
                raise ValueError("a json_schema constraint has no choices")
            try:
                schema = json.loads(self.schema_json)
            except ValueError as exc:
                raise ValueError(f"schema_json is not JSON: {exc}") from exc
            if not isinstance(schema, dict):
                raise ValueError("schema_json must hold a JSON object (a JSON schema)")
        elif self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise ValueError("a choice constraint needs one or more non-empty strings")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError(f"repeated choices: {list(self.choices)}")
            if self.schema_json:
                raise ValueError("a choice constraint has no schema")
        else:
            raise ValueError(f"unknown constraint kind {self.kind!r}")

    @classmethod
    def json_schema(cls, name: str, schema: Mapping[str, Any]) -> OutputConstraint:
        """The answer must be a JSON value valid against `schema` (keys kept in their order)."""
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return cls("json_schema", name=name, schema_json=text)

    @classmethod
    def choice(cls, *options: str) -> OutputConstraint:
        """The answer must be exactly one of `options`."""
        return cls("choice", choices=tuple(options))

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema (a fresh dict each time; empty for a choice constraint)."""
        return json.loads(self.schema_json) if self.schema_json else {}

    def keyed(self) -> dict[str, Any]:
        """What enters the request key. The schema goes in as its text, so its key order counts
        (the request key's own JSON sorts keys; a schema dict there would lose the order)."""
        if self.kind == "json_schema":
            return {"kind": self.kind, "name": self.name, "schema": self.schema_json}
        return {"kind": self.kind, "choices": list(self.choices)}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat-completion call asking for `params.n` samples.

    `id` is the caller's handle for the request (a response or judgment id); it does not enter the
    request key. `prompt_version` is the hash of the template that rendered the messages, so a
    changed template is a different request. `constraint` asks the endpoint for structured output
    (a JSON schema or a choice); it enters the key only when set, so unconstrained keys are those
    of before it existed.
    """

    id: str
    model: str
    messages: tuple[Message, ...]
    params: SamplingParams = SamplingParams()
    prompt_version: str = ""
    constraint: OutputConstraint | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def top_dict(self) -> dict[str, float]:
        return dict(self.top)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True, slots=True)
class SampleUsage:
    """One sample's share of the call that produced it; the runner sets it (see `split_usage`).

    The shares of a call's samples add up to the call's usage exactly: its prompt tokens are split
    evenly over the samples it returned (the remainder to the lowest indices), and its completion
    tokens go to each sample by the endpoint's own per-choice count when it gave one (`exact`),
    else are split the same way (`exact` false). A sample that repeats another one of its batch
    (the same request key) carries zero tokens, `exact` false: the first one carries the cost.
    """

    call_id: str  # names the call: siblings of one n>1 call share it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    exact: bool = False  # completion_tokens is this sample's own length, as the endpoint counted

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    def shared(self) -> SampleUsage:
        """The same sample handed to a second request of the batch: no tokens of its own."""
        return SampleUsage(self.call_id)


@dataclass(frozen=True, slots=True)
class Sample:
    """One returned choice.

    `completion_tokens` is the choice's own token count when the provider knows it (vLLM's token
    ids, the entries of OpenAI token logprobs), else None. `usage` is the sample's share of its
    call, set by the runner (None straight out of a provider).
    """

    index: int
    text: str
    finish_reason: str  # "stop", "length", "content_filter", "tool_calls", ...
    logprobs: tuple[TokenLogprob, ...] | None = None
    completion_tokens: int | None = None
    usage: SampleUsage | None = None


def _even(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that add up to it, the remainder to the first ones."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_usage(usage: Usage, samples: Sequence[Sample], call_id: str) -> list[SampleUsage]:
    """Each returned sample's share of the call's `usage`; the shares add up to `usage`.

    Prompt tokens: split evenly over the samples (every sample of the call was conditioned on the
    one prompt; putting them all on sample 0 would make its row look like the expensive one).
    Completion tokens: a sample's own count where the provider gave one (`exact`), the rest of the
    call's completion tokens split evenly over the samples without one. When every sample has its
    own count but they add up to less than the call was billed (tokens the endpoint does not show
    per choice), the difference is split over all of them and none is exact. An endpoint that
    reports fewer completion tokens than its choices hold (or no usage at all) is overruled by
    the per-choice counts.
    """
    if not samples:
        return []
    prompts = _even(usage.prompt_tokens, len(samples))
    own = [s.completion_tokens for s in samples]
    unknown = [i for i, c in enumerate(own) if c is None]
    rest = max(usage.completion_tokens - sum(c for c in own if c is not None), 0)
    completions = [c or 0 for c in own]
    exact = [c is not None for c in own]
    if unknown:
        for i, share in zip(unknown, _even(rest, len(unknown)), strict=True):
            completions[i] = share
    elif rest:
        spread = _even(rest, len(own))
        completions = [c + share for c, share in zip(completions, spread, strict=True)]
        exact = [False] * len(own)
    return [
        SampleUsage(call_id, p, c, e) for p, c, e in zip(prompts, completions, exact, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a request produced no samples. A value, not an exception."""

    kind: FailureKind
    message: str
    status: int | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The outcome of one `ChatRequest`: its samples, or a failure.

    Straight out of a provider, `usage` is the whole call's, as the endpoint reported it. Out of
    the runner (`run_requests`), `usage` is the sum of the samples' `usage` shares: what this
    result's rows add up to. Journaled samples carry the share their call recorded, so a cached
    or partly cached result has the usage a fresh one had; a sample that repeats another request
    of the batch carries none (see `SampleUsage`).

    `cached` is true when nothing was sent for this request: every sample came from the request
    journal, or from another request of the batch with the same key. `latency_s` and `attempts`
    describe the call made for this request (zero when cached).
    """

    request: ChatRequest
    samples: tuple[Sample, ...] = ()
    usage: Usage = Usage()
    latency_s: float = 0.0
    failure: Failure | None = None
    cached: bool = False
    attempts: int = 0  # HTTP attempts made (0 when cached)

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]
