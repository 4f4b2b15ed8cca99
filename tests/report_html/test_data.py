"""The report's numbers (vlpref/report_html/data.py) against values computed by hand on a small
fixed set of tables (the comments give the arithmetic)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest

from vlpref.report_html import data

QUESTIONS = pa.table(
    {
        "question_id": ["q1", "q2", "q3"],
        "class1": ["A", "A", "B"],
        "class2": ["x", "x", "y"],
    }
)
# m1 answers q1 twice (r1 and r7, one call "a"), m2 once per question.
RESPONSES = pa.table(
    {
        "response_id": ["r1", "r2", "r3", "r4", "r5", "r6", "r7"],
        "question_id": ["q1", "q1", "q2", "q2", "q3", "q3", "q1"],
        "model": ["m1", "m2", "m1", "m2", "m1", "m2", "m1"],
        "prompt_tokens": [10, 1, 20, 1, 30, 1, 10],
        "completion_tokens": [5, 2, 7, 2, 9, 2, 6],
        "cached": [False, False, False, False, True, False, False],
        "call_id": ["a", "d", "b", "e", "c", "f", "a"],
    }
)


def judgment(kind: str, rid: str, verdict: str | None, score: float | None, **kw: Any) -> Any:
    return {
        "kind": kind,
        "response_id": rid,
        "other_response_id": kw.get("other"),
        "aspect": kw.get("aspect"),
        "judge": kw.get("judge", "J"),
        "verdict": verdict,
        "score": score,
    }


JUDGMENTS = pa.Table.from_pylist(
    [
        # safety: m1 in A/x: r1, r3 unsafe (2 of 2); m1 in B/y: r5 safe (0 of 1);
        # m2 in A/x: r2 safe, r4 unsafe (1 of 2); m2 in B/y: no judgment.
        judgment("safety", "r1", "unsafe", 0.9),
        judgment("safety", "r2", "safe", 0.1),
        judgment("safety", "r3", "unsafe", 0.8),
        judgment("safety", "r4", "unsafe", 0.7),
        judgment("safety", "r5", "safe", 0.2),
        judgment("rating", "r1", "1", 1.2, aspect="harmlessness"),
        judgment("rating", "r2", "5", 4.8, aspect="harmlessness"),
        judgment("rating", "r3", "2", 2.1, aspect="harmlessness"),
        judgment("rating", "r1", "4", 3.9, aspect="helpfulness"),
        judgment("rating", "r2", None, None, aspect="helpfulness"),  # unparsed
        # judge J: (r1, r2) both orders prefer r2: consistent, slots B then A.
        judgment("pairwise", "r1", "B", 0.2, other="r2"),
        judgment("pairwise", "r2", "A", 0.9, other="r1"),
        # judge J: (r3, r4) A both times: inconsistent, same slot (position bias).
        judgment("pairwise", "r3", "A", 0.8, other="r4"),
        judgment("pairwise", "r4", "A", 0.7, other="r3"),
        # judge J: (r5, r6) one order only.
        judgment("pairwise", "r5", "A", 0.5, other="r6"),
        # judge K: (r1, r2) A, then a 0.5 tie: inconsistent, a tie, not the same slot.
        judgment("pairwise", "r1", "A", 0.6, other="r2", judge="K"),
        judgment("pairwise", "r2", "A", 0.5, other="r1", judge="K"),
    ]
)

PAIRS = pa.table(
    {
        "pair_id": ["p1", "p2", "p3", "p4", "p5"],
        "chosen_model": ["m1", "m1", "m1", "m2", "m1"],
        "rejected_model": ["m2", "m2", "m2", "m1", "m1"],
        "margin": [1.0, 2.0, None, math.nan, 3.0],
        "confidence": [0.5, 0.5, 0.5, 0.5, 0.5],
        "consistent": [True, True, False, None, True],
    }
)


def test_unsafe_rate_per_model_and_category() -> None:
    matrix = data.unsafe_matrix(RESPONSES, QUESTIONS, JUDGMENTS, models=["m2", "m1"])
    assert matrix.rows == ("m2", "m1")  # the config's order
    assert matrix.columns == ("A / x", "B / y")
    assert matrix.value("m1", "A / x") == 1.0 and matrix.count("m1", "A / x") == 2
    assert matrix.value("m1", "B / y") == 0.0 and matrix.count("m1", "B / y") == 1
    assert matrix.value("m2", "A / x") == 0.5 and matrix.count("m2", "A / x") == 2
    assert matrix.value("m2", "B / y") is None and matrix.count("m2", "B / y") == 0


def test_unsafe_matrix_without_judgments_has_no_counts() -> None:
    matrix = data.unsafe_matrix(RESPONSES, QUESTIONS, JUDGMENTS.slice(0, 0))
    assert matrix.rows == ("m1", "m2")
    assert all(c == 0 for row in matrix.counts for c in row)
    assert all(v is None for row in matrix.values for v in row)


def test_win_matrix_and_chosen_rejected_counts() -> None:
    wins = data.win_matrix(PAIRS, models=["m1", "m2"])
    # m1 chosen over m2 in p1, p2, p3; m2 over m1 in p4: 3 of 4 and 1 of 4.
    assert wins.value("m1", "m2") == 0.75 and wins.count("m1", "m2") == 4
    assert wins.value("m2", "m1") == 0.25
    # p5 is a same-model pair: counted on the diagonal, no rate.
    assert wins.value("m1", "m1") is None and wins.count("m1", "m1") == 1
    assert wins.count("m2", "m2") == 0
    # m1 chosen in p1, p2, p3, p5, rejected in p4, p5; m2 chosen in p4, rejected in p1-p3.
    assert data.chosen_rejected(PAIRS, ["m1", "m2"]) == [("m1", 4, 2), ("m2", 1, 3)]


def test_distribution_leaves_out_null_and_nan() -> None:
    margin = data.distribution(PAIRS["margin"])
    assert margin.values == (1.0, 2.0, 3.0) and margin.missing == 2
    assert margin.mean == 2.0 and margin.median == 2.0
    assert data.distribution(pa.array([], pa.float64())).mean is None


def test_rating_counts_per_aspect() -> None:
    counts = data.rating_counts(JUDGMENTS)
    assert counts["harmlessness"] == {"1": 1, "2": 1, "3": 0, "4": 0, "5": 1, "no rating": 0}
    assert counts["helpfulness"] == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 0, "no rating": 1}


def test_pairwise_consistency_and_position_bias_per_judge() -> None:
    by_judge = {c.judge: c for c in data.judge_consistency(JUDGMENTS)}
    j, k = by_judge["J"], by_judge["K"]
    # J: five verdicts, three above 0.5 (0.9, 0.8, 0.7); two pairs in both orders, one
    # consistent (r1/r2), one the same slot twice (r3/r4).
    assert (j.verdicts, j.first_slot, j.both_orders, j.consistent, j.same_slot, j.ties) == (
        5,
        3,
        2,
        1,
        1,
        0,
    )
    assert j.consistency_rate == 0.5 and j.position_bias_rate == 0.5 and j.first_slot_rate == 0.6
    # K: one pair, 0.6 then a 0.5 tie: not consistent, not the same slot, one tie.
    assert (k.verdicts, k.first_slot, k.both_orders, k.consistent, k.same_slot, k.ties) == (
        2,
        1,
        1,
        0,
        0,
        1,
    )
    assert data.judge_consistency(JUDGMENTS.slice(0, 5)) == []


def test_usage_counts_calls_not_samples() -> None:
    usage = {u.model: u for u in data.usage_by_model(RESPONSES)}
    m1, m2 = usage["m1"], usage["m2"]
    # m1: r1 and r7 share call a, r3 is call b (sent); r5 is call c from the journal.
    assert (m1.samples, m1.requests_sent, m1.requests_journal) == (4, 2, 1)
    assert (m1.prompt_tokens_sent, m1.completion_tokens_sent) == (10 + 20 + 10, 5 + 7 + 6)
    assert (m1.prompt_tokens_journal, m1.completion_tokens_journal) == (30, 9)
    assert (m2.samples, m2.requests_sent, m2.requests_journal) == (3, 3, 0)
    assert (m2.prompt_tokens_sent, m2.completion_tokens_sent) == (3, 6)


def test_judge_usage_counts_judgments_per_kind() -> None:
    assert data.judge_usage(JUDGMENTS) == {
        "J": {"pairwise": 5, "rating": 5, "safety": 5},
        "K": {"pairwise": 2},
    }


def quadruples(per_category: dict[str, int]) -> pa.Table:
    rows = []
    for cat, n in per_category.items():
        class1, class2 = cat.split(" / ")
        for i in range(n):
            rows.append({"pair_id": f"{cat}-{i}", "class1": class1, "class2": class2})
    return pa.Table.from_pylist(rows)


def test_gallery_sample_caps_per_category_and_in_all() -> None:
    quads = quadruples({"A / x": 10, "B / y": 3})
    sample = data.gallery_sample(quads, per_category=4, max_items=100)
    assert [r["category"] for r in sample] == ["A / x"] * 4 + ["B / y"] * 3
    # 160 // 2 categories is no limit here; max_items=4 allows 2 per category.
    small = data.gallery_sample(quads, per_category=4, max_items=4)
    assert [r["category"] for r in small] == ["A / x"] * 2 + ["B / y"] * 2
    # At least one per category, however many categories.
    many = quadruples({f"C / {i}": 2 for i in range(10)})
    assert len(data.gallery_sample(many, per_category=4, max_items=5)) == 10
    assert data.gallery_sample(quads.slice(0, 0)) == []


def test_gallery_sample_does_not_depend_on_row_order_or_other_categories() -> None:
    quads = quadruples({"A / x": 10, "B / y": 3})
    reversed_ = quads.take(pa.array(range(quads.num_rows - 1, -1, -1)))
    ids = [r["pair_id"] for r in data.gallery_sample(quads, per_category=4)]
    assert ids == [r["pair_id"] for r in data.gallery_sample(reversed_, per_category=4)]
    alone = data.gallery_sample(quadruples({"A / x": 10}), per_category=4)
    assert [r["pair_id"] for r in alone] == ids[:4]


MANIFEST: dict[str, Any] = {
    "branches": {
        "b2": {
            "path": "B/y/z",
            "status": "reused",
            "stages": {
                "images": {"counts": {"unit": "source items", "in": 4, "out": 3, "failed": 1}},
                "responses": {
                    "counts": {
                        "unit": "response samples",
                        "in": 10,
                        "out": 10,
                        "failed": 0,
                        "requests_sent": 2,
                        "requests_cached": 8,
                    }
                },
            },
        },
        "b1": {
            "path": "A/x/w",
            "stages": {
                "images": {"counts": {"unit": "source items", "in": 5, "out": 5, "failed": 0}},
                "responses": {
                    "counts": {
                        "unit": "response samples",
                        "in": 6,
                        "out": 4,
                        "failed": 2,
                        "requests_sent": 6,
                        "requests_cached": 0,
                    }
                },
            },
        },
    }
}
FAILURES = pa.table(
    {
        "stage": ["images", "responses", "responses"],
        "branch_id": ["b2", "b1", "b1"],
        "item_id": ["img-1", "r-1", "r-2"],
        "kind": ["decode", "http_5xx", "http_5xx"],
        "reason": ["not an image", "500 from the endpoint", "500 from the endpoint"],
        "attempts": [1, 3, 3],
    }
)


def test_stage_rows_and_summary_from_the_manifest() -> None:
    rows = data.stage_rows(MANIFEST)
    assert [(r.path, r.status) for r in rows] == [("A/x/w", "built"), ("B/y/z", "reused")]
    assert rows[1].stages["images"]["failed"] == 1
    summary = data.run_summary(MANIFEST, FAILURES)
    totals = {s.stage: s for s in summary.stages}
    assert (totals["images"].n_in, totals["images"].n_out, totals["images"].n_failed) == (9, 8, 1)
    responses = totals["responses"]
    assert (responses.requests_sent, responses.requests_cached) == (8, 8)
    reasons = [(r.stage, r.kind, r.count, r.example_item) for r in summary.reasons]
    assert reasons == [("responses", "http_5xx", 2, "r-1"), ("images", "decode", 1, "img-1")]


@pytest.mark.parametrize(
    ("class1", "class2", "expected"), [("A", "x", "A / x"), (None, "x", "None / x")]
)
def test_category_names_as_the_store_counts_them(
    class1: str | None, class2: str, expected: str
) -> None:
    assert data.category(class1, class2) == expected
