"""The in-process client variants of the throughput benchmark (run them with `python -m bench`).

Each variant sends `count` chat completions (the same bodies) to the sim's `model` with at most
`concurrency` in flight, and returns how many answers came back. They run in this process, in
the main virtual environment; the peers (curator, distilabel) run in their own, through the
drivers in `bench/peers/`.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import httpx2
import openai

from vlpref.chat import ChatRequest, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.runner import run_requests

MAX_TOKENS = 32
Runner = Callable[[str, str, int, int], Coroutine[Any, Any, int]]


def body(i: int) -> list[dict[str, Any]]:
    """The messages of request `i` (the peer drivers send the same)."""
    return [{"role": "user", "content": f"question number {i}: what does the image show?"}]


async def bare_aiohttp(base_url: str, model: str, count: int, concurrency: int) -> int:
    """The floor: aiohttp, a semaphore, `json=` bodies and `response.json()`."""
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with (
                sem,
                session.post(
                    f"{base_url}/chat/completions",
                    json={"model": model, "messages": body(i), "max_tokens": MAX_TOKENS},
                    headers={"authorization": "Bearer sim"},
                ) as response,
            ):
                data = await response.json()
                return len(data["choices"])

        return sum(await asyncio.gather(*(one(i) for i in range(count))))


async def bare_openai(base_url: str, model: str, count: int, concurrency: int, aio: bool) -> int:
    """`openai.AsyncOpenAI` + a semaphore + `chat.completions.create`, as a user writes it; the
    connection pool gets the same limits as vlpref's."""
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http_client = (
        openai.DefaultAioHttpClient(limits=limits)
        if aio
        else openai.DefaultAsyncHttpxClient(limits=limits)
    )
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="sim", max_retries=0, http_client=http_client
    )
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with sem:
            completion = await client.chat.completions.create(
                model=model,
                messages=body(i),  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
            )
            return len(completion.choices)

    try:
        return sum(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        await client.close()


async def openai_httpx(base_url: str, model: str, count: int, concurrency: int) -> int:
    return await bare_openai(base_url, model, count, concurrency, aio=False)


async def openai_aiohttp(base_url: str, model: str, count: int, concurrency: int) -> int:
    return await bare_openai(base_url, model, count, concurrency, aio=True)


def requests(model: str, count: int) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=str(i),
            model=model,
            messages=(Message.user(body(i)[0]["content"]),),
            params=SamplingParams(max_tokens=MAX_TOKENS),
        )
        for i in range(count)
    ]


async def _vlpref(
    base_url: str, model: str, count: int, concurrency: int, transport: str, journal: bool
) -> int:
    provider = create_provider(
        "openai", {"base_url": base_url, "concurrency": concurrency, "transport": transport}
    )
    ok = 0
    with tempfile.TemporaryDirectory() as tmp:
        log = Journal(tmp) if journal else None
        async with provider:
            async for result in run_requests(provider, requests(model, count), log):
                ok += len(result.samples)
        if log is not None:
            log.close()
    return ok


async def vlpref_aiohttp(base_url: str, model: str, count: int, concurrency: int) -> int:
    """vlpref's model client: the `openai` provider through `run_requests`, no journal."""
    return await _vlpref(base_url, model, count, concurrency, "aiohttp", journal=False)


async def vlpref_aiohttp_journal(base_url: str, model: str, count: int, concurrency: int) -> int:
    """The same with the request journal in front (keys, lookups, a flushed line per answer)."""
    return await _vlpref(base_url, model, count, concurrency, "aiohttp", journal=True)


async def vlpref_httpx(base_url: str, model: str, count: int, concurrency: int) -> int:
    return await _vlpref(base_url, model, count, concurrency, "httpx", journal=False)


# name -> (runner, what it is); the first is the baseline every ratio is taken against.
VARIANTS: dict[str, tuple[Runner, str]] = {
    "bare aiohttp loop": (bare_aiohttp, "aiohttp + semaphore, no SDK: the floor"),
    "bare openai.AsyncOpenAI (httpx2)": (
        openai_httpx,
        "`chat.completions.create` + semaphore, the SDK's default httpx2 pool",
    ),
    "bare openai.AsyncOpenAI (aiohttp)": (
        openai_aiohttp,
        "the same on the SDK's aiohttp transport (`DefaultAioHttpClient`)",
    ),
    "vlpref provider": (vlpref_aiohttp, "`openai` provider via `run_requests`, no journal"),
    "vlpref provider + journal": (vlpref_aiohttp_journal, "the same with the request journal"),
}
BASELINE = "bare aiohttp loop"
VLPREF = "vlpref provider"
