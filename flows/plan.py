"""`vlpref plan`: what a run of a config will send, per stage, branch and model, sending nothing.

Walks the stages of every selected branch as the flow would (`flows/stages.py`), with the same
keys: a stage whose output exists for its key (and has nothing the retry policy would ask again)
is *reused* and asks nothing; any other stage runs here, on a model service that never sends
(`vlpref.planning`), so the journal answers what it holds and the rest is counted with estimated
tokens. Counts are exact while every input of a stage is known; what depends on answers not yet
known is a *bound* (an upper bound):
- requests that hold a planned answer (questions from a caption not yet written, responses to
  planned questions, judge calls on planned responses);
- pairwise comparisons of a judge stage where any pointwise verdict is still to come: at most
  min(max_pairs_per_question, C(k, 2)) pairs per question of k usable responses, both orders;
- reasoning calls of a `cascade_band` judge: at most one per response whose verdict is still to
  come (and, with debias, one reasoning prior per question);
- a `tier: second` judge while a first-pass verdict is still to come: at most what it would be
  asked without tiers (its pointwise calls on every response, and the pairwise bound).
Re-asks of unreadable answers and provider retries are not in the plan (at most `max_attempts`
and the endpoint's retries times the counts).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pyarrow as pa

from flows.stages import STAGES, Stage
from vlpref.config import ModelEntry, RunConfig
from vlpref.journal import Journal
from vlpref.planning import (
    PLANNED,
    Line,
    PlanningService,
    Recorder,
    cost,
    settle,
)
from vlpref.protocols import GUARDS
from vlpref.retry import retryable_count
from vlpref.taxonomy import load_taxonomy
from vlpref.workspace import StageRef, Workspace, output_id

__all__ = ["Plan", "plan_run"]


@dataclass
class Plan:
    """A plan's lines and what the totals mean."""

    config: str
    branches: int
    lines: list[Line] = field(default_factory=list)
    entries: dict[str, ModelEntry] = field(default_factory=dict)

    def totals(self, by: Sequence[str] = ("stage", "model")) -> list[Line]:
        """Lines summed over everything but `by` (stage, branch, model)."""
        out: dict[tuple[str, ...], Line] = {}
        for line in self.lines:
            key = tuple(getattr(line, k) for k in by)
            if key not in out:
                out[key] = Line(
                    line.stage if "stage" in by else "*",
                    line.branch if "branch" in by else "*",
                    line.model if "model" in by else "*",
                    reused=True,
                )
            out[key].add(line)
            out[key].reused = out[key].reused and line.reused
        return list(out.values())

    def by_stage(self) -> dict[str, dict[str, int]]:
        """stage -> {from_journal, to_send, bound}: what the manifest keeps of a plan."""
        return {
            line.stage: {
                "from_journal": line.from_journal,
                "to_send": line.to_send,
                "bound": line.bound,
            }
            for line in self.totals(by=("stage",))
        }

    def cost_of(self, line: Line) -> float | None:
        return cost(line, self.entries.get(line.model))

    def to_json(self) -> dict[str, Any]:
        rows = [
            {
                "stage": line.stage,
                "branch": line.branch,
                "model": line.model,
                "reused": line.reused,
                "from_journal": line.from_journal,
                "to_send": line.to_send,
                "bound": line.bound,
                "prompt_tokens": line.prompt_tokens,
                "completion_tokens": line.completion_tokens,
                "cost": self.cost_of(line),
            }
            for line in self.lines
        ]
        whole = self.totals(by=())[0] if self.lines else Line("*", "*", "*")
        costs = [c for line in self.lines if (c := self.cost_of(line)) is not None]
        return {
            "config": self.config,
            "branches": self.branches,
            "requests": {
                "from_journal": whole.from_journal,
                "to_send": whole.to_send,
                "bound": whole.bound,
            },
            "tokens": {"prompt": whole.prompt_tokens, "completion": whole.completion_tokens},
            "cost": sum(costs) if costs else None,
            "priced_models": sorted(n for n, e in self.entries.items() if e.price is not None),
            "lines": rows,
        }


