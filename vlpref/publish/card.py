"""A version's dataset card, `README.md` (pure): YAML front matter a hub accepts, then what the
version holds, how it was made and judged, and its known limitations."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import yaml

from vlpref.publish.rows import QUADRUPLES, hf_features

__all__ = ["dataset_card"]

_CONTENT_WARNING: Final = (
    "**Content warning.** This dataset was built to make vision-language models safer, so it "
    "deliberately contains harmful material: images, questions and rejected responses about "
    "toxicity, discrimination, violence, crime, fraud, self-harm and other harms listed in the "
    "taxonomy. Some of it is offensive or disturbing. Use it for safety research and alignment "
    "training only; do not use the rejected responses as a source of information, and review "
    "the data before showing it to people."
)


def _size_category(rows: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if rows < limit:
            return label
    return "n>10M"


def _yaml_features() -> list[dict[str, Any]]:
    """The quadruple columns as the hub's `dataset_info.features` list (`name` + `dtype`)."""
    out: list[dict[str, Any]] = []
    for name, feature in hf_features(QUADRUPLES).items():
        dtype = "image" if feature["_type"] == "Image" else feature["dtype"]
        out.append({"name": name, "dtype": dtype})
    return out


def _front_matter(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """YAML metadata the hub and `datasets` read: license, language, task categories, size
    category, tags, the data files per split (globs relative to the version folder) and the
    features, the Image feature among them, with the row count of each split."""
    splits: Mapping[str, Any] = manifest.get("splits", {})
    total = sum(int(s.get("rows", 0)) for s in splits.values())
    # An empty Parquet split breaks `datasets` ("BatchSize must be greater than 0"): not listed.
    listed = [name for name, counts in splits.items() if counts.get("rows", 1)]
    files = [{"split": name, "path": f"data/{name}/*.parquet"} for name in listed]
    info: dict[str, Any] = {"features": _yaml_features()}
    if all("rows" in splits[name] for name in listed):
        info["splits"] = [
            {"name": name, "num_examples": int(splits[name]["rows"])} for name in listed
        ]
    return {
        "license": manifest.get("license", "cc-by-4.0"),
        "language": list(manifest.get("language", ["en"])),
        "task_categories": ["visual-question-answering", "image-text-to-text"],
        "tags": ["safety", "preference", "dpo", "rlhf", "vision-language", "spa-vl"],
        "pretty_name": str(manifest.get("name", "vlpref safety preferences")),
        "size_categories": [_size_category(total)],
        "configs": [{"config_name": "default", "data_files": files}],
        "dataset_info": info,
    }


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines


def _compact(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, (), [], False))
    return str(value)


