"""The stages of a branch, declared once: what each reads, what enters its key, what runs it,
and which tables it writes.

    images ──> questions ──> responses ──> judge ──> pairs
       └───────────┴────────────┴──────────┘ (each stage may read any earlier one)

The flow (`flows/build.py`) makes one Prefect task per (stage, branch) from this table, and
`vlpref plan` walks the same table without sending a request; a new stage is one entry here. A
stage's key hashes its name, the columns it writes, the output ids of the stages it reads and
`key_parts`: the settings, model entries and prompt versions its rows depend on (so a change
reruns exactly the stages it affects, and a stage's key never changes when nothing it depends on
did).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from vlpref import records
from vlpref.config import PLAN_ONLY_FIELDS, RunConfig
from vlpref.journal import Journal
from vlpref.records import schema_fingerprint
from vlpref.service import ModelService
from vlpref.stage import StageOutput
from vlpref.taxonomy import Subcategory
from vlpref.workspace import StageRef, stage_key


def _entry(config: RunConfig, name: str) -> dict[str, Any]:
    """A model entry as it enters stage keys: with its endpoint's kind and cache namespace (what
    decides the answers), never the endpoint's URL or credentials."""
    entries = {m.name: m for m in (*config.models, config.generator, *config.judges)}
    entry = entries[name]
    endpoint = config.endpoints[entry.endpoint]
    # A judge's `rules` enters only when on, so judge keys made before it existed still hold;
    # price and image_tokens never change an answer.
    exclude = {"endpoint", *PLAN_ONLY_FIELDS}
    if getattr(entry, "rules", None) == "off":
        exclude.add("rules")
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


def _aggregate(config: RunConfig) -> list[str]:
    """The judges' aggregation in a stage key, only when not the default `mean` (so that keys
    written before the option existed stay valid)."""
    aggregate = config.stages.judge.aggregate
    return [] if aggregate == "mean" else [f"aggregate={aggregate}"]


def _judge_settings(config: RunConfig) -> dict[str, Any]:
    exclude = {"aggregate"} if config.stages.judge.aggregate == "mean" else None
    return config.stages.judge.model_dump(mode="json", exclude=exclude)


class Inputs(Protocol):
    """The tables of the stages a stage reads: from the workspace in a build, from memory in a
    plan."""

    def table(self, stage: str, name: str) -> pa.Table: ...


Run = Callable[
    [RunConfig, Subcategory, Inputs, Journal | None, ModelService | None],
    tuple[StageOutput, dict[str, pa.Table]],
]
KeyParts = Callable[[RunConfig, Subcategory], list[Any]]


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of a branch (module docstring)."""

    name: str
    inputs: tuple[str, ...]  # the stages whose outputs it reads
    # The input whose output id enters the key: the stage just before it, whose id already
    # holds those of every stage before (None: images, keyed by its source instead).
    parent: str | None
    tables: tuple[str, ...]  # the tables it writes (the first holds its rows)
    key_parts: KeyParts  # besides the parent's output id: what its rows depend on
    run: Run
    journaled: bool = True  # whether it sends model requests (through a journal)

    def key(self, config: RunConfig, leaf: Subcategory, refs: Mapping[str, StageRef]) -> str:
        """The stage's key for a branch, given the outputs of the stages it reads."""
        parent = [refs[self.parent].output_id] if self.parent else []
        return stage_key(self.name, _columns(self.name), *parent, *self.key_parts(config, leaf))


def _images_parts(config: RunConfig, leaf: Subcategory) -> list[Any]:
    """The images of a branch depend on its own source (the override that applies to it, or the
    default) and the normalisation settings; not on other branches' overrides."""
    from tasks.images import choose_source, source_key_parts

    stage = config.stages.images
    choice = choose_source(leaf, stage)
    source = choice.source
    # decode_pixel_budget bounds memory, not what is decoded: it never changes the images.
    settings = stage.model_dump(mode="json", exclude={"source", "overrides", "decode_pixel_budget"})
    path = getattr(source, "path", None)
    local = _file_fingerprint(_base_dir(config) / path) if path else []
    return [
        leaf.path,
        leaf.keywords,
        leaf.key_phrase,
        source.model_dump(mode="json"),
        choice.exact,  # decides a folder source's layout
        settings,
        local,
        *source_key_parts(source, config, _base_dir(config)),
    ]


