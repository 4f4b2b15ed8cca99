"""What the peer drivers share. Runs inside a peer's own virtual environment: standard library only.

A driver sends `--requests` chat completions (the same bodies as `bench.client_throughput`) to the
simulated server at `--concurrency`, and prints one JSON line: elapsed seconds and answers counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base-url", required=True, help="the sim's OpenAI base URL (.../v1)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    return parser.parse_args()


def messages(i: int) -> list[dict[str, str]]:
    """The same request body as the in-process variants (bench.client_throughput.body)."""
    return [{"role": "user", "content": f"question number {i}: what does the image show?"}]


def offline_environment() -> None:
    """Keep a peer off the internet: no telemetry, no hub, and a dead proxy for everything that
    is not loopback, so a stray download fails at once instead of leaving the machine."""
    os.environ.update(
        {
            "DO_NOT_TRACK": "1",
            "TELEMETRY_ENABLED": "false",  # curator's posthog client
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm: no cost-map download
            "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "ALL_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
            "TQDM_DISABLE": "1",  # progress bars cost CPU in the measured process
        }
    )
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        os.environ[name] = os.environ[name.upper()]


def report(elapsed_s: float, answered: int, **extra: Any) -> None:
    print(json.dumps({"elapsed_s": elapsed_s, "answered": answered, **extra}), flush=True)
    sys.stdout.flush()
