"""`vlpref export VERSION --format F --out DIR`: the command function (registered by vlpref.cli).

Bad input (an unknown format, split or category, an output folder with files in it) raises a
VlprefError, which `vlpref.cli.main` prints as one `error:` line with exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["export"]


def export(
    version: Annotated[str, typer.Argument(help="version id, or 'latest'")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="trl, llamafactory, swift or listwise")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write (new or empty)")],
    split: Annotated[
        list[str] | None, typer.Option("--split", help="split to export (repeatable; default all)")
    ] = None,
    category: Annotated[
        list[str] | None,
        typer.Option("--category", help="taxonomy path prefix to export (repeatable)"),
    ] = None,
    min_margin: Annotated[
        float | None, typer.Option("--min-margin", help="keep pairs with margin >= this")
    ] = None,
    min_confidence: Annotated[
        float | None, typer.Option("--min-confidence", help="keep pairs with confidence >= this")
    ] = None,
    consistent_only: Annotated[
        bool,
        typer.Option(
            "--consistent-only", help="keep pairs whose pairwise verdicts agreed in both orders"
        ),
    ] = False,
    store: cli.StoreOption = None,
    config: cli.ConfigOption = None,
) -> None:
    """Write a version in a trainer's format, with the same filters for every format; the
    folder gets an export.json (counts, filters, files, the command that trains on it)."""
    # Imported here: `vlpref.cli` registers this command, and every command's start-up should
    # not pay for pyarrow.
    from vlpref.export.core import ExportSpec, export_version
    from vlpref.export.filters import Filters

    st = cli._store(store, config)
    v = st.open(cli._resolve_version(st, version))
    filters = Filters.of(
        splits=split,
        categories=category,
        min_margin=min_margin,
        min_confidence=min_confidence,
        consistent_only=consistent_only,
    )
    result = export_version(v, ExportSpec(format=format, filters=filters), out)
    cli.console.print(f"[green]ok[/green] {result.summary()}", highlight=False, soft_wrap=True)
    cli.console.print(
        f"train with: {result.command}", highlight=False, markup=False, soft_wrap=True
    )


# Imported last, and used only when the command runs: vlpref.cli imports this module to register
# `export`, so whichever of the two is imported first, `export` exists before the other needs it.
# The annotations above are resolved by Typer when the command line is built, not at import.
from vlpref import cli  # noqa: E402
