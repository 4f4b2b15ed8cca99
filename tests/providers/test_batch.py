"""`mode: batch` against the simulated server's batch API over loopback: the same answers and
journal lines as online, partial failures and expired batches sent again for what is missing
only, and the pure bookkeeping of `vlpref.batching`."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from vlpref.batching import (
    BatchRecord,
    batch_line,
    custom_id,
    is_open_record,
    parse_result_line,
    poll_delays,
    record_file,
    starts_new_file,
)
from vlpref.chat import ChatRequest, ChatResult, Message, SamplingParams
from vlpref.journal import Journal
from vlpref.providers import create_provider
from vlpref.providers.openai_batch import BatchResultsFile, OpenAIBatchProvider, write_batch_file
from vlpref.providers.openai_compat import OpenAICompatOptions, OpenAICompatProvider
from vlpref.runner import BatchStats, run_all
from vlpref.sim.testing import SimServer, SimServerFactory

FAST: dict[str, Any] = {"batch_poll_s": 0.05, "batch_poll_max_s": 0.2}
JUDGE = {"sim-judge": {"persona": "judge"}, "sim-refuser": {"persona": "refuser"}}


def requests(count: int, model: str = "sim-judge", prefix: str = "q") -> list[ChatRequest]:
    """Judge-style requests (logprobs, n of 1 and 2) so that every parsed field is compared."""
    return [
        ChatRequest(
            id=f"{prefix}{i}",
            model=model,
            messages=(Message.user(f"TASK: safety\nQuestion: {prefix} number {i}?"),),
            params=SamplingParams(
                temperature=0.0, max_tokens=24, logprobs=True, top_logprobs=3, n=1 + i % 2
            ),
        )
        for i in range(count)
    ]


def run(
    sim: SimServer,
    batch: list[ChatRequest],
    journal: Path | None,
    stats: BatchStats | None = None,
    **options: Any,
) -> list[ChatResult]:
    provider = create_provider("openai", {"base_url": sim.base_url, **options})

    async def go() -> list[ChatResult]:
        async with provider:
            return await run_all(
                provider, batch, Journal(str(journal)) if journal is not None else None, stats
            )

    return asyncio.run(go())


def journal_lines(root: Path) -> dict[str, dict[str, Any]]:
    """Journal lines by key, without what differs between two calls that got one answer (when
    it was written and how long it took)."""
    out = {}
    for segment in sorted(root.glob("*.jsonl")):
        for line in segment.read_text().splitlines():
            record = json.loads(line)
            record.pop("t"), record.pop("l")
            out[record["k"]] = record
    return out


def test_batch_mode_is_the_openai_kind_with_its_identity() -> None:
    provider = create_provider("openai", {"mode": "batch", "cache_namespace": "x"})
    assert isinstance(provider, OpenAIBatchProvider)
    online = create_provider("openai", {"cache_namespace": "x"})
    assert type(online) is OpenAICompatProvider
    assert provider.identity == online.identity  # one journal for both transports


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "offline"},
        {"batch_poll_s": 0},
        {"batch_poll_s": 30, "batch_poll_max_s": 10},
        {"batch_max_requests": 50_001},
        {"batch_max_bytes": 10},
        {"batch_completion_window": "2h"},
        {"batch_completion_window": "8d"},
        {"batch_max_submissions": 0},
    ],
)
def test_batch_options_are_bounded(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OpenAICompatOptions.model_validate(options)


def test_batch_answers_equal_online_answers_line_for_line(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    """Same results (texts, logprobs, finish reasons, usage shares) and the same journal lines;
    nothing went to the chat endpoint in batch mode."""
    sim = sim_server({"models": JUDGE, "batch": {"completion_delay_s": 0.1}})
    batch = requests(30)
    online = run(sim, batch, tmp_path / "online")
    sent_online = sim.counters()["total"]
    stats = BatchStats()
    batched = run(sim, batch, tmp_path / "batch", stats, mode="batch", **FAST)
    counters = sim.counters()
    assert counters["total"] == sent_online == 30  # batch mode sent no chat request
    assert counters["batch"]["batches"] == 1 and counters["batch"]["lines"] == 30
    assert stats.sent == 30 and stats.failed == 0
    assert all(r.ok for r in batched)
    assert [(r.samples, r.usage) for r in batched] == [(r.samples, r.usage) for r in online]
    assert any(s.logprobs for r in batched for s in r.samples)
    assert journal_lines(tmp_path / "batch") == journal_lines(tmp_path / "online")
    # A rerun in either mode is answered by the journal the other one wrote.
    again = run(sim, batch, tmp_path / "batch")
    assert all(r.cached for r in again) and sim.counters()["total"] == 30


def test_partial_failures_are_sent_again_for_the_missing_requests_only(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    sim = sim_server({"models": JUDGE, "batch": {"fail_rate": 0.3, "fail_status": 503}})
    results = run(sim, requests(40), tmp_path / "j", mode="batch", **FAST)
    counters = sim.counters()["batch"]
    failed_first = counters["lines_by_status"]["503"]
    assert 0 < failed_first < 40
    assert all(r.ok for r in results)
    assert counters["batches"] == 2  # the batch, then one for what it did not answer
    assert counters["lines"] == 40 + failed_first  # nothing answered was sent again
    assert counters["lines_by_status"]["200"] == 40
    resent = [r for r in results if r.attempts == 2]
    assert len(resent) == failed_first
    assert len(Journal(str(tmp_path / "j"))) == sum(r.request.params.n for r in results)


def test_failed_lines_in_the_output_file_are_read_as_failures_too(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    """`vllm run-batch` and some hosted APIs write failed lines into the output file."""
    config = {"fail_rate": 0.3, "failed_lines_in": "output_file"}
    sim = sim_server({"models": JUDGE, "batch": config})
    results = run(sim, requests(20), tmp_path / "j", mode="batch", **FAST)
    counters = sim.counters()["batch"]
    assert all(r.ok for r in results)
    assert counters["lines"] == 20 + counters["lines_by_status"]["500"]


def test_an_expired_batch_is_submitted_again_for_what_it_did_not_answer(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    sim = sim_server({"models": JUDGE, "batch": {"expire_batches": 1, "expire_done_rate": 0.5}})
    results = run(sim, requests(40), tmp_path / "j", mode="batch", **FAST)
    counters = sim.counters()["batch"]
    expired = counters["lines_by_status"]["expired"]
    assert 0 < expired < 40
    assert all(r.ok for r in results)
    assert counters["ended"] == {"expired": 1, "completed": 1}
    assert counters["lines"] == 40 + expired and counters["lines_by_status"]["200"] == 40
    # Both records are closed once read: nothing is left for a rerun to resume.
    names = sorted(p.name for p in (tmp_path / "j" / "batches").iterdir())
    assert len(names) == 2 and not any(is_open_record(n) for n in names)


def test_retries_end_at_batch_max_submissions_and_nothing_is_journaled(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    sim = sim_server({"models": JUDGE, "batch": {"fail_rate": 1.0, "fail_max_per_request": 99}})
    results = run(sim, requests(6), tmp_path / "j", mode="batch", batch_max_submissions=2, **FAST)
    assert {r.failure.kind for r in results if r.failure} == {"server_error"}
    assert all(r.attempts == 2 for r in results)
    assert sim.counters()["batch"]["lines"] == 12
    assert len(Journal(str(tmp_path / "j"))) == 0


def test_requests_the_endpoint_refuses_fail_without_being_sent_again(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    sim = sim_server({"models": JUDGE})
    batch = requests(3) + requests(2, model="no-such-model", prefix="x")
    results = run(sim, batch, tmp_path / "j", mode="batch", **FAST)
    by_id = {r.request.id: r for r in results}
    assert all(by_id[f"q{i}"].ok for i in range(3))
    assert {by_id[f"x{i}"].failure.kind for i in range(2)} == {"bad_request"}  # type: ignore[union-attr]
    counters = sim.counters()["batch"]
    assert counters["batches"] == 2  # one file per model, as OpenAI requires
    assert counters["lines"] == 5  # the 404s were not sent again


def test_files_are_split_by_batch_max_requests(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    sim = sim_server({"models": JUDGE})
    results = run(sim, requests(10), tmp_path / "j", mode="batch", batch_max_requests=4, **FAST)
    assert all(r.ok for r in results)
    assert sim.counters()["batch"]["batches"] == 3  # 4 + 4 + 2


def test_a_cancelled_batch_is_submitted_again(sim_server: SimServerFactory, tmp_path: Path) -> None:
    sim = sim_server({"models": JUDGE, "batch": {"completion_delay_s": 30}})

    def cancel_first_batch() -> None:
        while True:
            with urllib.request.urlopen(sim.base_url + "/batches", timeout=5) as resp:
                batches = json.loads(resp.read())["data"]
            if batches:
                cancel = urllib.request.Request(
                    f"{sim.base_url}/batches/{batches[-1]['id']}/cancel", method="POST", data=b""
                )
                urllib.request.urlopen(cancel, timeout=5).close()
                return

    async def go() -> list[ChatResult]:
        provider = create_provider("openai", {"base_url": sim.base_url, "mode": "batch", **FAST})
        async with provider:
            task = asyncio.create_task(run_all(provider, requests(5), Journal(str(tmp_path))))
            await asyncio.to_thread(cancel_first_batch)
            # The resubmitted batch would take 30 s: it is enough to see it submitted.
            while sim.counters()["batch"]["batches"] < 2:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)
            task.cancel()
            return []

    asyncio.run(go())
    counters = sim.counters()["batch"]
    assert counters["cancels"] == 1 and counters["ended"] == {"cancelled": 1}
    open_records = [p for p in (tmp_path / "batches").iterdir() if is_open_record(p.name)]
    assert len(open_records) == 1  # the resubmission, for the next run to resume
    record = BatchRecord.from_json(open_records[0].read_bytes())
    assert record.submission == 2 and len(record.custom_ids) == 5


def test_a_wrong_key_fails_at_the_upload_and_records_nothing(
    sim_server: SimServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-batch-test-wrong-key-1234567890abcdef"
    monkeypatch.setenv("VLPREF_BATCH_KEY", secret)
    sim = sim_server({"models": JUDGE, "require_api_key": "sk-the-right-one"})
    results = run(
        sim, requests(4), tmp_path / "j", mode="batch", api_key_env="VLPREF_BATCH_KEY", **FAST
    )
    assert {r.failure.kind for r in results if r.failure} == {"auth"}
    assert all(secret not in (r.failure.message if r.failure else "") for r in results)
    assert sim.counters()["batch"]["batches"] == 0
    assert not (tmp_path / "j" / "batches").exists()


def test_records_and_kept_files_hold_no_secret(
    sim_server: SimServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-batch-test-right-key-abcdef1234567890"
    monkeypatch.setenv("VLPREF_BATCH_KEY", secret)
    sim = sim_server({"models": JUDGE, "require_api_key": secret})
    options: dict[str, Any] = {
        "mode": "batch",
        "api_key_env": "VLPREF_BATCH_KEY",
        "batch_keep_files": True,
    }
    results = run(sim, requests(4), tmp_path / "j", **options, **FAST)
    assert all(r.ok for r in results)
    files = list((tmp_path / "j").rglob("*"))
    kept = [p for p in files if p.name.endswith(".input.jsonl")]
    assert len(kept) == 1 and len(kept[0].read_text().splitlines()) == 4
    for path in files:
        if path.is_file():
            assert secret not in path.read_text(), path


# -- pure bookkeeping ------------------------------------------------------------------------


def test_batch_line_carries_the_online_body_verbatim() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi \\u00e9"}],"n":2}'
    line = batch_line("abc-n2", body)
    assert line.endswith(b"}\n") and body in line
    parsed = json.loads(line)
    assert parsed == {
        "custom_id": "abc-n2",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": json.loads(body),
    }


def test_custom_id_names_the_request_and_its_sample_count() -> None:
    assert custom_id("f" * 64, 2) == custom_id("f" * 64, 2) != custom_id("f" * 64, 3)
    assert custom_id("a" * 64, 1) != custom_id("b" * 64, 1)


def test_files_start_at_either_limit_and_an_oversized_line_goes_alone() -> None:
    assert not starts_new_file(0, 0, 10**9, 5, 100)  # the first line of a file always goes in
    assert starts_new_file(5, 50, 1, 5, 100)
    assert starts_new_file(2, 90, 11, 5, 100)
    assert not starts_new_file(2, 90, 10, 5, 100)


def test_poll_waits_grow_to_their_maximum() -> None:
    waits = poll_delays(1.0, 5.0)
    assert [next(waits) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_result_lines_of_openai_and_of_vllm_run_batch() -> None:
    ok = parse_result_line(
        '{"id":"r","custom_id":"a","response":{"status_code":200,"request_id":"x",'
        '"body":{"choices":[]}},"error":null}'
    )
    assert ok.answered and ok.custom_id == "a"
    failed = parse_result_line(
        '{"id":"r","custom_id":"b","response":{"status_code":429,"body":'
        '{"error":{"message":"slow down","code":"rate_limit_exceeded"}}},"error":null}'
    )
    assert (failed.status, failed.message, failed.answered) == (429, "slow down", False)
    expired = parse_result_line(
        '{"id":"r","custom_id":"c","response":null,'
        '"error":{"code":"batch_expired","message":"too late"}}'
    )
    assert expired.never_ran and expired.code == "batch_expired"
    vllm = parse_result_line(
        '{"id":"v","custom_id":"d","response":{"status_code":400,"request_id":"v","body":null},'
        '"error":{"error":{"message":"bad image","type":"BadRequestError","code":400}}}'
    )
    assert (vllm.status, vllm.message, vllm.never_ran) == (400, "bad image", False)
    text = parse_result_line(
        '{"id":"v","custom_id":"e","response":{"status_code":400,"request_id":"v"},'
        '"error":"Request must not be sent in stream mode"}'
    )
    assert text.status == 400 and "stream" in text.message
    with pytest.raises(ValueError):
        parse_result_line('{"id": "no custom id"}')


def test_batch_records_round_trip_and_name_their_state() -> None:
    record = BatchRecord("batch_1", "e" * 16, "m", ("a-n1", "b-n2"), 1.5, 2, "file_1")
    assert BatchRecord.from_json(record.to_json()) == record
    assert is_open_record(record_file("batch_1"))
    assert not is_open_record(record_file("batch_1", done=True))
    assert not is_open_record("batch_1.input.jsonl")
    with pytest.raises(ValueError):
        BatchRecord.from_json(b'{"v": 2}')


def test_a_batch_file_run_elsewhere_is_journaled_for_the_endpoint(
    sim_server: SimServerFactory, tmp_path: Path
) -> None:
    """`write_batch_file` writes what `mode: batch` would submit; a result file of it (here the
    sim's batch API, by hand, standing in for `vllm run-batch`) journals through
    `BatchResultsFile` under the endpoint's keys: an online run then finds every answer."""
    sim = sim_server({"models": JUDGE})
    endpoint = {"base_url": sim.base_url}
    batch = requests(6) + requests(1)  # a repeated request is one line
    source = tmp_path / "in.jsonl"
    assert write_batch_file(endpoint, batch, source) == 6
    client = openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
    uploaded = client.files.create(file=source, purpose="batch")
    job = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while job.status != "completed":
        job = client.batches.retrieve(job.id)
    assert job.output_file_id is not None
    results = tmp_path / "out.jsonl"
    results.write_bytes(client.files.content(job.output_file_id).content)

    async def journal_results() -> list[ChatResult]:
        journal = Journal(str(tmp_path / "journal"))
        return await run_all(BatchResultsFile(endpoint, results), batch, journal)

    imported = asyncio.run(journal_results())
    assert all(r.ok for r in imported) and sim.counters()["total"] == 0
    online = run(sim, batch, tmp_path / "journal")
    assert all(r.cached for r in online) and sim.counters()["total"] == 0
    fresh = run(sim, batch, None)
    assert [(r.samples, r.usage) for r in imported] == [(r.samples, r.usage) for r in fresh]
    missing = asyncio.run(
        run_all(BatchResultsFile(endpoint, results), requests(1, prefix="other"), None)
    )
    assert missing[0].failure is not None and missing[0].failure.kind == "other"
