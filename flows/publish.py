"""Publish: gather every branch's stage outputs into one immutable dataset version."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tasks.publish import assign_splits, build_quadruples, dataset_card
from vlpref import __version__
from vlpref.config import RunConfig
from vlpref.prompts import prompt_versions
from vlpref.records import SCHEMAS
from vlpref.store import Store
from vlpref.taxonomy import Subcategory, Taxonomy
from vlpref.workspace import StageRef, Workspace

# table name -> the stage whose output holds it
TABLE_SOURCES = {
    "images": "images",
    "questions": "questions",
    "responses": "responses",
    "judgments": "judge",
    "pairs": "pairs",
    "rankings": "pairs",
}


def code_version() -> str:
    """vlpref's version, plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}"


def gather_tables(
    workspace: Workspace, refs: dict[str, dict[str, StageRef]]
) -> dict[str, pa.Table]:
    tables: dict[str, pa.Table] = {}
    for name, stage in TABLE_SOURCES.items():
        parts = [workspace.read(stage_refs[stage], name) for stage_refs in refs.values()]
        tables[name] = pa.concat_tables(parts) if parts else SCHEMAS[name].empty_table()
    failures = [
        workspace.read(ref, "failures")
        for stage_refs in refs.values()
        for ref in stage_refs.values()
    ]
    tables["failures"] = (
        pa.concat_tables(failures) if failures else SCHEMAS["failures"].empty_table()
    )
    # One image may serve two branches (a folder source listing it twice): publish it once.
    images = tables["images"]
    if images.num_rows:
        ids = images.column("image_id").to_pylist()
        first = {image_id: i for i, image_id in reversed(list(enumerate(ids)))}
        keep = sorted(first.values())
        if len(keep) != len(ids):
            tables["images"] = images.take(pa.array(keep))
    return tables


def model_safety(tables: dict[str, pa.Table]) -> dict[str, dict[str, float]]:
    """Per response model: responses, share judged unsafe, mean P(unsafe) (SPA-VL's Table 1)."""
    responses = tables["responses"]
    judgments = tables["judgments"]
    model_of = dict(
        zip(
            responses.column("response_id").to_pylist(),
            responses.column("model").to_pylist(),
            strict=True,
        )
    )
    safety = judgments.filter(pc.equal(judgments.column("kind"), "safety"))
    verdicts: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for rid, verdict, score in zip(
        safety.column("response_id").to_pylist(),
        safety.column("verdict").to_pylist(),
        safety.column("score").to_pylist(),
        strict=True,
    ):
        verdicts[model_of[rid]].append((verdict, score))
    out: dict[str, dict[str, float]] = {}
    for model in sorted(set(model_of.values())):
        judged = verdicts.get(model, [])
        n = len(judged)
        out[model] = {
            "responses": sum(1 for m in model_of.values() if m == model),
            "judged": n,
            "unsafe_rate": sum(1 for v, _ in judged if v == "unsafe") / n if n else float("nan"),
            "mean_p_unsafe": sum(s for _, s in judged) / n if n else float("nan"),
        }
    return out


def build_manifest(
    config: RunConfig,
    taxonomy: Taxonomy,
    leaves: list[Subcategory],
    refs: dict[str, dict[str, StageRef]],
    tables: dict[str, pa.Table],
) -> dict[str, Any]:
    """What produced the version: never an endpoint URL or a secret, only what shapes the data."""

    def entry(m: Any) -> dict[str, Any]:
        endpoint = config.endpoints[m.endpoint]
        return {
            "name": m.name,
            "model": m.model,
            "provider": endpoint.get("kind", "openai"),
            "sampling": m.sampling.model_dump(mode="json"),
        }

    return {
        "name": config.name,
        "config_hash": config.content_hash(),
        "code_version": code_version(),
        "taxonomy": {"name": taxonomy.name, "hash": taxonomy.content_hash, "branches": len(leaves)},
        "prompts": prompt_versions(config.prompts_dir),
        "models": [entry(m) for m in config.models],
        "generator": entry(config.generator),
        "judges": [entry(j) for j in config.judges],
        "stages": config.stages.model_dump(mode="json"),
        "branches": {
            leaf.branch_id: {
                "path": leaf.path,
                "stages": {
                    stage: {"key": ref.key, "reused": ref.reused, "counts": ref.counts}
                    for stage, ref in refs[leaf.branch_id].items()
                },
            }
            for leaf in leaves
        },
        "counts": {name: tbl.num_rows for name, tbl in tables.items()},
        "model_safety": model_safety(tables),
    }


def publish_version(
    config: RunConfig,
    taxonomy: Taxonomy,
    leaves: list[Subcategory],
    refs: dict[str, dict[str, StageRef]],
) -> str:
    workspace = Workspace(config.workspace)
    tables = gather_tables(workspace, refs)
    publish = config.stages.publish
    splits = assign_splits(
        tables["images"].column("image_id").to_pylist(), publish.splits, publish.seed
    )
    quadruples = build_quadruples(
        tables["images"],
        tables["questions"],
        tables["responses"],
        tables["pairs"],
        splits,
        rankings=tables["rankings"],
        names=list(publish.splits),
    )
    # An empty split is left out: `datasets` cannot load an empty Parquet split.
    quadruples = {split: tbl for split, tbl in quadruples.items() if tbl.num_rows}
    store = Store(config.store)
    latest = store.latest()
    manifest = build_manifest(config, taxonomy, leaves, refs, tables)
    info = store.publish(
        tables, quadruples, manifest, dataset_card, parent=latest.version_id if latest else None
    )
    return info.version_id
