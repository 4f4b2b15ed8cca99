"""The dataset build flow: one Prefect task per (stage, branch), branches concurrent.

    build_dataset(config="runs/nightly.yaml", only=["Malicious Use/Security threats"])

Orchestration only. Each task finds its stage output in the workspace by the hash of its inputs
and reuses it, or runs the stage (whose model requests go through the request journal) and writes
it. Prefect sees a few tasks per branch, never a single model request; Prefect's own caching is
off (our keys are exact and cheaper). Whole-task failures are retried by Prefect once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.states import Completed

from flows import progress
from vlpref import heap, preflight, records, stopping
from vlpref.config import RunConfig, load_config
from vlpref.errors import BuildError, ConfigError, NothingToPublish
from vlpref.gctune import throughput_gc
from vlpref.records import schema_fingerprint
from vlpref.redact import install_log_redaction, redact
from vlpref.retry import check_policy, retryable_count
from vlpref.run_summary import RunSummary, stage_alert, summarize
from vlpref.scheduling import AnswerBudget
from vlpref.taxonomy import Subcategory, load_taxonomy
from vlpref.workspace import StageRef, Workspace, output_id, stage_key

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "retries": 1, "retry_delay_seconds": 2}


def _entry(config: RunConfig, name: str) -> dict[str, Any]:
    """A model entry as it enters stage keys: with its endpoint's kind and cache namespace (what
    decides the answers), never the endpoint's URL or credentials."""
    entries = {m.name: m for m in (*config.models, config.generator, *config.judges)}
    entry = entries[name]
    endpoint = config.endpoints[entry.endpoint]
    # A judge's `rules` enters only when on, so judge keys made before it existed still hold.
    exclude = {"endpoint", *(["rules"] if getattr(entry, "rules", None) == "off" else [])}
    return {
        **entry.model_dump(mode="json", exclude=exclude),
        "kind": endpoint.get("kind", "openai"),
        "cache_namespace": endpoint.get("cache_namespace", ""),
    }


def _file_fingerprint(path: Path) -> list[Any]:
    if path.is_file():
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        return [_file_fingerprint(p) for p in sorted(path.rglob("*")) if p.is_file()]
    return [str(path), "missing"]


def images_key(config: RunConfig, leaf: Subcategory) -> str:
    """The images of a branch depend on its own source (the override that applies to it, or the
    default) and the normalisation settings; not on other branches' overrides."""
    from tasks.images import choose_source

    stage = config.stages.images
    choice = choose_source(leaf, stage)
    source = choice.source
    # decode_pixel_budget bounds memory, not what is decoded: it never changes the images.
    settings = stage.model_dump(mode="json", exclude={"source", "overrides", "decode_pixel_budget"})
    path = getattr(source, "path", None)
    local = _file_fingerprint(_base_dir(config) / path) if path else []
    return stage_key(
        "images",
        _columns("images"),
        leaf.path,
        leaf.keywords,
        leaf.key_phrase,
        source.model_dump(mode="json"),
        choice.exact,  # decides a folder source's layout
        settings,
        local,
    )


STAGE_SCHEMAS = {
    "images": (records.IMAGES,),
    "questions": (records.QUESTIONS,),
    "responses": (records.RESPONSES,),
    "judge": (records.JUDGMENTS,),
    "pairs": (records.PAIRS, records.RANKINGS),
}


def _columns(stage: str) -> Any:
    """The columns a stage writes (its tables' and the failures'), as they enter its key."""
    return schema_fingerprint(*STAGE_SCHEMAS[stage], records.FAILURES)


def _base_dir(config: RunConfig) -> Path:
    return Path(config.source_file).resolve().parent if config.source_file else Path.cwd()


def _guard_templates(config: RunConfig) -> list[str]:
    """The templates of the guard protocols the judges speak (read only when used, so a
    `prompts_dir` made before they existed still works)."""
    from vlpref.protocols import GUARDS

    specs = (GUARDS.get(j.protocol) for j in config.judges)
    names = {s.template for s in specs if s is not None and s.template}
    if any(j.cascade_band for j in config.judges):
        names.add("judge_safety_reasoning")  # the cascade's reasoning calls
    if any(j.rules != "off" for j in config.judges):
        names.add("judge_rule")  # one call per (response, rule)
    return sorted(names)


