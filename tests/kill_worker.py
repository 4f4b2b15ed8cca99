"""Run one journaled batch against a server; the kill-and-rerun test SIGKILLs this process."""

from __future__ import annotations

import asyncio
import sys

from vlpref.chat import ChatRequest, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.runner import run_all


def requests(count: int) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=str(i),
            model="slow",
            messages=(Message.user(f"question {i}"),),
            params=SamplingParams(temperature=0.0, max_tokens=16),
        )
        for i in range(count)
    ]


async def main(base_url: str, journal_dir: str, count: int, concurrency: int) -> None:
    provider = create_provider("openai", {"base_url": base_url, "concurrency": concurrency})
    async with provider:
        results = await run_all(provider, requests(count), Journal(journal_dir))
    failed = sum(1 for r in results if not r.ok)
    print(f"done {len(results)} failed {failed}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
