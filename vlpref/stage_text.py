"""A stage output's counts as one line of text, for the task's log (the log file, `-v` on the
console, and the task run's logs in the Prefect UI):

    questions/cyber-4a02aa8c: 24 question slots in, 24 out, 0 failed; 16 sent, 0 from the
    journal; 0.4 s   (one line)

Pure; the counts are `StageOutput.counts()` as the workspace keeps them (`unit`, `in`, `out`,
`failed`, and the stage's extras: `requests_sent`, `requests_cached`, `pairs`, `elapsed_s`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def describe_counts(stage: str, counts: Mapping[str, Any], branch_id: str | None = None) -> str:
    """`stage[/branch]: N <unit> in, N out, N failed[; N sent, N from the journal][; ...; T s]`.
    The request part only for stages that make model requests (their counts carry
    `requests_sent`); the time only when the output was timed."""
    where = f"{stage}/{branch_id}" if branch_id else stage
    unit = str(counts.get("unit") or "rows")
    parts = [
        f"{_int(counts.get('in'))} {unit} in, {_int(counts.get('out'))} out, "
        f"{_int(counts.get('failed'))} failed"
    ]
    if "requests_sent" in counts or "requests_cached" in counts:
        parts.append(
            f"{_int(counts.get('requests_sent'))} sent, "
            f"{_int(counts.get('requests_cached'))} from the journal"
        )
    if "pairs" in counts:
        parts.append(f"{_int(counts.get('pairs'))} pairs")
    if _int(counts.get("duplicates")):
        parts.append(f"{_int(counts.get('duplicates'))} duplicates")
    elapsed = counts.get("elapsed_s")
    if isinstance(elapsed, int | float):
        parts.append(f"{elapsed:.1f} s")
    return f"{where}: " + "; ".join(parts)
