"""The dataset's tables: one Arrow schema each, joined by ids (docs/dataset.md has the reference).

Rows are plain dicts that match these schemas; stages build them with the small helpers below, and
`table(rows, SCHEMA)` turns a list of rows into a `pyarrow.Table` with exactly these columns, so a
typo in a column name fails loudly instead of writing a new column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

IMAGES = pa.schema(
    [
        ("image_id", pa.string()),  # sha256 of the normalised image bytes
        ("image_name", pa.string()),  # file name in SPA-VL's `image_name` column
        ("bytes", pa.binary()),  # normalised image (PNG or JPEG)
        ("format", pa.string()),  # "png" | "jpeg"
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),  # typographic | folder | manifest | url
        ("source_meta", pa.string()),  # JSON: path / url / original size / renderer text ...
        ("branch_id", pa.string()),
        ("class1", pa.string()),
        ("class2", pa.string()),
        ("class3", pa.string()),
        ("filter_scores", pa.string()),  # JSON: measure or filter name -> score
        # 64-bit perceptual hash, 16 hex digits (vlpref/images/dedupe.py): near-duplicates
        ("phash", pa.string()),
    ]
)

QUESTIONS = pa.schema(
    [
        ("question_id", pa.string()),
        ("image_id", pa.string()),
        ("type", pa.string()),  # easy | hardq | hards
        ("text", pa.string()),
        ("caption", pa.string()),
        ("branch_id", pa.string()),
        ("class1", pa.string()),
        ("class2", pa.string()),
        ("class3", pa.string()),
        ("generator", pa.string()),
        ("prompt_hash", pa.string()),
    ]
)

RESPONSES = pa.schema(
    [
        ("response_id", pa.string()),
        ("question_id", pa.string()),
        ("model", pa.string()),
        ("sample_idx", pa.int32()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        # The sample's share of the call that produced it: summed over rows, every call counts
        # once (docs/dataset.md). `usage_exact`: completion_tokens is the sample's
        # own length as the endpoint counted it, not a split of its call's.
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("usage_exact", pa.bool_()),
        ("call_id", pa.string()),  # the call that produced the sample; n > 1 siblings share it
        ("latency_s", pa.float64()),
        ("cached", pa.bool_()),
        ("branch_id", pa.string()),
    ]
)

JUDGMENTS = pa.schema(
    [
        ("judgment_id", pa.string()),
        ("kind", pa.string()),  # safety | rating | pairwise
        ("question_id", pa.string()),
        ("response_id", pa.string()),  # safety, rating: the response; pairwise: shown first
        ("other_response_id", pa.string()),  # pairwise: shown second; else null
        ("aspect", pa.string()),  # rating: harmlessness | helpfulness | faithfulness
        ("judge", pa.string()),
        ("verdict", pa.string()),  # safe/unsafe, "1".."5", A/B
        ("score", pa.float64()),  # P(unsafe) | expected rating | P(first better)
        ("probabilities", pa.string()),  # JSON: token -> probability over the verdict tokens
        ("from_logprobs", pa.bool_()),  # false: parsed from text only
        ("rationale", pa.string()),
        ("categories", pa.string()),  # guard judges: hazard codes as written ("S1,S10"); else null
        ("raw", pa.string()),
        ("branch_id", pa.string()),
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("question_id", pa.string()),
        ("chosen_response_id", pa.string()),
        ("rejected_response_id", pa.string()),
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
        ("margin", pa.float64()),
        ("confidence", pa.float64()),
        ("consistent", pa.bool_()),  # pairwise verdicts agreed in both orders
        ("policy", pa.string()),
        ("branch_id", pa.string()),
    ]
)

RANKINGS = pa.schema(
    [
        ("question_id", pa.string()),
        ("response_id", pa.string()),
        ("model", pa.string()),
        ("rank", pa.int32()),  # 1 = best
        ("p_unsafe", pa.float64()),
        ("harmlessness", pa.float64()),
        ("helpfulness", pa.float64()),
        ("faithfulness", pa.float64()),
        ("overall", pa.float64()),
        ("branch_id", pa.string()),
    ]
)

FAILURES = pa.schema(
    [
        ("stage", pa.string()),
        ("branch_id", pa.string()),
        ("item_id", pa.string()),
        ("kind", pa.string()),
        ("reason", pa.string()),
        ("attempts", pa.int32()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES,
    "questions": QUESTIONS,
    "responses": RESPONSES,
    "judgments": JUDGMENTS,
    "pairs": PAIRS,
    "rankings": RANKINGS,
    "failures": FAILURES,
}


def schema_fingerprint(*schemas: pa.Schema) -> list[list[tuple[str, str, bool]]]:
    """The columns of table schemas as plain values, for stage keys: an output written with other
    columns (an older vlpref) is computed again rather than published beside new ones."""
    return [[(f.name, str(f.type), f.nullable) for f in schema] for schema in schemas]


def stable_id(*parts: object, length: int = 24) -> str:
    """A short deterministic id from its parts (same parts, same id, across runs and machines)."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema`'s columns; an unknown or missing column is an error."""
    rows = list(rows)
    names = set(schema.names)
    for index, row in enumerate(rows):
        if row.keys() == names:  # one C-level comparison; the sets below only for the error
            continue
        extra, missing = set(row) - names, names - set(row)
        if extra or missing:
            raise ValueError(
                f"row {index} does not match the schema: "
                f"unknown {sorted(extra)}, missing {sorted(missing)}"
            )
    return pa.Table.from_pylist(rows, schema=schema)


class TableBuilder:
    """Rows appended one at a time, held as Arrow record batches of `batch_rows` rows.

    A row as a Python dict costs several times its columnar form, and one branch of a
    SPA-VL-sized run has tens of thousands of judgment rows: holding them as dicts until the stage
    ends made a branch's rows its largest allocation. Each batch is checked against the schema as
    `table` checks rows.
    """

    def __init__(self, schema: pa.Schema, batch_rows: int = 4096) -> None:
        self.schema = schema
        self.batch_rows = batch_rows
        self._batches: list[pa.Table] = []
        self._pending: list[Mapping[str, Any]] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def append(self, row: Mapping[str, Any]) -> None:
        self._pending.append(row)
        self._rows += 1
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.append(row)

    def _flush(self) -> None:
        if self._pending:
            self._batches.append(table(self._pending, self.schema))
            self._pending = []

    def table(self) -> pa.Table:
        """Every row so far, in the order appended."""
        self._flush()
        if not self._batches:
            return self.schema.empty_table()
        return pa.concat_tables(self._batches)


def iter_rows(tbl: pa.Table, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """`columns` of `tbl` as dicts, a record batch at a time (never the whole table at once)."""
    for batch in tbl.select(list(columns)).to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


def sorted_by(tbl: pa.Table, columns: Sequence[str]) -> pa.Table:
    """`tbl` sorted by `columns`, ascending, nulls first (as None sorted as "" would be); stable."""
    if tbl.num_rows == 0:
        return tbl
    # pyarrow 25 takes the null placement per key (the options-wide one is deprecated).
    indices = pc.sort_indices(tbl, sort_keys=[(c, "ascending", "at_start") for c in columns])
    return tbl.take(indices)