def images_key(config: RunConfig, leaf: Subcategory) -> str:
    """The images stage's key for a branch (it reads no other stage)."""
    return STAGES["images"].key(config, leaf, {})


def _questions_parts(config: RunConfig, leaf: Subcategory) -> list[Any]:
    return [
        _entry(config, config.generator.name),
        config.stages.questions.model_dump(mode="json"),
        _prompts(config, "caption", "questions"),
    ]


def _responses_parts(config: RunConfig, leaf: Subcategory) -> list[Any]:
    return [[_entry(config, m.name) for m in config.models], _prompts(config, "response")]


def _judge_parts(config: RunConfig, leaf: Subcategory) -> list[Any]:
    prompts = ("judge_safety", "judge_rating", "judge_pairwise", *_guard_templates(config))
    return [
        [_entry(config, j.name) for j in config.judges],
        _judge_settings(config),
        config.stages.pairs.model_dump(mode="json"),  # candidate pairs follow the policy
        _prompts(config, *prompts),
        *([rules] if (rules := _judge_rules(config, leaf)) else []),
    ]


def _pairs_parts(config: RunConfig, leaf: Subcategory) -> list[Any]:
    return [config.stages.pairs.model_dump(mode="json"), *_aggregate(config)]


def _run_images(
    config: RunConfig,
    leaf: Subcategory,
    inputs: Inputs,
    journal: Journal | None,
    service: ModelService | None,
) -> tuple[StageOutput, dict[str, pa.Table]]:
    from tasks.images import collect_images

    output = collect_images(
        leaf, config.stages.images, base_dir=_base_dir(config), run=config, service=service
    )
    return output, {"images": output.rows}


def _run_questions(
    config: RunConfig,
    leaf: Subcategory,
    inputs: Inputs,
    journal: Journal | None,
    service: ModelService | None,
) -> tuple[StageOutput, dict[str, pa.Table]]:
    from tasks.questions import generate_questions

    images = inputs.table("images", "images")
    output = generate_questions(leaf, images, config, journal, service)
    return output, {"questions": output.rows}


def _run_responses(
    config: RunConfig,
    leaf: Subcategory,
    inputs: Inputs,
    journal: Journal | None,
    service: ModelService | None,
) -> tuple[StageOutput, dict[str, pa.Table]]:
    from tasks.responses import collect_responses

    output = collect_responses(
        leaf.branch_id,
        inputs.table("questions", "questions"),
        inputs.table("images", "images"),
        config,
        journal,
        service,
    )
    return output, {"responses": output.rows}


def _run_judge(
    config: RunConfig,
    leaf: Subcategory,
    inputs: Inputs,
    journal: Journal | None,
    service: ModelService | None,
) -> tuple[StageOutput, dict[str, pa.Table]]:
    from tasks.judge import judge_responses

    output = judge_responses(
        leaf.branch_id,
        inputs.table("questions", "questions"),
        inputs.table("responses", "responses"),
        inputs.table("images", "images"),
        config,
        journal,
        service,
        rules=leaf.rules,
    )
    return output, {"judgments": output.rows}


def _run_pairs(
    config: RunConfig,
    leaf: Subcategory,
    inputs: Inputs,
    journal: Journal | None,
    service: ModelService | None,
) -> tuple[StageOutput, dict[str, pa.Table]]:
    from tasks.pairs import select_branch_pairs

    output, rankings = select_branch_pairs(
        leaf.branch_id,
        inputs.table("questions", "questions"),
        inputs.table("responses", "responses"),
        inputs.table("judge", "judgments"),
        config,
    )
    return output, {"pairs": output.rows, "rankings": rankings}


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("images", (), None, ("images",), _images_parts, _run_images, journaled=False),
        Stage("questions", ("images",), "images", ("questions",), _questions_parts, _run_questions),
        Stage(
            "responses",
            ("images", "questions"),
            "questions",
            ("responses",),
            _responses_parts,
            _run_responses,
        ),
        Stage(
            "judge",
            ("images", "questions", "responses"),
            "responses",
            ("judgments",),
            _judge_parts,
            _run_judge,
        ),
        Stage(
            "pairs",
            ("questions", "responses", "judge"),
            "judge",
            ("pairs", "rankings"),
            _pairs_parts,
            _run_pairs,
            journaled=False,
        ),
    )
}
"""The stages of a branch, in the order they run."""
