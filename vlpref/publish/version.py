"""Publishing a version: gather every branch's stage outputs into one immutable dataset version.

A version is written branch by branch (see `vlpref.store`). A branch is

- `built`: its files are written from this run's stage outputs;
- `reused`: this run computed it, and its inputs are exactly those of the parent version's copy
  (same pairs-stage key, same publish settings), so the parent's files are shared;
- `shared`: not part of this run (`--only` named other branches), so the parent's files are
  shared as they are.

Shared files are hard links where the filesystem allows it, copies elsewhere.

Every version gets its report, `report.html` (`vlpref.report_html`), written by the store's
extras hook from the staged version and listed in the manifest's files; the flow run links it as
the `vlpref-report` artifact. A report that fails to build is logged as a warning and left out:
the version's data is good without it, and `vlpref report VERSION` builds it again.

What a version publishes names no local folder and holds no key (docs/security.md): the
manifest's stage settings give a local image source as written in the config, an absolute one
relative to the config file's folder (`published_stages`); the failures table's item ids and
reasons name the config's folder, the workspace and the store relative to the config file's
folder (`LocalRoots`), and are redacted once more (`vlpref.redact`: a stage output written before
redaction existed, or by a plug-in stage, is published clean too).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vlpref import __version__
from vlpref.config import ModelEntry, RunConfig
from vlpref.evaluation import metrics
from vlpref.prompts import prompt_versions
from vlpref.publish.card import dataset_card
from vlpref.publish.rows import branch_parts
from vlpref.redact import redact
from vlpref.report_html import REPORT_NAME, build_report
from vlpref.store import Part, SharedFile, Store, Version, VersionInfo
from vlpref.taxonomy import Subcategory, Taxonomy
from vlpref.workspace import StageRef, Workspace, stage_key

log = logging.getLogger(__name__)

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


def config_dir(config: RunConfig) -> Path:
    """The folder of the config file, which its relative paths are relative to."""
    return Path(config.source_file).resolve().parent if config.source_file else Path.cwd()


def _relative(path: str, base: Path) -> str:
    """An absolute local path relative to `base` (`../x` above it); anything else as it is."""
    if "://" in path or not os.path.isabs(path):
        return path
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): the name alone
        return Path(path).name


class LocalRoots:
    """The run's absolute local folders (the config's folder, the workspace, the store) and how
    published text names them: relative to the config file's folder, as the config would."""

    def __init__(self, config: RunConfig) -> None:
        base = config_dir(config)
        self._names = {os.path.normpath(base): "."}
        for location in (config.workspace, config.store):
            if "://" not in location and os.path.isabs(location):
                self._names[os.path.normpath(location)] = _relative(location, base)
        # The longest first: a workspace inside the config's folder is named as the workspace.
        ordered = sorted(self._names, key=len, reverse=True)
        self._pattern = re.compile(
            r"(?<![\w.-])(?P<root>" + "|".join(map(re.escape, ordered)) + r")(?P<slash>/)?"
        )

    def _name(self, match: re.Match[str]) -> str:
        name = self._names[match["root"]]
        if match["slash"]:
            return "" if name == "." else f"{name}/"
        following = match.string[match.end() : match.end() + 2]
        if following[:1] == "." and following[1:].strip() == "":
            return name  # the end of a sentence
        if following and (following[0].isalnum() or following[0] in "_.-"):
            return match[0]  # another folder that begins alike (/tmp/run2 beside /tmp/run)
        return name

    def text(self, text: str) -> str:
        """`text` redacted, with the run's local folders named relative to the config's."""
        return self._pattern.sub(self._name, redact(text))


def published_failures(failures: pa.Table, roots: LocalRoots) -> pa.Table:
    """The failures table as published: item ids and reasons through `roots.text`."""
    for column in ("item_id", "reason"):
        index = failures.schema.get_field_index(column)
        values = failures[column].to_pylist()
        clean = [roots.text(v) if isinstance(v, str) else v for v in values]
        if clean != values:
            field = failures.schema.field(index)
            failures = failures.set_column(index, field, pa.array(clean, type=field.type))
    return failures


def branch_tables(
    workspace: Workspace, refs: dict[str, StageRef], roots: LocalRoots | None = None
) -> dict[str, pa.Table]:
    """One branch's tables, failures of every stage included (through `published_failures`
    when `roots` is given)."""
    tables = {name: workspace.read(refs[stage], name) for name, stage in TABLE_SOURCES.items()}
    failures = pa.concat_tables([workspace.read(ref, "failures") for ref in refs.values()])
    tables["failures"] = published_failures(failures, roots) if roots is not None else failures
    return tables