class _Known:
    """A stage output whose key a run would also compute: its id (what downstream keys hash)."""

    def __init__(self, output_id: str) -> None:
        self.output_id = output_id


class _PlanInputs:
    """The tables of earlier stages: read from the workspace when reused, else as planned."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.reused: dict[str, StageRef] = {}
        self.planned: dict[str, dict[str, pa.Table]] = {}

    def table(self, stage: str, name: str) -> pa.Table:
        if stage in self.reused:
            return self.workspace.read(self.reused[stage], name)
        return self.planned[stage][name]


def _plan_config(config: RunConfig) -> RunConfig:
    """The config the stages run under in a plan: one attempt (a re-ask is a new request that
    the plan cannot foresee), no early stop (nothing is sent to judge by)."""
    stages = config.stages.model_copy(
        update={
            "questions": config.stages.questions.model_copy(update={"max_attempts": 1}),
            "judge": config.stages.judge.model_copy(update={"max_attempts": 1}),
        }
    )
    return config.model_copy(update={"stages": stages, "early_stop_after": 0})


def _entries_for(config: RunConfig, stage: str) -> dict[str, ModelEntry]:
    """Entry name -> entry, for the models a stage asks."""
    if stage == "questions":
        chosen: Sequence[ModelEntry] = (config.generator,)
    elif stage == "responses":
        chosen = config.models
    elif stage == "judge":
        chosen = config.judges
    else:
        chosen = ()
    return {entry.name: entry for entry in chosen}


def _pairwise_bound(config: RunConfig, responses: pa.Table) -> int:
    """The most pairwise requests one judge can make over these responses (module docstring)."""
    usable = Counter(
        q
        for q, t in zip(
            responses.column("question_id").to_pylist(),
            responses.column("text").to_pylist(),
            strict=True,
        )
        if t and t.strip()
    )
    most = config.stages.judge.max_pairs_per_question
    if not config.stages.judge.pairwise or most <= 0:
        return 0
    return sum(2 * min(most, math.comb(k, 2)) for k in usable.values())


def _judge_bounds(
    config: RunConfig, recorder: Recorder, branch: str, responses: pa.Table, judgments: pa.Table
) -> None:
    """Replace what placeholder verdicts made of a judge stage's answer-dependent calls (pairwise,
    reasoning) by their bounds, where any of the judge's pointwise verdicts is still to come."""
    rows = judgments.to_pylist()
    planned_rids = {r["response_id"] for r in responses.to_pylist() if PLANNED in (r["text"] or "")}
    first_pending = any(
        recorder.kinds.get(("judge", branch, j.name), Counter())["pointwise"] > 0
        for j in config.judges
        if j.tier != "second"
    )
    for judge in config.judges:
        if judge.tier == "second" and first_pending:
            # What a second judge is asked follows the first pass's answers: at most what it
            # would be asked without tiers (every pointwise call, the pairwise bound).
            line = recorder.lines.get(("judge", branch, judge.name))
            if line is None:
                line = recorder.lines[("judge", branch, judge.name)] = Line(
                    "judge", branch, judge.name
                )
            kinds_per_response = int(config.stages.judge.safety) + int(
                bool(config.stages.judge.aspects)
            )
            most = responses.num_rows * kinds_per_response + _pairwise_bound(config, responses)
            line.bound = max(line.to_send + line.bound, most)
            line.to_send = 0
            continue
        line = recorder.lines.get(("judge", branch, judge.name))
        if line is None:
            continue
        kinds = recorder.kinds.get(("judge", branch, judge.name), Counter())
        pending_verdicts = kinds["pointwise"] > 0
        if not pending_verdicts or judge.protocol in GUARDS:
            continue
        # What the placeholder run counted for these kinds, out; the bounds, in.
        for kind in ("pairwise", "reasoning", "reasoning_prior"):
            exact, bound = kinds[f"{kind}:exact"], kinds[f"{kind}:bound"]
            line.to_send -= exact
            line.bound -= bound
        asked = {r["response_id"] for r in rows if r["judge"] == judge.name}
        unknown = {
            r["response_id"]
            for r in responses.to_pylist()
            if r["response_id"] in planned_rids or r["response_id"] not in asked
        }
        extra = _pairwise_bound(config, responses)
        if judge.cascade_band:
            extra += len(unknown)
            if judge.debias != "off":
                extra += len({r["question_id"] for r in responses.to_pylist()})
        line.bound += extra


