"""Run one journaled batch in `mode: batch` against a server; test_batch_kill SIGKILLs it.

batch_kill_worker.py BASE_URL JOURNAL COUNT
"""

from __future__ import annotations

import asyncio
import sys

from tests.kill_worker import requests  # the plain kill test's requests
from vlpref.chat import ChatResult
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.runner import run_all


async def main(base_url: str, journal_dir: str, count: int) -> list[ChatResult]:
    options = {"base_url": base_url, "mode": "batch", "batch_poll_s": 0.1, "batch_poll_max_s": 0.2}
    provider = create_provider("openai", options)
    async with provider:
        return await run_all(provider, requests(count), Journal(journal_dir))


if __name__ == "__main__":
    args = sys.argv[1:]
    results = asyncio.run(main(args[0], args[1], int(args[2])))
    failed = sum(1 for r in results if not r.ok)
    print(f"done {len(results)} failed {failed}", flush=True)