SOURCE_PATHS = ("path", "root")  # the fields of an image source that name local files


def published_stages(config: RunConfig) -> dict[str, Any]:
    """The stage settings as the manifest records them: a local image source's folders
    (`SOURCE_PATHS`) as the config writes them, absolute ones relative to the config file's
    folder. (The config's hash is of the settings as written.)"""
    stages: dict[str, Any] = config.stages.model_dump(mode="json")
    base = config_dir(config)
    images = stages["images"]
    for source in (images["source"], *images["overrides"].values()):
        for key in SOURCE_PATHS:
            if isinstance(source.get(key), str):
                source[key] = _relative(source[key], base)
    return stages


def model_safety_counts(tables: dict[str, pa.Table]) -> dict[str, dict[str, float]]:
    """Per response model: responses, judged, judged unsafe, sum of P(unsafe) (summable)."""
    responses, judgments = tables["responses"], tables["judgments"]
    model_of = dict(
        zip(responses["response_id"].to_pylist(), responses["model"].to_pylist(), strict=True)
    )
    out: dict[str, dict[str, float]] = {}
    for model, n in Counter(model_of.values()).items():
        out[model] = {"responses": n, "judged": 0, "unsafe": 0, "p_unsafe_sum": 0.0}
    safety = judgments.filter(pc.equal(judgments["kind"], "safety"))
    for rid, verdict, score in zip(
        safety["response_id"].to_pylist(),
        safety["verdict"].to_pylist(),
        safety["score"].to_pylist(),
        strict=True,
    ):
        stats = out[model_of[rid]]
        stats["judged"] += 1
        stats["unsafe"] += verdict == "unsafe"
        stats["p_unsafe_sum"] += score
    return out


def agreement_counts(judgments: pa.Table, judges: list[str]) -> dict[str, Any] | None:
    """With several judges, the branch's safety verdicts as summable counts: the contingency
    table of the first two judges (Cohen's kappa, exactly two judges) and Krippendorff's
    coincidence matrix (alpha, nominal), keyed `verdict|verdict`. None with one judge."""
    if len(judges) < 2:
        return None
    safety = judgments.filter(pc.equal(judgments["kind"], "safety"))
    by_response: dict[str, dict[str, str]] = {}
    for rid, judge, verdict in zip(
        safety["response_id"].to_pylist(),
        safety["judge"].to_pylist(),
        safety["verdict"].to_pylist(),
        strict=True,
    ):
        if verdict:
            by_response.setdefault(rid, {})[judge] = verdict
    names = sorted(judges)
    contingency = Counter(
        f"{v[names[0]]}|{v[names[1]]}"
        for v in by_response.values()
        if names[0] in v and names[1] in v
    )
    units = {rid: [v[j] for j in names if j in v] for rid, v in by_response.items()}
    coincidence = {f"{x}|{y}": n for (x, y), n in metrics.coincidences(units).items()}
    return {"judges": names, "contingency": dict(contingency), "coincidence": coincidence}


def judge_agreement(branches: dict[str, dict[str, Any]], judges: list[str]) -> dict[str, Any]:
    """The version's agreement between judges on the safety verdicts: Cohen's kappa (two
    judges) or Krippendorff's alpha (nominal, more), from the branches' summed counts."""
    names = sorted(judges)
    if len(names) < 2:
        return {"judges": len(names), "metric": None, "value": None, "reason": "one judge"}
    table: Counter[tuple[str, str]] = Counter()
    coincidence: dict[tuple[str, str], float] = {}
    missing = 0
    for branch in branches.values():
        counts = branch.get("judge_agreement_counts")
        if not counts or counts.get("judges") != names:
            missing += 1  # published before the counts existed, or by other judges
            continue
        for key, n in counts["contingency"].items():
            x, _, y = key.partition("|")
            table[(x, y)] += n
        for key, n in counts["coincidence"].items():
            x, _, y = key.partition("|")
            coincidence[(x, y)] = coincidence.get((x, y), 0.0) + n
    if len(names) == 2:
        m = metrics.kappa_from_table(table)
        out: dict[str, Any] = {"judges": 2, "metric": "cohen_kappa", "items": sum(table.values())}
    else:
        m = metrics.alpha_from_coincidence(coincidence)
        out = {"judges": len(names), "metric": "krippendorff_alpha"}
    out["value"] = m.value
    if m.reason:
        out["reason"] = m.reason
    out["branches_without_counts"] = missing
    return out


