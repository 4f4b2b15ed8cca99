"""The `vlpref` command line."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

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


def _default_sim_models() -> dict[str, dict[str, str]]:
    """Served when `vlpref sim-server` gets no --config: one model per persona."""
    from typing import get_args

    from vlpref.sim.config import PersonaName

    return {f"sim-{persona}": {"persona": persona} for persona in get_args(PersonaName)}


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

    sim_config = load_sim_config(config if config else {"models": _default_sim_models()})
    asyncio.run(serve(sim_config, host, port))


@app.command("run")
def run(
    # A string, not a Path: a config on shared storage is a URI (`s3://…`), which Path would
    # collapse to `s3:/…` (load_config reads both).
    config: Annotated[str, typer.Argument(help="run config YAML: a path, or a URI (s3://…)")],
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="taxonomy path prefix to build (repeatable)"),
    ] = None,
    runner: Annotated[str, typer.Option(help="task runner: threads, dask or ray")] = "threads",
    workers: Annotated[
        int | None,
        typer.Option(help="local workers: threads, Dask processes, or a local Ray's CPUs"),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="an existing Dask scheduler or Ray cluster address")
    ] = None,
    retry_failed: Annotated[
        str | None,
        typer.Option(
            "--retry-failed",
            help="which failures of earlier runs to ask for again: transient (the config's "
            "default), all, or none",
        ),
    ] = None,
    preflight: Annotated[
        bool,
        typer.Option(
            "--preflight/--no-preflight",
            help="before anything runs, check API keys, endpoints and model ids (GET /models; "
            "no chat request); --no-preflight skips it for this run",
        ),
    ] = True,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="first work out what the run will send (as `vlpref plan`), and show it beside "
            "what was sent at the end (kept in the manifest)",
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="also show Prefect's log lines on the console (they always go to the run's log "
            "file, <workspace>/logs/run-<UTC time>.log)",
        ),
    ] = False,
) -> None:
    """Build a new dataset version (one Prefect flow run)."""
    import time

    from vlpref.config import load_config
    from vlpref.preflight import check as preflight_check
    from vlpref.preflight import skipped
    from vlpref.report import print_summary
    from vlpref.retry import check_policy
    from vlpref.taxonomy import load_taxonomy

    cfg = load_config(config)  # fail on a bad config before Prefect starts
    if retry_failed is not None:
        check_policy(retry_failed)
    # Also before Prefect starts (an error line, no traceback), and before anything is paid for:
    # what `vlpref check` checks (taxonomy, templates, samples, folders, LATEST, key variables),
    # then the network checks unless told not to. The flow then skips what was just checked;
    # `kind: vllm` without vLLM is refused either way.
    preflight_check(
        cfg, network=preflight and cfg.preflight, warn=_warning, local=True, only=only or None
    )
    selected = only or (list(cfg.only) or None)
    leaves = load_taxonomy(cfg.taxonomy).select(selected)
    started = time.perf_counter()
    from flows.runners import task_runner
    from vlpref.prefect_server import check_api_for_cluster
    from vlpref.run_log import log_file_path

    check_api_for_cluster(runner, address)  # before a temporary server is started for nothing
    chosen = task_runner(runner, workers=workers, address=address)
    log_file = log_file_path(cfg.workspace)
    with skipped():
        version_id = _run_with_progress(
            str(config),
            only or None,
            len(leaves),
            chosen,
            retry_failed=retry_failed,
            plan=plan,
            verbose=verbose,
            log_file=log_file,
        )
    print_summary(
        str(config),
        version_id,
        time.perf_counter() - started,
        console=Console(),
        log_file=str(log_file),
    )


def _run_with_progress(
    config: str,
    only: list[str] | None,
    branches: int,
    runner: Any,
    *,
    retry_failed: str | None = None,
    plan: bool = False,
    verbose: bool = False,
    log_file: Path | None = None,
) -> str:
    """Run the flow with the live per-stage board (`vlpref/console_board.py`) on a terminal, a
    line per finished stage when piped; Prefect's log lines go to `log_file` (by default a new
    one in the workspace, `vlpref/run_log.py`) and, with `verbose`, to the console too. The run
    summary the flow hands over is printed when the run fails (a run that succeeds prints it with
    the version's summary)."""
    from rich.live import Live

    from flows import progress
    from flows.build import STAGES, build_dataset
    from flows.stages import STAGES as STAGE_TABLE
    from vlpref.config import load_config
    from vlpref.console_board import StageBoard, finished_line
    from vlpref.prefect_server import prefect_api
    from vlpref.run_log import log_file_path, route_logs

    if log_file is None:
        log_file = log_file_path(load_config(config).workspace)
    board = StageBoard(
        STAGES, branches, requesting=[name for name in STAGES if STAGE_TABLE[name].journaled]
    )
    # No live display when piped: rich would print nothing until the end, and a line per
    # finished stage tells a log reader how far the run got. Counts are the summary's.
    live = console.is_terminal and not console.is_dumb_terminal

    def said(stages: list[str]) -> None:
        if live:
            return
        views = {v.stage: v for v in board.views()}
        for stage in stages:
            line = finished_line(views[stage], board.elapsed(stage))
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    summaries: list[object] = []
    unsubscribes = [
        progress.subscribe(
            lambda stage, branch, counts: said(board.on_done(stage, branch, counts))
        ),
        progress.subscribe_failures(
            lambda stage, branch, error: said(board.on_failed(stage, branch))
        ),
        progress.subscribe_starts(board.on_start),
        progress.subscribe_requests(board.on_request),
        progress.subscribe_plan(board.set_plan),
        progress.subscribe_summary(summaries.append),
    ]
    console.print(f"log: {log_file}", markup=False, highlight=False, soft_wrap=True)
    display = Live(board, console=console, refresh_per_second=4, transient=True) if live else None
    try:
        # Without PREFECT_API_URL, a server of our own that Ctrl-C leaves for us to stop (see
        # there). The board is transient: the summary that follows is the one place for counts.
        with (
            route_logs(log_file, verbose=verbose, console=console),
            prefect_api(log=lambda line: console.print(line, markup=False)),
            display if display is not None else contextlib.nullcontext(),
        ):
            try:
                return build_dataset.with_options(task_runner=runner)(
                    config, only, retry_failed, plan
                )
            except BaseException:
                from vlpref.report import print_run_summary
                from vlpref.run_summary import RunSummary

                if display is not None:
                    display.stop()
                for summary in summaries:
                    if isinstance(summary, RunSummary):
                        print_run_summary(
                            summary, console=Console(stderr=True), log_file=str(log_file)
                        )
                raise
    finally:
        for unsubscribe in unsubscribes:
            unsubscribe()


versions_app = typer.Typer(help="List, show and compare dataset versions.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")

StoreOption = Annotated[str | None, typer.Option("--store", "-s", help="store location")]
# Strings, not Paths: a config on shared storage is a URI (`s3://…`), which Path would collapse.
ConfigOption = Annotated[
    str | None, typer.Option("--config", "-c", help="run config (its store): a path or a URI")
]


def _store(store: str | None, config: str | Path | None) -> Any:
    """The store given, else the store of the run config found as `find_config` finds it (said
    on stderr, so that a user knows which one was used)."""
    from vlpref.config import load_config
    from vlpref.store import Store

    if store is not None:
        return Store(store)
    return Store(load_config(_config_file(config)).store)


def _config_file(config: str | Path | None) -> str | Path:
    """The run config a command uses (`vlpref/config_lookup.py`), said on stderr."""
    from vlpref.config_lookup import find_config

    path, source = find_config(config)
    if source != "--config":
        console.print(f"using config {path} ({source})", highlight=False, markup=False)
    return path


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    # Light borders: at 80 columns every cell of a version table keeps its text (ids whole).
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    if not rows:
        Console().print(f"{title}: none")
        return
    for index, column in enumerate(rows[0]):
        numbers = any(isinstance(row[column], int) for row in rows)
        # The first column (what a row is) and ids keep their width, so rich narrows the
        # others (which wrap at spaces) rather than fold a name or an id mid-word.
        keep = index == 0 or column in ("version", "parent")
        widest = max(len(str(row[column])) for row in rows)
        table.add_column(
            str(column),
            justify="right" if numbers else "left",
            no_wrap=numbers or keep,
            # ... and a short word (a status) stays whole too.
            min_width=min(widest, 32 if keep else 12) if not numbers else None,
        )
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


@versions_app.command("list")
def versions_list(store: StoreOption = None, config: ConfigOption = None) -> None:
    """Every complete version, oldest first. A damaged version (its marker or manifest does not
    read) is listed as DAMAGED with a `warning:` line naming the file; the others are listed as
    usual and the command succeeds: one damaged version does not hide the rest."""
    from vlpref.errors import StoreError
    from vlpref.store import DamagedVersion
    from vlpref.versions import damaged_row, summary_row

    def warn(message: str) -> None:
        console.print(f"warning: {message}", highlight=False, markup=False)

    st = _store(store, config)
    try:
        latest = st.latest()
    except StoreError as exc:
        warn(str(exc))
        latest = None
    rows = []
    for entry in st.scan():
        damage = entry.reason if isinstance(entry, DamagedVersion) else None
        if damage is None:
            try:
                row = summary_row(st.open(entry.version_id).manifest)
            except StoreError as exc:
                damage = str(exc)
            except OSError as exc:  # unreadable (no permission...): the others still list
                damage = _os_error(exc)
        if damage is not None:
            warn(f"version {entry.version_id} is damaged: {damage}")
            row = damaged_row(entry.version_id)
        row["latest"] = "*" if latest and latest.version_id == entry.version_id else ""
        rows.append(row)
    _print_rows(f"versions in {st.location}", rows)


@versions_app.command("show")
def versions_show(
    version: Annotated[str, typer.Argument(help="version id, or 'latest'")],
    store: StoreOption = None,
    config: ConfigOption = None,
) -> None:
    """What a version holds and what produced it."""
    from vlpref.versions import branch_rows, sampling_text, taxonomy_text

    st = _store(store, config)
    v = st.open(_resolve_version(st, version))
    m = v.manifest
    out = Console()
    out.print(f"[bold]{v.version_id}[/bold]  created {m.get('created_at')}")
    out.print(f"parent {m.get('parent') or 'none'}", highlight=False)
    out.print(f"location: {v.path('')}", soft_wrap=True, highlight=False)
    out.print(
        f"config {str(m.get('config_hash'))[:12]}  code {m.get('code_version')}  "
        f"taxonomy {taxonomy_text(m.get('taxonomy'))}",
        highlight=False,
    )
    if m.get("only"):
        out.print(f"branch rerun of {m['only']}; rebuilt: {m.get('rebuilt')}")
    _print_rows("branches", branch_rows(m))
    _print_rows(
        "splits",
        [
            {"split": n, **{k: s[k] for k in ("rows", "images", "questions")}}
            for n, s in m.get("splits", {}).items()
        ],
    )
    models = [
        {
            "role": role,
            "name": e["name"],
            "model": e["model"],
            "sampling": sampling_text(e["sampling"]),
        }
        for role, entries in (
            ("response", m.get("models", [])),
            ("generator", [m["generator"]] if m.get("generator") else []),
            ("judge", m.get("judges", [])),
        )
        for e in entries
    ]
    _print_rows("models", models)
    _print_rows(
        "prompts", [{"template": k, "version": val} for k, val in m.get("prompts", {}).items()]
    )


@versions_app.command("diff")
def versions_diff(
    old: Annotated[str, typer.Argument(help="older version id")],
    new: Annotated[str, typer.Argument(help="newer version id, or 'latest'")],
    store: StoreOption = None,
    config: ConfigOption = None,
) -> None:
    """What changed between two versions: branches, splits, models, prompts, settings."""
    from vlpref.versions import diff

    st = _store(store, config)
    d = diff(
        st.open(_resolve_version(st, old)).manifest, st.open(_resolve_version(st, new)).manifest
    )
    out = Console()
    out.print(f"[bold]{d['old']}[/bold] -> [bold]{d['new']}[/bold]")
    _print_rows("branches changed", d["branches"])
    _print_rows("splits", [{"split": k, **v} for k, v in d["splits"].items()])
    for role in ("models", "judges"):
        changes = d[role]
        if any(changes.values()):
            out.print(f"{role}: " + "; ".join(f"{k} {v}" for k, v in changes.items() if v))
    if d["generator_changed"]:
        out.print("generator changed")
    if d["prompts_changed"]:
        out.print(f"prompts changed: {', '.join(d['prompts_changed'])}")
    if d["taxonomy_changed"]:
        out.print("taxonomy changed")
    _print_rows("settings changed", [{"setting": k, **v} for k, v in d["settings"].items()])
    if not d["config_changed"]:
        out.print("config unchanged")


def _resolve_version(store: Any, version: str) -> str:
    if version == "latest":
        info = store.latest()
        if info is None:
            from vlpref.errors import StoreError

            raise StoreError(f"{store.location} has no version yet")
        return str(info.version_id)
    return version


@app.command("serve")
def serve(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="run config the deployments build: a path or a URI"),
    ] = None,
    prefect_yaml: Annotated[Path, typer.Option(help="the deployments to serve")] = Path(
        "prefect.yaml"
    ),
    limit: Annotated[int | None, typer.Option(help="most flow runs at once")] = None,
) -> None:
    """Serve the nightly and branch-rerun deployments against a Prefect server."""
    from vlpref.serve import serve as serve_deployments

    serve_deployments(prefect_yaml, config=config, limit=limit)


