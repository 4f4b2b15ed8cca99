"""The simulated OpenAI-compatible HTTP server (aiohttp.web) - a test double, not a model.

Endpoints: POST /v1/chat/completions, POST /v1/images/generations (`vlpref.sim.images_api`),
GET /v1/models, GET /health, the batch API (POST /v1/files,
GET /v1/files/{id}/content, POST/GET /v1/batches, GET /v1/batches/{id}, POST
/v1/batches/{id}/cancel: `vlpref.sim.batches`), and the introspection endpoints GET
/sim/counters, GET /sim/requests, POST /sim/reset.

Images: data URLs are base64-decoded and verified with Pillow; one larger than Pillow's
`MAX_IMAGE_PIXELS` (a decompression bomb) is a 400 `image_too_large`, read no further than its
header, never a 500 that a client would retry. http(s) image URLs are
accepted but never fetched (the sim runs offline), so they carry no size. Streaming is not
supported (400). `top_p` and `stop` are accepted and ignored. A conversation may end with an
assistant turn (the guard personas judge it).

Output constraints (`response_format` json_schema / json_object, vLLM's `structured_outputs`
choice / json) are honoured as OpenAI and vLLM honour them and checked as they check them (a
400 for a bad one): see `vlpref.sim.constraints`. A model with `drop_logprobs: true` answers
`logprobs: null` even when asked, as many hosted APIs do.

Counters and the request log get one entry per arrival at the chat endpoint, written when the
request finishes: `t` is the arrival time (time.monotonic(), comparable across processes on
Linux), `status` the status sent, or 499 when the client went away first (e.g. during a hang),
and `fault` one of rate_limit, server_error, hang, malformed, rate_limit_enforced, or null.
The counters' `usage` sums, per model, the `usage` of every well-formed answer sent with status
200: what the endpoint billed, for tests that check a client's token accounting. POST /sim/reset
also forgets the per-body arrival counts and the rate-limit windows.

A model with `nondeterministic: true` answers a request without `seed` with a seed drawn from its
body and arrival count, as hosted APIs sample afresh: the same request sent twice gets two
answers (at temperature > 0), and a test can still predict them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import math
import sys
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from vlpref.sim import personas, styles
from vlpref.sim.config import FaultKind, FaultSpec, LatencyConfig, SimConfig
from vlpref.sim.constraints import Constraint, ConstraintError, parse_constraint
from vlpref.sim.faults import (
    GENEROUS_HEADERS,
    FaultBook,
    SlidingWindow,
    format_duration,
    latency_s,
    unit_hash,
)
from vlpref.sim.tokens import build_logprobs, tokenize

try:  # orjson is faster when present; it is not a requirement
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads


MAX_BODY_BYTES = 64 * 1024 * 1024
_IMAGE_CACHE_SIZE = 512


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        """The JSON error response."""
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return web.Response(
            body=_dumps(body), status=self.status, headers=headers, content_type="application/json"
        )


@dataclass(slots=True)
class ChatRequest:
    """A validated chat-completions request."""

    model: str
    messages: list[Any]
    n: int
    temperature: float
    max_tokens: int | None
    seed: int
    seeded: bool  # the body set `seed`
    logprobs: bool
    top_logprobs: int
    user_text: str
    prompt_tokens: int
    images: tuple[personas.ImageInfo, ...]
    constraint: Constraint | None = None  # response_format / structured_outputs
    response_text: str | None = None  # the final message's text when it is an assistant turn
    corrected: bool = False  # a corrective re-ask of a task (see _scan_messages)


@dataclass(slots=True)
class Arrival:
    """What gets recorded for one arrival once it finishes."""

    t: float
    model: str = "<invalid>"
    status: int = 500
    fault: str | None = None
    usage: tuple[int, int] | None = None  # (prompt, completion) of a well-formed answer


# ----------------------------------------------------------------------------- validation


def _int_field(
    data: dict[str, Any], name: str, default: int | None, lo: int, hi: int
) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be an integer in [{lo}, {hi}].", param=name)
    return value


def _float_field(data: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be a number in [{lo}, {hi}].", param=name)
    return float(value)


def _bad_image(detail: str) -> ApiError:
    return ApiError(
        400,
        f"You uploaded an unsupported image ({detail}). Please make sure your image is valid.",
        param="messages",
        code="invalid_image_format",
    )


def inspect_image_url(url: str) -> personas.ImageInfo:
    """Decode and verify a data URL with Pillow; http(s) URLs are accepted unfetched."""
    key = hashlib.sha256(url.encode()).hexdigest()
    if url.startswith(("http://", "https://")):
        return personas.ImageInfo(key=key)
    if not url.startswith("data:"):
        raise ApiError(
            400,
            "Invalid image URL: expected a data URL or http(s) URL.",
            param="messages",
            code="invalid_image_url",
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _bad_image("not a base64 data URL")
    try:
        raw = base64.b64decode(payload, validate=False)
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS Pillow warns, past twice that it raises: both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                width, height = im.size
                im.verify()
            blank = False
            if width * height <= _BLANK_CHECK_PIXELS:
                with Image.open(io.BytesIO(raw)) as im:
                    blank = _is_blank(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A client error, as the API answers it: a 500 would be retried, to the same end.
        raise ApiError(
            400,
            f"The image is too large: {exc} The limit is {Image.MAX_IMAGE_PIXELS:,} pixels.",
            param="messages",
            code="image_too_large",
        ) from exc
    except (binascii.Error, ValueError, OSError, SyntaxError) as exc:
        raise _bad_image(type(exc).__name__) from exc
    return personas.ImageInfo(width, height, key=key, blank=blank)


# Images up to this many pixels are decoded to tell whether they are blank; larger ones never are.
_BLANK_CHECK_PIXELS = 4_194_304


def _is_blank(im: Image.Image) -> bool:
    """Whether every pixel of the (first frame of the) image has one colour."""
    extrema: Any = im.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(lo == hi for lo, hi in bands)


class ImageCache:
    """Remembers verified data URLs: a pipeline sends the same image many times."""

    def __init__(self, size: int = _IMAGE_CACHE_SIZE) -> None:
        self._size = size
        self._items: dict[str, personas.ImageInfo] = {}

    def get(self, url: str) -> personas.ImageInfo:
        """The image's info, inspecting it on a miss (bad images are not cached)."""
        info = self._items.get(url)
        if info is None:
            info = inspect_image_url(url)
            if len(self._items) >= self._size:
                self._items.pop(next(iter(self._items)))
            self._items[url] = info
        return info


