"""A short human summary of a published version (used by `vlpref run` and the demo).

It ends with the path of the version's report (report.html, `vlpref.report_html`), the page with
the plots and the gallery that this summary only sketches.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from vlpref.config import load_config
from vlpref.plan_report import print_planned_vs_sent
from vlpref.report_html import REPORT_NAME
from vlpref.run_summary import RunSummary, summarize
from vlpref.store import Store, Version


def print_summary(
    config_path: str,
    version_id: str,
    elapsed_s: float | None = None,
    server_counters: dict[str, Any] | None = None,
    console: Console | None = None,
    log_file: str | None = None,
) -> None:
    console = console or Console()
    config = load_config(config_path)
    version = Store(config.store).open(version_id)
    manifest = version.manifest
    console.print(f"\n[bold]dataset version[/bold] {version_id}")
    console.print(f"location: {version.path('')}", soft_wrap=True, highlight=False)
    if elapsed_s is not None:
        console.print(f"built in {elapsed_s:.1f} s")
    if log_file is not None:  # the run's log lines (vlpref/run_log.py)
        console.print(f"log: {log_file}", markup=False, highlight=False, soft_wrap=True)

    splits = Table(title="quadruples per split and category (class2)")
    splits.add_column("category")
    names = version.splits
    for name in names:
        splits.add_column(name, justify="right")
    per_split = {name: Counter(version.split(name).column("class2").to_pylist()) for name in names}
    for category in sorted(set().union(*per_split.values()) if per_split else []):
        splits.add_row(category, *(str(per_split[n][category]) for n in names))
    splits.add_row("[bold]total[/bold]", *(str(sum(per_split[n].values())) for n in names))
    console.print(splits)

    safety = Table(title="response models (judged by the safety verdict)")
    for column in ("model", "responses", "unsafe rate", "mean P(unsafe)"):
        safety.add_column(column, justify="left" if column == "model" else "right")
    for model, stats in manifest.get("model_safety", {}).items():
        safety.add_row(
            model,
            str(stats["responses"]),
            f"{stats['unsafe_rate']:.1%}",
            f"{stats['mean_p_unsafe']:.3f}",
        )
    console.print(safety)

    counts = (
        (stage, branch_id, info["counts"])
        for branch_id, branch in manifest.get("branches", {}).items()
        for stage, info in branch["stages"].items()
    )
    failures = version.table("failures", ["stage", "kind", "reason", "item_id"])
    print_run_summary(
        summarize(counts, [failures], threshold=config.warn_failure_rate), console=console
    )
    print_planned_vs_sent(manifest, console)
    if server_counters is not None:
        console.print(f"requests that reached the simulated server: {server_counters.get('total')}")
    print_report_path(version, console)


def report_location(version: Version) -> str | None:
    """Where the version's report.html is, or None when it has none (published before versions
    had reports, or its report failed to build: the run's log says why)."""
    if REPORT_NAME not in version.manifest["files"]:
        return None
    return version.path(REPORT_NAME)


def print_report_path(version: Version, console: Console) -> None:
    """The last line of the summary: the report's path, alone on its line so that a script can
    take it (`tail -1`)."""
    where = report_location(version)
    if where is None:
        console.print(
            f"report: none in this version; `vlpref report {version.version_id} --store "
            f"{version.store.location}` builds one",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print("report:", highlight=False)
    console.print(where, markup=False, highlight=False, soft_wrap=True)


def print_run_summary(
    summary: RunSummary, console: Console | None = None, log_file: str | None = None
) -> None:
    """The per-stage in / out / failed table, the stages over the failure threshold, and the
    most common failure reasons with an example of each; then the run's log file, if given."""
    console = console or Console()
    for branch in summary.branches_failed:
        console.print(f"branch failed: {branch}", markup=False, highlight=False, soft_wrap=True)
    stages = Table(title="rows in / out / failed per stage (all branches)")
    for column in ("stage", "unit", "in", "out", "failed", "sent", "journal"):
        stages.add_column(column, justify="left" if column in ("stage", "unit") else "right")
    for s in summary.stages:
        failed = f"[red]{s.n_failed}[/red]" if s.n_failed else "0"
        stages.add_row(
            s.stage,
            s.unit,
            str(s.n_in),
            str(s.n_out),
            failed,
            str(s.requests_sent),
            str(s.requests_cached),
        )
    console.print(stages)
    for alert in summary.alerts:
        console.print(
            f"warning: {alert.describe()}, over warn_failure_rate {summary.threshold:g}",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line each, also when piped to a file
        )
    if summary.reasons:
        reasons = Table(title="most common failures", show_lines=False)
        for column in ("stage", "kind", "count", "example"):
            reasons.add_column(column, justify="right" if column == "count" else "left")
        for r in summary.reasons:
            reasons.add_row(r.stage, r.kind, str(r.count), f"{r.example_item}: {r.example_reason}")
        console.print(reasons)
    if log_file is not None:  # the run's log lines (vlpref/run_log.py)
        console.print(f"log: {log_file}", markup=False, highlight=False, soft_wrap=True)