@app.command("judge-eval")
def judge_eval(
    config: Annotated[Path, typer.Argument(help="run config YAML (its judges are evaluated)")],
    labelled: Annotated[Path, typer.Argument(help="labelled file: Parquet, JSONL, JSON or CSV")],
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            help="logical=column mapping, e.g. image=img_path,question=prompt,response=answer,"
            "label=is_unsafe,category=class2 (default: the config's judge_eval.columns)",
        ),
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="safety, pairwise or rating")] = None,
    target_fpr: Annotated[
        float | None,
        typer.Option("--target-fpr", help="false-positive rate the threshold is chosen for"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="report folder (default: <workspace>/judge-eval/<file>)"),
    ] = None,
) -> None:
    """Run the configured judges over a labelled file (same prompts, protocols, constraints and
    journal as a build) and write report.md and report.json: safety, pairwise or rating metrics,
    overall and per category, agreement between judges, and the cost per item."""
    from typing import cast

    from vlpref.config import load_config
    from vlpref.errors import DataError
    from vlpref.evaluation.labelled import Kind, load_labelled, parse_columns
    from vlpref.evaluation.run import evaluate, write_report

    cfg = load_config(config)
    # Before any request: the judges' templates (rule and reasoning ones included) read and
    # have their placeholders.
    from vlpref.preflight import PreflightError, prompt_problems

    problems = prompt_problems(cfg)
    if problems:
        raise PreflightError(problems, file=str(config))
    settings = cfg.judge_eval
    chosen = kind or settings.kind
    if chosen not in ("safety", "pairwise", "rating"):
        raise DataError(f"--kind: {chosen!r} is not safety, pairwise or rating")
    mapping = dict(settings.columns)
    mapping.update(parse_columns(columns))
    data = load_labelled(
        labelled,
        cast(Kind, chosen),
        parse_columns(",".join(f"{k}={v}" for k, v in mapping.items())),
        max_bytes=cfg.stages.images.max_bytes,
        download_timeout_s=cfg.stages.images.download_timeout_s,
    )
    fpr = settings.target_fpr if target_fpr is None else target_fpr
    if not 0 <= fpr <= 1:
        raise DataError(f"--target-fpr: {fpr} is not in [0, 1]")
    report = evaluate(cfg, data, target_fpr=fpr)
    folder = out or Path(cfg.workspace) / "judge-eval" / f"{labelled.stem}-{data.file_hash[:12]}"
    md, js = write_report(report, folder)
    cost = report["cost"]
    console.print(
        f"[green]ok[/green] {len(data.items)} item(s), {len(data.failures)} row(s) not used; "
        f"{cost['judge_calls']} judge call(s): {cost['requests_sent']} sent, "
        f"{cost['requests_from_journal']} from the journal; report: {md} and {js}",
        highlight=False,
    )


