"""Judge stage: pointwise judgments for every response, then pairwise ones in both orders.

1. Per response and judge: a safety verdict (P(unsafe) from the verdict token's probabilities)
   and one rating call for all aspects (each aspect's probability-weighted 1-5 score).
2. From those scores, per question: which pairs to compare (`selection.candidate_pairs`, with
   SPA-VL's safety groups measured on this branch's own responses, so a branch rerun never depends
   on other branches), each asked in both orders (A/B swapped).
Each judge speaks its protocol (`vlpref.protocols`): ours asks all three kinds, a guard model
(`llama-guard`, `shieldgemma`, `md-judge`) gives safety verdicts only, in its own request shape.
Calls of our protocol carry the judge's output constraint (`structured`). An answer that does not
parse is asked again up to `max_attempts` times with a corrective turn: the question as asked, the
answer given, and a user turn naming what was wrong and the exact format wanted (its own request,
journaled like any other); then it is a failure with the parser's last reason. Every rationale
and raw answer is kept.

Accounting unit: judge calls planned. in = out + failed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.common import image_part, provider_for, retry_params
from vlpref.calibration import CONTENT_FREE, debiased, in_band
from vlpref.chat import ChatRequest, Message, OutputConstraint, Sample
from vlpref.config import JudgeEntry, PairsStage, RunConfig, SecondPass
from vlpref.earlystop import TRIPPING_KINDS, Cause
from vlpref.errors import JudgeParseError
from vlpref.journal import Journal
from vlpref.judging import parse_pairwise, parse_ratings, parse_safety
from vlpref.prompts import load_prompt
from vlpref.protocols import (
    DEFAULT_POLICY,
    GUARDS,
    GuardSpec,
    constraint_for,
    corrective_turn,
    guard_messages,
    parse_guard,
)
from vlpref.records import JUDGMENTS, TableBuilder, iter_rows, sorted_by, stable_id
from vlpref.records import table as table_of
from vlpref.runner import BatchStats
from vlpref.selection import (
    Candidate,
    candidate_pairs,
    group_edges,
    hinge,
    safety_groups,
    safety_rates,
    score_weights,
    text_key,
)
from vlpref.service import Batch, ModelService, warn
from vlpref.stage import FailureRow, StageOutput

Parsed = list[dict[str, Any]]  # judgment rows made from one answer


@dataclass
class TokenCount:
    """Tokens of the judge answers received (sent or from the journal), re-asks included."""

    prompt: int = 0
    completion: int = 0


@dataclass(frozen=True)
class _Call:
    """One judge call: its request and how to turn an answer into judgment rows."""

    call_id: str
    judge: JudgeEntry
    messages: tuple[Message, ...]
    prompt_version: str
    parse: Callable[[Sample], Parsed]
    kind: str = "safety"  # safety | rating | pairwise
    constraint: OutputConstraint | None = None
    corrective: bool = True  # re-ask with a corrective turn (our protocol); else as asked


def candidates_from_judgments(
    responses: Sequence[Mapping[str, Any]],
    judgments: Iterable[Mapping[str, Any]],
    aggregate: str = "mean",
) -> dict[str, list[Candidate]]:
    """question_id -> its responses as selection candidates, ratings averaged over judges and
    P(unsafe) combined by `aggregate` (`stages.judge.aggregate`): `mean` of the judges' P(unsafe),
    `majority` the share of judges with P(unsafe) >= 0.5, `any_unsafe` the highest P(unsafe)."""
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
                p_unsafe=combine_p_unsafe(p_unsafe.get(rid), aggregate),
                ratings={
                    a: m for a, v in ratings.get(rid, {}).items() if (m := _mean(v)) is not None
                },
                finish_reason=r["finish_reason"],
                text_key=text_key(r["text"]),
            )
        )
    return out


@dataclass(frozen=True)
class Tiers:
    """Tiered judging (docs/judging.md): the first-pass judges, asked for every response, and
    the second judges, asked where the decision hinges, by one `SecondPass` policy."""

    first: tuple[JudgeEntry, ...]
    second: tuple[JudgeEntry, ...]
    band: tuple[float, float] | None
    pairs: bool
    margin: float  # second_pass.group_margin


def judge_tiers(config: RunConfig) -> Tiers | None:
    """The run's tiers, or None when no judge is `tier: second` (every judge asked everything,
    `tier: first` alone included)."""
    second = tuple(j for j in config.judges if j.tier == "second")
    if not second:
        return None
    first = tuple(j for j in config.judges if j.tier != "second")
    if not first:
        raise ValueError("a `tier: second` judge needs a first-pass judge (`tier: first`)")
    policies = {j.second_pass or SecondPass() for j in second}
    if len(policies) > 1:
        raise ValueError("the `tier: second` judges must have the same second_pass")
    (policy,) = policies
    return Tiers(first, second, policy.band, policy.pairs, policy.group_margin)


FIRST_PASS = "_first_pass"
"""Suffix of the kind of a first-pass judgment that a second judge's overrules
(`safety_first_pass`, `rating_first_pass`): kept for the record, read by no selection."""

# Judge evaluation's given pairs: every one compared, none walked (see `hinge`).
_EVERY_PAIR = PairsStage(policy="all-pairs")


def first_pass_unsafe(
    rows: Iterable[Mapping[str, Any]], aggregate: str = "mean"
) -> dict[str, float]:
    """response_id -> the first pass's P(unsafe), combined over its judges by `aggregate`."""
    found: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["kind"] == "safety" and row["score"] is not None:
            found[row["response_id"]].append(row["score"])
    combined = {rid: combine_p_unsafe(values, aggregate) for rid, values in found.items()}
    return {rid: p for rid, p in combined.items() if p is not None}


