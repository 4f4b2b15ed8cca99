"""The sim's image generation endpoint: POST /v1/images/generations, OpenAI's images API shape.

Deterministic: the picture is a function of (model, prompt, seed, index within the call) only:
a grid of colour blocks and a gradient drawn from their hash, at the asked `size` (16 to 2048
px a side). The same request gets the same bytes; another prompt or seed gets another image.

Request: `model` (any name; a model of the sim's config also gets its `faults`: rate_limit,
server_error and malformed, drawn per body and arrival as for chat), `prompt` (non-empty), `n`
(1-10), `size` (`WxH` or `auto`, which is 1024x1024), `seed` (an integer, default 0),
`response_format` (`b64_json`; the default for `gpt-image-*` models, which refuse the field as
OpenAI does; `url` is a 400 here: the sim serves no files), `quality` and `style` (accepted,
ignored). Unknown fields are a 400, as OpenAI answers them. A prompt containing
`sim:content_policy` is refused with OpenAI's content-policy 400, so tests can see a refusal.

Answer: `{"created": 0, "data": [{"b64_json": ...}], "usage": {"input_tokens",
"output_tokens", "total_tokens"}}` (tokens: prompt words and one per 32x32 pixels). Each
arrival is counted in /sim/counters under its model, like a chat request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw

from vlpref.sim.faults import GENEROUS_HEADERS

__all__ = ["image_for", "images_generations"]

_SIZE = re.compile(r"^([1-9][0-9]{1,3})x([1-9][0-9]{1,3})$")
_FIELDS = frozenset(
    {"model", "prompt", "n", "size", "seed", "response_format", "quality", "style", "user"}
)
REFUSE_MARK = "sim:content_policy"


def image_for(model: str, prompt: str, seed: int, index: int, width: int, height: int) -> bytes:
    """The PNG the sim answers for one image of a request."""
    digest = hashlib.sha256(f"{model}\x1f{prompt}\x1f{seed}\x1f{index}".encode()).digest()
    stream = hashlib.shake_256(digest).digest(3 * 64 + 6)
    image = Image.new("RGB", (width, height), tuple(stream[-6:-3]))
    draw = ImageDraw.Draw(image)
    # An 8 x 8 grid of blocks, each its own colour: two prompts never share a picture, and a
    # downscaled copy still differs from another prompt's (perceptual hashes see it).
    for cell in range(64):
        x, y = cell % 8, cell // 8
        colour = tuple(stream[3 * cell : 3 * cell + 3])
        box = (x * width // 8, y * height // 8, (x + 1) * width // 8, (y + 1) * height // 8)
        draw.rectangle(box, fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _error(status: int, message: str, *, code: str | None = None, param: str | None = None) -> Any:
    from vlpref.sim.server import ApiError

    return ApiError(status, message, param=param, code=code)


def _parse(body: bytes) -> dict[str, Any]:
    """The validated request; raises the sim's ApiError (a 400) for a bad one."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _error(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(data, dict):
        raise _error(400, "The body must be a JSON object.")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise _error(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model, prompt = data.get("model"), data.get("prompt")
    if not isinstance(model, str) or not model:
        raise _error(400, "you must provide a model parameter", param="model")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _error(400, "prompt must be a non-empty string", param="prompt")
    n = data.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
        raise _error(400, "n must be an integer from 1 to 10", param="n")
    size = data.get("size", "auto")
    size = "1024x1024" if size == "auto" else size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or not all(16 <= int(v) <= 2048 for v in match.groups()):
        raise _error(400, f"Invalid size {size!r}: WxH, 16 to 2048 each", param="size")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _error(400, "seed must be an integer", param="seed")
    gpt_image = model.startswith("gpt-image")
    fmt = data.get("response_format")
    if gpt_image and fmt is not None:
        raise _error(400, "Unknown parameter: 'response_format'.", param="response_format")
    if (fmt or ("b64_json" if gpt_image else "url")) != "b64_json":
        raise _error(
            400,
            "the sim serves no image URLs: ask response_format b64_json",
            param="response_format",
        )
    if REFUSE_MARK in prompt:
        raise _error(
            400,
            "Your request was rejected as a result of our safety system (simulated).",
            code="content_policy_violation",
        )
    width, height = (int(v) for v in match.groups())
    return {"model": model, "prompt": prompt, "n": n, "seed": seed, "w": width, "h": height}


async def images_generations(request: web.Request) -> web.Response:
    """POST /v1/images/generations."""
    from vlpref.sim.server import (
        STATE_KEY,
        ApiError,
        Arrival,
        _injected_rate_limit,
        _model_hint,
        _server_error,
        _unauthorized,
    )

    state = request.app[STATE_KEY]
    arrival = Arrival(t=time.monotonic())
    try:
        body = await request.read()
        arrival.model = _model_hint(body)
        refused = _unauthorized(request, state)
        if refused is not None:
            arrival.status = refused.status
            return refused
        try:
            asked = _parse(body)
        except ApiError as err:
            arrival.status = err.status
            return err.response(dict(GENEROUS_HEADERS))
        runtime = state.models.get(asked["model"])
        if runtime is not None and runtime.faults:
            body_sha = hashlib.sha256(body).digest()
            arrival_no = state.book.arrive(body_sha)
            fault = state.book.draw(body_sha, arrival_no, runtime.faults)
            arrival.fault = fault
            if fault == "rate_limit":
                response = _injected_rate_limit(runtime.faults["rate_limit"])
                arrival.status = response.status
                return response
            if fault == "server_error":
                response = _server_error()
                arrival.status = response.status
                return response
        else:
            fault = None
        # Rendering is CPU work: off the server's loop, so other requests keep being answered.
        images = await asyncio.to_thread(
            lambda: [
                image_for(asked["model"], asked["prompt"], asked["seed"], i, asked["w"], asked["h"])
                for i in range(asked["n"])
            ]
        )
        prompt_tokens = len(asked["prompt"].split())
        output_tokens = asked["n"] * max(1, asked["w"] * asked["h"] // 1024)
        payload = {
            "created": 0,
            "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images],
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": output_tokens,
                "total_tokens": prompt_tokens + output_tokens,
            },
        }
        data = json.dumps(payload).encode()
        if fault == "malformed":
            data = data[: len(data) // 2]
        else:
            arrival.usage = (prompt_tokens, output_tokens)
        arrival.status = 200
        return web.Response(body=data, headers=GENEROUS_HEADERS, content_type="application/json")
    except asyncio.CancelledError:
        arrival.status = 499
        raise
    finally:
        state.record(arrival)
