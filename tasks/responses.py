"""Responses stage: every configured response model answers every question, `n` samples each.

The request is the question rendered through `prompts/response.txt` with the image attached. A
refusal or a content-filter stop is a response like any other. A request that fails after the
provider's retries makes each of its samples a failure with the reason.

Accounting unit: response samples (questions x models x n). in = out + failed.

Each row's `prompt_tokens` and `completion_tokens` are its sample's share of the call that
produced it (`vlpref.chat.SampleUsage`), the same whether the sample was just answered or came
from the journal: summing a column counts every call once. A request that repeats another one of
the batch (same key) shares its answer and carries no tokens; `call_id` names the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa

from tasks.common import image_part, provider_for
from vlpref.chat import ChatRequest, Message
from vlpref.config import ModelEntry, RunConfig
from vlpref.journal import Journal
from vlpref.prompts import load_prompt
from vlpref.records import RESPONSES, stable_id, table
from vlpref.runner import BatchStats
from vlpref.service import ModelService
from vlpref.stage import FailureRow, StageOutput


def response_id(question_id: str, model_name: str, sample_idx: int) -> str:
    return stable_id(question_id, model_name, sample_idx)


def collect_responses(
    branch_id: str,
    questions: pa.Table,
    images: pa.Table,
    config: RunConfig,
    journal: Journal | None,
    service: ModelService | None = None,
) -> StageOutput:
    service = service or ModelService.shared()
    prompt = load_prompt("response", config.prompts_dir)
    image_rows = {r["image_id"]: r for r in images.to_pylist()}
    question_rows = questions.to_pylist()
    # Requests are made lazily, a chunk at a time, as the model service pulls them; `live` holds
    # only those in flight.
    live: dict[str, tuple[Mapping[str, Any], ModelEntry]] = {}

    def requests_for(entry: ModelEntry) -> Iterator[ChatRequest]:
        params = entry.sampling.to_params()
        for q in question_rows:
            request_id = f"{entry.name}\x1f{q['question_id']}"
            live[request_id] = (q, entry)
            text = prompt.render(question=q["text"])
            yield ChatRequest(
                id=request_id,
                model=entry.model,
                messages=(Message.user(image_part(image_rows[q["image_id"]]), text),),
                params=params,
                prompt_version=prompt.version,
            )

    batches = [
        (provider_for(config, entry, service), requests_for(entry)) for entry in config.models
    ]

    rows: list[dict[str, Any]] = []
    failures: list[FailureRow] = []
    stats = BatchStats()
    n_in = len(question_rows) * config.samples_per_question
    for result in service.run(batches, journal, stats):
        question, entry = live.pop(result.request.id)
        n = result.request.params.n
        got = {s.index: s for s in result.samples}
        for idx in range(n):
            rid = response_id(question["question_id"], entry.name, idx)
            sample = got.get(idx)
            if sample is None:
                failure = result.failure
                reason = f"{failure.kind}: {failure.message}" if failure else "no sample returned"
                failures.append(
                    FailureRow(
                        rid,
                        failure.kind if failure else "missing",
                        reason,
                        failure.attempts if failure else 1,
                    )
                )
                continue
            usage = sample.usage  # its share of its call (the runner sets it)
            rows.append(
                {
                    "response_id": rid,
                    "question_id": question["question_id"],
                    "model": entry.name,
                    "sample_idx": idx,
                    "text": sample.text,
                    "finish_reason": sample.finish_reason,
                    "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "completion_tokens": usage.completion_tokens if usage else 0,
                    "usage_exact": usage.exact if usage else False,
                    "call_id": usage.call_id if usage else None,
                    "latency_s": result.latency_s,
                    "cached": result.cached,
                    "branch_id": branch_id,
                }
            )
    rows.sort(key=lambda r: (r["question_id"], r["model"], r["sample_idx"]))
    return StageOutput(
        stage="responses",
        branch_id=branch_id,
        unit="response samples",
        n_in=n_in,
        rows=table(rows, RESPONSES),
        failures=tuple(failures),
        extra={
            "requests_sent": stats.sent,
            "requests_cached": stats.cached,
            "requests_deduplicated": stats.deduplicated,
        },
    )
