"""Judge stage: pointwise judgments for every response, then pairwise ones in both orders.

1. Per response and judge: a safety verdict (P(unsafe) from the verdict token's probabilities)
   and one rating call for all aspects (each aspect's probability-weighted 1-5 score).
2. From those scores, per question: which pairs to compare (`selection.candidate_pairs`, with
   SPA-VL's safety groups measured on this branch's own responses, so a branch rerun never depends
   on other branches), each asked in both orders (A/B swapped).
An answer that does not parse is asked again with another seed up to `max_attempts`; then it is a
failure with the parser's reason. Every rationale and raw answer is kept.

Accounting unit: judge calls planned. in = out + failed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.common import image_part, provider_for, retry_params
from vlpref.chat import ChatRequest, Message, Sample
from vlpref.config import ModelEntry, RunConfig
from vlpref.errors import JudgeParseError
from vlpref.journal import Journal
from vlpref.judging import parse_pairwise, parse_ratings, parse_safety
from vlpref.prompts import load_prompt
from vlpref.records import JUDGMENTS, TableBuilder, iter_rows, sorted_by, stable_id
from vlpref.runner import BatchStats
from vlpref.selection import (
    Candidate,
    candidate_pairs,
    safety_groups,
    safety_rates,
    score_weights,
    text_key,
)
from vlpref.service import ModelService
from vlpref.stage import FailureRow, StageOutput

Parsed = list[dict[str, Any]]  # judgment rows made from one answer


@dataclass(frozen=True)
class _Call:
    """One judge call: its request and how to turn an answer into judgment rows."""

    call_id: str
    judge: ModelEntry
    messages: tuple[Message, ...]
    prompt_version: str
    parse: Callable[[Sample], Parsed]


def candidates_from_judgments(
    responses: Sequence[Mapping[str, Any]], judgments: Iterable[Mapping[str, Any]]
) -> dict[str, list[Candidate]]:
    """question_id -> its responses as selection candidates, scores averaged over judges."""
    p_unsafe: dict[str, list[float]] = defaultdict(list)
    ratings: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j in judgments:
        if j["kind"] == "safety":
            p_unsafe[j["response_id"]].append(j["score"])
        elif j["kind"] == "rating":
            ratings[j["response_id"]][j["aspect"]].append(j["score"])
    out: dict[str, list[Candidate]] = defaultdict(list)
    for r in responses:
        rid = r["response_id"]
        out[r["question_id"]].append(
            Candidate(
                response_id=rid,
                model=r["model"],
                sample_idx=r["sample_idx"],
                p_unsafe=_mean(p_unsafe.get(rid)),
                ratings={
                    a: m for a, v in ratings.get(rid, {}).items() if (m := _mean(v)) is not None
                },
                finish_reason=r["finish_reason"],
                text_key=text_key(r["text"]),
            )
        )
    return out


def _mean(values: Sequence[float] | None) -> float | None:
    if not values:
        return None
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else None


def judge_responses(
    branch_id: str,
    questions: pa.Table,
    responses: pa.Table,
    images: pa.Table,
    config: RunConfig,
    journal: Journal | None,
    service: ModelService | None = None,
) -> StageOutput:
    service = service or ModelService.shared()
    stage = config.stages.judge
    image_rows = {r["image_id"]: r for r in images.to_pylist()}
    question_rows = {q["question_id"]: q for q in questions.to_pylist()}
    response_rows = responses.to_pylist()
    by_id = {r["response_id"]: r for r in response_rows}
    safety_prompt = load_prompt("judge_safety", config.prompts_dir)
    rating_prompt = load_prompt("judge_rating", config.prompts_dir)
    pairwise_prompt = load_prompt("judge_pairwise", config.prompts_dir)
    aspects: list[str] = list(stage.aspects)
    aspect_lines = "\n".join(f"{a.capitalize()}: <1-5>" for a in aspects)

    def image_of(response: Mapping[str, Any]) -> Any:
        return image_part(image_rows[question_rows[response["question_id"]]["image_id"]])

    def base_row(
        kind: str,
        judge: ModelEntry,
        response_id: str,
        other: str | None,
        aspect: str | None,
        raw: str,
    ) -> dict[str, Any]:
        question_id = by_id[response_id]["question_id"]
        return {
            "judgment_id": stable_id(kind, judge.name, response_id, other or "", aspect or ""),
            "kind": kind,
            "question_id": question_id,
            "response_id": response_id,
            "other_response_id": other,
            "aspect": aspect,
            "judge": judge.name,
            "raw": raw,
            "branch_id": branch_id,
        }

    # Calls are made lazily, a chunk at a time, as the model service pulls them.
    def pointwise_calls(judge: ModelEntry) -> Iterator[_Call]:
        for r in response_rows:
            question = question_rows[r["question_id"]]["text"]
            if stage.safety:
                text = safety_prompt.render(question=question, response=r["text"])
                yield _Call(
                    f"safety\x1f{judge.name}\x1f{r['response_id']}",
                    judge,
                    (Message.user(image_of(r), text),),
                    safety_prompt.version,
                    _safety_parser(base_row, judge, r["response_id"]),
                )
            if aspects:
                text = rating_prompt.render(
                    question=question,
                    response=r["text"],
                    caption=question_rows[r["question_id"]]["caption"],
                    aspects=", ".join(aspects),
                    aspect_lines=aspect_lines,
                )
                yield _Call(
                    f"rating\x1f{judge.name}\x1f{r['response_id']}",
                    judge,
                    (Message.user(image_of(r), text),),
                    rating_prompt.version,
                    _rating_parser(base_row, judge, r["response_id"], aspects),
                )

    stats = BatchStats()

    def run_phase(
        calls_for: Callable[[ModelEntry], Iterator[_Call]],
    ) -> tuple[TableBuilder, list[FailureRow], int]:
        calls = {j.name: calls_for(j) for j in config.judges}
        return _run_calls(calls, config, journal, service, stage.max_attempts, stats)

    rows, failures, n_calls = run_phase(pointwise_calls)
    tables = [rows.table()]

    if stage.pairwise and stage.max_pairs_per_question > 0:
        candidates = candidates_from_judgments(
            response_rows, iter_rows(tables[0], ("kind", "response_id", "aspect", "score"))
        )
        groups = safety_groups(
            safety_rates(c for cs in candidates.values() for c in cs),
            config.stages.pairs.safety_groups,
        )
        weights = score_weights(config.stages.pairs, stage)

        def pairwise_calls(judge: ModelEntry) -> Iterator[_Call]:
            for question_id, cands in sorted(candidates.items()):
                question = question_rows[question_id]["text"]
                pairs = candidate_pairs(
                    question_id,
                    cands,
                    groups,
                    config.stages.pairs,
                    max_pairs=stage.max_pairs_per_question,
                    weights=weights,
                )
                for x, y in pairs:
                    for first, second in ((x, y), (y, x)):
                        text = pairwise_prompt.render(
                            question=question,
                            response_a=by_id[first]["text"],
                            response_b=by_id[second]["text"],
                        )
                        yield _Call(
                            f"pairwise\x1f{judge.name}\x1f{first}\x1f{second}",
                            judge,
                            (Message.user(image_of(by_id[first]), text),),
                            pairwise_prompt.version,
                            _pairwise_parser(base_row, judge, first, second),
                        )

        pair_rows, pair_failures, n_pair_calls = run_phase(pairwise_calls)
        tables.append(pair_rows.table())
        failures.extend(pair_failures)
        n_calls += n_pair_calls
    n_ok = n_calls - len(failures)
    judgments = sorted_by(
        pa.concat_tables(tables),
        ("question_id", "kind", "response_id", "other_response_id", "aspect", "judge"),
    )
    return StageOutput(
        stage="judge",
        branch_id=branch_id,
        unit="judge calls",
        n_in=n_calls,
        n_out=n_ok,
        rows=judgments,
        failures=tuple(failures),
        extra={
            "judgments": judgments.num_rows,
            "requests_sent": stats.sent,
            "requests_cached": stats.cached,
        },
    )


def _safety_parser(
    base_row: Callable[..., dict[str, Any]], judge: ModelEntry, rid: str
) -> Callable[[Sample], Parsed]:
    def parse(sample: Sample) -> Parsed:
        verdict = parse_safety(sample)
        return [
            {**base_row("safety", judge, rid, None, None, sample.text), **verdict.judgment_fields()}
        ]

    return parse


def _rating_parser(
    base_row: Callable[..., dict[str, Any]], judge: ModelEntry, rid: str, aspects: list[str]
) -> Callable[[Sample], Parsed]:
    def parse(sample: Sample) -> Parsed:
        ratings = parse_ratings(sample, aspects)
        return [
            {**base_row("rating", judge, rid, None, a, sample.text), **ratings.judgment_fields(a)}
            for a in aspects
        ]

    return parse


def _pairwise_parser(
    base_row: Callable[..., dict[str, Any]], judge: ModelEntry, first: str, second: str
) -> Callable[[Sample], Parsed]:
    def parse(sample: Sample) -> Parsed:
        verdict = parse_pairwise(sample)
        return [
            {
                **base_row("pairwise", judge, first, second, None, sample.text),
                **verdict.judgment_fields(),
            }
        ]

    return parse


def _run_calls(
    calls_by_judge: Mapping[str, Iterable[_Call]],
    config: RunConfig,
    journal: Journal | None,
    service: ModelService,
    max_attempts: int,
    stats: BatchStats,
) -> tuple[TableBuilder, list[FailureRow], int]:
    """Ask every call, re-asking unparseable answers with a new seed; one failure per call that
    never produced a parseable answer. Returns (rows, failures, number of calls)."""
    judges = {j.name: j for j in config.judges}
    rows = TableBuilder(JUDGMENTS)
    live: dict[str, _Call] = {}  # calls in flight
    last_error: dict[str, tuple[str, str]] = {}
    tries: dict[str, int] = defaultdict(int)
    planned = 0

    def requests(calls: Iterable[_Call], attempt: int) -> Iterator[ChatRequest]:
        nonlocal planned
        for call in calls:
            planned += attempt == 0
            live[call.call_id] = call
            yield ChatRequest(
                id=call.call_id,
                model=call.judge.model,
                messages=call.messages,
                params=retry_params(call.judge.sampling.to_params(), attempt),
                prompt_version=call.prompt_version,
            )

    from vlpref.chat import ChatResult
    from vlpref.service import Batch

    def unparseable(result: ChatResult) -> str | None:
        """The early-stop probe's check (on the service's thread; the call is still live): a
        judge whose first answers all fail to parse is asked no more (vlpref/earlystop.py)."""
        call = live.get(result.request.id)
        if call is None or not result.samples:
            return None
        try:
            call.parse(result.samples[0])
        except JudgeParseError as exc:
            return str(exc)
        return None

    todo: Mapping[str, Iterable[_Call]] = calls_by_judge
    for attempt in range(max_attempts):
        retry: dict[str, list[_Call]] = defaultdict(list)
        batches = [  # re-asks are answers that failed to parse already: only transport stops them
            Batch(
                provider_for(config, judges[name], service),
                requests(calls, attempt),
                check=None if attempt else unparseable,
            )
            for name, calls in todo.items()
        ]
        for result in service.run(batches, journal, stats):
            call_id = result.request.id
            call = live.pop(call_id)
            tries[call_id] += max(result.attempts, 1)
            if not result.ok or not result.samples:
                failure = result.failure
                last_error[call_id] = (
                    failure.kind if failure else "missing",
                    f"{failure.kind}: {failure.message}" if failure else "no sample returned",
                )
                continue  # the provider already retried what retrying can fix
            try:
                rows.extend(call.parse(result.samples[0]))
                last_error.pop(call_id, None)
                del tries[call_id]  # only failures report their tries
            except JudgeParseError as exc:
                last_error[call_id] = ("unparseable", str(exc))
                retry[call.judge.name].append(call)
        if not retry:
            break
        todo = retry
    failures = [
        FailureRow(call_id.replace("\x1f", ":"), kind, reason, tries[call_id])
        for call_id, (kind, reason) in last_error.items()
    ]
    return rows, failures, planned