def _scan_messages(
    messages: list[Any], images: ImageCache
) -> tuple[list[str], str, list[personas.ImageInfo], str | None, bool]:
    """All text parts, the last user message's text, the images, the final message's text when
    it is an assistant turn (a conversation for a guard to judge), and whether the conversation
    is a corrected task: a user turn with a `TASK:` line, an assistant answer, then a user turn
    without one (a corrective re-ask). Then the task's turn stays the user text the judge reads."""
    texts: list[str] = []
    infos: list[personas.ImageInfo] = []
    user_text = ""
    final_assistant: str | None = None
    corrected = False
    answered = False
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, "Each message needs a string 'role'.", param="messages")
        content = msg.get("content")
        own: list[str] = []
        if isinstance(content, str):
            own.append(content)
        elif isinstance(content, list):
            for part in content:
                _scan_part(part, own, infos, images)
        elif content is not None:
            raise ApiError(400, "'content' must be a string or an array.", param="messages")
        texts.extend(own)
        if msg["role"] == "user":
            text = "\n".join(own)
            if answered and personas.has_task(user_text) and not personas.has_task(text):
                corrected = True  # a correction of the task above: the task is still that one
            else:
                user_text, corrected = text, False
            answered = False
        elif msg["role"] == "assistant":
            answered = True
        final_assistant = "\n".join(own) if msg["role"] == "assistant" else None
    return texts, user_text, infos, final_assistant, corrected


