"""Which prepared branches may start answering: the flow's admission rule, apart from Prefect.

An answering branch (responses, judge, pairs) holds its rows in memory, and how many it holds
grows with its size: questions x response samples per question. Counting branches alone would
let a run of large branches hold ten times what a run of small ones does; counting the response
samples they hold keeps a run's memory near a fixed budget whatever the branch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AnswerBudget:
    """At most `branches` branches answering, holding at most `responses` response samples
    together. A branch larger than the whole budget still runs, alone: nothing waits forever."""

    branches: int
    responses: int

    def admits(self, answering: Sequence[int], size: int) -> bool:
        """Whether a branch of `size` response samples may start, given the sizes of those
        already answering."""
        if not answering:
            return True
        return len(answering) < self.branches and sum(answering) + size <= self.responses