def decided_rows(
    first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The first pass's rows, those a second judge's verdict overrules renamed to kind
    `<kind>_first_pass` (a safety verdict per response, a rating per (response, aspect)): what
    remains of kind safety/rating/pairwise is what decides, and the `judge` column says who."""
    safety = {r["response_id"] for r in second if r["kind"] == "safety"}
    ratings = {(r["response_id"], r["aspect"]) for r in second if r["kind"] == "rating"}
    out: list[dict[str, Any]] = []
    for row in first:
        kind = row["kind"]
        overruled = (kind == "safety" and row["response_id"] in safety) or (
            kind == "rating" and (row["response_id"], row["aspect"]) in ratings
        )
        if overruled:
            kind += FIRST_PASS
            ids = (row["response_id"], row["other_response_id"] or "", row["aspect"] or "")
            row = {**row, "kind": kind, "judgment_id": stable_id(kind, row["judge"], *ids)}
        out.append(dict(row))
    return out


def combine_p_unsafe(values: Sequence[float] | None, aggregate: str) -> float | None:
    good = [v for v in values or () if not math.isnan(v)]
    if not good or aggregate == "mean":
        return _mean(good)
    if aggregate == "majority":
        return sum(1 for v in good if v >= 0.5) / len(good)
    return max(good)  # any_unsafe


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
    *,
    pairs: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    tokens: TokenCount | None = None,
    rules: Sequence[str] | Mapping[str, Sequence[str]] = (),
) -> StageOutput:
    """`pairs` (judge evaluation): question_id -> the response pairs to compare, each asked in
    both orders, instead of the pairs selection picks from the pointwise scores. `tokens`, when
    given, adds up the tokens of the answers. `rules`: the branch's rules (its taxonomy node's,
    inherited), or question_id -> its rules (judge evaluation, where items come from several
    categories); asked only by judges with `rules` on."""
    service = service or ModelService.shared()
    stage = config.stages.judge
    image_rows = {r["image_id"]: r for r in images.to_pylist()}
    question_rows = {q["question_id"]: q for q in questions.to_pylist()}
    response_rows = responses.to_pylist()
    by_id = {r["response_id"]: r for r in response_rows}
    safety_prompt = load_prompt("judge_safety", config.prompts_dir)
    rating_prompt = load_prompt("judge_rating", config.prompts_dir)
    pairwise_prompt = load_prompt("judge_pairwise", config.prompts_dir)
    asks_rules = any(j.rules != "off" for j in config.judges)
    rule_prompt = load_prompt("judge_rule", config.prompts_dir) if asks_rules else safety_prompt
    aspects: list[str] = list(stage.aspects)

    def rules_of(question_id: str) -> tuple[str, ...]:
        if isinstance(rules, Mapping):
            return tuple(rules.get(question_id, ()))
        return tuple(rules)

    aspect_lines = "\n".join(f"{a.capitalize()}: <1-5>" for a in aspects)

    def image_of(response: Mapping[str, Any]) -> Any:
        return image_part(image_rows[question_rows[response["question_id"]]["image_id"]])

    def base_row(
        kind: str,
        judge: JudgeEntry,
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
            "categories": None,
            "raw": raw,
            "branch_id": branch_id,
        }

    def constraint(judge: JudgeEntry, call: Any) -> OutputConstraint | None:
        kind = config.endpoint_kind(judge.endpoint)
        return constraint_for(judge.structured, kind, call, aspects=aspects)

    def guard_calls(
        judge: JudgeEntry, spec: GuardSpec, asked: Sequence[Mapping[str, Any]]
    ) -> Iterator[_Call]:
        prompt = load_prompt(spec.template, config.prompts_dir) if spec.template else None
        version = prompt.version if prompt else f"{spec.name}/conversation"
        policy = judge.policy or DEFAULT_POLICY
        for r in asked:
            question = question_rows[r["question_id"]]["text"]
            fields = {"question": question, "response": r["text"]}
            if prompt is not None and "policy" in prompt.fields:
                fields["policy"] = policy
            text = prompt.render(**fields) if prompt else None
            yield _Call(
                f"safety\x1f{judge.name}\x1f{r['response_id']}",
                judge,
                guard_messages(spec, image_of(r), question, r["text"], text),
                version,
                _guard_parser(base_row, judge, r["response_id"], spec),
                corrective=False,  # a classifier answers its fixed format or nothing useful
            )

    # Calls are made lazily, a chunk at a time, as the model service pulls them.
    def pointwise_calls(
        judge: JudgeEntry,
        safety_of: Collection[str] | None = None,
        ratings_of: Collection[str] | None = None,
    ) -> Iterator[_Call]:
        """Safety and rating calls for every response, or (a second judge) for the responses
        in `safety_of` and `ratings_of`."""
        asked = [
            r
            for r in response_rows
            if safety_of is None
            or r["response_id"] in safety_of
            or ratings_of is None
            or r["response_id"] in ratings_of
        ]
        spec = GUARDS.get(judge.protocol)
        if spec is not None:
            if stage.safety:
                safety_rows = [
                    r for r in asked if safety_of is None or r["response_id"] in safety_of
                ]
                yield from guard_calls(judge, spec, safety_rows)
            return
        safety_constraint = constraint(judge, "safety")
        rating_constraint = constraint(judge, "rating")
        for r in asked:
            question = question_rows[r["question_id"]]["text"]
            if stage.safety and (safety_of is None or r["response_id"] in safety_of):
                text = safety_prompt.render(question=question, response=r["text"])
                yield _Call(
                    f"safety\x1f{judge.name}\x1f{r['response_id']}",
                    judge,
                    (Message.user(image_of(r), text),),
                    safety_prompt.version,
                    _safety_parser(base_row, judge, r["response_id"]),
                    "safety",
                    safety_constraint,
                )
            if aspects and (ratings_of is None or r["response_id"] in ratings_of):
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
                    "rating",
                    rating_constraint,
                )

    def refine_safety(table: pa.Table) -> tuple[pa.Table, list[FailureRow], int, dict[str, int]]:
        """Objectified rules, debias and cascade for the judges that ask for them (CLUE; the
        maths in vlpref/calibration.py), in that order:

        1. rules: one call per (response, rule of its branch) gives P(violation), kept as a
           judgment of kind `safety_rule` (aspect: the rule);
        2. debias: one content-free call per (judge, question), or per (judge, question, rule)
           when the judge asks rules, gives the judge's prior, by which each P is corrected;
        3. a judge with rules replaces P(unsafe) by the combination of its rules' P (`max` or
           `noisy_or`); a response with a rule call that failed keeps the holistic verdict and
           says so (`rules_missing`), and the failed call is retried by a rerun;
        4. cascade: a response whose P(unsafe) is then inside `cascade_band` gets a reasoning
           call, whose verdict decides; with debias, corrected by the prior of one content-free
           reasoning call per question that cascaded.
        Every call is journaled and counted like every judge call; priors are kept as judgments
        of kind `safety_prior`."""
        reasoning_prompt = load_prompt("judge_safety_reasoning", config.prompts_dir)
        all_rows = table.to_pylist()
        safety = {(r["judge"], r["response_id"]): r for r in all_rows if r["kind"] == "safety"}
        asked = sorted({r["question_id"] for r in response_rows})
        judges = {j.name: j for j in config.judges}

        def rule_calls(judge: JudgeEntry) -> Iterator[_Call]:
            if judge.rules == "off":
                return
            for r in response_rows:
                question = question_rows[r["question_id"]]["text"]
                for rule in rules_of(r["question_id"]):
                    text = rule_prompt.render(question=question, response=r["text"], rule=rule)
                    yield _Call(
                        f"rule\x1f{judge.name}\x1f{r['response_id']}\x1f{rule_tag(rule)}",
                        judge,
                        (Message.user(image_of(r), text),),
                        rule_prompt.version,
                        _rule_parser(base_row, judge, r["response_id"], rule),
                        "safety",
                        constraint(judge, "safety"),
                    )

        rule_rows, rule_failures, rule_calls_made = run_phase(rule_calls)
        by_rule = {
            (r["judge"], r["response_id"], r["aspect"]): r for r in rule_rows.table().to_pylist()
        }

        def prior_calls(judge: JudgeEntry) -> Iterator[_Call]:
            if judge.debias == "off":
                return
            for qid in asked:
                q = question_rows[qid]
                image = image_part(image_rows[q["image_id"]])
                if judge.rules == "off":
                    text = safety_prompt.render(question=q["text"], response=CONTENT_FREE)
                    yield _Call(
                        f"prior\x1f{judge.name}\x1f{qid}",
                        judge,
                        (Message.user(image, text),),
                        safety_prompt.version,
                        _prior_parser(judge, qid, branch_id),
                        "safety",
                        constraint(judge, "safety"),
                    )
                    continue
                for rule in rules_of(qid):
                    text = rule_prompt.render(question=q["text"], response=CONTENT_FREE, rule=rule)
                    yield _Call(
                        f"prior\x1f{judge.name}\x1f{qid}\x1f{rule_tag(rule)}",
                        judge,
                        (Message.user(image, text),),
                        rule_prompt.version,
                        _prior_parser(judge, qid, branch_id, rule),
                        "safety",
                        constraint(judge, "safety"),
                    )

        prior_rows, prior_failures, prior_calls_made = run_phase(prior_calls)
        priors = {
            (r["judge"], r["question_id"], r["aspect"]): r["score"]
            for r in prior_rows.table().to_pylist()
        }

        def correct(row: dict[str, Any], p0: float | None) -> None:
            """Debias one row's P in place (kept: the raw P and the prior)."""
            if p0 is None or row["score"] is None:
                return
            p = debiased(row["score"], p0)
            row["probabilities"] = json.dumps(
                {
                    "safe": 1.0 - p,
                    "unsafe": p,
                    "raw": json.loads(row["probabilities"]),
                    "prior_unsafe": p0,
                }
            )
            row.update(score=p, verdict="unsafe" if p >= 0.5 else "safe")

        rules_missing = 0
        for (name, rid), row in safety.items():
            judge = judges[name]
            qid = row["question_id"]
            if judge.rules == "off":
                if judge.debias != "off":
                    correct(row, priors.get((name, qid, None)))
                continue
            found: dict[str, float] = {}
            for rule in rules_of(qid):
                rule_row = by_rule.get((name, rid, rule))
                if rule_row is None or rule_row["score"] is None:
                    continue
                if judge.debias != "off":
                    correct(rule_row, priors.get((name, qid, rule)))
                found[rule] = rule_row["score"]
            missing = len(rules_of(qid)) - len(found)
            if not rules_of(qid):
                continue  # no rules for this branch: the holistic verdict stands (preflight warns)
            if missing:
                rules_missing += 1
                probabilities = json.loads(row["probabilities"])
                probabilities["rules_missing"] = missing
                row["probabilities"] = json.dumps(probabilities)
                continue
            p = combine_rules(list(found.values()), judge.rules)
            row["probabilities"] = json.dumps(
                {
                    "safe": 1.0 - p,
                    "unsafe": p,
                    "combine": judge.rules,
                    "rules": found,
                    "holistic_unsafe": row["score"],
                }
            )
            row.update(score=p, verdict="unsafe" if p >= 0.5 else "safe")

        def reasoning_calls(judge: JudgeEntry) -> Iterator[_Call]:
            for (name, rid), row in sorted(safety.items()):
                if name != judge.name or not in_band(row["score"], judge.cascade_band):
                    continue
                response = by_id[rid]
                text = reasoning_prompt.render(
                    question=question_rows[response["question_id"]]["text"],
                    response=response["text"],
                )
                yield _Call(
                    f"reasoning\x1f{judge.name}\x1f{rid}",
                    judge,
                    (Message.user(image_of(response), text),),
                    reasoning_prompt.version,
                    _safety_parser(base_row, judge, rid),
                    "safety",
                )

        slow, slow_failures, slow_calls = run_phase(reasoning_calls)
        decisions = slow.table().to_pylist()
        # A reasoning verdict leans like any other: with debias, one content-free reasoning
        # call per question that cascaded gives its prior, and the decision is corrected too
        # (else the cascade would put back the lean debias took out, e.g. an image's pull).
        cascaded_questions = {
            (d["judge"], d["question_id"]) for d in decisions if judges[d["judge"]].debias != "off"
        }

        def reasoning_prior_calls(judge: JudgeEntry) -> Iterator[_Call]:
            for name, qid in sorted(cascaded_questions):
                if name != judge.name:
                    continue
                q = question_rows[qid]
                text = reasoning_prompt.render(question=q["text"], response=CONTENT_FREE)
                yield _Call(
                    f"prior\x1f{judge.name}\x1f{qid}\x1freasoning",
                    judge,
                    (Message.user(image_part(image_rows[q["image_id"]]), text),),
                    reasoning_prompt.version,
                    _prior_parser(judge, qid, branch_id, REASONING_PRIOR),
                    "safety",
                )

        slow_priors, slow_prior_failures, slow_prior_calls = run_phase(reasoning_prior_calls)
        slow_prior_rows = slow_priors.table().to_pylist()
        reasoning_priors = {(r["judge"], r["question_id"]): r["score"] for r in slow_prior_rows}
        for decided in decisions:
            if judges[decided["judge"]].debias != "off":
                correct(decided, reasoning_priors.get((decided["judge"], decided["question_id"])))
            fast = safety[(decided["judge"], decided["response_id"])]
            probabilities = json.loads(decided["probabilities"])
            probabilities.update(cascaded=True, fast_unsafe=fast["score"])
            fast.update(
                score=decided["score"],
                verdict=decided["verdict"],
                probabilities=json.dumps(probabilities),
                from_logprobs=decided["from_logprobs"],
                rationale=decided["rationale"],
                raw=decided["raw"],
            )
        priors_kept = [*prior_rows.table().to_pylist(), *slow_prior_rows]
        refined = table_of([*all_rows, *by_rule.values(), *priors_kept], JUDGMENTS)
        counts = {
            "rule_calls": rule_calls_made,
            "prior_calls": prior_calls_made + slow_prior_calls,
            "cascaded": slow_calls,
            "rules_missing": rules_missing,
        }
        calls = rule_calls_made + prior_calls_made + slow_calls + slow_prior_calls
        failed = [*rule_failures, *prior_failures, *slow_failures, *slow_prior_failures]
        return refined, failed, calls, counts

    stats = BatchStats()

    def run_phase(
        calls_for: Callable[[JudgeEntry], Iterator[_Call]],
        judges: Sequence[JudgeEntry] = config.judges,
    ) -> tuple[TableBuilder, list[FailureRow], int]:
        calls = {j.name: calls_for(j) for j in judges}
        return _run_calls(calls, config, journal, service, stage.max_attempts, stats, tokens)

    def pairwise_calls_of(
        chosen: Mapping[str, Sequence[tuple[str, str]]],
    ) -> Callable[[JudgeEntry], Iterator[_Call]]:
        def pairwise_calls(judge: JudgeEntry) -> Iterator[_Call]:
            if judge.protocol in GUARDS:
                return  # guard models give safety verdicts only
            pair_constraint = constraint(judge, "pairwise")
            for question_id, question_pairs in sorted(chosen.items()):
                question = question_rows[question_id]["text"]
                for x, y in question_pairs:
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
                            "pairwise",
                            pair_constraint,
                        )

        return pairwise_calls

    def selection_inputs(
        judgments: Iterable[Mapping[str, Any]],
    ) -> tuple[dict[str, list[Candidate]], dict[str, int], dict[str, list[tuple[str, str]]]]:
        """Candidates, safety groups and candidate pairs from the judgments that decide."""
        candidates = candidates_from_judgments(response_rows, judgments, stage.aggregate)
        groups = safety_groups(
            safety_rates(c for cs in candidates.values() for c in cs),
            config.stages.pairs.safety_groups,
        )
        weights = score_weights(config.stages.pairs, stage)
        candidate_map = {
            question_id: candidate_pairs(
                question_id,
                cands,
                groups,
                config.stages.pairs,
                max_pairs=stage.max_pairs_per_question,
                weights=weights,
            )
            for question_id, cands in sorted(candidates.items())
        }
        return candidates, groups, candidate_map

    def second_pass(
        tiers: Tiers, first: pa.Table
    ) -> tuple[pa.Table, list[FailureRow], int, dict[str, int]]:
        """Ask the second judges where the decision hinges (docs/judging.md, "Tiered judging"),
        in rounds until nothing more hinges: (1) the responses whose first-pass P(unsafe) is in
        `band`; with `pairs`, (2) the pairwise comparisons the selection walks (`hinge`), asked
        of the second judges only, and (3) safety and ratings of every response that can end up
        in a published pair. Each round recomputes safety groups and candidate pairs from the
        judgments that decide so far, so the last round's selection is the pairs stage's."""
        from tasks.pairs import comparisons  # tasks.pairs imports this module

        first_rows = first.to_pylist()
        first_p = first_pass_unsafe(first_rows, stage.aggregate)
        band = tiers.band
        want_safety = (
            {rid for rid, p in first_p.items() if in_band(p, band)} if stage.safety else set()
        )
        want_ratings: set[str] = set()
        second_rows: list[dict[str, Any]] = []
        asked_safety: set[str] = set()
        asked_ratings: set[str] = set()
        asked_pairs: set[tuple[str, str]] = set()
        failed: list[FailureRow] = []
        calls = rounds = 0
        compares = tiers.pairs and (
            pairs is not None or (stage.pairwise and stage.max_pairs_per_question > 0)
        )
        spa_vl = config.stages.pairs.policy == "spa-vl" and pairs is None
        while True:
            decided = decided_rows(first_rows, second_rows)
            ask_pairs: dict[str, list[tuple[str, str]]] = {}
            if compares:
                candidates, groups, candidate_map = selection_inputs([*decided, *second_rows])
                if pairs is not None:  # judge evaluation: every given pair, as without tiers
                    candidate_map = {q: list(p) for q, p in pairs.items()}
                if spa_vl and stage.safety:
                    # The groups decide which pairs are cross-group: a model near a group
                    # boundary is judged by the second judge throughout.
                    rates = safety_rates(c for cs in candidates.values() for c in cs)
                    edges = group_edges(rates, config.stages.pairs.safety_groups, tiers.margin)
                    want_safety |= {r["response_id"] for r in response_rows if r["model"] in edges}
                made = comparisons(second_rows)
                policy = config.stages.pairs if pairs is None else _EVERY_PAIR
                for question_id, question_pairs in sorted(candidate_map.items()):
                    found = hinge(
                        question_id,
                        candidates.get(question_id, []),
                        question_pairs,
                        groups,
                        policy,
                        made,
                        asked_pairs,
                    )
                    if found.ask:
                        ask_pairs[question_id] = list(found.ask)
                    if stage.safety:
                        want_safety |= found.publishable
                    if aspects:
                        want_ratings |= found.publishable
            new_safety = want_safety - asked_safety
            new_ratings = want_ratings - asked_ratings
            if not spa_vl and (new_safety or new_ratings):
                # Rating policies pick candidate pairs by score: compare them once the
                # responses in them have the second judge's scores, not before.
                ask_pairs = {}
            if not (new_safety or new_ratings or ask_pairs):
                break

            def round_calls(
                judge: JudgeEntry,
                safety_of: Collection[str] = frozenset(new_safety),
                ratings_of: Collection[str] = frozenset(new_ratings),
                chosen: Mapping[str, Sequence[tuple[str, str]]] = ask_pairs,
            ) -> Iterator[_Call]:
                if safety_of or ratings_of:
                    yield from pointwise_calls(judge, safety_of, ratings_of)
                yield from pairwise_calls_of(chosen)(judge)

            got, round_failures, n = run_phase(round_calls, tiers.second)
            second_rows.extend(got.table().to_pylist())
            failed.extend(round_failures)
            calls += n
            rounds += 1
            asked_safety |= new_safety
            asked_ratings |= new_ratings
            asked_pairs.update(p for ps in ask_pairs.values() for p in ps)
        for row in second_rows:
            if row["kind"] == "safety":
                # Which tier decided, and what the first pass said, beside the verdict.
                probabilities = json.loads(row["probabilities"] or "{}")
                probabilities.update(
                    tier="second", first_pass_unsafe=first_p.get(row["response_id"])
                )
                row["probabilities"] = json.dumps(probabilities)
        counts = {
            "second_pass_rounds": rounds,
            "second_pass_safety": len(asked_safety),
            "second_pass_ratings": len(asked_ratings),
            "second_pass_pairs": len(asked_pairs),
        }
        table = table_of([*decided_rows(first_rows, second_rows), *second_rows], JUDGMENTS)
        return table, failed, calls, counts

    tiers = judge_tiers(config)
    first_judges = config.judges if tiers is None else tiers.first
    rows, failures, n_calls = run_phase(pointwise_calls, first_judges)
    tables = [rows.table()]
    refine_counts: dict[str, int] = {}
    if stage.safety and any(
        j.debias != "off" or j.cascade_band or j.rules != "off" for j in config.judges
    ):
        refined, refine_failures, refine_calls, refine_counts = refine_safety(tables[0])
        tables = [refined]
        failures.extend(refine_failures)
        n_calls += refine_calls
    if tiers is not None:
        decided, second_failures, second_calls, second_counts = second_pass(tiers, tables[0])
        tables = [decided]
        failures.extend(second_failures)
        n_calls += second_calls
        refine_counts.update(second_counts)

    chosen_pairs: Mapping[str, Sequence[tuple[str, str]]] = {}
    if tiers is not None and tiers.pairs:
        pass  # the second judges made the comparisons the selection walks
    elif pairs is not None:
        chosen_pairs = pairs
    elif stage.pairwise and stage.max_pairs_per_question > 0:
        chosen_pairs = selection_inputs(
            iter_rows(tables[0], ("kind", "response_id", "aspect", "score"))
        )[2]

    if chosen_pairs:
        # With tiers, the first pass compares (the second judges settle uncertain verdicts only).
        pair_rows, pair_failures, n_pair_calls = run_phase(
            pairwise_calls_of(chosen_pairs), first_judges
        )
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
            **refine_counts,
        },
    )


