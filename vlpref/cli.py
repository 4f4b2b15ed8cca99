"""The `vlpref` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from vlpref.errors import VlprefError

app = typer.Typer(
    name="vlpref",
    help="Build safety preference datasets for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)


# Served when `vlpref sim-server` gets no --config: one model per persona.
DEFAULT_SIM_MODELS = {
    f"sim-{persona}": {"persona": persona}
    for persona in (
        "refuser",
        "safe-helpful",
        "over-compliant",
        "jailbroken",
        "mixed",
        "filtered",
        "echo",
        "judge",
    )
}


@app.command("sim-server")
def sim_server(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0 picks a free one)")] = 8765,
    config: Annotated[
        Path | None, typer.Option(help="sim config YAML (personas, faults, latency)")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind; keep it on loopback")] = "127.0.0.1",
) -> None:
    """Serve the simulated OpenAI-compatible endpoint (a test double: never a real model)."""
    import asyncio

    from vlpref.sim.__main__ import serve
    from vlpref.sim.config import load_config as load_sim_config

    sim_config = load_sim_config(config if config else {"models": DEFAULT_SIM_MODELS})
    asyncio.run(serve(sim_config, host, port))


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="taxonomy path prefix to build (repeatable)"),
    ] = None,
) -> None:
    """Build a new dataset version (one Prefect flow run)."""
    import time

    from vlpref.config import load_config
    from vlpref.report import print_summary
    from vlpref.taxonomy import load_taxonomy

    cfg = load_config(config)  # fail on a bad config before Prefect starts
    selected = only or (list(cfg.only) or None)
    leaves = load_taxonomy(cfg.taxonomy).select(selected)
    started = time.perf_counter()
    version_id = _run_with_progress(str(config), only or None, len(leaves))
    print_summary(str(config), version_id, time.perf_counter() - started, console=Console())


def _run_with_progress(config: str, only: list[str] | None, branches: int) -> str:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows import progress
    from flows.build import STAGES, build_dataset

    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        ids = {stage: bars.add_task(stage, total=branches) for stage in STAGES}

        def advance(stage: str, branch_id: str, counts: dict[str, object]) -> None:
            if stage in ids:
                bars.advance(ids[stage])

        unsubscribe = progress.subscribe(advance)
        try:
            return build_dataset(config, only)
        finally:
            unsubscribe()


@app.command("check")
def check(config: Annotated[Path, typer.Argument(help="run config YAML")]) -> None:
    """Validate a run config (and its taxonomy) without running anything."""
    from vlpref.config import load_config

    cfg = load_config(config)
    console.print(
        f"[green]ok[/green] {config}: {len(cfg.models)} response model(s), "
        f"{len(cfg.judges)} judge(s), {len(cfg.endpoints)} endpoint(s), "
        f"config {cfg.content_hash()[:12]}"
    )


@app.command("providers")
def providers() -> None:
    """List the provider kinds a config may use (built-in and plug-ins)."""
    from vlpref.providers.registry import available_kinds

    for kind in available_kinds():
        typer.echo(kind)


def main() -> None:
    try:
        app()
    except VlprefError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