def _judge_rules(config: RunConfig, leaf: Subcategory) -> list[str]:
    """The branch's rules in the judge stage's key, only when a judge asks them: adding rules to
    a taxonomy rebuilds the judgments of the judges that use them, and nothing else."""
    return list(leaf.rules) if any(j.rules != "off" for j in config.judges) else []


def _prompts(config: RunConfig, *names: str) -> dict[str, str]:
    from vlpref.prompts import load_prompt

    return {n: load_prompt(n, config.prompts_dir).version for n in names}


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
    get_run_logger().info("%s/%s: %s", ref.stage, ref.branch_id, ref.counts)
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


@task(name="images", **TASK_OPTIONS)
def images_task(config: RunConfig, leaf: Subcategory) -> StageRef:
    from tasks.images import collect_images

    workspace, started = Workspace(config.workspace), time.perf_counter()
    key = images_key(config, leaf)
    previous = _reuse_or_run(workspace, config, "images", leaf.branch_id, key)
    if previous.reuse:
        return _outcome(previous.reuse, config)
    output = collect_images(leaf, config.stages.images, base_dir=_base_dir(config))
    return _finish(workspace, config, output, key, {"images": output.rows}, started, previous)


@task(name="questions", **TASK_OPTIONS)
def questions_task(config: RunConfig, leaf: Subcategory, images: StageRef) -> StageRef:
    from tasks.questions import generate_questions

    workspace, started = Workspace(config.workspace), time.perf_counter()
    key = stage_key(
        "questions",
        _columns("questions"),
        images.output_id,
        _entry(config, config.generator.name),
        config.stages.questions.model_dump(mode="json"),
        _prompts(config, "caption", "questions"),
    )
    previous = _reuse_or_run(workspace, config, "questions", leaf.branch_id, key)
    if previous.reuse:
        return _outcome(previous.reuse, config)
    with workspace.journal("questions", leaf.branch_id) as journal:
        output = generate_questions(leaf, workspace.read(images, "images"), config, journal)
    return _finish(workspace, config, output, key, {"questions": output.rows}, started, previous)


@task(name="responses", **TASK_OPTIONS)
def responses_task(
    config: RunConfig, leaf: Subcategory, images: StageRef, questions: StageRef
) -> StageRef:
    from tasks.responses import collect_responses

    workspace, started = Workspace(config.workspace), time.perf_counter()
    key = stage_key(
        "responses",
        _columns("responses"),
        questions.output_id,
        [_entry(config, m.name) for m in config.models],
        _prompts(config, "response"),
    )
    previous = _reuse_or_run(workspace, config, "responses", leaf.branch_id, key)
    if previous.reuse:
        return _outcome(previous.reuse, config)
    with workspace.journal("responses", leaf.branch_id) as journal:
        output = collect_responses(
            leaf.branch_id,
            workspace.read(questions, "questions"),
            workspace.read(images, "images"),
            config,
            journal,
        )
    return _finish(workspace, config, output, key, {"responses": output.rows}, started, previous)


def _aggregate(config: RunConfig) -> list[str]:
    """The judges' aggregation in a stage key, only when not the default `mean` (so that keys
    written before the option existed stay valid)."""
    aggregate = config.stages.judge.aggregate
    return [] if aggregate == "mean" else [f"aggregate={aggregate}"]


def _judge_settings(config: RunConfig) -> dict[str, Any]:
    exclude = {"aggregate"} if config.stages.judge.aggregate == "mean" else None
    return config.stages.judge.model_dump(mode="json", exclude=exclude)


@task(name="judge", **TASK_OPTIONS)
def judge_task(
    config: RunConfig, leaf: Subcategory, images: StageRef, questions: StageRef, responses: StageRef
) -> StageRef:
    from tasks.judge import judge_responses

    workspace, started = Workspace(config.workspace), time.perf_counter()
    key = stage_key(
        "judge",
        _columns("judge"),
        responses.output_id,
        [_entry(config, j.name) for j in config.judges],
        _judge_settings(config),
        config.stages.pairs.model_dump(mode="json"),  # candidate pairs follow the policy
        _prompts(
            config, "judge_safety", "judge_rating", "judge_pairwise", *_guard_templates(config)
        ),
        *([rules] if (rules := _judge_rules(config, leaf)) else []),
    )
    previous = _reuse_or_run(workspace, config, "judge", leaf.branch_id, key)
    if previous.reuse:
        return _outcome(previous.reuse, config)
    with workspace.journal("judge", leaf.branch_id) as journal:
        output = judge_responses(
            leaf.branch_id,
            workspace.read(questions, "questions"),
            workspace.read(responses, "responses"),
            workspace.read(images, "images"),
            config,
            journal,
            rules=leaf.rules,
        )
    return _finish(workspace, config, output, key, {"judgments": output.rows}, started, previous)