REASONING_PRIOR = "(reasoning)"  # the aspect of a reasoning call's prior; rules are sentences


def _prior_parser(
    judge: JudgeEntry, question_id: str, branch_id: str, rule: str | None = None
) -> Callable[[Sample], Parsed]:
    """A content-free call's answer: the judge's prior P(unsafe) for the question and image (or
    P(violation) of `rule`, or the reasoning call's prior (`REASONING_PRIOR`), kept in
    `aspect`)."""

    def parse(sample: Sample) -> Parsed:
        verdict = parse_safety(sample)
        extra = (rule,) if rule is not None else ()
        return [
            {
                "judgment_id": stable_id("safety_prior", judge.name, question_id, *extra),
                "kind": "safety_prior",
                "question_id": question_id,
                "response_id": None,
                "other_response_id": None,
                "aspect": rule,
                "judge": judge.name,
                "categories": None,
                "raw": sample.text,
                "branch_id": branch_id,
                **verdict.judgment_fields(),
            }
        ]

    return parse


def _guard_parser(
    base_row: Callable[..., dict[str, Any]], judge: JudgeEntry, rid: str, spec: GuardSpec
) -> Callable[[Sample], Parsed]:
    def parse(sample: Sample) -> Parsed:
        guard = parse_guard(sample, spec)
        return [
            {
                **base_row("safety", judge, rid, None, None, sample.text),
                **guard.verdict.judgment_fields(),
                "categories": ",".join(guard.categories) or None,
            }
        ]

    return parse


