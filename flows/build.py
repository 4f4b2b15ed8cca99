"""The dataset build flow: one Prefect task per (stage, branch), branches concurrent.

    build_dataset(config="runs/nightly.yaml", only=["Malicious Use/Security threats"])

Orchestration only. The stages are declared once, in `flows/stages.py` (what each reads, what
enters its key, what runs it, the tables it writes); `stage_task` is the one task body for all of
them. Each task finds its stage output in the workspace by the hash of its inputs and reuses it,
or runs the stage (whose model requests go through the request journal) and writes it. Prefect
sees a few tasks per branch, never a single model request; Prefect's own caching is off (our keys
are exact and cheaper). Whole-task failures are retried by Prefect once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.states import Completed

from flows import progress
from flows.stages import STAGES as STAGE_TABLE
from vlpref import budget, heap, preflight, stopping
from vlpref.config import RunConfig, load_config
from vlpref.errors import BuildError, ConfigError, NothingToPublish
from vlpref.gctune import throughput_gc
from vlpref.redact import install_log_redaction, redact
from vlpref.retry import check_policy, retryable_count
from vlpref.run_summary import RunSummary, stage_alert, summarize
from vlpref.scheduling import AnswerBudget
from vlpref.stage_text import describe_counts
from vlpref.taxonomy import Subcategory, load_taxonomy
from vlpref.workspace import StageRef, Workspace, output_id

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "retries": 1, "retry_delay_seconds": 2}


@dataclass(frozen=True, slots=True)
class _Previous:
    """What a task found in the workspace for its key: an output to reuse as it is, or one whose
    failures the retry policy asks for again (the stage runs; the journal answers the rest)."""

    reuse: StageRef | None
    retrying: StageRef | None


def _reuse_or_run(
    workspace: Workspace, config: RunConfig, stage: str, branch_id: str, key: str
) -> _Previous:
    found = workspace.find(stage, branch_id, key)
    if found is None:
        return _Previous(None, None)
    retry = retryable_count(found.failed_by_kind, config.retry_failed)
    if retry:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(found.failed_by_kind.items()))
        get_run_logger().info(
            "%s/%s: retrying %d failed item(s) of output %s (%s; --retry-failed %s)",
            stage,
            branch_id,
            retry,
            key,
            kinds,
            config.retry_failed,
        )
        return _Previous(None, found)
    get_run_logger().info("%s/%s: reusing output %s", stage, branch_id, key)
    progress.notify(stage, branch_id, found.counts)
    return _Previous(found, None)


def _finish(
    workspace: Workspace,
    config: RunConfig,
    output: Any,
    key: str,
    tables: dict[str, Any],
    started: float,
    previous: _Previous,
) -> StageRef:
    output.extra["elapsed_s"] = round(time.perf_counter() - started, 3)
    before = previous.retrying
    if before is not None and before.output_id == output_id(key, output.failed_items()):
        # The retry healed nothing: the same items failed again. Keep the output that exists
        # rather than a copy under a new generation, so nothing downstream is recomputed.
        return _outcome(_done(before), config)
    ref = _done(workspace.write(output, key, tables))
    heap.trim()  # what earlier stages freed goes back to the OS (vlpref/heap.py)
    return _outcome(ref, config)


def _done(ref: StageRef) -> StageRef:
    # Readable text, not the counts dict: this line is what the log file and the task run's
    # page in the Prefect UI show of the stage.
    get_run_logger().info("%s", describe_counts(ref.stage, ref.counts, ref.branch_id))
    progress.notify(ref.stage, ref.branch_id, ref.counts)
    return ref


def _outcome(ref: StageRef, config: RunConfig) -> StageRef:
    """The task's result; as a state named 'Completed with failures' (with a warning in the log
    and an artifact on the task run) when the output's failure rate passes `warn_failure_rate`.

    Completed, not Failed: the rows that succeeded are good data, the branch's later stages and
    the other branches still run, and a rerun retries what failed. A Failed task would stop its
    branch, make Prefect retry the task at once against the same endpoint, and publish nothing
    of a branch where one response model is down."""
    alert = stage_alert(ref.stage, ref.counts, config.warn_failure_rate)
    if alert is None:
        return ref
    message = f"{ref.stage}/{ref.branch_id}: {alert}"
    get_run_logger().warning("%s (warn_failure_rate %s)", message, config.warn_failure_rate)
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(ref.failed_by_kind.items()))
    create_markdown_artifact(
        markdown=f"# {message}\n\nFailures by kind: {kinds or 'unknown'}. "
        "The branch's failures table and the run summary give the reasons.\n",
        description=f"{ref.stage} failures over warn_failure_rate",
    )
    state: State[StageRef] = Completed(data=ref, name="Completed with failures", message=message)
    return cast(StageRef, state)  # Prefect makes a returned state the task's final state


class _WorkspaceInputs:
    """The tables of the stages a stage reads, from the workspace, read when asked."""

    def __init__(self, workspace: Workspace, refs: Mapping[str, StageRef]) -> None:
        self.workspace, self.refs = workspace, refs

    def table(self, stage: str, name: str) -> pa.Table:
        return self.workspace.read(self.refs[stage], name)


@task(name="stage", **TASK_OPTIONS)
def stage_task(
    name: str, config: RunConfig, leaf: Subcategory, refs: dict[str, StageRef]
) -> StageRef:
    """One stage of one branch (`flows/stages.py: STAGES[name]`): reuse its output for its key,
    or run it (its requests through the branch's journal for the stage) and write it."""
    # The scope tells the CLI's live display which stage and branch each model result of this
    # thread belongs to, and that the stage failed for the branch if this raises.
    with progress.stage_scope(name, leaf.branch_id):
        return _run_stage(name, config, leaf, refs)


def _run_stage(
    name: str, config: RunConfig, leaf: Subcategory, refs: dict[str, StageRef]
) -> StageRef:
    stage = STAGE_TABLE[name]
    workspace, started = Workspace(config.workspace), time.perf_counter()
    key = stage.key(config, leaf, refs)
    previous = _reuse_or_run(workspace, config, name, leaf.branch_id, key)
    if previous.reuse:
        return _outcome(previous.reuse, config)
    inputs = _WorkspaceInputs(workspace, refs)
    if stage.journaled:
        with workspace.journal(name, leaf.branch_id) as journal:
            output, tables = stage.run(config, leaf, inputs, journal, None)
    else:
        output, tables = stage.run(config, leaf, inputs, None, None)
    return _finish(workspace, config, output, key, tables, started, previous)


def _submit(
    name: str,
    config: RunConfig,
    leaf: Subcategory,
    futures: Mapping[str, PrefectFuture[StageRef]],
) -> PrefectFuture[StageRef]:
    """Submit a stage of a branch; Prefect hands it the results of the futures of its inputs."""
    refs = {i: _after(futures[i]) for i in STAGE_TABLE[name].inputs}
    task_ = stage_task.with_options(name=f"{name}/{leaf.branch_id}")
    return task_.submit(name, config, leaf, refs)


def submit_preparation(config: RunConfig, leaf: Subcategory) -> dict[str, PrefectFuture[StageRef]]:
    """Submit a branch's images and questions: the cheap half of its chain, which tells how
    large the rest will be. Futures carry the dependencies (Prefect hands each task the result of
    the futures it is given)."""
    futures: dict[str, PrefectFuture[StageRef]] = {}
    for name in PREPARATION:
        futures[name] = _submit(name, config, leaf, futures)
    return futures


def submit_answers(
    config: RunConfig, leaf: Subcategory, prepared: dict[str, PrefectFuture[StageRef]]
) -> dict[str, PrefectFuture[StageRef]]:
    """Submit the rest of a prepared branch's chain: responses, judge, pairs."""
    futures = dict(prepared)
    for name in STAGES:
        if name not in futures:
            futures[name] = _submit(name, config, leaf, futures)
    return futures


def _after(future: PrefectFuture[StageRef]) -> StageRef:
    return cast(StageRef, future)


STAGES = tuple(STAGE_TABLE)  # the stage names, in the order they run
PREPARATION = STAGES[:2]  # images, questions: the cheap half of a branch (run_branches)


def branch_size(config: RunConfig, questions: PrefectFuture[StageRef]) -> int:
    """The response samples a branch will hold once answering: its questions times the samples
    per question. A branch whose questions stage failed holds none (its chain fails upstream)."""
    try:
        ref = questions.result()
    except Exception:  # reported with the branch's other failures when the flow collects them
        return 0
    return int(ref.counts.get("out", 0)) * config.samples_per_question


def run_branches(
    config: RunConfig, leaves: list[Subcategory]
) -> dict[str, dict[str, PrefectFuture[StageRef]]]:
    """Run every branch's chain in two halves, and return when all have finished.

    A branch is *prepared* (images, questions), then *answered* (responses, judge, pairs). At
    most `parallel_branches` branches are in flight, and a prepared branch starts answering only
    while `AnswerBudget` admits it: what an answering branch holds in memory (its responses,
    judgments and rows) grows with its size, so a run of large branches answers one or two at a
    time, and one of small branches several, each keeping the endpoints busy. Preparing the
    next branches meanwhile overlaps their image rendering with the model calls."""
    budget = AnswerBudget(config.parallel_branches, config.responses_in_flight)
    pending = list(reversed(leaves))
    branches: dict[str, dict[str, PrefectFuture[StageRef]]] = {}
    # By the task run id of the future each waits on: questions (preparing), pairs (answering).
    preparing: dict[Any, Subcategory] = {}
    ready: list[tuple[Subcategory, int]] = []  # prepared, waiting for the budget, in order
    answering: dict[Any, tuple[Subcategory, int]] = {}
    while pending or preparing or ready or answering:
        while ready and budget.admits([size for _, size in answering.values()], ready[0][1]):
            leaf, size = ready.pop(0)
            futures = submit_answers(config, leaf, branches[leaf.branch_id])
            branches[leaf.branch_id] = futures
            answering[futures["pairs"].task_run_id] = (leaf, size)
        while pending and len(preparing) + len(ready) + len(answering) < budget.branches:
            leaf = pending.pop()
            futures = submit_preparation(config, leaf)
            branches[leaf.branch_id] = futures
            preparing[futures["questions"].task_run_id] = leaf
        waiting = [branches[leaf.branch_id]["questions"] for leaf in preparing.values()]
        waiting += [branches[leaf.branch_id]["pairs"] for leaf, _ in answering.values()]
        finished = next(as_completed(waiting))
        if finished.task_run_id in preparing:
            leaf = preparing.pop(finished.task_run_id)
            ready.append((leaf, branch_size(config, finished)))
        else:
            del answering[finished.task_run_id]
            heap.trim()  # a whole branch's working set was just freed
    wait([f for futures in branches.values() for f in futures.values()])
    return branches


@flow(name="build-dataset", log_prints=True)
def build_dataset(
    config: str,
    only: list[str] | None = None,
    retry_failed: str | None = None,
    plan: bool = False,
) -> str:
    """Build one dataset version from the run config at `config` (a path); `only` limits the run
    to taxonomy path prefixes; `retry_failed` (transient, all, none) overrides the config's
    choice of which failures of finished stage outputs are asked for again; `plan` first works
    out what the run will send (`vlpref plan`, no request) and keeps it in the manifest beside
    what was sent. Returns the new version's id."""
    from vlpref.publish.version import publish_version, write_version_exports

    install_log_redaction()  # keys never reach a log record, Prefect's API logs included
    stopping.reset()  # an earlier run in this process may have been interrupted
    budget.reset()  # ... or have spent its own budget
    run_config = load_config(config)
    if retry_failed is not None:
        run_config = run_config.model_copy(update={"retry_failed": check_policy(retry_failed)})
    taxonomy = load_taxonomy(run_config.taxonomy)
    selected = only if only is not None else (list(run_config.only) or None)
    if selected is not None and not selected:
        raise ConfigError("`only` is empty: name at least one taxonomy path prefix to rebuild")
    leaves = taxonomy.select(selected)
    preflight.before_build(run_config)  # keys, endpoints, model ids: before anything is paid for
    planned = None
    if plan:
        from flows.plan import plan_run

        planned = plan_run(run_config, selected).by_stage()
        get_run_logger().info(
            "plan: %s",
            "; ".join(
                f"{stage} {p['to_send']} to send, {p['from_journal']} from the journal"
                + (f", up to {p['bound']} more" if p.get("bound") else "")
                for stage, p in planned.items()
            ),
        )
        progress.notify_plan(planned)  # the live display's ETA
    with throughput_gc(), heap.system_arrow_pool():
        branches = run_branches(run_config, leaves)
        refs: dict[str, dict[str, StageRef]] = {}
        failed: list[str] = []
        for branch_id, futures in branches.items():
            try:
                refs[branch_id] = {stage: futures[stage].result() for stage in STAGES}
            except Exception as exc:  # reported below; the flow fails after the artifact
                # Redacted: the cause becomes the flow's state message and the artifact.
                failed.append(f"{branch_id}: {type(exc).__name__}: {redact(str(exc))}")
        summary = _report(run_config, leaves, refs, failed)
        spent = budget.reached(run_config)
        if spent is not None:  # before publishing: a version is never partial
            raise budget.BudgetReached(spent.summary())
        if failed:
            raise BuildError(failed, workspace=run_config.workspace)
        if selected is None and not any(r["pairs"].counts.get("pairs") for r in refs.values()):
            raise NothingToPublish(_nothing_to_publish(summary))
        version_id = publish_version(
            run_config, taxonomy, leaves, refs, only=selected, plan=planned
        )
    for line in write_version_exports(run_config, version_id):
        get_run_logger().info("export: %s", line)
    return version_id


def _nothing_to_publish(summary: RunSummary) -> str:
    """Why a run has no pair, in a line: the stage that lost the most of its rows."""
    worst = max(
        (s for s in summary.stages if s.stage != "pairs" and s.n_failed),
        key=lambda s: s.failure_rate,
        default=None,
    )
    where = (
        f"; {worst.stage} lost {worst.n_failed} of {worst.n_in} {worst.unit}"
        if worst is not None
        else ""
    )
    return f"nothing to publish: no branch produced a pair{where} (the summary above says why)"


def _report(
    config: RunConfig,
    leaves: list[Subcategory],
    refs: dict[str, dict[str, StageRef]],
    failed: list[str],
) -> RunSummary:
    """The run summary, before anything is published: as the flow run's artifacts and handed to
    the CLI, so a run that can publish nothing still says what failed and why."""
    workspace = Workspace(config.workspace)
    outputs = [ref for leaf in leaves for ref in refs.get(leaf.branch_id, {}).values()]
    summary = summarize(
        ((ref.stage, ref.branch_id, ref.counts) for ref in outputs),
        (workspace.read(ref, "failures") for ref in outputs if ref.counts.get("failed")),
        threshold=config.warn_failure_rate,
        branches_failed=failed,
    )
    rows = []
    for leaf in leaves:
        stage_refs = refs.get(leaf.branch_id)
        if stage_refs is None:
            continue
        row: dict[str, Any] = {"branch": leaf.path}
        for stage in STAGES:
            counts = stage_refs[stage].counts
            row[stage] = f"{counts.get('out')}/{counts.get('in')} ({counts.get('failed')} failed)"
        rows.append(row)
    create_table_artifact(
        key="vlpref-branch-counts", table=rows, description="out/in per stage and branch"
    )
    create_markdown_artifact(key="vlpref-build", markdown=summary.to_markdown())
    progress.notify_summary(summary)
    return summary