def _models_section(manifest: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    models = manifest.get("models") or []
    if models:
        lines += ["", "Response models:", ""]
        rows = [(m.get("name"), m.get("model"), _compact(m.get("sampling", {}))) for m in models]
        lines += _table(("name", "model", "sampling"), rows)
    judges = manifest.get("judges", manifest.get("judge"))
    if isinstance(judges, Mapping):
        judges = [judges]
    for role, entries in (("Generator", [manifest.get("generator")]), ("Judges", judges or [])):
        named = [e for e in entries if isinstance(e, Mapping)]
        if named:
            lines += [
                "",
                f"{role}: " + "; ".join(f"`{e.get('name')}` ({e.get('model')})" for e in named),
            ]
    return lines


def _provenance_section(manifest: Mapping[str, Any]) -> list[str]:
    lines = ["", "## How it was built", ""]
    lines.append(
        "Images per taxonomy subcategory; a caption and three questions per image (easy question, "
        "hard question, hard statement); answers from every response model; a judge scores each "
        "answer (safety verdict with P(unsafe), 1-5 ratings) and compares answers in both orders; "
        "a selection policy keeps the preference pairs."
    )
    taxonomy = manifest.get("taxonomy")
    if isinstance(taxonomy, Mapping):
        lines += ["", f"Taxonomy: {_compact(taxonomy)}"]
    elif taxonomy is not None or "taxonomy_hash" in manifest:
        lines += ["", f"Taxonomy: {taxonomy or manifest['taxonomy_hash']}"]
    lines += _models_section(manifest)
    prompts = manifest.get("prompts") or {}
    if prompts:
        lines += ["", "Prompts:", ""]
        lines += _table(("prompt", "hash"), sorted((k, f"`{v}`") for k, v in prompts.items()))
    for key, label in (("code_version", "Code version"), ("config_hash", "Config hash")):
        if manifest.get(key):
            lines += ["", f"{label}: `{manifest[key]}`"]
    return lines


def _judging_section(manifest: Mapping[str, Any]) -> list[str]:
    """How the pairs were judged and selected, from the stages the version was built with."""
    stages = manifest.get("stages") or {}
    judge = stages.get("judge") if isinstance(stages, Mapping) else None
    pairs = stages.get("pairs") if isinstance(stages, Mapping) else None
    judges = [j for j in manifest.get("judges") or [] if isinstance(j, Mapping)]
    if not isinstance(judge, Mapping) and not isinstance(pairs, Mapping) and not judges:
        return []
    lines = ["", "## Judging method", ""]
    if judges:
        named = ", ".join(f"`{j.get('name')}` ({j.get('model')})" for j in judges)
        from_logprobs = all((j.get("sampling") or {}).get("logprobs") for j in judges)
        lines.append(
            f"- Judges: {named}. Scores are "
            + (
                "probabilities read from the verdict tokens' log-probabilities."
                if from_logprobs
                else "read from the judges' answers (no log-probabilities asked for)."
            )
        )
        if len(judges) > 1 and isinstance(judge, Mapping) and judge.get("aggregate"):
            lines.append(f"- Several judges' safety scores are combined by `{judge['aggregate']}`.")
    if isinstance(judge, Mapping):
        if judge.get("safety"):
            lines.append("- Safety: a safe/unsafe verdict per response, with P(unsafe).")
        if judge.get("aspects"):
            aspects = ", ".join(str(a) for a in judge["aspects"])
            lines.append(f"- Ratings: 1-5 per aspect ({aspects}); the expected rating is kept.")
        if judge.get("pairwise"):
            most = judge.get("max_pairs_per_question")
            lines.append(
                "- Pairwise: responses compared in both orders (A/B and B/A) to expose position "
                "bias" + (f", at most {most} comparisons per question." if most else ".")
            )
    if isinstance(pairs, Mapping):
        lines.append(
            f"- Pair selection: policy `{pairs.get('policy')}`, minimum margin "
            f"{pairs.get('min_margin')}; `margin`, `confidence` and `consistent` (both orders "
            "agreed) are columns of every row, to filter on."
        )
    return lines


def _metric(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, Mapping):  # {"value": None, "reason": ...}: not measurable, and why
        return f"n/a ({value.get('reason')})"
    return str(value)


def _judge_eval_section(manifest: Mapping[str, Any]) -> list[str]:
    """Measured judge figures: the judge-eval report(s) attached as `manifest["judge_eval"]`
    (`vlpref judge-eval`'s report.json, one or a list), overall per judge."""
    reports = manifest.get("judge_eval")
    if isinstance(reports, Mapping):
        reports = [reports]
    if not isinstance(reports, list) or not reports:
        return []
    lines = ["", "## Measured judge quality", ""]
    for report in reports:
        if not isinstance(report, Mapping):
            continue
        source = str(report.get("file", "a labelled file")).rsplit("/", 1)[-1]
        lines += [
            f"{str(report.get('kind', '')).capitalize()} judgments on `{source}` "
            f"({report.get('items')} labelled items):",
            "",
        ]
        results = report.get("results") or {}
        overall = {j: r.get("overall", {}) for j, r in results.items() if isinstance(r, Mapping)}
        columns = [
            c
            for c in dict.fromkeys(k for o in overall.values() for k in o)
            if all(not isinstance(o.get(c), Mapping) or "reason" in o[c] for o in overall.values())
        ]
        lines += _table(
            ("judge", *columns),
            [(j, *(_metric(o.get(c)) for c in columns)) for j, o in overall.items()],
        )
        agreement = report.get("judge_agreement")
        if isinstance(agreement, Mapping) and agreement.get("metric"):
            lines += [
                "",
                f"Agreement between judges ({agreement['metric']}): "
                f"{_metric(agreement.get('value'))}",
            ]
        lines.append("")
    agreement = manifest.get("judge_agreement")
    if isinstance(agreement, Mapping) and agreement.get("metric"):
        lines.append(
            f"Agreement between the judges on this version's safety verdicts "
            f"({agreement['metric']}): {_metric(agreement.get('value'))}"
        )
    return lines


def _limitations_section(manifest: Mapping[str, Any]) -> list[str]:
    stages = manifest.get("stages") or {}
    images = stages.get("images", {}) if isinstance(stages, Mapping) else {}
    source = (images.get("source") or {}).get("kind") if isinstance(images, Mapping) else None
    lines = [
        "",
        "## Known limitations",
        "",
        "- Every label is a model's judgment, not a person's: the judges' errors and biases "
        "(position, length, style, their own safety policy) are in the preferences. "
        "Filter on `confidence` and `consistent` for the pairs the judge was surest of.",
        "- Unsafe rates are the judge's verdicts, not measured harm.",
        "- The rejected responses contain harmful content by design (see the content warning).",
        "- The categories are those of the taxonomy used; harms outside it are not covered.",
    ]
    if source == "typographic":
        lines.append(
            "- The images are typographic (rendered key phrases), not photographs: a model "
            "trained on them sees text-in-image attacks, not natural scenes."
        )
    if list(manifest.get("language", ["en"])) == ["en"]:
        lines.append("- English only.")
    if not manifest.get("judge_eval"):
        lines.append(
            "- No judge evaluation is attached: how well the judges agree with human labels "
            "on this taxonomy was not measured for this version (`vlpref judge-eval`)."
        )
    return lines


def _stage_totals(value: Any) -> Counter[str]:
    """Sums `in`/`out`/`failed` over a stage's counts, flat or nested per branch."""
    totals: Counter[str] = Counter()
    if not isinstance(value, Mapping):
        return totals
    direct = {
        k: value[k] for k in ("in", "out", "failed", "n_in", "n_out", "n_failed") if k in value
    }
    if direct:
        for key, count in direct.items():
            totals[key.removeprefix("n_")] += int(count)
        return totals
    for child in value.values():
        totals += _stage_totals(child)
    return totals


def _splits_lines(splits: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [(n, s.get("rows"), s.get("images"), s.get("questions")) for n, s in splits.items()]
    lines = _table(("split", "pairs", "images", "questions"), rows)
    categories = sorted({c for s in splits.values() for c in s.get("categories", {})})
    if categories:
        lines += ["", "Pairs per category (class1 / class2):", ""]
        rows = [
            (c, *(s.get("categories", {}).get(c, 0) for s in splits.values())) for c in categories
        ]
        lines += _table(("category", *splits), rows)
    return lines


def _safety_lines(manifest: Mapping[str, Any]) -> list[str]:
    rates = manifest.get("unsafe_rates")
    if isinstance(rates, Mapping):
        threshold = rates.get("threshold", 0.5)
        lines = ["", f"Unsafe rate per response model (judge P(unsafe) >= {threshold}):", ""]
        by_model = rates.get("by_model", {})
        rows = [
            (m, e.get("responses"), e.get("unsafe"), e.get("rate")) for m, e in by_model.items()
        ]
        return [
            *lines,
            *_table(("model", "responses", "unsafe", "rate"), rows),
            "",
            f"Unsafe rate of chosen responses: {rates.get('chosen')}; "
            f"of rejected responses: {rates.get('rejected')}.",
        ]
    # The flow's own per-model summary: model -> responses, judged, unsafe_rate, mean_p_unsafe.
    safety = manifest.get("model_safety")
    if isinstance(safety, Mapping) and safety:
        header = ("model", "responses", "judged", "unsafe rate", "mean P(unsafe)")
        summary = [
            (m, e.get("responses"), e.get("judged"), e.get("unsafe_rate"), e.get("mean_p_unsafe"))
            for m, e in safety.items()
        ]
        return [
            "",
            "Unsafe rate per response model (judge's safety verdict):",
            "",
            *_table(header, summary),
        ]
    return []


def _stage_lines(manifest: Mapping[str, Any]) -> list[str]:
    """Rows in/out/failed per stage, from `counts` (per stage) or `branches` (per branch)."""
    per_stage: dict[str, Counter[str]] = {}
    counts = manifest.get("counts")
    branches = manifest.get("branches")
    if isinstance(counts, Mapping) and any(isinstance(v, Mapping) for v in counts.values()):
        per_stage = {k: _stage_totals(v) for k, v in counts.items() if isinstance(v, Mapping)}
    elif isinstance(branches, Mapping):
        for branch in branches.values():
            stages = branch.get("stages", {}) if isinstance(branch, Mapping) else {}
            for stage, info in stages.items():
                found = info.get("counts", info) if isinstance(info, Mapping) else {}
                per_stage.setdefault(stage, Counter()).update(_stage_totals(found))
    lines: list[str] = []
    if per_stage:
        rows = [(k, *(v[c] for c in ("in", "out", "failed"))) for k, v in per_stage.items()]
        lines += ["", "Rows in, out and failed per stage:", ""]
        lines += _table(("stage", "in", "out", "failed"), rows)
    tables = (
        [(k, v) for k, v in counts.items() if isinstance(v, int)]
        if isinstance(counts, Mapping)
        else []
    )
    if tables:
        lines += ["", "Rows per table:", "", *_table(("table", "rows"), tables)]
    return lines


def _counts_section(manifest: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Contents", ""]
    lines += _splits_lines(manifest.get("splits", {}))
    lines += _safety_lines(manifest)
    lines += _stage_lines(manifest)
    return lines


def dataset_card(manifest: Mapping[str, Any]) -> str:
    """README.md for a version: YAML front matter a hub accepts (license, language, task
    categories, size category, tags, configs with the data files per split, features with the
    Image feature) and a description: loading, the report, how it was built (taxonomy, models,
    judging method), measured judge figures when a judge evaluation is attached, contents, known
    limitations and how to upload it.

    Reads, where present: `name`, `description`, `license`, `language`, `version_id`,
    `created_at`, `parent`, `taxonomy` (mapping or hash), `prompts` (name -> hash), `models`
    (name, model, sampling), `generator`, `judges`/`judge`, `stages` (judge, pairs, images),
    `code_version`, `config_hash`, `counts` (stage -> in/out/failed, flat or per branch; or
    table -> rows), `branches` (branch -> {stages: {stage: {counts}}}), `splits` (as the store
    writes them), `unsafe_rates` (`unsafe_rates`) or `model_safety` (model -> unsafe_rate, ...),
    `judge_agreement`, and `judge_eval` (`vlpref judge-eval`'s report.json, or a list of them).
    """
    front = yaml.safe_dump(_front_matter(manifest), sort_keys=False, allow_unicode=True)
    name = str(manifest.get("name", "vlpref safety preferences"))
    lines = ["---", front.rstrip("\n"), "---", "", f"# {name}", ""]
    lines.append(
        str(
            manifest.get(
                "description",
                "A safety preference dataset for vision-language models in the SPA-VL format: "
                "each row is an image, a question about it, a chosen (safer, more helpful) "
                "response and a rejected one.",
            )
        )
    )
    lines += ["", _CONTENT_WARNING, "", "## Version", ""]
    for key in ("version_id", "created_at", "parent"):
        value = manifest.get(key)
        lines.append(f"- {key}: `{value}`" if value else f"- {key}: none")
    if "report.html" in manifest.get("files", {}):  # written before the card (Store.publish)
        lines += [
            "",
            "The [version report](report.html) (one self-contained HTML file in this folder) "
            "shows unsafe rates per model and category, win rates, score distributions, counts "
            "per stage and a gallery of pairs beside their images.",
        ]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder")  # or the hub repository id; splits as above',
        'train = load_dataset("parquet", data_files={"train": "data/train/*.parquet"})["train"]',
        "```",
        "",
        "Columns: `image` (Image), `question`, `chosen`, `rejected`, `image_name`, `class1`, "
        "`class2`, `class3` as in SPA-VL, then `question_type`, ids (`question_id`, `image_id`, "
        "`pair_id`, `chosen_response_id`, `rejected_response_id`), `chosen_model`, "
        "`rejected_model`, `margin`, `confidence`, `consistent`, `policy` and the judge's "
        "scores of both responses. The `tables/` folder holds the full side tables. "
        "`vlpref export` writes the pairs for TRL, LLaMA-Factory or ms-swift, and every ranked "
        "response per question for listwise training.",
    ]
    lines += _provenance_section(manifest)
    lines += _judging_section(manifest)
    lines += _judge_eval_section(manifest)
    lines += _counts_section(manifest)
    lines += _limitations_section(manifest)
    lines += [
        "",
        "## Uploading",
        "",
        "The version folder is the dataset repository as it is (this card, `data/`, `tables/`, "
        "the manifest and the report):",
        "",
        "```bash",
        f"hf upload --repo-type dataset OWNER/{_repo_name(name)} path/to/this/folder .",
        "```",
    ]
    return "\n".join(lines) + "\n"


def _repo_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "vlpref-dataset"
