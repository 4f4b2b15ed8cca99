"""Run one journaled batch against a server; the kill-and-rerun tests SIGKILL this process.

    kill_worker.py BASE_URL JOURNAL COUNT CONCURRENCY [N DUMP]

With `N` > 1 every request asks for N samples at temperature 1; with `DUMP`, the results (texts
and each sample's usage share) are written there as JSON once the batch is done.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from vlpref.chat import ChatRequest, ChatResult, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.runner import run_all


def requests(count: int, n: int = 1) -> list[ChatRequest]:
    return [
        ChatRequest(
            id=str(i),
            model="slow",
            messages=(Message.user(f"question {i}"),),
            params=SamplingParams(temperature=0.0 if n == 1 else 1.0, max_tokens=16, n=n),
        )
        for i in range(count)
    ]


async def main(
    base_url: str, journal_dir: str, count: int, concurrency: int, n: int
) -> list[ChatResult]:
    provider = create_provider("openai", {"base_url": base_url, "concurrency": concurrency})
    async with provider:
        return await run_all(provider, requests(count, n), Journal(journal_dir))


def dump(results: list[ChatResult], path: str) -> None:
    """Each result's id, `cached`, and samples as [index, text, call id, prompt, completion,
    exact]."""
    rows = []
    for r in results:
        samples = []
        for s in r.samples:
            u = s.usage
            share = [u.call_id, u.prompt_tokens, u.completion_tokens, u.exact] if u else []
            samples.append([s.index, s.text, *share])
        rows.append({"id": r.request.id, "cached": r.cached, "samples": samples})
    Path(path).write_text(json.dumps(rows), encoding="utf-8")


if __name__ == "__main__":
    args = sys.argv[1:]
    n = int(args[4]) if len(args) > 4 else 1
    results = asyncio.run(main(args[0], args[1], int(args[2]), int(args[3]), n))
    if len(args) > 5:
        dump(results, args[5])
    failed = sum(1 for r in results if not r.ok)
    print(f"done {len(results)} failed {failed}", flush=True)