rules_app = typer.Typer(help="Objectified rules for the judges (taxonomy `rules:`).")
app.add_typer(rules_app, name="rules")


@rules_app.command("draft")
def rules_draft(
    config: Annotated[Path, typer.Argument(help="run config YAML (its taxonomy and models)")],
    out: Annotated[Path, typer.Option("--out", help="where to write the taxonomy with drafts")],
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="taxonomy path prefix to draft for (repeatable)"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="name of the config entry that drafts (default: generator)"),
    ] = None,
    redraft: Annotated[
        bool, typer.Option("--redraft", help="also draft for leaves that have rules of their own")
    ] = False,
) -> None:
    """Ask a model to draft 2-5 checkable rules per taxonomy leaf and write a copy of the
    taxonomy with them, marked unreviewed. Review and edit it, then point `taxonomy:` at it."""
    from vlpref.config import load_config
    from vlpref.errors import DataError
    from vlpref.rules_draft import draft_rules, with_drafts, write
    from vlpref.taxonomy import load_taxonomy

    cfg = load_config(config)
    entries = {m.name: m for m in (*cfg.models, cfg.generator, *cfg.judges)}
    name = model or cfg.generator.name
    if name not in entries:
        raise DataError(f"--model: no model entry named {name!r} (known: {', '.join(entries)})")
    if out.exists():
        raise DataError(f"--out: {out} exists; choose a new file (drafts never overwrite)")
    taxonomy = load_taxonomy(cfg.taxonomy)
    leaves = taxonomy.select(only or None)
    draft = draft_rules(cfg, taxonomy, leaves, entries[name], redraft=redraft)
    write(out, with_drafts(taxonomy, draft))
    n_rules = sum(len(r) for r in draft.rules.values())
    console.print(
        f"[green]ok[/green] {n_rules} rule(s) drafted for {len(draft.rules)} leaf(s) by "
        f"{draft.model} ({draft.requests_sent} request(s) sent, {draft.requests_cached} from the "
        f"journal); written to {out}: review every rule before using it",
        highlight=False,
    )
    for path, why in sorted(draft.failed.items()):
        _warning(f"no rules drafted for {path}: {why}")


