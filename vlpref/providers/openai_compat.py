"""Any endpoint that speaks OpenAI chat completions: OpenAI, a vLLM server, hosted APIs, the sim.

One `openai.AsyncOpenAI` per endpoint, over one shared HTTP client (aiohttp-backed by default:
measured here it is several times faster than the default httpx pool, see docs/performance.md).
The SDK's own retries are off; ours (tenacity) honour `Retry-After`, back off with jitter, and end
in a `Failure` value rather than an exception. A fixed pool of `concurrency` workers pulls requests
from the batch, so memory does not grow with the batch size.

The hot path is shaped by profiles (see bench/ and docs/performance.md): the body is
serialised once per request and sent with `AsyncOpenAI.post(..., cast_to=httpx2.Response)`, which
skips the SDK's per-request walk over its TypedDict annotations and its pydantic parsing (we read
the raw bytes anyway); the first attempt runs outside tenacity, which only takes over once an
attempt has failed in a retryable way.

Structured outputs (a request's `constraint`, docs/models.md), by the endpoint's
`structured_dialect`:

- `json_schema` -> `"response_format": {"type": "json_schema", "json_schema": {"name", "strict":
  true, "schema"}}`: OpenAI's strict structured outputs; vLLM's server turns it into its own JSON
  constraint (`structured_outputs_from_response_format` in vLLM 0.32).
- `choice` -> `"structured_outputs": {"choice": [...]}`, vLLM's own key, on the `vllm` dialect
  only: OpenAI has no choice constraint and rejects unknown keys (400). On the `openai` dialect a
  choice request goes out unconstrained and the judge's text parser reads the answer as before.
- A constraint the endpoint rejects (400/422) is an ordinary `bad_request` failure, not retried.

Logprobs under a constraint (vLLM 0.32): the grammar's bitmask is applied to the logits before the
sampler computes logprobs, also in the default `logprobs_mode: raw_logprobs`, so the returned
logprobs are over the tokens the grammar allows at that step (renormalised among them); a token the
grammar forbids has logprob -inf, which the server sends as -9999.0, and shows up among the top-k
alternatives only when fewer than k tokens are allowed. Ratios between allowed tokens (all that the
judge's renormalised P(unsafe) and rating maths read) are those of the unconstrained model.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Literal, Self, cast
from urllib.parse import urlsplit

import httpx2
import openai
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from vlpref import limits
from vlpref.chat import (
    ChatRequest,
    ChatResult,
    Failure,
    FailureKind,
    ImagePart,
    Message,
    OutputConstraint,
    Sample,
    TextPart,
    TokenLogprob,
    Usage,
)
from vlpref.errors import ProviderError
from vlpref.keys import unique_ids
from vlpref.providers.base import Provider
from vlpref.providers.ratelimit import RateLimiter, retry_after_seconds
from vlpref.redact import (
    is_block_name,
    is_credential_name,
    is_env_var_name,
    redact,
    register_secret,
)
from vlpref.vllm_serve import ServeOptions

try:  # orjson comes with prefect; it encodes a data-URL image ~80x faster than json (bench/)
    import orjson

    def _dumps(obj: Any) -> bytes:
        # Non-string keys become strings, as with json (`logit_bias` maps token ids).
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

    _loads = json.loads

IMAGE_TOKEN_ESTIMATE = 765  # what a high-detail 512x512 image costs on OpenAI; only for pacing
CHAT_PATH = "/chat/completions"
# The SDK gives every POST an idempotency key, by default a uuid4: an urandom syscall per request,
# 3 % of the flow process's CPU in a scale run (py-spy). Ours are as unique, and the same for every
# attempt of one request, as idempotency keys should be.
_new_idempotency_key = unique_ids("vlpref-")
PLATFORM_HEADERS = (
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
)


class OpenAICompatOptions(BaseModel):
    """The endpoint entry of a run config for `kind: openai`.

    No key is ever written here (docs/security.md): `api_key_env` is the name of an environment
    variable, `api_key_secret` the name of a Prefect Secret block, and `headers` and `extra_body`
    may not carry a field named like a credential (`vlpref.redact.is_credential_name`). Errors do
    not quote their input (`hide_input_in_errors`): a ValidationError raised in a Prefect task
    would otherwise store a mistyped key in Prefect's database."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    kind: Literal["openai"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = Field(
        default=None, description="name of the environment variable that holds the API key"
    )
    api_key_secret: str | None = Field(
        default=None, description="name of a Prefect Secret block that holds the API key"
    )
    concurrency: int = Field(default=64, ge=1, le=4096)
    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    max_retry_time_s: float = Field(default=900.0, gt=0)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_retry_after_s: float = Field(default=120.0, ge=0)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    structured_dialect: Literal["auto", "vllm", "openai", "none"] = Field(
        default="auto",
        description="how a request's output constraint is sent: `vllm` (JSON schemas as "
        "response_format, choices as vLLM's structured_outputs), `openai` (JSON schemas only; "
        "choices unconstrained), `none` (nothing: the endpoint rejects both); `auto`: `openai` "
        "on api.openai.com and Azure OpenAI, `vllm` elsewhere",
    )
    cache_namespace: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    serve: ServeOptions | None = Field(
        default=None, description="`vlpref vllm-serve` starts a vLLM server here (docs/vllm.md)"
    )
    # Batch APIs (docs/batch.md): `batch` sends a stage's missing requests as batch files
    # through /v1/files + /v1/batches (half price on OpenAI, results within the window) instead
    # of one call each; `concurrency`, `rpm` and `tpm` then do not apply.
    mode: Literal["online", "batch"] = "online"
    batch_max_requests: int = Field(default=50_000, ge=1, le=50_000)  # OpenAI's per-file limit
    batch_max_bytes: int = Field(default=200_000_000, ge=1_000_000, le=200_000_000)
    batch_poll_s: float = Field(default=10.0, gt=0, le=3600)  # the first poll's wait
    batch_poll_max_s: float = Field(default=300.0, gt=0, le=3600)  # waits grow up to this
    # OpenAI takes 24h only; other batch APIs (Groq, ...) up to 7 days.
    batch_completion_window: str = Field(
        default="24h", pattern=r"^(24|48|72|96|120|144|168)h$|^[1-7]d$"
    )
    batch_max_submissions: int = Field(default=3, ge=1, le=20)  # per request, within one run
    batch_keep_files: bool = False  # keep each input file beside the journal (vllm run-batch)

    @model_validator(mode="after")
    def _poll_range(self) -> Self:
        if self.batch_poll_max_s < self.batch_poll_s:
            raise ValueError("batch_poll_max_s must be >= batch_poll_s")
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def dialect(self) -> Literal["vllm", "openai", "none"]:
        """`structured_dialect` with `auto` resolved from the base URL's host."""
        if self.structured_dialect != "auto":
            return self.structured_dialect
        host = (urlsplit(self.base_url).hostname or "").lower()
        openai_hosts = ("api.openai.com", ".openai.azure.com")
        return "openai" if host.endswith(openai_hosts) else "vllm"

    @field_validator("api_key_env")
    @classmethod
    def _env_var_name(cls, value: str | None) -> str | None:
        if value is not None and not is_env_var_name(value):
            raise ValueError(
                "expected the NAME of an environment variable (letters, digits and '_', not "
                "starting with a digit) that holds the key, not the key itself"
            )
        return value

    @field_validator("api_key_secret")
    @classmethod
    def _block_name(cls, value: str | None) -> str | None:
        if value is not None and not is_block_name(value):
            raise ValueError(
                "expected the name of a Prefect Secret block (lowercase letters, digits and '-') "
                "that holds the key, not the key itself"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _no_secret_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if is_credential_name(name):
                raise ValueError(
                    f"header {redact(name)!r} is named like a credential (docs/security.md): it "
                    "would put a secret in the config; use api_key_env instead"
                )
        return value

    @field_validator("extra_body")
    @classmethod
    def _no_secret_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = _credential_field(value)
        if found is not None:
            raise ValueError(
                f"extra_body field {redact(found)!r} is named like a credential "
                "(docs/security.md): it would put a secret in the config; use api_key_env instead"
            )
        return value


def _credential_field(value: Any, where: str = "") -> str | None:
    """The path of the first field named like a credential in an `extra_body` value, or None."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if is_credential_name(str(key)):
                return path
            found = _credential_field(item, path)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _credential_field(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(
        self, kind: FailureKind, message: str, status: int | None, retry_after: float | None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


class _FinalError(Exception):
    """An attempt failed in a way retrying cannot fix (400, 401, 404, ...)."""

    def __init__(self, kind: FailureKind, message: str, status: int | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class _StopAt(stop_base):
    """Stop once the monotonic clock passes `deadline` (`stop_after_delay`, measured from when
    the request's first attempt started rather than from when tenacity took over)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx2's default TLS context (system trust store, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), built
    once per process and shared: loading the CA bundle costs 25-50 ms for every new client."""
    return httpx2.create_ssl_context()


def message_to_openai(message: Message) -> dict[str, Any]:
    """One message in the chat-completions wire format (images as URLs or data URLs)."""
    if len(message.content) == 1 and isinstance(message.content[0], TextPart):
        return {"role": message.role, "content": message.content[0].text}
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, ImagePart):
            parts.append({"type": "image_url", "image_url": {"url": part.as_url()}})
        else:
            parts.append({"type": "text", "text": part.text})
    return {"role": message.role, "content": parts}


@functools.lru_cache(maxsize=256)
def _response_format(name: str, schema_json: str) -> dict[str, Any]:
    """The `response_format` of a JSON schema constraint, parsed once per schema (a judge run
    sends one schema thousands of times); shared between bodies, which only serialise it."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "strict": True, "schema": json.loads(schema_json)},
    }


def constraint_fields(
    constraint: OutputConstraint, dialect: Literal["vllm", "openai", "none"]
) -> dict[str, Any]:
    """The body keys that ask the endpoint for `constraint`; empty where its dialect has none.

    The choice key is vLLM's: read in vLLM 0.32's
    `vllm/entrypoints/openai/chat_completion/protocol.py`, where `ChatCompletionRequest` has
    `structured_outputs: StructuredOutputsParams | None` (`vllm/sampling_params.py`: `json`,
    `regex`, `choice`, `grammar`, ...). The older `guided_choice` / `guided_json` keys are gone
    there; vLLM ignores an unknown key with a warning, so the wrong name would go unnoticed (the
    vLLM tier checks that every answer is one of the choices)."""
    if dialect == "none":
        return {}
    if constraint.kind == "json_schema":
        return {"response_format": _response_format(constraint.name, constraint.schema_json)}
    if dialect == "vllm":
        return {"structured_outputs": {"choice": list(constraint.choices)}}
    return {}  # OpenAI has no choice constraint: the request goes out unconstrained


def estimate_tokens(request: ChatRequest) -> int:
    """A pacing estimate (chars/4 + images + the completion budget), corrected after the call."""
    chars = sum(len(p.text) for m in request.messages for p in m.content if isinstance(p, TextPart))
    images = sum(1 for m in request.messages for p in m.content if isinstance(p, ImagePart))
    completion = (request.params.max_tokens or 256) * request.params.n
    return chars // 4 + images * IMAGE_TOKEN_ESTIMATE + completion


def parse_completion(body: bytes) -> tuple[tuple[Sample, ...], Usage]:
    """Turn a chat-completion body into samples; raise `_RetryableError('malformed')` if it is not
    one (a truncated body, HTML from a proxy, a missing `choices`)."""
    try:
        data = _loads(body)
        choices = data["choices"]
        samples = tuple(sorted((_parse_choice(c) for c in choices), key=lambda s: s.index))
    except (ValueError, KeyError, TypeError) as exc:
        # Redacted before it is cut, so that no key is cut short of its redactable shape.
        snippet = redact(body[:4096].decode("utf-8", "replace"))[:120]
        raise _RetryableError(
            "malformed", f"not a chat completion ({exc}): {snippet!r}", 200, None
        ) from exc
    if not samples:
        raise _RetryableError("malformed", "chat completion with no choices", 200, None)
    usage_data = data.get("usage") or {}
    usage = Usage(
        prompt_tokens=int(usage_data.get("prompt_tokens") or 0),
        completion_tokens=int(usage_data.get("completion_tokens") or 0),
    )
    return samples, usage


def _parse_choice(choice: Mapping[str, Any]) -> Sample:
    message = choice.get("message") or {}
    content = message.get("content")
    if content is None:
        content = ""  # a content_filter stop or a tool call: no text, still a result
    if not isinstance(content, str):
        raise TypeError(f"message.content is {type(content).__name__}, expected a string")
    logprobs: tuple[TokenLogprob, ...] | None = None
    lp = choice.get("logprobs")
    if lp and lp.get("content") is not None:
        # The hottest loop of a judge run (every token, every alternative): comprehensions, not
        # generator expressions, and a float() only where a server may send an integer 0.
        logprobs = tuple(
            [
                TokenLogprob(
                    t["token"],
                    float(t["logprob"]),
                    tuple([(a["token"], a["logprob"] + 0.0) for a in t.get("top_logprobs") or ()]),
                )
                for t in lp["content"]
            ]
        )
    return Sample(
        index=int(choice.get("index", 0)),
        text=content,
        finish_reason=str(choice.get("finish_reason") or "unknown"),
        logprobs=logprobs,
        # Token logprobs list the choice's tokens one by one: its own exact length. Without
        # them the endpoint reports completion tokens for the whole call only.
        completion_tokens=len(logprobs) if logprobs is not None else None,
    )


def _classify(exc: BaseException) -> _RetryableError | _FinalError:
    """Map an SDK exception to a retry decision and a failure kind."""
    if isinstance(exc, _RetryableError | _FinalError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        # The aiohttp transport reports a refused connection as a ConnectTimeout: either way it is
        # the connection phase that failed, not a slow answer.
        if isinstance(exc.__cause__, httpx2.ConnectTimeout):
            return _RetryableError("connection", f"cannot connect: {exc.__cause__}", None, None)
        return _RetryableError("timeout", "request timed out", None, None)
    if isinstance(exc, openai.APIConnectionError):
        return _RetryableError(
            "connection", f"connection error: {exc.__cause__ or exc}", None, None
        )
    if isinstance(exc, openai.APIStatusError):
        retry_after = retry_after_seconds(exc.response.headers)
        return classify_status(exc.status_code, _error_message(exc), retry_after)
    return _FinalError("other", f"{type(exc).__name__}: {exc}", None)


def classify_status(
    status: int, detail: str, retry_after: float | None = None
) -> _RetryableError | _FinalError:
    """What an error status means: retryable or not, and its failure kind. Online answers and
    the lines of a batch's output and error files (vlpref/providers/openai_batch.py) alike."""
    message = f"HTTP {status}: {detail}"
    if status == 429:
        return _RetryableError("rate_limit", message, status, retry_after)
    if status >= 500:
        return _RetryableError("server_error", message, status, retry_after)
    if status in (408, 409):
        return _RetryableError(
            "timeout" if status == 408 else "other", message, status, retry_after
        )
    if status in (401, 403):
        return _FinalError("auth", message, status)
    return _FinalError("bad_request", message, status)


def _error_message(exc: openai.APIStatusError) -> str:
    """The endpoint's error message, redacted before it is cut to 300 characters (a key cut in
    half would no longer be recognised)."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return redact(str(inner["message"]))[:300]
    return redact(str(exc.message))[:300]


class OpenAICompatProvider(Provider):
    """Chat completions over HTTP for any OpenAI-compatible endpoint."""

    kind = "openai"

    def __init__(self, options: OpenAICompatOptions) -> None:
        self.options = options
        # The endpoint's concurrency, rpm and tpm: this process's, or the whole run's under a
        # scale-out runner (vlpref/limits.py); chosen again if the process's scope changes (a
        # Dask worker kept from one run to the next).
        self._limits_scope = limits.scope()
        self.limits = self._new_limits()
        self._client: openai.AsyncOpenAI | None = None
        self._chat_url = CHAT_PATH
        self._dialect = options.dialect  # resolved once, not per request
        # The endpoint's `concurrency`, shared by every batch on this provider (several stage
        # tasks run batches at once). Taken before a request's body is built, so bodies (each
        # with its image as base64) exist only for requests about to be sent.
        self._slots: asyncio.Semaphore | None = None

    def _new_limits(self) -> limits.SharedLimiter:
        opts = self.options
        return limits.limiter_for(
            opts.model_dump_json(),
            concurrency=opts.concurrency,
            rpm=opts.rpm,
            tpm=opts.tpm,
            limits_scope=self._limits_scope,
        )

    def _current_limits(self) -> limits.SharedLimiter:
        scope = limits.scope()
        if scope != self._limits_scope:
            old, self._limits_scope = self.limits, scope
            self.limits = self._new_limits()
            task = asyncio.ensure_future(old.aclose())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self.limits

    @property
    def limiter(self) -> RateLimiter:
        """This process's rate limiter: the configured rates (threads runner) and the
        endpoint's own signals (x-ratelimit headers, a 429's cool-down)."""
        return self.limits.rate

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        OpenAICompatOptions.model_validate(dict(options))

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        opts = OpenAICompatOptions.model_validate(dict(options))
        if opts.mode == "batch" and cls is OpenAICompatProvider:
            # Same kind, same identity (so the same journal keys): only the transport differs.
            from vlpref.providers.openai_batch import OpenAIBatchProvider

            return cast(Self, OpenAIBatchProvider(opts))
        return cls(opts)

    @property
    def identity(self) -> str:
        return (
            f"openai:{self.options.cache_namespace}" if self.options.cache_namespace else "openai"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def _resolve_api_key(self) -> str:
        """The endpoint's key, registered for redaction (`vlpref.redact`) before it is used."""
        opts = self.options
        if opts.api_key_env:
            key = os.environ.get(opts.api_key_env)
            if not key:
                raise ProviderError(
                    f"environment variable {opts.api_key_env!r} (api_key_env of the endpoint at "
                    f"{opts.base_url}) is not set"
                )
            register_secret(key)
            return key
        if opts.api_key_secret:
            from prefect.blocks.system import Secret

            secret: Secret[str] = await Secret.aload(opts.api_key_secret)
            value = str(secret.get())
            register_secret(value)
            return value
        # Local servers (vLLM, the sim) accept any key; the SDK insists on one.
        return "EMPTY"

    async def _get_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            opts = self.options
            limits = httpx2.Limits(
                max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency
            )
            timeout = httpx2.Timeout(opts.timeout_s, connect=opts.connect_timeout_s)
            http_client: httpx2.AsyncClient
            if opts.transport == "aiohttp":
                http_client = openai.DefaultAioHttpClient(
                    timeout=timeout, limits=limits, verify=_tls_context()
                )
            else:
                http_client = openai.DefaultAsyncHttpxClient(
                    timeout=timeout, limits=limits, verify=_tls_context()
                )
            # The SDK's platform headers describe this machine (OS, arch, Python and SDK
            # versions) to the endpoint on every request: we send none of them (no telemetry),
            # which also saves ~8% of the client's CPU per request (bench/, docs/performance.md).
            headers: dict[str, Any] = {name: openai.Omit() for name in PLATFORM_HEADERS}
            headers.update(opts.headers)
            self._client = openai.AsyncOpenAI(
                base_url=opts.base_url,
                api_key=await self._resolve_api_key(),
                max_retries=0,  # retries are ours: they must end in a Failure, not an exception
                timeout=timeout,
                http_client=http_client,
                default_headers=cast(dict[str, str], headers),  # Omit() removes a header
            )
            # An absolute URL: the SDK then skips merging a relative path into its base URL
            # (a URL parse and copy per request). The same URL it would build from the path.
            self._chat_url = f"{self._client.base_url}{CHAT_PATH.lstrip('/')}"
        return self._client

    async def aclose(self) -> None:
        self._slots = None  # bound to this event loop; a reopened provider makes its own
        await self.limits.aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- the seam ------------------------------------------------------------------------------

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        client = await self._get_client()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.options.concurrency)
        slots = self._slots
        pending = iter(requests)
        results: asyncio.Queue[ChatResult | None] = asyncio.Queue()

        async def worker() -> None:
            try:
                while True:
                    # A slot first, then the next request: with many batches on one endpoint
                    # (8 branches x 12 models) a worker per slot per batch would otherwise build
                    # tens of thousands of bodies that then wait for a connection (measured: the
                    # flow's RSS rose by ~1 GB in a 30k-question run's responses stage).
                    async with slots:
                        # A shared iterator: `next` runs without awaiting, so no collisions.
                        request = next(pending, None)
                        if request is None:
                            return
                        result = await self._complete_one(client, request)
                    results.put_nowait(result)
            finally:
                results.put_nowait(None)

        workers = [asyncio.create_task(worker()) for _ in range(self.options.concurrency)]
        finished = 0
        try:
            while finished < len(workers):
                item = await results.get()
                if item is None:
                    finished += 1
                else:
                    yield item
            for task in workers:  # surfaces a bug in a worker instead of hiding it
                task.result()
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _complete_one(self, client: openai.AsyncOpenAI, request: ChatRequest) -> ChatResult:
        started = time.perf_counter()
        deadline = time.monotonic() + self.options.max_retry_time_s
        try:
            body = self._request_body(request)
        except Exception as exc:  # e.g. an extra_body value that is not JSON: a value too
            return self._failed(request, exc, 1, started)
        estimate = estimate_tokens(request) if self.options.tpm or self.limiter.tpm else 0
        key = _new_idempotency_key()
        # The fast path: most requests succeed at once, and need none of tenacity's bookkeeping.
        try:
            samples, usage, latency = await self._attempt(client, body, estimate, key)
        except _RetryableError as exc:
            first_error = exc
        except Exception as exc:  # every request-level problem becomes a value
            return self._failed(request, exc, 1, started)
        else:
            return ChatResult(request, samples=samples, usage=usage, latency_s=latency, attempts=1)
        # The first attempt failed and may be retried: tenacity takes over, starting from that
        # failure, so stop, wait and Retry-After apply exactly as if it had run attempt 1 too.
        attempts = 1
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_RetryableError),
            stop=stop_after_attempt(self.options.max_attempts) | _StopAt(deadline),
            wait=self._wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise first_error
                    attempts += 1
                    samples, usage, latency = await self._attempt(client, body, estimate, key)
        except Exception as exc:
            return self._failed(request, exc, attempts, started)
        return ChatResult(
            request, samples=samples, usage=usage, latency_s=latency, attempts=attempts
        )

    @staticmethod
    def _failed(request: ChatRequest, exc: Exception, attempts: int, started: float) -> ChatResult:
        """Every failure of this provider is built here, from the last attempt's error, whose
        message may quote the endpoint (an error body that repeats the key it received, a
        proxy's echo of the headers): redacted here, before the early-stop probe, a stage, a
        log line or a published table sees it."""
        err = _classify(exc)
        return ChatResult(
            request,
            failure=Failure(err.kind, redact(str(err)), err.status, attempts),
            latency_s=time.perf_counter() - started,
            attempts=attempts,
        )

    async def _attempt(
        self, client: openai.AsyncOpenAI, body: bytes, estimate: int, key: str
    ) -> tuple[tuple[Sample, ...], Usage, float]:
        """One attempt: wait for the rate limiter, send, parse; returns samples, usage, latency."""
        limiter = self._current_limits()
        await limiter.admit(estimate)
        async with limiter.slot():  # run-wide concurrency: held only while the call is out
            t0 = time.perf_counter()
            samples, usage = await self._send(client, body, key)
            latency = time.perf_counter() - t0
        if estimate:
            limiter.settle(estimate, usage.total_tokens)
        return samples, usage, latency

    async def _send(
        self, client: openai.AsyncOpenAI, body: bytes, key: str
    ) -> tuple[tuple[Sample, ...], Usage]:
        try:
            # Through the SDK's client (auth, headers, timeouts, its error types), with the body
            # already serialised and the response left raw: we parse the bytes ourselves.
            raw = await client.post(
                self._chat_url,
                cast_to=httpx2.Response,
                content=body,
                options={"idempotency_key": key},
            )
        except openai.APIStatusError as exc:
            self.limiter.observe_headers(exc.response.headers)
            err = _classify(exc)
            if isinstance(err, _RetryableError) and err.kind == "rate_limit":
                # Cool the whole endpoint down, not just this worker.
                self.limiter.pause_for(min(err.retry_after or 1.0, self.options.max_retry_after_s))
            raise err from exc
        except openai.OpenAIError as exc:
            raise _classify(exc) from exc
        self.limiter.observe_headers(raw.headers)
        return self._parse_answer(raw.content)

    def _parse_answer(self, content: bytes) -> tuple[tuple[Sample, ...], Usage]:
        """The samples and usage of a response body (a subclass for another endpoint, e.g.
        image generation, parses its own answer and keeps the rest of `_send`)."""
        return parse_completion(content)

    def _request_body(self, request: ChatRequest) -> bytes:
        """The JSON body of the chat-completions call, serialised once for every attempt."""
        p = request.params
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": [message_to_openai(m) for m in request.messages],
        }
        if p.n != 1:
            payload["n"] = p.n
        if p.max_tokens is not None:
            payload[self.options.max_tokens_field] = p.max_tokens
        if p.temperature is not None:
            payload["temperature"] = p.temperature
        if p.top_p is not None:
            payload["top_p"] = p.top_p
        if p.seed is not None:
            payload["seed"] = p.seed
        if p.logprobs:
            payload["logprobs"] = True
            if p.top_logprobs is not None:
                payload["top_logprobs"] = p.top_logprobs
        if p.stop:
            payload["stop"] = list(p.stop)
        if request.constraint is not None:
            payload.update(constraint_fields(request.constraint, self._dialect))
        if self.options.extra_body:
            payload.update(self.options.extra_body)  # as the SDK's extra_body: top level, wins
        return _dumps(payload)

    def _wait(self, state: RetryCallState) -> float:
        """Backoff with full jitter, or the server's `Retry-After` when it gave one."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryableError) and exc.retry_after is not None:
            return min(exc.retry_after, self.options.max_retry_after_s)
        backoff = wait_random_exponential(
            multiplier=self.options.backoff_initial_s, max=self.options.backoff_max_s
        )
        return float(backoff(state))
