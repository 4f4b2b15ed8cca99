"""The admission rule for answering branches (`vlpref.scheduling`), apart from Prefect."""

from __future__ import annotations

import pytest

from vlpref.scheduling import AnswerBudget


def test_a_branch_starts_when_nothing_is_answering_however_large() -> None:
    budget = AnswerBudget(branches=4, responses=100)
    assert budget.admits([], 1)
    assert budget.admits([], 10_000)  # larger than the budget: it answers alone


@pytest.mark.parametrize(
    ("answering", "size", "admitted"),
    [
        ([40], 60, True),  # exactly the budget
        ([40], 61, False),  # one sample over
        ([10, 10, 10], 10, True),  # the fourth branch
        ([10, 10, 10, 10], 1, False),  # a fifth: over the branch count, within the samples
        ([150], 1, False),  # an oversized branch answers alone
    ],
)
def test_both_limits_hold(answering: list[int], size: int, admitted: bool) -> None:
    assert AnswerBudget(branches=4, responses=100).admits(answering, size) is admitted


def test_empty_branches_only_count_against_the_branch_limit() -> None:
    budget = AnswerBudget(branches=2, responses=5)
    assert budget.admits([5], 0)
    assert not budget.admits([0, 0], 0)