@app.command("plan")
def plan(
    config: Annotated[
        str | None,
        typer.Argument(
            help="run config YAML, a path or a URI (default: $VLPREF_CONFIG, ./vlpref.yaml, "
            "then the demo's)"
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="taxonomy path prefix `run --only` would build (repeatable)"),
    ] = None,
    by_branch: Annotated[
        bool, typer.Option("--by-branch", help="one row per branch as well as per stage and model")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the plan as JSON to this file")
    ] = None,
) -> None:
    """Say what `vlpref run` would send, per stage and model, without sending anything: requests
    the journal answers, requests to send (exact), requests that depend on answers not known yet
    (an upper bound, marked <=), estimated tokens, and the cost where models have a `price`."""
    import json

    from flows.plan import plan_run
    from vlpref.config import load_config
    from vlpref.plan_report import print_plan
    from vlpref.preflight import check as preflight_check

    cfg = load_config(_config_file(config))
    preflight_check(cfg, network=False, warn=_warning, local=True, only=only or None)
    result = plan_run(cfg, only or None)
    print_plan(result, by_branch=by_branch, console=Console())
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
        console.print(f"plan written to {json_out}", highlight=False)


@app.command("check")
def check(
    config: Annotated[str, typer.Argument(help="run config YAML: a path, or a URI (s3://…)")],
    preflight: Annotated[
        bool,
        typer.Option(
            "--preflight",
            help="also check API keys, endpoints and model ids (GET /models; no chat request)",
        ),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="taxonomy path prefix `run --only` would build (repeatable)"),
    ] = None,
) -> None:
    """Check what `vlpref run` will need, without running or sending anything: the config, its
    taxonomy (and the --only selection), every prompt template, at least two response samples
    per question, the API key variables, the workspace and store folders (and the store's
    LATEST version), and vLLM where `kind: vllm` is configured. Every problem is reported."""
    from vlpref.config import load_config
    from vlpref.preflight import check as preflight_check
    from vlpref.taxonomy import load_taxonomy

    cfg = load_config(config)
    # Without --preflight: everything but the network.
    preflight_check(cfg, network=preflight, warn=_warning, local=True, only=only or None)
    leaves = load_taxonomy(cfg.taxonomy).select(only or (list(cfg.only) or None))
    console.print(
        f"[green]ok[/green] {config}: {len(cfg.models)} response model(s) "
        f"({cfg.samples_per_question} samples per question), "
        f"{len(cfg.judges)} judge(s), {len(cfg.endpoints)} endpoint(s), "
        f"{len(leaves)} branch(es), config {cfg.content_hash()[:12]}"
        + ("; preflight passed" if preflight else "")
    )


