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


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat-completion call asking for `params.n` samples.

    `id` is the caller's handle for the request (a response or judgment id); it does not enter the
    request key. `prompt_version` is the hash of the template that rendered the messages, so a
    changed template is a different request.
    """

    id: str
    model: str
    messages: tuple[Message, ...]
    params: SamplingParams = SamplingParams()
    prompt_version: str = ""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def top_dict(self) -> dict[str, float]:
        return dict(self.top)


@dataclass(frozen=True, slots=True)
class Sample:
    """One returned choice."""

    index: int
    text: str
    finish_reason: str  # "stop", "length", "content_filter", "tool_calls", ...
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


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

    `cached` is true when every sample came from the request journal and nothing was sent.
    `usage` and `latency_s` describe the call(s) that produced the samples (zero when cached).
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
