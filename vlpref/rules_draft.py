"""`vlpref rules draft`: a model drafts objectified rules for taxonomy leaves, for review.

Rules are a policy: a model may draft them, a person decides them. This module asks a model of
the run config (the generator by default) for 2-5 "The response must not ..." rules per leaf
(`prompts/draft_rules.txt`), journaled like every request (a rerun sends nothing), checks each
rule as the taxonomy loader would (one line, at most RULE_MAX_CHARS, no duplicates with what the
leaf already inherits), and writes a copy of the taxonomy with the drafts on the leaves and a
header saying they are unreviewed. The copy is loaded back before it is written, so it is always
a valid taxonomy. Leaves that already have rules of their own are left alone unless asked.

The answer is read tolerantly: a JSON object with a `rules` list (fenced or not), else a JSON
list, else lines starting with "-", "*" or "1.". An answer with no usable rule is a failure of
that leaf, reported, and the leaf is written without drafts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vlpref.chat import ChatRequest, Message
from vlpref.config import ModelEntry, RunConfig
from vlpref.errors import ConfigError
from vlpref.prompts import load_prompt
from vlpref.runner import BatchStats
from vlpref.service import ModelService
from vlpref.taxonomy import RULE_MAX_CHARS, Subcategory, Taxonomy, loads_taxonomy
from vlpref.workspace import Workspace

__all__ = ["Draft", "draft_rules", "parse_rules", "with_drafts"]

_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.+?)\s*$")
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_JSON_LIST = re.compile(r"\[.*\]", re.DOTALL)


def parse_rules(text: str) -> list[str]:
    """The rules in a model's answer (module docstring), cleaned to one line each."""
    found: list[Any] = []
    for pattern, pick in ((_JSON_OBJECT, "rules"), (_JSON_LIST, None)):
        match = pattern.search(text)
        if match is None:
            continue
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        value = data.get(pick) if pick and isinstance(data, dict) else data
        if isinstance(value, list):
            found = value
            break
    if not found:
        found = [m.group(1) for line in text.splitlines() if (m := _LIST_ITEM.match(line))]
    rules: list[str] = []
    for item in found:
        if not isinstance(item, str):
            continue
        rule = " ".join(item.split()).strip("\"' ")
        if rule and len(rule) <= RULE_MAX_CHARS:
            rules.append(rule)
    return rules


@dataclass
class Draft:
    """What drafting did: leaf path -> drafted rules, and the leaves that failed, with why."""

    model: str
    rules: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    requests_sent: int = 0
    requests_cached: int = 0


def _keep(leaf: Subcategory, drafted: list[str]) -> list[str]:
    """Drafted rules minus what the leaf already inherits and repeats, each once."""
    seen = {r.casefold() for r in leaf.rules}
    out = []
    for rule in drafted:
        if rule.casefold() not in seen:
            seen.add(rule.casefold())
            out.append(rule)
    return out[:8]


def draft_rules(
    config: RunConfig,
    taxonomy: Taxonomy,
    leaves: Sequence[Subcategory],
    entry: ModelEntry,
    *,
    redraft: bool = False,
    service: ModelService | None = None,
) -> Draft:
    """Ask `entry` for rules for each leaf without rules of its own (every leaf with `redraft`)."""
    prompt = load_prompt("draft_rules", config.prompts_dir)
    service = service or ModelService.shared()
    provider = service.provider(
        config.endpoints[entry.endpoint], early_stop_after=config.early_stop_after
    )
    todo = {leaf.path: leaf for leaf in leaves if redraft or not leaf.own_rules}
    draft = Draft(model=entry.model)
    requests = [
        ChatRequest(
            id=path,
            model=entry.model,
            messages=(
                Message.user(
                    prompt.render(
                        class_path=f"{leaf.class1} > {leaf.class2} > {leaf.class3}",
                        keywords=", ".join(leaf.keywords),
                        key_phrase=leaf.key_phrase,
                    )
                ),
            ),
            params=entry.sampling.to_params(),
            prompt_version=prompt.version,
        )
        for path, leaf in todo.items()
    ]
    stats = BatchStats()
    journal = Workspace(config.workspace).journal("rules-draft", taxonomy.content_hash[:16])
    with journal:
        for result in service.run([(provider, requests)], journal, stats):
            path = result.request.id
            if not result.ok or not result.samples:
                failure = result.failure
                why = f"{failure.kind}: {failure.message}" if failure else "no answer"
                draft.failed[path] = why
                continue
            rules = _keep(todo[path], parse_rules(result.samples[0].text))
            if rules:
                draft.rules[path] = rules
            else:
                draft.failed[path] = "the answer held no usable rule"
    draft.requests_sent, draft.requests_cached = stats.sent, stats.cached
    return draft


def with_drafts(taxonomy: Taxonomy, draft: Draft) -> str:
    """The taxonomy as YAML with the drafted rules on their leaves (replacing a leaf's own rules
    when it was redrafted), under a header for the reviewer; checked by loading it back."""
    tree = taxonomy.to_dict()
    for domain in tree["domains"]:
        for category in domain["categories"]:
            for leaf in category["subcategories"]:
                path = f"{domain['name']}/{category['name']}/{leaf['name']}"
                if path in draft.rules:
                    leaf["rules"] = draft.rules[path]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    header = (
        f"# Rules drafted by {draft.model} on {stamp} for {len(draft.rules)} leaf(s): "
        "NOT REVIEWED.\n"
        "# Read every rule: keep it only if a reader can check it in an answer alone; edit or\n"
        "# delete the rest, then point the run config's `taxonomy:` at this file.\n"
    )
    text = header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=100)
    try:
        loads_taxonomy(text, file="<drafted taxonomy>")
    except ConfigError as exc:  # a bug here, not the model's: drafts were checked one by one
        raise ConfigError(f"the drafted taxonomy does not load: {exc}") from exc
    return text


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
