"""A version's rows (pure: no Prefect, no file I/O): splits, the SPA-VL quadruple view, the Hugging
Face features, statistics, and `branch_parts`, one branch's files, which `vlpref.publish.version`
hands to `vlpref.store.Store.publish`.

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
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc

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