def _scan_part(
    part: Any, texts: list[str], infos: list[personas.ImageInfo], images: ImageCache
) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        texts.append(part["text"])
    elif kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise ApiError(400, "'image_url.url' must be a string.", param="messages")
        infos.append(images.get(url))
    else:
        raise ApiError(400, f"Unsupported content part type {kind!r}.", param="messages")


def parse_chat(body: bytes, config: SimConfig, images: ImageCache) -> ChatRequest:
    """Validate a chat-completions body; raises ApiError (400/404)."""
    try:
        data = _loads(body)
    except ValueError as exc:
        raise ApiError(400, "We could not parse the JSON body of your request.") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = data.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "You must provide a model parameter.", param="model")
    if model not in config.models:
        raise ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    if data.get("stream"):
        raise ApiError(400, "Streaming is not supported by the simulator.", param="stream")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    texts, user_text, infos, final_assistant, corrected = _scan_messages(messages, images)
    try:
        constraint = parse_constraint(data)
    except ConstraintError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from exc
    _float_field(data, "top_p", 1.0, 0.0, 1.0)  # validated, then ignored
    max_tokens = _int_field(data, "max_completion_tokens", None, 1, 10**7)
    if max_tokens is None:
        max_tokens = _int_field(data, "max_tokens", None, 1, 10**7)
    logprobs = data.get("logprobs") is True
    top_logprobs = _int_field(data, "top_logprobs", 0, 0, 20) or 0
    if data.get("top_logprobs") is not None and not logprobs:
        raise ApiError(
            400, "'logprobs' must be set to true when 'top_logprobs' is used.", param="top_logprobs"
        )
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer.", param="seed")
    return ChatRequest(
        model=model,
        messages=messages,
        n=_int_field(data, "n", 1, 1, 128) or 1,
        temperature=_float_field(data, "temperature", 1.0, 0.0, 2.0),
        max_tokens=max_tokens,
        seed=seed or 0,
        seeded=seed is not None,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        user_text=user_text,
        prompt_tokens=sum(len(tokenize(t)) for t in texts) + config.image_tokens * len(infos),
        images=tuple(infos),
        constraint=constraint,
        response_text=final_assistant,
        corrected=corrected,
    )


# ----------------------------------------------------------------------------- generation


def _choice(
    settings: personas.PersonaSettings,
    req: ChatRequest,
    prompt: personas.Prompt,
    index: int,
    drop_logprobs: bool,
) -> tuple[dict[str, Any], int]:
    """One entry of `choices` and its completion token count."""
    gen = personas.generate(
        settings,
        prompt,
        seed=req.seed,
        index=index,
        temperature=req.temperature,
        constraint=req.constraint,
    )
    tokens = tokenize(gen.text)
    text: str = gen.text
    finish: str = gen.finish_reason
    if req.max_tokens is not None and len(tokens) > req.max_tokens:
        tokens = tokens[: req.max_tokens]
        text, finish = "".join(tokens), "length"
    logprobs = None
    if req.logprobs and not drop_logprobs:
        rng = personas.choice_rng(prompt.digest, req.seed + 1, index, req.temperature)
        logprobs = build_logprobs(tokens, gen.decisions, req.top_logprobs, rng)
    choice = {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": logprobs,
        "finish_reason": finish,
    }
    return choice, len(tokens)