def _warning(message: str) -> None:
    from vlpref.redact import redact

    console.print(f"warning: {redact(message)}", highlight=False, markup=False)


@app.command("vllm-serve")
def vllm_serve(
    config: Annotated[Path, typer.Argument(help="run config YAML with `serve:` endpoints")],
    out: Annotated[
        Path | None,
        typer.Option(help="where to write the config that points at the servers"),
    ] = None,
    run_flow: Annotated[
        bool, typer.Option("--run", help="build a dataset with it, then stop the servers")
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="with --run: taxonomy path prefix to build (repeatable)"),
    ] = None,
    log_dir: Annotated[Path | None, typer.Option(help="folder for the servers' logs")] = None,
) -> None:
    """Start `vllm serve` for every endpoint with a `serve:` block, wait for /health, write a
    config pointing at them, and serve until Ctrl-C (or, with --run, build one dataset version).
    The servers are stopped on exit, Ctrl-C or SIGTERM."""
    import time

    from vlpref.config import load_config
    from vlpref.vllm_serve import VllmServeError, VllmServers, terminate_as_interrupt

    cfg = load_config(config)
    servers = VllmServers(cfg, log_dir=log_dir, log=lambda line: console.print(line, markup=False))
    if not servers.specs:
        raise VllmServeError(f"{config}: no endpoint has a `serve:` block; nothing to start")
    target = out or config.with_name(f"{config.stem}.served.yaml")
    try:
        with terminate_as_interrupt(), servers:
            servers.write_config(target)
            console.print(f"config pointing at the servers: {target}", markup=False)
            if run_flow:
                from vlpref.report import print_summary
                from vlpref.taxonomy import load_taxonomy

                served = load_config(target)
                leaves = load_taxonomy(served.taxonomy).select(only or (list(served.only) or None))
                from flows.runners import task_runner

                started = time.perf_counter()
                version_id = _run_with_progress(
                    str(target), only or None, len(leaves), task_runner("threads")
                )
                servers.check_alive()
                print_summary(
                    str(target), version_id, time.perf_counter() - started, console=Console()
                )
            else:
                console.print("serving; Ctrl-C stops the servers", markup=False)
                while True:
                    time.sleep(2)
                    servers.check_alive()
    except KeyboardInterrupt:
        raise SystemExit(INTERRUPTED) from None  # main() prints the `error: interrupted` line
    finally:
        console.print("vllm servers stopped", markup=False)
        servers.cleanup()