@task(name="pairs", **TASK_OPTIONS)
def pairs_task(
    config: RunConfig, leaf: Subcategory, questions: StageRef, responses: StageRef, judge: StageRef
) -> StageRef:
    from tasks.pairs import select_branch_pairs

    workspace, started = Workspace(config.workspace), time.perf_counter()
    key = stage_key(
        "pairs",
        _columns("pairs"),
        judge.output_id,
        config.stages.pairs.model_dump(mode="json"),
        *_aggregate(config),
    )
    previous = _reuse_or_run(workspace, config, "pairs", leaf.branch_id, key)
    if previous.reuse:
        return _outcome(previous.reuse, config)
    output, rankings = select_branch_pairs(
        leaf.branch_id,
        workspace.read(questions, "questions"),
        workspace.read(responses, "responses"),
        workspace.read(judge, "judgments"),
        config,
    )
    tables = {"pairs": output.rows, "rankings": rankings}
    return _finish(workspace, config, output, key, tables, started, previous)


def submit_preparation(config: RunConfig, leaf: Subcategory) -> dict[str, PrefectFuture[StageRef]]:
    """Submit a branch's images and questions: the cheap half of its chain, which tells how
    large the rest will be. Futures carry the dependencies (Prefect hands each task the result of
    the futures it is given)."""
    b = leaf.branch_id
    images = images_task.with_options(name=f"images/{b}").submit(config, leaf)
    questions = questions_task.with_options(name=f"questions/{b}").submit(
        config, leaf, _after(images)
    )
    return {"images": images, "questions": questions}


def submit_answers(
    config: RunConfig, leaf: Subcategory, prepared: dict[str, PrefectFuture[StageRef]]
) -> dict[str, PrefectFuture[StageRef]]:
    """Submit the rest of a prepared branch's chain: responses, judge, pairs."""
    b = leaf.branch_id
    images, questions = _after(prepared["images"]), _after(prepared["questions"])
    responses = responses_task.with_options(name=f"responses/{b}").submit(
        config, leaf, images, questions
    )
    judge = judge_task.with_options(name=f"judge/{b}").submit(
        config, leaf, images, questions, _after(responses)
    )
    pairs = pairs_task.with_options(name=f"pairs/{b}").submit(
        config, leaf, questions, _after(responses), _after(judge)
    )
    return {**prepared, "responses": responses, "judge": judge, "pairs": pairs}


def _after(future: PrefectFuture[StageRef]) -> StageRef:
    return cast(StageRef, future)


STAGES = ("images", "questions", "responses", "judge", "pairs")


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
    config: str, only: list[str] | None = None, retry_failed: str | None = None
) -> str:
    """Build one dataset version from the run config at `config` (a path); `only` limits the run
    to taxonomy path prefixes; `retry_failed` (transient, all, none) overrides the config's
    choice of which failures of finished stage outputs are asked for again. Returns the new
    version's id."""
    from flows.publish import publish_version

    install_log_redaction()  # keys never reach a log record, Prefect's API logs included
    stopping.reset()  # an earlier run in this process may have been interrupted
    run_config = load_config(config)
    if retry_failed is not None:
        run_config = run_config.model_copy(update={"retry_failed": check_policy(retry_failed)})
    taxonomy = load_taxonomy(run_config.taxonomy)
    selected = only if only is not None else (list(run_config.only) or None)
    if selected is not None and not selected:
        raise ConfigError("`only` is empty: name at least one taxonomy path prefix to rebuild")
    leaves = taxonomy.select(selected)
    preflight.before_build(run_config)  # keys, endpoints, model ids: before anything is paid for
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
        if failed:
            raise BuildError(failed, workspace=run_config.workspace)
        if selected is None and not any(r["pairs"].counts.get("pairs") for r in refs.values()):
            raise NothingToPublish(_nothing_to_publish(summary))
        return publish_version(run_config, taxonomy, leaves, refs, only=selected)


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