def complete(
    settings: personas.PersonaSettings,
    req: ChatRequest,
    completion_id: str,
    *,
    drop_logprobs: bool = False,
) -> dict[str, Any]:
    """The full chat.completion object; `drop_logprobs` answers `logprobs: null` even when the
    request asks for them (as many hosted APIs do)."""
    prompt = personas.Prompt(
        digest=personas.prompt_digest(req.model, req.messages),
        user_text=req.user_text,
        images=req.images,
        response_text=req.response_text,
        corrected=req.corrected,
    )
    choices = []
    completion_tokens = 0
    for j in range(req.n):
        choice, used = _choice(settings, req, prompt, j, drop_logprobs)
        choices.append(choice)
        completion_tokens += used
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": "fp_vlpref_sim",
        "choices": choices,
        "usage": {
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": req.prompt_tokens + completion_tokens,
        },
    }


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class ModelRuntime:
    """Everything about one served model that can be computed once at start-up."""

    settings: personas.PersonaSettings
    latency: LatencyConfig
    faults: dict[FaultKind, FaultSpec]
    window: SlidingWindow | None
    nondeterministic: bool = False
    drop_logprobs: bool = False


class SimState:
    """Counters, the request log and per-model runtime state of one server."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.book = FaultBook(config.seed)
        self.images = ImageCache()
        self.models: dict[str, ModelRuntime] = {}
        for name, mc in config.models.items():
            limits = config.rate_limit_for(name)
            self.models[name] = ModelRuntime(
                settings=personas.PersonaSettings(
                    persona=mc.persona,
                    weights=tuple(mc.weights.items()),
                    filter_rate=mc.filter_rate,
                    malformed_rate=mc.malformed_rate,
                    position_bias=mc.position_bias,
                    styles=styles.normalise_styles(mc.styles),
                    follows_corrections=mc.follows_corrections,
                    prior_bias=mc.prior_bias,
                    image_dependence=mc.image_dependence,
                    noise=mc.noise,
                ),
                latency=config.latency_for(name),
                faults=config.faults_for(name),
                window=SlidingWindow(limits) if limits is not None else None,
                nondeterministic=mc.nondeterministic,
                drop_logprobs=mc.drop_logprobs,
            )
        self.log: deque[tuple[float, str, int, str | None]] = deque(maxlen=config.request_log_size)
        self._next_id = 0
        self.reset()

    def reset(self) -> None:
        """Zero counters and log; forget arrivals and rate-limit windows."""
        self.total = 0
        self.by_model: dict[str, dict[str, int]] = {}
        self.by_status: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.usage: dict[str, dict[str, int]] = {}
        self.log.clear()
        self.book.reset()
        for rt in self.models.values():
            if rt.window is not None:
                rt.window.reset()

    def record(self, arrival: Arrival) -> None:
        """Count one finished arrival."""
        status = str(arrival.status)
        self.total += 1
        per_model = self.by_model.setdefault(arrival.model, {})
        per_model[status] = per_model.get(status, 0) + 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if arrival.fault is not None:
            self.faults[arrival.fault] = self.faults.get(arrival.fault, 0) + 1
        if arrival.usage is not None and arrival.status == 200:
            billed = self.usage.setdefault(arrival.model, {})
            billed["prompt_tokens"] = billed.get("prompt_tokens", 0) + arrival.usage[0]
            billed["completion_tokens"] = billed.get("completion_tokens", 0) + arrival.usage[1]
        self.log.append((arrival.t, arrival.model, arrival.status, arrival.fault))

    def new_id(self) -> str:
        """A fresh completion id."""
        self._next_id += 1
        return f"chatcmpl-sim{self._next_id:010x}"

    def counters(self) -> dict[str, Any]:
        """The /sim/counters payload."""
        return {
            "total": self.total,
            "by_model": self.by_model,
            "by_status": self.by_status,
            "faults": self.faults,
            "usage": self.usage,
        }


STATE_KEY = web.AppKey("vlpref_sim_state", SimState)


# ----------------------------------------------------------------------------- handlers


def _retry_headers(wait_s: float, base: dict[str, str]) -> dict[str, str]:
    headers = dict(base)
    headers["Retry-After"] = str(max(0, math.ceil(wait_s)))
    headers["retry-after-ms"] = str(max(0, round(wait_s * 1000)))
    return headers


def _injected_rate_limit(spec: FaultSpec) -> web.Response:
    headers = _retry_headers(spec.retry_after_s, GENEROUS_HEADERS)
    headers["x-ratelimit-remaining-requests"] = "0"
    headers["x-ratelimit-reset-requests"] = format_duration(spec.retry_after_s)
    err = ApiError(
        429,
        "Rate limit reached for requests (simulated). Please try again later.",
        type_="requests",
        code="rate_limit_exceeded",
    )
    return err.response(headers)


def _server_error() -> web.Response:
    err = ApiError(
        500,
        "The server had an error while processing your request (simulated).",
        type_="server_error",
    )
    return err.response(dict(GENEROUS_HEADERS))


def _admit(
    rt: ModelRuntime, req: ChatRequest
) -> tuple[list[float] | None, dict[str, str], web.Response | None]:
    """Apply an enforced rate limit: (window entry, headers, 429 response or None)."""
    if rt.window is None:
        return None, GENEROUS_HEADERS, None
    now = time.monotonic()
    # Like OpenAI, admission counts max_tokens as an estimate; settle() fixes it afterwards.
    entry, wait = rt.window.admit(now, req.prompt_tokens + (req.max_tokens or 0))
    headers = rt.window.headers(now)
    if entry is not None:
        return entry, headers, None
    limited = ApiError(
        429,
        f"Rate limit reached for {req.model} (simulated, enforced).",
        type_="requests",
        code="rate_limit_exceeded",
    )
    return None, headers, limited.response(_retry_headers(wait, headers))


async def _handle_chat(request: web.Request, state: SimState, arrival: Arrival) -> web.Response:
    body = await request.read()
    try:
        req = parse_chat(body, state.config, state.images)
    except ApiError as err:
        arrival.model = _model_hint(body)
        return err.response(dict(GENEROUS_HEADERS))
    arrival.model = req.model
    rt = state.models[req.model]
    entry, headers, refusal = _admit(rt, req)
    if refusal is not None:
        arrival.fault = "rate_limit_enforced"
        return refusal
    body_sha = hashlib.sha256(body).digest()
    arrival_no = state.book.arrive(body_sha)
    fault = state.book.draw(body_sha, arrival_no, rt.faults) if rt.faults else None
    arrival.fault = fault
    if fault == "rate_limit":
        return _injected_rate_limit(rt.faults["rate_limit"])
    if fault == "hang":
        delay = rt.faults["hang"].hang_s
    elif rt.latency.is_zero:
        delay = 0.0
    else:
        delay = latency_s(rt.latency, body_sha, arrival_no, state.book.seed)
    if fault == "server_error":
        await _sleep(delay)
        return _server_error()
    payload = answer(state, req, body_sha, arrival_no)
    if entry is not None and rt.window is not None:
        rt.window.settle(entry, payload["usage"]["total_tokens"])
    data = _dumps(payload)
    if fault == "malformed":
        data = data[: len(data) // 2]  # truncated JSON, still labelled application/json
    else:
        arrival.usage = (payload["usage"]["prompt_tokens"], payload["usage"]["completion_tokens"])
    await _sleep(delay)
    if request.transport is None or request.transport.is_closing():
        arrival.status = 499  # the client went away (e.g. it timed out on a hang)
    return web.Response(body=data, headers=headers, content_type="application/json")


def answer(state: SimState, req: ChatRequest, body_sha: bytes, arrival_no: int) -> dict[str, Any]:
    """The chat.completion that a valid request gets, online or as a line of a batch (one
    answer path, so a batch answers exactly what the endpoint would)."""
    rt = state.models[req.model]
    if rt.nondeterministic and not req.seeded:
        req.seed = int(unit_hash(body_sha, arrival_no, "seed", state.book.seed) * 2**31)
    return complete(rt.settings, req, state.new_id(), drop_logprobs=rt.drop_logprobs)


async def _sleep(delay: float) -> None:
    if delay > 0:
        await asyncio.sleep(delay)


def _model_hint(body: bytes) -> str:
    """The model named by an invalid request, for the counters."""
    try:
        data = _loads(body)
    except ValueError:
        return "<invalid>"
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else "<invalid>"


def _unauthorized(request: web.Request, state: SimState) -> web.Response | None:
    """401 when the sim requires a key and the request does not carry it."""
    wanted = state.config.require_api_key
    if wanted is None or request.headers.get("Authorization") == f"Bearer {wanted}":
        return None
    return ApiError(
        401,
        "Incorrect API key provided (simulated).",
        type_="invalid_request_error",
        code="invalid_api_key",
    ).response()


async def chat_completions(request: web.Request) -> web.Response:
    """POST /v1/chat/completions."""
    state = request.app[STATE_KEY]
    arrival = Arrival(t=time.monotonic())
    try:
        response = _unauthorized(request, state)
        if response is not None:
            arrival.model = _model_hint(await request.read())
        else:
            response = await _handle_chat(request, state, arrival)
        if arrival.status != 499:
            arrival.status = response.status
        return response
    except asyncio.CancelledError:
        arrival.status = 499
        raise
    except web.HTTPException as exc:  # e.g. 413 for a body over client_max_size
        arrival.status = exc.status
        return ApiError(exc.status, exc.reason or "Request rejected.").response()
    except Exception as exc:
        # A sim bug must still look like an API error to the client, and be visible.
        traceback.print_exc(file=sys.stderr)
        arrival.status = 500
        return ApiError(500, f"Simulator bug: {exc!r}", type_="server_error").response()
    finally:
        state.record(arrival)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    state = request.app[STATE_KEY]
    refused = _unauthorized(request, state)
    if refused is not None:
        return refused
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "vlpref-sim"}
        for name in state.config.models
    ]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    name = request.match_info["model"]
    if name not in request.app[STATE_KEY].config.models:
        return ApiError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        ).response()
    return web.json_response(
        {"id": name, "object": "model", "created": 0, "owned_by": "vlpref-sim"}
    )


async def health(request: web.Request) -> web.Response:
    """GET /health."""
    return web.json_response({"status": "ok"})


async def sim_counters(request: web.Request) -> web.Response:
    """GET /sim/counters (the batch API's under `batch`, see `vlpref.sim.batches`)."""
    from vlpref.sim.batches import BATCHES_KEY

    counters = request.app[STATE_KEY].counters()
    counters["batch"] = request.app[BATCHES_KEY].counters()
    return web.Response(body=_dumps(counters), content_type="application/json")


async def sim_requests(request: web.Request) -> web.Response:
    """GET /sim/requests."""
    log = [
        {"t": t, "model": model, "status": status, "fault": fault}
        for t, model, status, fault in request.app[STATE_KEY].log
    ]
    return web.Response(body=_dumps(log), content_type="application/json")


async def sim_reset(request: web.Request) -> web.Response:
    """POST /sim/reset."""
    from vlpref.sim.batches import BATCHES_KEY

    request.app[STATE_KEY].reset()
    request.app[BATCHES_KEY].reset()
    return web.json_response({"status": "reset"})


def create_app(config: SimConfig) -> web.Application:
    """The aiohttp application serving `config`."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = SimState(config)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/sim/counters", sim_counters)
    app.router.add_get("/sim/requests", sim_requests)
    app.router.add_post("/sim/reset", sim_reset)
    # Imported here: the batch API answers its lines through this module's chat path.
    from vlpref.sim.batches import add_batch_routes

    add_batch_routes(app)
    from vlpref.sim.images_api import images_generations

    app.router.add_post("/v1/images/generations", images_generations)
    return app
