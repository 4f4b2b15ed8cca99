"""distilabel 1.5.3 against the simulated server; runs in bench/.venvs/distilabel.

Measured at distilabel's LLM level, without a Pipeline (a pipeline adds worker processes, queues
and its batch cache on top, and would only make distilabel slower): `OpenAILLM` (the SDK's
`AsyncOpenAI` on its default transport) with `generate_outputs` over batches of `--concurrency`
inputs. An `AsyncLLM` sends one batch with `asyncio.gather`, so the batch size is distilabel's
concurrency (a step's `input_batch_size`); it has no other concurrency or rate setting.
`max_retries=0`, `timeout=120`. Nothing is cached at this level.

Traps handled: distilabel 1.5.3 needs `requests` to import (installed in its venv), and logs
every HTTP request at INFO: logging is raised to WARNING so the log does not cost the run.
"""

from __future__ import annotations

import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import messages, offline_environment, parse_args, report


def main() -> None:
    args = parse_args(__doc__ or "")
    offline_environment()
    logging.disable(logging.INFO)
    from distilabel.models.llms import OpenAILLM

    llm = OpenAILLM(
        model=args.model, base_url=args.base_url, api_key="sim", max_retries=0, timeout=120
    )
    llm.load()
    inputs = [messages(i) for i in range(args.requests)]
    answered = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(inputs), args.concurrency):
        batch = inputs[start : start + args.concurrency]
        outputs = llm.generate_outputs(
            inputs=batch, num_generations=1, max_new_tokens=args.max_tokens
        )
        answered += sum(1 for out in outputs for text in out["generations"] if text)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    report(elapsed, answered, cpu_s=cpu, peer="distilabel", version=version("distilabel"))


if __name__ == "__main__":
    main()