@app.command("providers")
def providers() -> None:
    """List the provider kinds a config may use (built-in and plug-ins)."""
    from vlpref.providers.registry import available_kinds

    for kind in available_kinds():
        typer.echo(kind)


INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C; SIGTERM too (`vllm-serve` alike)


def _os_error(exc: OSError) -> str:
    """An OSError as `<file>: <what>`; one that names no file (a full disk does not) as the
    command it stopped, what happened and its errno name."""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        files = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else exc.filename
        return f"{files}: {what}"
    code = errno.errorcode.get(exc.errno or 0)
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    where = f"vlpref {command}: " if command else ""
    return f"{where}{what} ({code})" if code else f"{where}{what}"


def _fail(message: str, code: int) -> NoReturn:
    """The one `error:` line an expected failure ends with. A temporary Prefect server is stopped
    first, so that its goodbye does not come after the line, and none is left behind."""
    from vlpref.prefect_server import stop_temporary_server
    from vlpref.redact import redact

    stop_temporary_server()
    # Redacted (docs/security.md): a message may quote an endpoint that echoed the key.
    console.print(f"error: {redact(message)}", highlight=False, markup=False)
    raise SystemExit(code)


def _expected(exc: BaseException | None) -> bool:
    """A failure the user can act on from its message alone: a VlprefError, or an error of the
    operating system (a full disk, no permission, a missing file). Anything else is a bug."""
    return isinstance(exc, VlprefError) or (isinstance(exc, OSError) and exc.errno is not None)


