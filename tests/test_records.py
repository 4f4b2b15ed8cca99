"""Row accumulation in Arrow batches, and the sort the stages use for their output order."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vlpref.records import TableBuilder, iter_rows, sorted_by

SCHEMA = pa.schema([("id", pa.string()), ("other", pa.string()), ("score", pa.float64())])


def rows(n: int) -> list[dict[str, object]]:
    return [
        {"id": f"r{i:03d}", "other": None if i % 3 else f"o{i}", "score": i / 2} for i in range(n)
    ]


def test_the_builder_keeps_every_row_in_order_across_batches() -> None:
    builder = TableBuilder(SCHEMA, batch_rows=4)
    builder.extend(rows(10))
    assert len(builder) == 10
    assert builder.table().to_pylist() == rows(10)
    builder.append(rows(11)[10])
    assert builder.table().to_pylist() == rows(11)  # asking twice is fine
    assert builder.table().schema == SCHEMA


def test_an_empty_builder_gives_an_empty_table_of_the_schema() -> None:
    assert TableBuilder(SCHEMA).table() == SCHEMA.empty_table()


def test_a_row_off_the_schema_is_an_error_when_its_batch_is_made() -> None:
    builder = TableBuilder(SCHEMA, batch_rows=2)
    builder.append({"id": "a", "other": None, "score": 1.0})
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        builder.append({"id": "b", "other": None, "score": 1.0, "extra": 1})


def test_sorted_by_puts_nulls_first_as_empty_strings_would_sort() -> None:
    tbl = pa.Table.from_pylist(
        [
            {"id": "b", "other": "x", "score": 1.0},
            {"id": "a", "other": "y", "score": 2.0},
            {"id": "b", "other": None, "score": 3.0},
            {"id": "a", "other": None, "score": 4.0},
        ],
        schema=SCHEMA,
    )
    got = sorted_by(tbl, ("id", "other")).to_pylist()
    want = sorted(tbl.to_pylist(), key=lambda r: (r["id"], r["other"] or ""))
    assert got == want
    assert sorted_by(SCHEMA.empty_table(), ("id",)).num_rows == 0


def test_iter_rows_yields_the_chosen_columns() -> None:
    tbl = pa.Table.from_pylist(rows(5), schema=SCHEMA)
    assert list(iter_rows(tbl, ("id", "score"))) == [
        {"id": r["id"], "score": r["score"]} for r in rows(5)
    ]