def plan_run(config: RunConfig, only: Sequence[str] | None = None) -> Plan:
    """The plan of a run of `config` (module docstring). Reads the workspace and the journals;
    writes nothing and sends nothing."""
    taxonomy = load_taxonomy(config.taxonomy)
    leaves = taxonomy.select(list(only) if only else (list(config.only) or None))
    workspace = Workspace(config.workspace)
    run_config = _plan_config(config)
    recorder = Recorder(entries={})
    service = PlanningService(run_config, recorder)
    plan = Plan(config=config.source_file or config.name, branches=len(leaves))
    for entry in (*config.models, config.generator, *config.judges):
        plan.entries.setdefault(entry.name, entry)
    try:
        for leaf in leaves:
            _plan_branch(config, run_config, leaf, workspace, recorder, service, plan)
    finally:
        service.close()
    plan.lines = list(recorder.lines.values()) + [line for line in plan.lines if line.reused]
    return plan


def _plan_branch(
    config: RunConfig,
    run_config: RunConfig,
    leaf: Any,
    workspace: Workspace,
    recorder: Recorder,
    service: PlanningService,
    plan: Plan,
) -> None:
    known: dict[str, _Known | StageRef] = {}
    inputs = _PlanInputs(workspace)
    for stage in STAGES.values():
        exact_inputs = all(name in known for name in stage.inputs)
        key = stage.key(config, leaf, cast(Mapping[str, StageRef], known)) if exact_inputs else ""
        found = workspace.find(stage.name, leaf.branch_id, key) if key else None
        if found is not None and not retryable_count(found.failed_by_kind, config.retry_failed):
            known[stage.name] = found
            inputs.reused[stage.name] = found
            for entry in _entries_for(config, stage.name).values():
                plan.lines.append(Line(stage.name, leaf.branch_id, entry.name, reused=True))
            continue
        recorder.stage, recorder.branch = stage.name, leaf.branch_id
        recorder.entries = _entries_for(config, stage.name)
        sent_before = _planned_so_far(recorder, stage, leaf.branch_id)
        output, tables = _run(stage, run_config, leaf, inputs, workspace, service)
        settle(recorder)
        inputs.planned[stage.name] = tables
        if stage.name == "judge":
            _judge_bounds(
                config,
                recorder,
                leaf.branch_id,
                inputs.table("responses", "responses"),
                tables["judgments"],
            )
        planned = _planned_so_far(recorder, stage, leaf.branch_id) - sent_before
        if exact_inputs and planned == 0:
            # Everything came from the journal: a run computes this very output.
            known[stage.name] = _Known(output_id(key, output.failed_items()))


def _planned_so_far(recorder: Recorder, stage: Stage, branch: str) -> int:
    return sum(
        line.to_send + line.bound
        for (s, b, _), line in recorder.lines.items()
        if s == stage.name and b == branch
    )


def _run(
    stage: Stage,
    config: RunConfig,
    leaf: Any,
    inputs: _PlanInputs,
    workspace: Workspace,
    service: PlanningService,
) -> tuple[Any, dict[str, pa.Table]]:
    if not stage.journaled:
        return stage.run(config, leaf, inputs, None, service)
    journal: Journal = workspace.journal(stage.name, leaf.branch_id)  # read; never appended to
    return stage.run(config, leaf, inputs, journal, service)
