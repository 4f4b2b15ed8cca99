"""`vlpref index`: the embedded retrieval index's commands (vlpref/images/index.py).

    vlpref index build POOL --model MODEL_DIR --out INDEX_DIR

Registered in vlpref/cli.py with `app.add_typer(index_app, name="index")`. Errors are
VlprefErrors (a missing model folder, an unreadable manifest, the `retrieval` extra not
installed), which `vlpref`'s entry point prints as one `error: ...` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["build", "index_app"]

index_app = typer.Typer(
    help="Local CLIP retrieval indices over your own images (the retrieval source's `index`).",
    no_args_is_help=True,
)


@index_app.callback()
def _group() -> None:
    """Local CLIP retrieval indices (a callback keeps `build` a subcommand, not the app)."""


@index_app.command("build")
def build(
    pool: Annotated[
        Path, typer.Argument(help="a folder of images, or a CSV/TSV/JSONL/Parquet with `path`")
    ],
    model: Annotated[
        Path,
        typer.Option(
            "--model", help="open_clip model folder (open_clip_config.json + weights); no download"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="the index folder to write")],
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="images embedded at once")] = 32,
    max_bytes: Annotated[
        int, typer.Option(min=1024, help="larger files are left out, unread")
    ] = 20_000_000,
) -> None:
    """Embed every image of POOL with the CLIP model and write a FAISS index to OUT."""
    from vlpref.images.index import build_index

    report = build_index(pool, model, out, batch_size=batch_size, max_bytes=max_bytes)
    typer.echo(
        f"indexed {report.indexed} image(s) in {report.seconds:.1f} s -> {report.out}"
        + (f"; {len(report.skipped)} left out (see index.json)" if report.skipped else "")
    )
    for item, why in sorted(report.skipped.items())[:10]:
        typer.echo(f"  left out {item}: {why}", err=True)
