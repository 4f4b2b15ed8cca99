"""The console view of a plan (`vlpref plan`): per stage and model, then the totals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from flows.plan import Plan
    from vlpref.planning import Line


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4f}"


def _row(plan: Plan, line: Line, *, branch: bool) -> list[str]:
    status = "reused" if line.reused else ""
    bound = f"<= {line.bound:,}" if line.bound else "0"
    cells = [line.stage, *([line.branch] if branch else []), line.model, status]
    return [
        *cells,
        f"{line.from_journal:,}",
        f"{line.to_send:,}",
        bound,
        f"{line.prompt_tokens:,}",
        f"{line.completion_tokens:,}",
        _money(plan.cost_of(line)),
    ]


def print_plan(plan: Plan, *, by_branch: bool = False, console: Console | None = None) -> None:
    """The plan as a table, then one line of totals and what the columns mean."""
    console = console or Console()
    by = ("stage", "branch", "model") if by_branch else ("stage", "model")
    table = Table(title=f"plan: {plan.config} ({plan.branches} branch(es))", title_justify="left")
    for name in ("stage", *(["branch"] if by_branch else []), "model", ""):
        table.add_column(name)
    for name in ("journal", "to send", "depends", "prompt tok", "completion tok", "cost"):
        table.add_column(name, justify="right")
    order = {"images": 0, "questions": 1, "responses": 2, "judge": 3, "pairs": 4}
    for line in sorted(plan.totals(by), key=lambda x: (order.get(x.stage, 9), x.branch, x.model)):
        table.add_row(*_row(plan, line, branch=by_branch))
    console.print(table)
    data = plan.to_json()
    req = data["requests"]
    cost = data["cost"]
    priced = ", ".join(data["priced_models"]) or "none"
    console.print(
        f"requests: {req['to_send']:,} to send, up to {req['bound']:,} more that depend on answers "
        f"not known yet, {req['from_journal']:,} answered by the journal; tokens (estimated): "
        f"{data['tokens']['prompt']:,} prompt, {data['tokens']['completion']:,} completion; "
        f"cost: {_money(cost)} (models with a price: {priced})",
        highlight=False,
    )
    console.print(
        "'depends': an upper bound (questions from captions not yet written, calls on responses "
        "not yet answered, pairwise and reasoning calls that follow verdicts to come); re-asks "
        "of unreadable answers and provider retries are not counted.",
        highlight=False,
        style="dim",
    )


def planned_vs_sent(manifest: Mapping[str, Any]) -> list[tuple[str, int, int, int]]:
    """(stage, planned to send, planned bound, sent) for a version whose run was planned
    (`vlpref run --plan`): what this run sent is the requests of the stage outputs it computed
    (a reused output sent nothing in this run)."""
    plan = manifest.get("plan")
    if not plan:
        return []
    sent: dict[str, int] = {}
    for branch in manifest.get("branches", {}).values():
        if branch.get("status") == "shared":
            continue
        for stage, info in branch.get("stages", {}).items():
            if not info.get("reused"):
                sent[stage] = sent.get(stage, 0) + int(info["counts"].get("requests_sent", 0))
    return [
        (stage, int(p["to_send"]), int(p["bound"]), sent.get(stage, 0)) for stage, p in plan.items()
    ]


def print_planned_vs_sent(manifest: Mapping[str, Any], console: Console) -> None:
    rows = planned_vs_sent(manifest)
    if not rows:
        return
    table = Table(title="requests: planned before the run, and sent", title_justify="left")
    for name in ("stage", "planned", "depends (<=)", "sent"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for stage, exact, bound, sent in rows:
        table.add_row(stage, f"{exact:,}", f"{bound:,}", f"{sent:,}")
    console.print(table)