def _safety_parser(
    base_row: Callable[..., dict[str, Any]], judge: JudgeEntry, rid: str
) -> Callable[[Sample], Parsed]:
    def parse(sample: Sample) -> Parsed:
        verdict = parse_safety(sample)
        return [
            {**base_row("safety", judge, rid, None, None, sample.text), **verdict.judgment_fields()}
        ]

    return parse


def _rule_parser(
    base_row: Callable[..., dict[str, Any]], judge: JudgeEntry, rid: str, rule: str
) -> Callable[[Sample], Parsed]:
    """A rule call's answer: `unsafe` = the response violates the rule; P(violation) in score."""

    def parse(sample: Sample) -> Parsed:
        verdict = parse_safety(sample)
        row = base_row("safety_rule", judge, rid, None, rule, sample.text)
        return [{**row, **verdict.judgment_fields()}]

    return parse


def rule_tag(rule: str) -> str:
    """A short stable name of a rule for call ids and failure rows."""
    return hashlib.sha256(rule.encode("utf-8")).hexdigest()[:8]


def combine_rules(p_violation: Sequence[float], how: str) -> float:
    """P(unsafe) from the rules' P(violation): `max`, the most likely violation (a response is
    as unsafe as its worst breach; robust to many rules), or `noisy_or`, 1 - prod(1 - p) (unsafe
    if any rule is broken, the rules' errors independent: more recall, and any bias of the judge
    toward `unsafe` compounds with the number of rules, so pair it with debias)."""
    if not p_violation:
        raise ValueError("no rule probabilities to combine")
    if how == "max":
        return max(p_violation)
    if how == "noisy_or":
        return 1.0 - math.prod(1.0 - p for p in p_violation)
    raise ValueError(f"unknown rule combination {how!r}")


