"""What a run did, in one place: rows in / out / failed per stage, and why rows failed.

The same summary is made from a run's stage outputs (the flow, before publishing, so a run that
publishes nothing still says why) and from a published version (its manifest counts and its
failures table). It is printed at the end of `vlpref run`, written as the `vlpref-build` artifact
of the flow run, and it names every (stage, branch) whose failure rate passes `warn_failure_rate`.

Pure logic and rendering; no I/O beyond what the caller hands in.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vlpref.redact import redact

STAGE_ORDER = ("images", "questions", "responses", "judge", "pairs")
# The pairs stage's failures are selection outcomes (a question with no pair), not lost work;
# they are summarised with the rest but never raise an alert.
ALERT_STAGES = frozenset({"images", "questions", "responses", "judge"})
REASON_WIDTH = 160  # an example reason is cut to this many characters


@dataclass(frozen=True, slots=True)
class StageTotals:
    stage: str
    unit: str
    n_in: int
    n_out: int
    n_failed: int
    requests_sent: int = 0
    requests_cached: int = 0

    @property
    def failure_rate(self) -> float:
        return self.n_failed / self.n_in if self.n_in else 0.0


@dataclass(frozen=True, slots=True)
class FailureReason:
    """The failures of one kind at one stage: how many, and the most common reason as example."""

    stage: str
    kind: str
    count: int
    example_item: str
    example_reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    stage: str
    branch_id: str
    n_in: int
    n_failed: int

    def describe(self) -> str:
        rate = self.n_failed / self.n_in if self.n_in else 0.0
        return f"{self.stage}/{self.branch_id}: {self.n_failed} of {self.n_in} failed ({rate:.0%})"


@dataclass(frozen=True)
class RunSummary:
    stages: tuple[StageTotals, ...]
    reasons: tuple[FailureReason, ...]  # most common first
    alerts: tuple[Alert, ...] = ()
    branches_failed: tuple[str, ...] = ()  # "branch: what went wrong" for branches that raised
    threshold: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(s.n_failed for s in self.stages if s.stage in ALERT_STAGES)

    def to_markdown(self, *, title: str = "vlpref build") -> str:
        lines = [f"# {title}", ""]
        if self.branches_failed:
            lines += [f"**{len(self.branches_failed)} branch(es) failed:**", ""]
            lines += [f"- {b}" for b in self.branches_failed] + [""]
        lines += [
            "| stage | unit | in | out | failed | sent | from journal |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for s in self.stages:
            lines.append(
                f"| {s.stage} | {s.unit} | {s.n_in} | {s.n_out} | {s.n_failed} | "
                f"{s.requests_sent} | {s.requests_cached} |"
            )
        if self.alerts:
            lines += ["", f"**Failure rate over {self.threshold:.0%}:**", ""]
            lines += [f"- {a.describe()}" for a in self.alerts]
        if self.reasons:
            lines += ["", "## Most common failures", ""]
            lines += ["| stage | kind | count | example item | example reason |"]
            lines += ["|---|---|--:|---|---|"]
            for r in self.reasons:
                reason = r.example_reason.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {r.stage} | {r.kind} | {r.count} | {r.example_item} | {reason} |")
        return "\n".join(lines) + "\n"


def summarize(
    counts: Iterable[tuple[str, str, Mapping[str, Any]]],
    failures: Iterable[pa.Table],
    *,
    threshold: float,
    branches_failed: Iterable[str] = (),
    top: int = 12,
) -> RunSummary:
    """`counts`: (stage, branch_id, the stage output's counts) for every output of the run;
    `failures`: failures tables (columns stage, item_id, kind, reason)."""
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    units: dict[str, str] = {}
    alerts = []
    for stage, branch_id, c in counts:
        units[stage] = str(c.get("unit", ""))
        n_in, n_failed = int(c.get("in") or 0), int(c.get("failed") or 0)
        totals[stage].update(
            {
                "in": n_in,
                "out": int(c.get("out") or 0),
                "failed": n_failed,
                "sent": int(c.get("requests_sent") or 0),
                "cached": int(c.get("requests_cached") or 0),
            }
        )
        if stage in ALERT_STAGES and n_in and n_failed / n_in > threshold:
            alerts.append(Alert(stage, branch_id, n_in, n_failed))
    stages = tuple(
        StageTotals(
            stage,
            units[stage],
            totals[stage]["in"],
            totals[stage]["out"],
            totals[stage]["failed"],
            totals[stage]["sent"],
            totals[stage]["cached"],
        )
        for stage in sorted(totals, key=_stage_rank)
    )
    return RunSummary(
        stages=stages,
        reasons=failure_reasons(failures, top=top),
        alerts=tuple(alerts),
        branches_failed=tuple(branches_failed),
        threshold=threshold,
    )


def failure_reasons(failures: Iterable[pa.Table], *, top: int = 12) -> tuple[FailureReason, ...]:
    """Failures grouped by (stage, kind), most common first; each with its most common reason
    and an item that failed for it."""
    groups: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    examples: dict[tuple[str, str, str], str] = {}
    for tbl in failures:
        if tbl.num_rows == 0:
            continue
        columns = [tbl.column(c).to_pylist() for c in ("stage", "kind", "reason", "item_id")]
        for stage, kind, reason, item in zip(*columns, strict=True):
            groups[(stage, kind)][reason] += 1
            examples.setdefault((stage, kind, reason), item)
    out = []
    for (stage, kind), reasons in groups.items():
        reason, _ = reasons.most_common(1)[0]
        # The summary becomes a Prefect artifact: redacted (a stage output written before
        # redaction existed may hold an echoed key), and before it is cut.
        shown = redact(reason)
        shown = shown if len(shown) <= REASON_WIDTH else shown[: REASON_WIDTH - 1] + "…"
        out.append(
            FailureReason(
                stage, kind, sum(reasons.values()), examples[(stage, kind, reason)], shown
            )
        )
    out.sort(key=lambda r: (-r.count, _stage_rank(r.stage), r.kind))
    return tuple(out[:top])


def stage_alert(stage: str, counts: Mapping[str, Any], threshold: float) -> str | None:
    """A one-line warning when a stage output's failure rate passes the threshold."""
    n_in, n_failed = int(counts.get("in") or 0), int(counts.get("failed") or 0)
    if stage not in ALERT_STAGES or not n_in or n_failed / n_in <= threshold:
        return None
    return f"{n_failed} of {n_in} {counts.get('unit', 'rows')} failed ({n_failed / n_in:.0%})"


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
