"""Curator (bespokelabs-curator) against the simulated server; runs in bench/.venvs/curator.

Settings, chosen to give curator its best case:
- `backend="openai"` with the sim's base URL (curator's own aiohttp client, not litellm);
- `max_concurrent_requests = --concurrency` (its semaphore), and request/token-per-minute limits
  far above what the run needs, so only the concurrency limit paces it (curator otherwise takes
  the limits from the `x-ratelimit-*` headers of its probe request);
- `max_retries=0`, `request_timeout=120`, `require_all_responses=True`;
- `CURATOR_DISABLE_CACHE=1` (a fresh run fingerprint, so every row is really sent) and a fresh
  working directory per run; telemetry off; the rich progress display off (it costs CPU).

Traps handled: curator counts tokens with tiktoken's `cl100k_base` and would download it: here
`TIKTOKEN_CACHE_DIR` points at the copy litellm ships. It sends one probe request (an empty
`messages`, answered 400 by the sim) before the run, to read rate-limit headers; the timed call
includes it, as it is part of every curator run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import messages, offline_environment, parse_args, report


def _tiktoken_cache_dir() -> str:
    """litellm's bundled tokenizer files; cl100k_base is stored there under tiktoken's cache name
    (the sha1 of its download URL), so tiktoken finds it without a download."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    if not (folder / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4").exists():
        raise SystemExit(f"cl100k_base not found under {folder}")
    return str(folder)


def main() -> None:
    args = parse_args(__doc__ or "")
    offline_environment()
    os.environ["TIKTOKEN_CACHE_DIR"] = _tiktoken_cache_dir()
    os.environ["CURATOR_DISABLE_CACHE"] = "1"
    os.environ["CURATOR_DISABLE_RICH_DISPLAY"] = "1"
    os.environ["CURATOR_VIEWER"] = "0"
    import logging

    logging.disable(logging.INFO)  # curator logs per run and per failure; keep stderr quiet
    from bespokelabs import curator

    class Ask(curator.LLM):
        def prompt(self, input: dict[str, int]) -> list[dict[str, str]]:
            return messages(input["i"])

        def parse(self, input: dict[str, int], response: str) -> dict[str, object]:
            return {"i": input["i"], "text": response}

    llm = Ask(
        model_name=args.model,
        backend="openai",
        generation_params={"max_tokens": args.max_tokens},
        backend_params={
            "base_url": args.base_url,
            "api_key": "sim",
            "max_concurrent_requests": args.concurrency,
            "max_requests_per_minute": 100_000_000,
            "max_tokens_per_minute": 100_000_000_000,
            "max_retries": 0,
            "request_timeout": 120,
            "require_all_responses": True,
        },
    )
    rows = [{"i": i} for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="curator-bench-") as work:
        os.environ["CURATOR_CACHE_DIR"] = work
        c0, t0 = time.process_time(), time.perf_counter()
        result = llm(rows, working_dir=work)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        dataset = getattr(result, "dataset", result)
        answered = sum(1 for row in dataset if row.get("text"))
    report(elapsed, answered, cpu_s=cpu, peer="curator", version=version("bespokelabs-curator"))


if __name__ == "__main__":
    main()
