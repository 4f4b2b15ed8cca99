"""Client throughput against the simulated server: vlpref's provider vs bare loops, same run.

    python -m bench.client_throughput [--requests 2000] [--concurrency 64] [--repeats 3]

Every variant sends the same requests to the same sim server process (a separate process, so the
client has a core of its own) at zero latency and at 50 ms; each figure is the median of
`--repeats` runs, and every ratio is taken against the bare loops measured in this same run.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from typing import Any

import aiohttp
import openai

from vlpref.chat import ChatRequest, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.runner import run_requests
from vlpref.sim.testing import SimServer

SIM = {
    "models": {
        "fast": {"persona": "echo", "latency": {"kind": "constant", "ms": 0}},
        "slow": {"persona": "echo", "latency": {"kind": "constant", "ms": 50}},
    }
}
Runner = Callable[[str, str, int, int], Coroutine[Any, Any, int]]


def body(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"question number {i}: what does the image show?"}]


async def bare_aiohttp(base_url: str, model: str, count: int, concurrency: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with (
                sem,
                session.post(
                    f"{base_url}/chat/completions",
                    json={"model": model, "messages": body(i), "max_tokens": 32},
                ) as response,
            ):
                data = await response.json()
                return len(data["choices"])

        return sum(await asyncio.gather(*(one(i) for i in range(count))))


async def bare_openai(base_url: str, model: str, count: int, concurrency: int, aio: bool) -> int:
    http_client = openai.DefaultAioHttpClient() if aio else openai.DefaultAsyncHttpxClient()
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="sim", max_retries=0, http_client=http_client
    )
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with sem:
            completion = await client.chat.completions.create(
                model=model,
                messages=body(i),  # type: ignore[arg-type]
                max_tokens=32,
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
            params=SamplingParams(max_tokens=32),
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
    return await _vlpref(base_url, model, count, concurrency, "aiohttp", journal=False)


async def vlpref_aiohttp_journal(base_url: str, model: str, count: int, concurrency: int) -> int:
    return await _vlpref(base_url, model, count, concurrency, "aiohttp", journal=True)


async def vlpref_httpx(base_url: str, model: str, count: int, concurrency: int) -> int:
    return await _vlpref(base_url, model, count, concurrency, "httpx", journal=False)


VARIANTS: dict[str, Runner] = {
    "bare aiohttp loop": bare_aiohttp,
    "bare openai.AsyncOpenAI (default httpx2) + semaphore": openai_httpx,
    "bare openai.AsyncOpenAI (aiohttp) + semaphore": openai_aiohttp,
    "vlpref provider (aiohttp)": vlpref_aiohttp,
    "vlpref provider (aiohttp) + journal": vlpref_aiohttp_journal,
    "vlpref provider (httpx2)": vlpref_httpx,
}


def measure(runner: Runner, base_url: str, model: str, count: int, concurrency: int) -> float:
    t0 = time.perf_counter()
    done = asyncio.run(runner(base_url, model, count, concurrency))
    elapsed = time.perf_counter() - t0
    if done != count:
        raise RuntimeError(f"{runner.__name__}: {done} of {count} answered")
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# client throughput: {args.requests} requests, concurrency {args.concurrency}, "
        f"median of {args.repeats}"
    )
    print(
        f"machine: {platform.platform()}, python {platform.python_version()}, "
        f"openai {version('openai')}, aiohttp {version('aiohttp')}"
    )
    with SimServer(SIM) as sim:
        for model, label in (("fast", "0 ms"), ("slow", "50 ms")):
            rates: dict[str, float] = {}
            for name, runner in VARIANTS.items():
                runs = []
                for _ in range(args.repeats):  # interleaving would be fairer; medians suffice here
                    runs.append(
                        measure(runner, sim.base_url, model, args.requests, args.concurrency)
                    )
                rates[name] = statistics.median(runs)
            base = rates["bare openai.AsyncOpenAI (default httpx2) + semaphore"]
            aio = rates["bare aiohttp loop"]
            print(f"\n## latency {label}\n")
            print("| client | req/s | vs bare openai | vs bare aiohttp |")
            print("|---|---:|---:|---:|")
            for name, rate in rates.items():
                print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {rate / aio:.2f}x |")


if __name__ == "__main__":
    main()
