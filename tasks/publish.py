"""The publish stage's pure part: splits, the SPA-VL quadruple view, statistics, the dataset card.

No Prefect and no file I/O here: `branch_parts` builds one branch's files, which the flow hands
to `vlpref.store.Store.publish`.

Splits are assigned per image (`assign_splits`): a hash of (seed, image_id) read as a uniform
number in [0, 1) falls into one of the cumulative fractions of the split names taken in sorted
order. So no image (and none of its questions) crosses splits, the assignment does not depend on
the order of the config's mapping, and adding images never moves an existing one.

The quadruple tables (`build_quadruples`) follow SPA-VL's released columns (`image`, `question`,
`chosen`, `rejected`, `image_name`, `class1..3`) and add ours (`QUADRUPLES`). `image` is a Hugging
Face Image column: an Arrow struct `{bytes: binary, path: string}` whose `path` is the image name;
the schema carries the features metadata `datasets` reads (`hf_features`), so
`datasets.load_dataset("parquet", data_files=...)` decodes `image` to a PIL image.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from vlpref.errors import DataError
from vlpref.records import IMAGES, PAIRS, QUESTIONS, RANKINGS, RESPONSES

if TYPE_CHECKING:
    from vlpref.config import PublishStage

__all__ = [
    "IMAGE_TYPE",
    "QUADRUPLES",
    "assign_splits",
    "branch_parts",
    "build_quadruples",
    "dataset_card",
    "hf_features",
    "hf_metadata",
    "unsafe_rates",
]

IMAGE_TYPE: Final = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCORES: Final = ("p_unsafe", "harmlessness", "helpfulness", "faithfulness", "overall")

QUADRUPLES: Final = pa.schema(
    [
        # SPA-VL's columns, in its order.
        ("image", IMAGE_TYPE),
        ("question", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("image_name", pa.string()),
        ("class1", pa.string()),
        ("class2", pa.string()),
        ("class3", pa.string()),
        # Ours: ids to join back to the side tables, and how the pair was made.
        ("question_type", pa.string()),
        ("question_id", pa.string()),
        ("image_id", pa.string()),
        ("branch_id", pa.string()),
        ("pair_id", pa.string()),
        ("policy", pa.string()),
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
        ("chosen_response_id", pa.string()),
        ("rejected_response_id", pa.string()),
        ("margin", pa.float64()),
        ("confidence", pa.float64()),
        ("consistent", pa.bool_()),
        # Scores from the rankings table; null where a response was not ranked.
        *((f"{side}_{score}", pa.float64()) for score in SCORES for side in ("chosen", "rejected")),
        ("chosen_rank", pa.int32()),
        ("rejected_rank", pa.int32()),
    ]
)

# Rows per `take` of image bytes: a binary chunk must stay below Arrow's 2 GiB offset limit, and
# 64 images at the images stage's default 20 MB cap is 1.3 GB.
_IMAGE_BATCH: Final = 64
_SORT_KEYS: Final = ("class1", "class2", "class3", "image_id", "question_type", "pair_id")


# --- splits -------------------------------------------------------------------------------------


def _uniform(image_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    image_ids: Iterable[str], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """image_id -> split name, deterministic per image (see the module docstring)."""
    names = sorted(name for name, fraction in fractions.items() if fraction > 0)
    if not names or any(not math.isfinite(f) or f < 0 for f in fractions.values()):
        raise ValueError(
            f"split fractions must be finite, non-negative, some positive: {fractions}"
        )
    total = sum(fractions[name] for name in names)
    bounds: list[float] = []
    running = 0.0
    for name in names:
        running += fractions[name] / total
        bounds.append(running)
    assigned: dict[str, str] = {}
    for image_id in image_ids:
        u = _uniform(image_id, seed)
        # The last split also takes anything that float rounding leaves above its bound.
        index = next((i for i, bound in enumerate(bounds) if u < bound), len(names) - 1)
        assigned[image_id] = names[index]
    return assigned


# --- quadruples ---------------------------------------------------------------------------------


def _index(column: pa.ChunkedArray, what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for row, value in enumerate(column.to_pylist()):
        if value in index:
            raise DataError(f"duplicate {what} {value!r} in the {what}s table")
        index[value] = row
    return index


def _lookup(index: Mapping[str, int], key: str, what: str, pair_id: str) -> int:
    try:
        return index[key]
    except KeyError:
        raise DataError(f"pair {pair_id!r} refers to a missing {what} {key!r}") from None


def _check_columns(tbl: pa.Table, schema: pa.Schema, name: str) -> None:
    missing = [field.name for field in schema if field.name not in tbl.column_names]
    if missing:
        raise DataError(f"the {name} table lacks columns {missing}")


def _plan(
    images: pa.Table,
    questions: pa.Table,
    responses: pa.Table,
    pairs: pa.Table,
    rankings: pa.Table | None,
) -> pa.Table:
    """Every quadruple column but `image`, plus `_image_row` (a row of `images`), sorted."""
    image_rows = _index(images["image_id"], "image")
    question_rows = _index(questions["question_id"], "question")
    response_rows = _index(responses["response_id"], "response")
    pair_ids: list[str] = pairs["pair_id"].to_pylist()
    q_take = [
        _lookup(question_rows, qid, "question", pid)
        for qid, pid in zip(pairs["question_id"].to_pylist(), pair_ids, strict=True)
    ]
    q = questions.take(pa.array(q_take, pa.int64()))
    img_take = [
        _lookup(image_rows, iid, "image", pid)
        for iid, pid in zip(q["image_id"].to_pylist(), pair_ids, strict=True)
    ]
    img = images.select(["image_id", "image_name", "format"]).take(pa.array(img_take, pa.int64()))
    names = [
        name if name else f"{iid}.{fmt or 'png'}"
        for name, iid, fmt in zip(
            img["image_name"].to_pylist(),
            img["image_id"].to_pylist(),
            img["format"].to_pylist(),
            strict=True,
        )
    ]
    columns: dict[str, Any] = {
        "question": q["text"],
        "image_name": pa.array(names, pa.string()),
        "class1": q["class1"],
        "class2": q["class2"],
        "class3": q["class3"],
        "question_type": q["type"],
        "question_id": q["question_id"],
        "image_id": q["image_id"],
        "branch_id": pairs["branch_id"],
        "pair_id": pairs["pair_id"],
        "policy": pairs["policy"],
        "margin": pairs["margin"],
        "confidence": pairs["confidence"],
        "consistent": pairs["consistent"],
        "_image_row": pa.array(img_take, pa.int64()),
    }
    ranked = _index(rankings["response_id"], "ranked response") if rankings is not None else {}
    for side in ("chosen", "rejected"):
        ids: list[str] = pairs[f"{side}_response_id"].to_pylist()
        rows = [
            _lookup(response_rows, rid, "response", pid)
            for rid, pid in zip(ids, pair_ids, strict=True)
        ]
        resp = responses.take(pa.array(rows, pa.int64()))
        columns[side] = resp["text"]
        columns[f"{side}_model"] = pairs[f"{side}_model"]
        columns[f"{side}_response_id"] = pairs[f"{side}_response_id"]
        rank_rows = pa.array([ranked.get(rid) for rid in ids], pa.int64())
        for score in (*SCORES, "rank"):
            values = (
                rankings[score].take(rank_rows)
                if rankings is not None
                else pa.nulls(len(ids), RANKINGS.field(score).type)
            )
            columns[f"{side}_{score}"] = values
    plan = pa.table(columns)
    return plan.sort_by([(key, "ascending") for key in _SORT_KEYS])


def _image_column(images: pa.Table, rows: pa.Array, names: pa.ChunkedArray) -> pa.ChunkedArray:
    chunks = []
    name_array = names.combine_chunks() if names.num_chunks else pa.array([], pa.string())
    for start in range(0, len(rows), _IMAGE_BATCH):
        data = images["bytes"].take(rows.slice(start, _IMAGE_BATCH)).combine_chunks()
        path = name_array.slice(start, _IMAGE_BATCH)
        chunks.append(pa.StructArray.from_arrays([data, path], fields=list(IMAGE_TYPE)))
    return pa.chunked_array(chunks, IMAGE_TYPE)


def _check_trainable(plan: pa.Table) -> None:
    """Every published pair has a non-empty question, chosen and rejected, and chosen differs
    from rejected (TRL's DPO check rejects a file with one such row). Pair selection never makes
    one (`vlpref.selection`); this is the last line of defence, so it fails loudly."""
    for question, chosen, rejected, pair_id in zip(
        *(plan[c].to_pylist() for c in ("question", "chosen", "rejected", "pair_id")), strict=True
    ):
        if not (question or "").strip() or not (chosen or "").strip():
            raise DataError(f"pair {pair_id!r}: empty question or chosen response")
        if not (rejected or "").strip() or chosen.split() == rejected.split():
            raise DataError(f"pair {pair_id!r}: empty rejected response, or the same as chosen")


def build_quadruples(
    images: pa.Table,
    questions: pa.Table,
    responses: pa.Table,
    pairs: pa.Table,
    splits: Mapping[str, str],
    *,
    rankings: pa.Table | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, pa.Table]:
    """One SPA-VL quadruple table per split (schema `QUADRUPLES` with HF features metadata).

    `splits` maps image_id -> split (`assign_splits`); `names` lists the splits to return, in
    order (default: the split names in `splits`, sorted), each even when empty. Rows are sorted by
    class path, image, question type and pair id, whatever order the inputs came in. A pair that
    refers to a missing question, response or image, or whose image has no split, is a DataError.
    """
    for tbl, schema, what in (
        (images, IMAGES, "images"),
        (questions, QUESTIONS, "questions"),
        (responses, RESPONSES, "responses"),
        (pairs, PAIRS, "pairs"),
        *(((rankings, RANKINGS, "rankings"),) if rankings is not None else ()),
    ):
        _check_columns(tbl, schema, what)
    plan = _plan(images, questions, responses, pairs, rankings)
    _check_trainable(plan)
    row_splits: list[str] = []
    for image_id, pair_id in zip(
        plan["image_id"].to_pylist(), plan["pair_id"].to_pylist(), strict=True
    ):
        if image_id not in splits:
            raise DataError(f"pair {pair_id!r}: image {image_id!r} has no split")
        row_splits.append(splits[image_id])
    wanted = list(names) if names is not None else sorted(set(splits.values()))
    unknown = sorted(set(row_splits) - set(wanted))
    if unknown:
        raise DataError(f"pairs fall into splits {unknown} that are not among {wanted}")
    split_column = pa.array(row_splits, pa.string())
    schema = QUADRUPLES.with_metadata(hf_metadata(QUADRUPLES))
    result: dict[str, pa.Table] = {}
    for name in wanted:
        part = plan.filter(pc.equal(split_column, name))
        image = _image_column(images, part["_image_row"].combine_chunks(), part["image_name"])
        arrays = [image if f.name == "image" else part[f.name].cast(f.type) for f in QUADRUPLES]
        result[name] = pa.Table.from_arrays(arrays, schema=schema)
    return result


# --- Hugging Face features ----------------------------------------------------------------------

_VALUE_DTYPES: Final[dict[pa.DataType, str]] = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.bool_(): "bool",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` features dict for `schema` (as `Features.to_dict()` writes it).

    An `IMAGE_TYPE` column named `image` becomes `{"_type": "Image"}`; scalar columns become
    `{"dtype": ..., "_type": "Value"}`.
    """
    features: dict[str, Any] = {}
    for field in schema:
        if field.type == IMAGE_TYPE:
            features[field.name] = {"_type": "Image"}
        elif field.type in _VALUE_DTYPES:
            features[field.name] = {"dtype": _VALUE_DTYPES[field.type], "_type": "Value"}
        else:
            raise ValueError(f"no Hugging Face feature for column {field.name!r} ({field.type})")
    return features


def hf_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """Schema metadata `datasets` reads back: `{b"huggingface": {"info": {"features": ...}}}`."""
    payload = {"info": {"features": hf_features(schema)}}
    return {b"huggingface": json.dumps(payload).encode()}


# --- statistics ---------------------------------------------------------------------------------


def unsafe_rates(
    rankings: pa.Table, quadruples: Mapping[str, pa.Table], *, threshold: float = 0.5
) -> dict[str, Any]:
    """Unsafe rates (P(unsafe) >= threshold) per response model and for chosen/rejected responses.

    Responses without a safety score are counted under `unscored`, not as safe.
    """
    by_model: dict[str, dict[str, Any]] = {}
    for model, p in zip(
        rankings["model"].to_pylist(), rankings["p_unsafe"].to_pylist(), strict=True
    ):
        entry = by_model.setdefault(model, {"responses": 0, "unscored": 0, "unsafe": 0})
        entry["responses"] += 1
        if p is None or math.isnan(p):
            entry["unscored"] += 1
        elif p >= threshold:
            entry["unsafe"] += 1
    for entry in by_model.values():
        entry["rate"] = _rate(entry["unsafe"], entry["responses"] - entry["unscored"])
    sides: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        scores = [
            p
            for tbl in quadruples.values()
            for p in tbl[f"{side}_p_unsafe"].to_pylist()
            if p is not None and not math.isnan(p)
        ]
        sides[side] = _rate(sum(p >= threshold for p in scores), len(scores))
    return {"threshold": threshold, "by_model": dict(sorted(by_model.items())), **sides}


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# --- dataset card -------------------------------------------------------------------------------

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


# --- one branch's files -------------------------------------------------------------------------


def branch_parts(
    branch_id: str, tables: Mapping[str, pa.Table], stage: PublishStage
) -> dict[str, pa.Table]:
    """The files one branch contributes to a version: its side tables, and its quadruples per
    split (empty splits left out: `datasets` cannot load an empty Parquet file).

    `tables` holds at least images, questions, responses and pairs of this branch (rankings
    adds the scores). Splits are assigned by image (`assign_splits`), so a branch's parts do
    not depend on which other branches are in the version, and can be shared between versions.
    """
    images = tables["images"]
    splits = assign_splits(images["image_id"].to_pylist(), stage.splits, stage.seed)
    names = [name for name in sorted(stage.splits) if stage.splits[name] > 0]
    quadruples = build_quadruples(
        images,
        tables["questions"],
        tables["responses"],
        tables["pairs"],
        splits,
        rankings=tables.get("rankings"),
        names=names,
    )
    parts = {f"tables/{name}/{branch_id}.parquet": tbl for name, tbl in tables.items()}
    parts.update(
        {
            f"data/{split}/{branch_id}.parquet": tbl
            for split, tbl in quadruples.items()
            if tbl.num_rows
        }
    )
    return parts