def model_safety(branches: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """SPA-VL's Table 1 over the whole version: share judged unsafe and mean P(unsafe)."""
    total: dict[str, Counter[str]] = {}
    for branch in branches.values():
        for model, stats in branch.get("model_safety", {}).items():
            total.setdefault(model, Counter()).update(stats)
    out = {}
    for model, t in sorted(total.items()):
        judged = t["judged"]
        out[model] = {
            "responses": t["responses"],
            "judged": judged,
            "unsafe_rate": t["unsafe"] / judged if judged else float("nan"),
            "mean_p_unsafe": t["p_unsafe_sum"] / judged if judged else float("nan"),
        }
    return out


def _entry(config: RunConfig, m: ModelEntry) -> dict[str, Any]:
    endpoint = config.endpoints[m.endpoint]
    return {
        "name": m.name,
        "model": m.model,
        "provider": endpoint.get("kind", "openai"),
        "sampling": m.sampling.model_dump(mode="json"),
    }


def publish_key(config: RunConfig, refs: dict[str, StageRef]) -> str:
    """What a branch's published files depend on: its pairs output (which hashes everything
    upstream) and the split settings."""
    return stage_key(
        "publish", refs["pairs"].output_id, config.stages.publish.model_dump(mode="json")
    )


def _shared_parts(parent: Version, branch_id: str) -> dict[str, Part]:
    suffix = f"/{branch_id}.parquet"
    return {
        rel: SharedFile(parent.version_id, rel)
        for rel in parent.manifest["files"]
        if rel.endswith(suffix)
    }


def publish_version(
    config: RunConfig,
    taxonomy: Taxonomy,
    leaves: list[Subcategory],
    refs: dict[str, dict[str, StageRef]],
    only: list[str] | None = None,
    plan: dict[str, dict[str, int]] | None = None,
) -> str:
    """Publish the branches of this run, sharing what the parent version already has; `plan`
    (what the run planned to send, per stage) is kept in the manifest when given."""
    workspace = Workspace(config.workspace)
    store = Store(config.store)
    latest = store.latest()
    parent = store.open(latest.version_id) if latest else None
    parent_branches: dict[str, Any] = parent.manifest.get("branches", {}) if parent else {}
    branches: dict[str, dict[str, Any]] = {}
    roots = LocalRoots(config)

    def parts() -> Iterator[tuple[str, Part]]:
        """Each branch's parts in turn: the store writes them as they come, so memory holds one
        branch's tables at a time (a SPA-VL-sized version is several GB of images and text)."""
        for leaf in leaves:
            branch_refs = refs[leaf.branch_id]
            key = publish_key(config, branch_refs)
            info: dict[str, Any] = {
                "path": leaf.path,
                "publish_key": key,
                "stages": {
                    stage: {
                        "key": ref.key,
                        "output_id": ref.output_id,
                        "generation": ref.generation,
                        "reused": ref.reused,
                        "counts": ref.counts,
                    }
                    for stage, ref in branch_refs.items()
                },
            }
            previous = parent_branches.get(leaf.branch_id)
            if parent is not None and previous is not None and previous.get("publish_key") == key:
                yield from _shared_parts(parent, leaf.branch_id).items()
                info.update(
                    status="reused", rows=previous["rows"], model_safety=previous["model_safety"]
                )
                if "judge_agreement_counts" in previous:
                    info["judge_agreement_counts"] = previous["judge_agreement_counts"]
            else:
                tables = branch_tables(workspace, branch_refs, roots)
                info.update(
                    status="built",
                    rows={name: tbl.num_rows for name, tbl in tables.items()},
                    model_safety=model_safety_counts(tables),
                )
                counts = agreement_counts(tables["judgments"], [j.name for j in config.judges])
                if counts is not None:
                    info["judge_agreement_counts"] = counts
                yield from branch_parts(leaf.branch_id, tables, config.stages.publish).items()
                del tables
            branches[leaf.branch_id] = info
        if only is not None and parent is not None:
            # A branch rerun: every other branch of the parent comes along unchanged.
            for branch_id, previous in parent_branches.items():
                if branch_id not in branches:
                    yield from _shared_parts(parent, branch_id).items()
                    branches[branch_id] = {**previous, "status": "shared"}

    def manifest() -> dict[str, Any]:
        return {
            "name": config.name,
            "config_hash": config.content_hash(),
            "code_version": code_version(),
            "taxonomy": {
                "name": taxonomy.name,
                "hash": taxonomy.content_hash,
                "branches": len(branches),
            },
            "prompts": prompt_versions(config.prompts_dir),
            "models": [_entry(config, m) for m in config.models],
            "generator": _entry(config, config.generator),
            "judges": [_entry(config, j) for j in config.judges],
            "stages": published_stages(config),
            "only": only,
            "rebuilt": sorted(b["path"] for b in branches.values() if b["status"] == "built"),
            "branches": branches,
            "counts": dict(sum((Counter(b["rows"]) for b in branches.values()), Counter())),
            "model_safety": model_safety(branches),
            "judge_agreement": judge_agreement(branches, [j.name for j in config.judges]),
            **({"plan": plan} if plan is not None else {}),
        }

    info_ = store.publish(
        parts(),
        manifest,
        dataset_card,
        parent=parent.version_id if parent else None,
        extras={REPORT_NAME: version_report},
    )
    link_report(store.open(info_.version_id))
    return info_.version_id


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (its records reach the Prefect UI), or this module's outside one."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def version_report(version: Version) -> bytes | None:
    """report.html for the version being published; None (with a warning) when it cannot be
    built: a bug in the report must not cost a finished run its version."""
    try:
        return build_report(version)
    except Exception as exc:
        _logger().warning(
            "report.html left out of version %s (%s: %s); build it with `vlpref report %s`",
            version.version_id,
            type(exc).__name__,
            redact(str(exc)),
            version.version_id,
            exc_info=True,
        )
        return None


def report_link(info: VersionInfo) -> str:
    """Where a version's report.html is, as a link: a file:// URL for a local store, the
    fsspec URI (s3://..., gs://...) elsewhere."""
    location = f"{info.location.rstrip('/')}/{REPORT_NAME}"
    return location if "://" in location else Path(location).resolve().as_uri()


def link_report(version: Version) -> None:
    """The report as the flow run's `vlpref-report` link artifact. Nothing outside a flow run,
    or when the version has no report; a failure to create it is a warning (the version is
    already committed: an artifact is a convenience, not part of it)."""
    from prefect.artifacts import create_link_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None or REPORT_NAME not in version.manifest["files"]:
        return
    try:
        create_link_artifact(
            link=report_link(version.info),
            link_text=f"{REPORT_NAME} of {version.version_id}",
            key="vlpref-report",
            description=f"The version report (plots and a sample gallery) of {version.version_id}",
        )
    except Exception as exc:
        _logger().warning("could not link report.html as an artifact: %s", redact(str(exc)))


def export_root(config: RunConfig) -> Path | None:
    """Where `exports:` are written: `exports.dir` (relative to the config file), else
    `<store>/exports` when the store is local; None when there is nowhere local to write."""
    from vlpref.fs import is_local, resolve

    if config.exports.dir is not None:
        return (config_dir(config) / config.exports.dir).resolve()
    fs, root = resolve(config.store)
    return Path(root) / "exports" if is_local(fs) else None


def write_version_exports(config: RunConfig, version_id: str) -> list[str]:
    """The config's `exports:` of a published version, into `<root>/<version_id>/<name>`; what
    was written, one line each. An export that fails is a warning naming the command that makes
    it: the version is published and stays so."""
    from vlpref.export.core import ExportSpec, write_exports
    from vlpref.export.filters import Filters

    if not config.exports.formats:
        return []
    root = export_root(config)
    if root is None:
        log.warning(
            "exports: the store %s is not local: set exports.dir to write %d export(s)",
            config.store,
            len(config.exports.formats),
        )
        return []
    specs = [
        ExportSpec(
            format=e.format,
            name=e.name,
            filters=Filters.of(
                splits=e.splits,
                categories=e.categories,
                min_margin=e.min_margin,
                min_confidence=e.min_confidence,
                consistent_only=e.consistent_only,
            ),
        )
        for e in config.exports.formats
    ]
    try:
        results = write_exports(Store(config.store).open(version_id), specs, root / version_id)
    except Exception as exc:
        log.warning(
            "exports of %s failed: %s; `vlpref export %s --format F --out DIR` makes one",
            version_id,
            redact(str(exc)),
            version_id,
        )
        return []
    return [r.summary() for r in results]
