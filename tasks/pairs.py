"""Pairs stage: the selection policy over the judged responses -> pairs and rankings.

Pure logic over the judge stage's output (no model calls): candidates with their scores averaged
over judges, both-orders comparisons combined per judge and averaged, SPA-VL safety groups
measured on the branch, then `selection.select_pairs` per question. Every question yields its
pairs or a reason why it has none.

Accounting unit: questions. out = questions with at least one pair; failed = questions with none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from tasks.judge import candidates_from_judgments
from vlpref.config import RunConfig
from vlpref.judging import OrderedComparison, combine_orders
from vlpref.records import PAIRS, RANKINGS, table
from vlpref.selection import safety_groups, safety_rates, score_weights, select_pairs
from vlpref.stage import FailureRow, StageOutput

JUDGMENT_COLUMNS = ("kind", "judge", "response_id", "other_response_id", "aspect", "score")
RESPONSE_COLUMNS = ("response_id", "question_id", "model", "sample_idx", "finish_reason", "text")


def comparisons(judgments: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], OrderedComparison]:
    """(x, y) -> both orders combined, for every pair asked in both orders (by the same judge);
    with several judges, their P(x better) are averaged and consistency needs all of them."""
    by_order: dict[tuple[str, str, str], float] = {}
    for j in judgments:
        if j["kind"] == "pairwise":
            by_order[(j["judge"], j["response_id"], j["other_response_id"])] = j["score"]
    per_pair: dict[tuple[str, str], list[OrderedComparison]] = defaultdict(list)
    for (judge, first, second), p_first in by_order.items():
        if first < second and (judge, second, first) in by_order:
            per_pair[(first, second)].append(
                combine_orders(p_first, by_order[(judge, second, first)])
            )
    out: dict[tuple[str, str], OrderedComparison] = {}
    for key, found in per_pair.items():
        if len(found) == 1:
            out[key] = found[0]
            continue
        p1 = sum(c.p_first_when_x_first for c in found) / len(found)
        p2 = sum(c.p_first_when_y_first for c in found) / len(found)
        merged = combine_orders(p1, p2)
        out[key] = OrderedComparison(merged.p_x_better, all(c.consistent for c in found), p1, p2)
    return out


def select_branch_pairs(
    branch_id: str,
    questions: pa.Table,
    responses: pa.Table,
    judgments: pa.Table,
    config: RunConfig,
) -> tuple[StageOutput, pa.Table]:
    """-> (the stage output whose rows are the pairs, the rankings table)."""
    pairs_config = config.stages.pairs
    weights = score_weights(pairs_config, config.stages.judge)
    # Only the columns selection reads: the text columns (raw answers, rationales, responses)
    # are most of the bytes, and converting them to Python was most of this stage's time.
    judgment_rows = judgments.select(list(JUDGMENT_COLUMNS)).to_pylist()
    candidates = candidates_from_judgments(
        responses.select(list(RESPONSE_COLUMNS)).to_pylist(),
        judgment_rows,
        config.stages.judge.aggregate,
    )
    groups = safety_groups(
        safety_rates(c for cs in candidates.values() for c in cs), pairs_config.safety_groups
    )
    pairwise = comparisons(judgment_rows)
    pair_rows: list[dict[str, Any]] = []
    ranking_rows: list[dict[str, Any]] = []
    failures: list[FailureRow] = []
    question_ids = sorted(questions.column("question_id").to_pylist())
    with_pairs = 0
    for question_id in question_ids:
        selection = select_pairs(
            question_id,
            candidates.get(question_id, []),
            pairs_config,
            pairwise=pairwise,
            groups=groups,
            weights=weights,
        )
        ranking_rows.extend(r.as_row(branch_id) for r in selection.rankings)
        if selection.pairs:
            with_pairs += 1
            pair_rows.extend(p.as_row(branch_id) for p in selection.pairs)
        else:
            reason = selection.no_pair.reason if selection.no_pair else "no pair"
            failures.append(FailureRow(question_id, "no_pair", reason, 0))
    output = StageOutput(
        stage="pairs",
        branch_id=branch_id,
        unit="questions",
        n_in=len(question_ids),
        n_out=with_pairs,
        rows=table(pair_rows, PAIRS),
        failures=tuple(failures),
        extra={
            "pairs": len(pair_rows),
            "policy": pairs_config.policy,
            "groups": groups,
            # Responses with no text to train on (empty or whitespace): never paired or ranked.
            "unusable_responses": sum(not c.usable for cs in candidates.values() for c in cs),
        },
    )
    return output, table(ranking_rows, RANKINGS)
