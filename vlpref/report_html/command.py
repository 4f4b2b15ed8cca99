"""`vlpref report [VERSION]`: build a version's report again, outside the version.

A version is immutable (`vlpref.store`): its own `report.html`, written at publish, is never
rewritten. A rebuilt report (a newer vlpref, a version published before reports existed, or one
whose report failed) goes to `--out PATH`, or by default to `<workspace>/reports/<version>.html`
(the run config's workspace with `--config`, the current folder's `reports/` with `--store`).
The path is printed on stdout, and `--open` opens it in the default web browser.

Registered on the `vlpref` app by `vlpref.cli` (`app.command("report")(report)`); the store
options and version lookup are the `versions` commands' own.
"""

from __future__ import annotations

import time
import webbrowser
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["default_output", "report"]


def default_output(version_id: str, config: str | Path | None) -> Path:
    """`<workspace>/reports/<version_id>.html`: the config's workspace (a local folder) when a
    config is given, else the current folder."""
    base = Path.cwd()
    if config is not None:
        from vlpref.config import load_config

        workspace = load_config(config).workspace
        if "://" not in workspace:
            base = Path(workspace)
    return base / "reports" / f"{version_id}.html"


def report(
    version: Annotated[
        str | None, typer.Argument(help="version id, or 'latest' (the default)")
    ] = None,
    store: cli.StoreOption = None,
    config: cli.ConfigOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="where to write the report (default: <workspace>/reports/<version>.html)",
        ),
    ] = None,
    open_: Annotated[
        bool, typer.Option("--open", help="open the report in the default web browser")
    ] = False,
) -> None:
    """Build a version's report (report.html: plots and a sample gallery) again, outside the
    version (versions are never rewritten), and print where it is."""
    from vlpref.report_html import write_report

    st = cli._store(store, config)
    v = st.open(cli._resolve_version(st, version or "latest"))
    target = out if out is not None else default_output(v.version_id, config)
    started = time.perf_counter()
    path = write_report(v, target).resolve()
    elapsed = time.perf_counter() - started
    size_kb = path.stat().st_size / 1024
    Console(stderr=True).print(
        f"report of {v.version_id}: {size_kb:,.0f} KB, built in {elapsed:.1f} s",
        highlight=False,
    )
    print(path)
    if open_:
        webbrowser.open(path.as_uri())


# Last, and the module rather than its names: `vlpref.cli` imports this module at its own end to
# register `report`, so whichever of the two is imported first, the other finds what it needs
# already defined. The annotations above (`cli.StoreOption`...) are strings that typer resolves
# only when the app runs, when both modules are complete.
import vlpref.cli as cli  # noqa: E402