class _NoTracebackWhenExpected(logging.Filter):
    """Prefect logs a task or flow run that failed with the exception's traceback. For an
    expected failure the message says what and where, and the traceback only buries it (and
    looks like a crash); a bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _expected(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


# Commands defined in their own packages (each imports this module for the shared helpers; they
# are registered here, after those helpers exist).
from vlpref.export_cli import export as _export  # noqa: E402
from vlpref.index_cli import index_app as _index_app  # noqa: E402
from vlpref.report_html.command import report as _report  # noqa: E402

app.command("export")(_export)
app.command("report")(_report)
app.add_typer(_index_app, name="index")


def main() -> None:
    """Run the command line. Every expected failure ends with one `error: ...` line on stderr:
    a VlprefError (a bad config, a branch that failed, a damaged store, a held lock) or an OSError
    (a full disk, no permission, a missing file) exits with code 2; Ctrl-C or SIGTERM with
    `error: interrupted ...` and code 130. Anything else is a bug and keeps its traceback."""
    from vlpref.redact import install_log_redaction
    from vlpref.vllm_serve import terminate_as_interrupt

    install_log_redaction()  # every log record of the process, Prefect's included (redact.py)
    for name in ("prefect.task_runs", "prefect.flow_runs"):  # before Prefect configures them
        logging.getLogger(name).addFilter(_NoTracebackWhenExpected())
    try:
        with terminate_as_interrupt():  # SIGTERM stops a command as Ctrl-C does
            app()
    except VlprefError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(_os_error(exc), 2)
    except (KeyboardInterrupt, SystemExit) as exc:
        # typer turns a KeyboardInterrupt inside a command into exit code 130.
        if isinstance(exc, KeyboardInterrupt) or exc.code == INTERRUPTED:
            ran_a_flow = "flows.build" in sys.modules
            hint = "; the answers that arrived are in the journal: a rerun asks for the rest"
            _fail(f"interrupted (Ctrl-C or SIGTERM){hint if ran_a_flow else ''}", INTERRUPTED)
        raise


if __name__ == "__main__":
    main()
