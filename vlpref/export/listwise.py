"""Listwise data (MM-SCALE-style): per question, every ranked response in rank order.

One row per question: the image (a `datasets` Image), the question, its type and classes, and
`responses`, a list in rank order (1 = best) of {response_id, model, rank, text, p_unsafe,
harmlessness, helpfulness, faithfulness, overall}, from the version's `rankings` and `responses`
tables: what a listwise preference objective (ranking losses over K responses) trains on, where
a pair format keeps only two of them.

Written as `<split>.parquet` with the `datasets` features, so `load_dataset("parquet", ...)`
decodes the image. The unit counted is a question. A question's split is the split its pairs were
published in; a question without a pair gets its image's split as publish assigns it
(`vlpref.publish.rows.assign_splits` with the version's `stages.publish` splits and seed). A
question with fewer than two ranked responses has no order to learn and is left out
(`unranked`). Pair filters keep a question when all its pairs pass (see `vlpref.export.filters`).
The side tables are read one branch part at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from vlpref.export.core import Context, Written, relative_files, require_datasets
from vlpref.export.filters import category_path
from vlpref.export.source import branch_parts, read_part
from vlpref.publish.rows import assign_splits
from vlpref.store import Version

__all__ = ["features", "question_splits", "write"]

SCORES: Final = ("p_unsafe", "harmlessness", "helpfulness", "faithfulness", "overall")
QUESTION_COLUMNS: Final = (
    "question_id",
    "question_type",
    "class1",
    "class2",
    "class3",
    "branch_id",
)


def features() -> Any:
    ds = require_datasets()
    text = ds.Value("string")
    response = {
        "response_id": text,
        "model": text,
        "rank": ds.Value("int32"),
        "text": text,
        **{score: ds.Value("float64") for score in SCORES},
    }
    return ds.Features(
        {
            "image": ds.Image(),
            "question": text,
            **{name: text for name in QUESTION_COLUMNS},
            "image_id": text,
            "responses": ds.List(response),
        }
    )


def question_splits(version: Version, part: str, image_ids: Mapping[str, str]) -> dict[str, str]:
    """question_id -> split for one branch part: from the published quadruples, else (a
    question without a pair) by its image, as publish assigns splits."""
    out: dict[str, str] = {}
    for split in version.splits:
        rel = f"data/{split}/{part}.parquet"
        if rel in version.manifest["files"]:
            for qid in read_part(version, rel, ["question_id"])["question_id"].to_pylist():
                out[qid] = split
    publish = version.manifest.get("stages", {}).get("publish", {})
    fractions, seed = publish.get("splits"), publish.get("seed")
    missing = {qid: iid for qid, iid in image_ids.items() if qid not in out}
    if missing and isinstance(fractions, Mapping) and isinstance(seed, int):
        by_image = assign_splits(sorted(set(missing.values())), fractions, seed)
        out.update({qid: by_image[iid] for qid, iid in missing.items()})
    return out


def _branch_rows(ctx: Context, part: str) -> dict[str, list[dict[str, Any]]]:
    """One branch's kept questions as export rows, per split; the others counted."""
    v, filters, tally = ctx.version, ctx.filters, ctx.tally
    questions = read_part(v, f"tables/questions/{part}.parquet").to_pylist()
    tally.rows_in += len(questions)
    splits = question_splits(v, part, {q["question_id"]: q["image_id"] for q in questions})
    pairs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in read_part(v, f"tables/pairs/{part}.parquet").to_pylist():
        pairs[p["question_id"]].append(p)
    ranked: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in read_part(v, f"tables/rankings/{part}.parquet").to_pylist():
        if r["rank"] is not None:
            ranked[r["question_id"]].append(r)
    kept = []
    for q in questions:
        qid = q["question_id"]
        split = splits.get(qid)
        if split is None or not filters.keeps_split(split):
            tally.drop("split", 1)
        elif not filters.keeps_category(category_path(q["class1"], q["class2"], q["class3"])):
            tally.drop("category", 1)
        elif (reason := filters.first_pair_failure(pairs[qid])) is not None:
            tally.drop(reason, 1)
        elif len(ranked[qid]) < 2:
            tally.drop("unranked", 1)
        else:
            kept.append((split, q))
    if not kept:
        return {}
    wanted = {r["response_id"] for _, q in kept for r in ranked[q["question_id"]]}
    texts = {
        r["response_id"]: r["text"]
        for r in read_part(
            v, f"tables/responses/{part}.parquet", ["response_id", "text"]
        ).to_pylist()
        if r["response_id"] in wanted
    }
    image_ids = {q["image_id"] for _, q in kept}
    images = {
        i["image_id"]: {"bytes": i["bytes"], "path": i["image_name"] or i["image_id"]}
        for i in read_part(
            v, f"tables/images/{part}.parquet", ["image_id", "image_name", "bytes"]
        ).to_pylist()
        if i["image_id"] in image_ids
    }
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for split, q in kept:
        responses = sorted(ranked[q["question_id"]], key=lambda r: (r["rank"], r["response_id"]))
        out[split].append(
            {
                "image": images[q["image_id"]],
                "question": q["text"],
                "question_id": q["question_id"],
                "question_type": q["type"],
                **{c: q[c] for c in ("class1", "class2", "class3", "branch_id")},
                "image_id": q["image_id"],
                "responses": [
                    {
                        "response_id": r["response_id"],
                        "model": r["model"],
                        "rank": r["rank"],
                        "text": texts[r["response_id"]],
                        **{s: r[s] for s in SCORES},
                    }
                    for r in responses
                ],
            }
        )
    return out


def write(ctx: Context) -> Written:
    schema = features().arrow_schema
    writers: dict[str, pq.ParquetWriter] = {}
    counts: dict[str, int] = {}
    try:
        for part in branch_parts(ctx.version):
            for split, rows in _branch_rows(ctx, part).items():
                if split not in writers:
                    writers[split] = pq.ParquetWriter(str(ctx.out / f"{split}.parquet"), schema)
                writers[split].write_table(pa.Table.from_pylist(rows, schema=schema))
                counts[split] = counts.get(split, 0) + len(rows)
                ctx.tally.written += len(rows)
    finally:
        for writer in writers.values():
            writer.close()
    files = ", ".join(f"'{split}': '{ctx.final / f'{split}.parquet'}'" for split in counts)
    return Written(
        files=relative_files(ctx.out),
        splits=counts,
        unit="questions",
        command=(
            'python -c "import datasets; '
            f"print(datasets.load_dataset('parquet', data_files={{{files}}}))\""
        ),
        notes=[
            "responses are in rank order (1 = best) with the judge's scores; "
            "no trainer reads this format as is: a listwise objective's data loader does"
        ],
    )
