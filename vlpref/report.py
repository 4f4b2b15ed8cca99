"""A short human summary of a published version (used by `vlpref run` and the demo)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from vlpref.config import load_config
from vlpref.store import Store


def print_summary(
    config_path: str,
    version_id: str,
    elapsed_s: float | None = None,
    server_counters: dict[str, Any] | None = None,
    console: Console | None = None,
) -> None:
    console = console or Console()
    config = load_config(config_path)
    version = Store(config.store).open(version_id)
    manifest = version.manifest
    console.print(f"\n[bold]dataset version[/bold] {version_id}")
    console.print(f"location: {version.path('')}")
    if elapsed_s is not None:
        console.print(f"built in {elapsed_s:.1f} s")

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

    stages = Table(title="rows in / out / failed per stage (all branches)")
    for column in ("stage", "unit", "in", "out", "failed"):
        stages.add_column(column, justify="left" if column in ("stage", "unit") else "right")
    totals: dict[str, Counter[str]] = {}
    units: dict[str, str] = {}
    for branch in manifest.get("branches", {}).values():
        for stage, info in branch["stages"].items():
            counts = info["counts"]
            units[stage] = counts.get("unit", "")
            totals.setdefault(stage, Counter()).update(
                {k: int(counts.get(k) or 0) for k in ("in", "out", "failed")}
            )
    for stage, total in totals.items():
        stages.add_row(
            stage, units[stage], str(total["in"]), str(total["out"]), str(total["failed"])
        )
    console.print(stages)
    if server_counters is not None:
        console.print(f"requests that reached the simulated server: {server_counters.get('total')}")
