"""The vLLM tier: the responses stage against a real vLLM server and against vLLM's offline
engine in this process, on the same tiny model and the same workload.

The model is random: its text is gibberish. The tests assert structure, counts and accounting
(in = out + failed), finish reasons, usage, logprobs, the journal, and what the server saw.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pytest

from bench.vllm_tiny import (
    REPEATS,
    REQUESTS,
    SERVED_NAME,
    compare,
    offline_options,
    report,
    workload,
)
from tasks.responses import collect_responses
from tests_vllm.conftest import REPORT
from vlpref.chat import ChatRequest, Message, SamplingParams
from vlpref.config import RunConfig, parse_config
from vlpref.journal import Journal
from vlpref.providers.base import complete_all
from vlpref.providers.vllm_offline import VllmProvider
from vlpref.runner import run_all
from vlpref.service import ModelService
from vlpref.stage import StageOutput
from vlpref.vllm_serve import VllmServers

REPO = Path(__file__).resolve().parents[1]
LP = {"max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 1, "logprobs": True, "top_logprobs": 3}
GREEDY = {"max_tokens": 6, "temperature": 0.0}
FINISH = {"stop", "length"}


def run_config(endpoint: dict[str, Any], root: Path, *, broken: bool = False) -> RunConfig:
    models: list[dict[str, Any]] = [
        {"name": "tiny-lp", "endpoint": "tiny", "model": SERVED_NAME, "sampling": LP},
        {"name": "tiny-greedy", "endpoint": "tiny", "model": SERVED_NAME, "sampling": GREEDY},
    ]
    if broken:  # a model id the endpoint does not serve: every request fails, none is lost
        models.append({"name": "missing", "endpoint": "tiny", "model": "no-such-model"})
    return parse_config(
        {
            "name": "vllm-tier",
            "taxonomy": str(REPO / "taxonomy" / "demo.yaml"),
            "workspace": str(root / "ws"),
            "store": str(root / "store"),
            "endpoints": {"tiny": endpoint},
            "models": models,
            "generator": {"name": "gen", "endpoint": "tiny", "model": SERVED_NAME},
            "judges": [{"name": "judge", "endpoint": "tiny", "model": SERVED_NAME}],
        }
    )


def served_endpoint(served: VllmServers) -> dict[str, Any]:
    return dict(served.config.endpoints["tiny"])


def server_successes(served: VllmServers) -> float:
    """Sequences the vLLM server finished, from its Prometheus /metrics (a request with n=2
    counts twice)."""
    url = served.specs[0].root_url + "/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def check_stage(out: StageOutput, questions: pa.Table, journal: Journal) -> None:
    """The first run of the responses stage: 6 questions x (2 + 1) samples, all answered."""
    q = questions.num_rows
    assert (out.n_in, out.n_out, out.n_failed) == (q * 3, q * 3, 0), out.failures
    assert out.extra == {"requests_sent": q * 2, "requests_cached": 0, "requests_deduplicated": 0}
    rows = out.rows.to_pylist()
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    assert sorted((m, len(r)) for m, r in by_model.items()) == [
        ("tiny-greedy", q),
        ("tiny-lp", 2 * q),
    ]
    assert sorted({r["sample_idx"] for r in by_model["tiny-lp"]}) == [0, 1]
    assert {r["question_id"] for r in rows} == set(questions.column("question_id").to_pylist())
    for row in rows:
        limit = (8 * 2) if row["model"] == "tiny-lp" else 6
        assert row["finish_reason"] in FINISH
        assert row["prompt_tokens"] > 20  # the prompt template, the question and image tokens
        assert 1 <= row["completion_tokens"] <= limit
        assert isinstance(row["text"], str)
        assert row["cached"] is False and row["latency_s"] > 0
    # The journal holds every sample, with logprobs exactly where they were asked for.
    entries = [journal.get(k) for k in journal.keys()]  # noqa: SIM118 - a Journal is no dict
    assert len(entries) == 3 * q
    with_lp = [e for e in entries if e is not None and e.sample.logprobs is not None]
    assert len(with_lp) == 2 * q
    for entry in with_lp:
        logprobs = entry.sample.logprobs
        assert logprobs is not None
        assert 1 <= len(logprobs) <= 8
        if entry.sample.finish_reason == "length":
            assert len(logprobs) == 8
        for token in logprobs:
            assert isinstance(token.token, str)
            assert math.isfinite(token.logprob) and token.logprob <= 0
            assert len(token.top) == 3
            assert all(math.isfinite(lp) and lp <= 0 for _, lp in token.top)


def rerun_sends_nothing(
    config: RunConfig, workload: Any, journal_dir: Path, service: ModelService, first: StageOutput
) -> None:
    leaf, images, questions = workload
    journal = Journal(str(journal_dir))
    again = collect_responses(leaf.branch_id, questions, images, config, journal, service)
    assert again.extra == {
        "requests_sent": 0,
        "requests_cached": questions.num_rows * 2,
        "requests_deduplicated": 0,
    }
    assert journal.appended == 0
    assert again.rows.column("text").to_pylist() == first.rows.column("text").to_pylist()
    assert set(again.rows.column("cached").to_pylist()) == {True}


def failures_are_counted(
    config: RunConfig, workload: Any, journal_dir: Path, service: ModelService
) -> list[str]:
    """A third model the endpoint does not serve: 6 more samples in, 6 failed, and only those 6
    requests are sent (the others come from the journal)."""
    leaf, images, questions = workload
    q = questions.num_rows
    out = collect_responses(
        leaf.branch_id, questions, images, config, Journal(str(journal_dir)), service
    )
    assert (out.n_in, out.n_out, out.n_failed) == (4 * q, 3 * q, q)
    assert out.extra == {"requests_sent": q, "requests_cached": 2 * q, "requests_deduplicated": 0}
    return sorted({f.kind for f in out.failures})


@pytest.fixture(scope="module")
def service() -> Any:
    svc = ModelService()
    yield svc
    svc.close()


# -- (a) the server ---------------------------------------------------------------------------


def test_responses_stage_against_a_vllm_server(
    served: VllmServers, workload: Any, tmp_path: Path, service: ModelService
) -> None:
    leaf, images, questions = workload
    config = run_config(served_endpoint(served), tmp_path)
    journal = Journal(str(tmp_path / "journal"))
    before = server_successes(served)
    started = time.perf_counter()
    out = collect_responses(leaf.branch_id, questions, images, config, journal, service)
    REPORT.append(f"server: responses stage, 12 requests: {time.perf_counter() - started:.2f}s")
    check_stage(out, questions, journal)
    assert server_successes(served) - before == questions.num_rows * 3  # samples

    rerun_sends_nothing(config, workload, tmp_path / "journal", service, out)
    assert server_successes(served) - before == questions.num_rows * 3  # nothing new arrived

    broken = run_config(served_endpoint(served), tmp_path, broken=True)
    assert failures_are_counted(broken, workload, tmp_path / "journal", service) == ["bad_request"]
    served.check_alive()


async def test_server_text_only_and_bad_requests(served: VllmServers) -> None:
    from vlpref.providers.openai_compat import OpenAICompatProvider

    provider = OpenAICompatProvider.from_config(served_endpoint(served))
    try:
        text, too_long, image = await run_all(provider, edge_requests())
    finally:
        await provider.aclose()
    assert text.ok and len(text.samples) == 1 and text.samples[0].finish_reason in FINISH
    assert text.usage.prompt_tokens > 0 and 1 <= text.usage.completion_tokens <= 5
    assert too_long.failure is not None and too_long.failure.kind == "bad_request"
    assert too_long.failure.status == 400
    assert image.ok and len(image.samples) == 3


# -- (b) the offline engine -------------------------------------------------------------------


def test_responses_stage_on_the_offline_engine(
    tiny_model: Path, workload: Any, tmp_path: Path, service: ModelService
) -> None:
    leaf, images, questions = workload
    config = run_config(offline_options(tiny_model), tmp_path)
    journal = Journal(str(tmp_path / "journal"))
    started = time.perf_counter()
    out = collect_responses(leaf.branch_id, questions, images, config, journal, service)
    REPORT.append(
        f"offline: responses stage, 12 requests, engine start included: "
        f"{time.perf_counter() - started:.2f}s"
    )
    check_stage(out, questions, journal)
    provider = service.provider(config.endpoints["tiny"])
    assert isinstance(provider, VllmProvider) and provider.engine_starts == 1

    rerun_sends_nothing(config, workload, tmp_path / "journal", service, out)
    broken = run_config(offline_options(tiny_model), tmp_path, broken=True)
    assert failures_are_counted(broken, workload, tmp_path / "journal", service) == ["bad_request"]
    assert provider.engine_starts == 1  # one engine for the whole task


def edge_requests() -> list[ChatRequest]:
    image_request = workload(SERVED_NAME, 1, tag="edge")[0]
    return [
        ChatRequest(
            "text",
            SERVED_NAME,
            (Message.system("You are terse."), Message.user("Say hello.")),
            SamplingParams(max_tokens=5, temperature=0.0),
        ),
        ChatRequest(
            "too-long",
            SERVED_NAME,
            (Message.user("word " * 2000),),
            SamplingParams(max_tokens=5),
        ),
        ChatRequest(
            "image",
            SERVED_NAME,
            image_request.messages,
            SamplingParams(max_tokens=4, n=3, seed=3, temperature=0.9),
        ),
    ]


async def test_offline_text_only_and_a_failing_request(tiny_model: Path) -> None:
    """A request vLLM refuses becomes Failure('engine'); its batch-mates are still answered."""
    provider = VllmProvider.from_config(offline_options(tiny_model))
    try:
        text, too_long, image = await complete_all(provider, edge_requests())
    finally:
        await provider.aclose()
    assert text.ok and len(text.samples) == 1 and text.samples[0].finish_reason in FINISH
    assert text.samples[0].logprobs is None
    assert text.usage.prompt_tokens > 0 and 1 <= text.usage.completion_tokens <= 5
    assert too_long.failure is not None and too_long.failure.kind == "engine"
    assert "maximum context length" in too_long.failure.message
    assert image.ok and [s.index for s in image.samples] == [0, 1, 2]
    assert not provider.engine_loaded


# -- offline vs server throughput (same workload, same run) ------------------------------------


async def test_throughput_offline_vs_server(served: VllmServers, tiny_model: Path) -> None:
    from vlpref.providers.openai_compat import OpenAICompatProvider

    server = OpenAICompatProvider.from_config(served_endpoint(served))
    offline = VllmProvider.from_config(offline_options(tiny_model))
    try:
        measured = await compare({"server": server, "offline": offline}, SERVED_NAME)
    finally:
        await server.aclose()
        await offline.aclose()
    served.check_alive()
    for m in measured:
        assert m.ok == REQUESTS and m.samples == 2 * REQUESTS
    REPORT.append(
        f"offline vs server throughput ({REQUESTS} image requests, n=2, 16 tokens, top-3 "
        f"logprobs; median of {REPEATS} interleaved rounds):\n" + report(measured)
    )


# -- (c) engines one after another in one process ----------------------------------------------


def engine_processes(exclude: set[int]) -> list[psutil.Process]:
    """Live child processes of this test process that were not there before (engine cores)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in exclude and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_no_engine_processes(exclude: set[int], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while engine_processes(exclude) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_processes(exclude) == [], "an engine process outlived its provider"


async def test_two_engines_one_after_another(tiny_model: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    a = VllmProvider.from_config({**offline_options(tiny_model), "seed": 1})
    b = VllmProvider.from_config({**offline_options(tiny_model), "seed": 2})
    batch = workload(SERVED_NAME, 3, tag="release")
    try:
        # Explicitly: A runs and is closed, then B.
        assert all(r.ok for r in await complete_all(a, batch))
        assert a.engine_loaded and engine_processes(before)
        await a.aclose()
        assert not a.engine_loaded
        wait_no_engine_processes(before)
        assert all(r.ok for r in await complete_all(b, batch))
        await b.aclose()
        wait_no_engine_processes(before)

        # Automatically: both asked at once; the device thread finishes A's work, releases A's
        # engine (no keep_resident), then starts B's. Never two engines at a time.
        results = await asyncio.gather(complete_all(a, batch), complete_all(b, batch))
        assert all(r.ok for rs in results for r in rs)
        assert (a.engine_starts, b.engine_starts) == (2, 2)
        assert not (a.engine_loaded and b.engine_loaded)
    finally:
        await a.aclose()
        await b.aclose()
    wait_no_engine_processes(before)