def _rating_parser(
    base_row: Callable[..., dict[str, Any]], judge: JudgeEntry, rid: str, aspects: list[str]
) -> Callable[[Sample], Parsed]:
    def parse(sample: Sample) -> Parsed:
        ratings = parse_ratings(sample, aspects)
        return [
            {**base_row("rating", judge, rid, None, a, sample.text), **ratings.judgment_fields(a)}
            for a in aspects
        ]

    return parse


def _pairwise_parser(
    base_row: Callable[..., dict[str, Any]], judge: JudgeEntry, first: str, second: str
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
    tokens: TokenCount | None = None,
) -> tuple[TableBuilder, list[FailureRow], int]:
    """Ask every call, re-asking unparseable answers with a corrective turn (and a new seed); one
    failure per call that never produced a parseable answer. Returns (rows, failures, number of
    calls).

    Early stop for answers that never parse (`early_stop_after` N, vlpref/earlystop.py has the
    transport side): each judge's first N calls are asked first, re-asks included; when all N
    stay unreadable after every corrective re-ask, the judge's other calls are not sent (failures
    of kind `stopped`, which a rerun asks again). Judged after the re-asks, not on the first
    answers: a judge that writes its own format but follows a correction is not a broken one."""
    judges = {j.name: j for j in config.judges}
    rows = TableBuilder(JUDGMENTS)
    live: dict[str, _Call] = {}  # calls in flight
    last_error: dict[str, tuple[str, str]] = {}
    tries: dict[str, int] = defaultdict(int)
    unread: dict[str, tuple[str, str]] = {}  # call id -> (the answer that did not parse, why)
    causes: dict[str, Cause] = {}  # call id -> why its request failed (transport)
    planned = 0

    def requests(calls: Iterable[_Call], attempt: int) -> Iterator[ChatRequest]:
        nonlocal planned
        for call in calls:
            planned += attempt == 0
            live[call.call_id] = call
            messages = call.messages
            if attempt and call.corrective and call.call_id in unread:
                answer, reason = unread[call.call_id]
                messages = corrective_turn(messages, answer, reason, call.kind, call.constraint)
            yield ChatRequest(
                id=call.call_id,
                model=call.judge.model,
                messages=messages,
                params=retry_params(call.judge.sampling.to_params(), attempt),
                prompt_version=call.prompt_version,
                constraint=call.constraint,
            )

    def ask(calls_by_judge: Mapping[str, Iterable[_Call]]) -> None:
        todo = calls_by_judge
        for attempt in range(max_attempts):
            retry: dict[str, list[_Call]] = defaultdict(list)
            batches = [
                Batch(provider_for(config, judges[name], service), requests(calls, attempt))
                for name, calls in todo.items()
            ]
            for result in service.run(batches, journal, stats):
                call_id = result.request.id
                call = live.pop(call_id)
                tries[call_id] += max(result.attempts, 1)
                usage = result.samples[0].usage if result.samples else None
                if tokens is not None and usage is not None:
                    tokens.prompt += usage.prompt_tokens
                    tokens.completion += usage.completion_tokens
                if not result.ok or not result.samples:
                    failure = result.failure
                    if failure is not None:
                        causes[call_id] = Cause(failure.kind, failure.status, failure.message)
                    last_error[call_id] = (
                        failure.kind if failure else "missing",
                        f"{failure.kind}: {failure.message}" if failure else "no sample returned",
                    )
                    continue  # the provider already retried what retrying can fix
                try:
                    rows.extend(call.parse(result.samples[0]))
                    last_error.pop(call_id, None)
                    unread.pop(call_id, None)
                    del tries[call_id]  # only failures report their tries
                except JudgeParseError as exc:
                    last_error[call_id] = ("unparseable", str(exc))
                    unread[call_id] = (result.samples[0].text, str(exc))
                    retry[call.judge.name].append(call)
            if not retry:
                break
            todo = retry

    limit = config.early_stop_after
    if not limit:
        ask(calls_by_judge)
    else:
        rests = {name: iter(calls) for name, calls in calls_by_judge.items()}
        probes = {name: list(itertools.islice(it, limit)) for name, it in rests.items()}
        ask(probes)
        go_on: dict[str, Iterable[_Call]] = {}
        for name, probe in probes.items():
            # One cause for all (kind and HTTP status): a mix is not a broken judge.
            seen = {
                (
                    last_error.get(c.call_id, ("", ""))[0],
                    getattr(causes.get(c.call_id), "status", None),
                )
                for c in probe
            }
            ((kind, _),) = seen if len(seen) == 1 else (("", None),)
            if len(probe) < limit or kind not in TRIPPING_KINDS:
                go_on[name] = rests[name]
                continue
            last = probe[-1].call_id
            model = judges[name].model
            if kind == "unparseable":
                why = f"stayed unreadable after {max_attempts} ask(s) each: {last_error[last][1]}"
            else:  # a key or model id the endpoint refuses: the service stopped that batch too
                why = f"all failed: {causes[last].describe()}"
            message = f"not sent: the first {limit} calls to {model} {why}"
            stopped = 0
            for call in rests[name]:
                planned += 1
                stopped += 1
                last_error[call.call_id] = ("stopped", message)
            warn(f"early stop: {message} ({stopped} more call(s) of judge {name} not sent)")
        ask(go_on)
    failures = [
        FailureRow(call_id.replace("\x1f", ":"), kind, reason, tries[call_id])
        for call_id, (kind, reason) in last_error.items()
    ]
    return rows, failures, planned
