"""What every stage returns for one branch: its rows, its failures, and the count that ties them.

The invariant `n_in == n_out + n_failed` is checked when the result is built, so a stage that
loses a row fails loudly at once instead of publishing a dataset with silent holes. What "a row
in" means is the stage's own unit (an image source item, an image, a question, a response...)
and is stated in `unit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vlpref.records import FAILURES, table


@dataclass(frozen=True, slots=True)
class FailureRow:
    item_id: str
    kind: str
    reason: str
    attempts: int = 1


@dataclass(frozen=True)
class StageOutput:
    stage: str
    branch_id: str
    unit: str
    n_in: int
    rows: pa.Table
    failures: tuple[FailureRow, ...] = ()
    n_out: int = -1  # -1: the number of rows
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific counters

    def __post_init__(self) -> None:
        if self.n_out < 0:
            object.__setattr__(self, "n_out", self.rows.num_rows)
        if self.n_in != self.n_out + len(self.failures):
            raise AssertionError(
                f"{self.stage}/{self.branch_id}: accounting broken: {self.n_in} {self.unit} in, "
                f"{self.n_out} out, {len(self.failures)} failed"
            )

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def failed_items(self) -> list[str]:
        return [f.item_id for f in self.failures]

    def failures_table(self) -> pa.Table:
        return table(
            (
                {
                    "stage": self.stage,
                    "branch_id": self.branch_id,
                    "item_id": f.item_id,
                    "kind": f.kind,
                    "reason": f.reason,
                    "attempts": f.attempts,
                }
                for f in self.failures
            ),
            FAILURES,
        )

    def counts(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "in": self.n_in,
            "out": self.n_out,
            "failed": self.n_failed,
            **self.extra,
        }
