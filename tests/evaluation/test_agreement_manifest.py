"""The version manifest's `judge_agreement` block (summable per-branch counts) and the config's
aggregation of several judges' P(unsafe) where candidates are made."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from tasks.judge import candidates_from_judgments
from vlpref.config import JudgeStage
from vlpref.publish.version import agreement_counts, judge_agreement


def _judgments(verdicts: dict[str, dict[str, str]]) -> pa.Table:
    rows = [
        {"kind": "safety", "response_id": rid, "judge": judge, "verdict": v}
        for judge, by_rid in verdicts.items()
        for rid, v in by_rid.items()
    ]
    rows.append({"kind": "rating", "response_id": "r1", "judge": "a", "verdict": "3"})
    return pa.Table.from_pylist(rows)


def test_two_judges_kappa_summed_over_branches() -> None:
    # Branch 1: a = u u, b = u s; branch 2: a = s s, b = s s. Together a = u u s s, b = u s s s:
    # p_o = 3/4, p_e = (2*1 + 2*3) / 16 = 1/2, kappa = (3/4 - 1/2) / (1/2) = 0.5
    one = agreement_counts(
        _judgments({"a": {"r1": "u", "r2": "u"}, "b": {"r1": "u", "r2": "s"}}), ["a", "b"]
    )
    two = agreement_counts(
        _judgments({"a": {"r3": "s", "r4": "s"}, "b": {"r3": "s", "r4": "s"}}), ["b", "a"]
    )
    assert one is not None and one["contingency"] == {"u|u": 1, "u|s": 1}
    branches: dict[str, dict[str, Any]] = {
        "x": {"judge_agreement_counts": one},
        "y": {"judge_agreement_counts": two},
        "old": {},  # published before the counts existed
    }
    got = judge_agreement(branches, ["a", "b"])
    assert got["metric"] == "cohen_kappa" and got["items"] == 4
    assert got["value"] == pytest.approx(0.5) and got["branches_without_counts"] == 1


def test_three_judges_alpha_and_one_judge() -> None:
    # Units [u,u,u], [s,s,s], [u,s,s]: alpha = 1 - 8 * 2 / 40 = 0.6 (worked in test_metrics)
    verdicts = {
        "a": {"1": "u", "2": "s", "3": "u"},
        "b": {"1": "u", "2": "s", "3": "s"},
        "c": {"1": "u", "2": "s", "3": "s"},
    }
    counts = agreement_counts(_judgments(verdicts), ["a", "b", "c"])
    got = judge_agreement({"x": {"judge_agreement_counts": counts}}, ["c", "b", "a"])
    assert got["metric"] == "krippendorff_alpha" and got["value"] == pytest.approx(0.6)
    assert agreement_counts(_judgments({"a": {"1": "u"}}), ["a"]) is None
    assert judge_agreement({}, ["a"])["value"] is None


@pytest.mark.parametrize(
    ("aggregate", "expected"), [("mean", 0.5), ("majority", 2 / 3), ("any_unsafe", 0.7)]
)
def test_aggregate_chooses_how_judges_combine(aggregate: str, expected: float) -> None:
    assert JudgeStage().aggregate == "mean"
    assert JudgeStage(aggregate=aggregate).aggregate == aggregate  # type: ignore[arg-type]
    response = {
        "response_id": "r",
        "question_id": "q",
        "model": "m",
        "sample_idx": 0,
        "finish_reason": "stop",
        "text": "t",
    }
    judgments = [
        {"kind": "safety", "response_id": "r", "aspect": None, "score": p} for p in (0.2, 0.6, 0.7)
    ]
    (candidate,) = candidates_from_judgments([response], judgments, aggregate)["q"]
    assert candidate.p_unsafe == pytest.approx(expected)
