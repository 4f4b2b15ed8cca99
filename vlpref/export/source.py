"""Reading a version for an export: a part at a time, a batch at a time.

A 30,000-question version holds gigabytes of image bytes in its quadruples, so nothing here reads
a whole split: quadruples come as record batches of `BATCH_ROWS` rows, the side tables (listwise)
one branch part at a time.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from vlpref.errors import StoreError
from vlpref.export.filters import Filters, Tally
from vlpref.parquet_read import read_parquet
from vlpref.store import EMPTY_PART, Store, Version

__all__ = [
    "BATCH_ROWS",
    "ImageFiles",
    "branch_parts",
    "category_paths",
    "image_suffix",
    "iter_pairs",
    "open_version",
    "read_part",
]

BATCH_ROWS: Final = 256

# The quadruple columns a pair exporter reads (the image only where it writes one).
PAIR_COLUMNS: Final = (
    "question",
    "chosen",
    "rejected",
    "image_name",
    "class1",
    "class2",
    "class3",
    "question_type",
    "question_id",
    "image_id",
    "pair_id",
    "chosen_model",
    "rejected_model",
    "margin",
    "confidence",
    "consistent",
)


def open_version(version: Version | str | Path) -> Version:
    """A Version as it is, or the version at a folder `<store>/versions/<id>` (path or URI)."""
    if isinstance(version, Version):
        return version
    location = str(version).rstrip("/")
    versions_dir, version_id = posixpath.split(location)
    store_root, versions = posixpath.split(versions_dir)
    if versions != "versions" or not version_id:
        raise StoreError(f"{location}: not a version folder (<store>/versions/<version id>)")
    return Store(store_root).open(version_id)


def read_part(version: Version, rel: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet part of `version` (all its rows; for side-table parts, one branch)."""
    with version.store.fs.open(version.path(rel), "rb") as f:
        return read_parquet(f, columns=columns)


def _batches(version: Version, rel: str, columns: list[str]) -> Iterator[pa.Table]:
    with version.store.fs.open(version.path(rel), "rb") as f:
        parquet = pq.ParquetFile(f)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
            yield pa.Table.from_batches([batch])


def iter_pairs(
    version: Version, filters: Filters, tally: Tally, *, image: bool
) -> Iterator[tuple[str, pa.Table]]:
    """(split, batch of quadruples that pass `filters`), split by split in the version's order;
    every row read (or skipped with its split) is counted in `tally`."""
    columns = [*(("image",) if image else ()), *PAIR_COLUMNS]
    for split, counts in version.manifest.get("splits", {}).items():
        if not filters.keeps_split(split):
            rows = int(counts.get("rows", 0))
            tally.rows_in += rows
            tally.drop("split", rows)
            continue
        for rel in version.parts(f"data/{split}"):
            for batch in _batches(version, rel, columns):
                tally.rows_in += batch.num_rows
                kept = filters.apply_to_pairs(batch, tally)
                if kept.num_rows:
                    yield split, kept


def branch_parts(version: Version) -> list[str]:
    """The part names of the version's side tables (one per branch; the empty part left out)."""
    names = {
        posixpath.basename(rel)[: -len(".parquet")] for rel in version.parts("tables/questions")
    }
    return sorted(names - {EMPTY_PART})


def category_paths(version: Version) -> list[str]:
    """The taxonomy paths (`class1/class2/class3`) the version holds: its branches' paths as the
    manifest records them, or, for a manifest without them, the questions' classes."""
    branches = version.manifest.get("branches")
    if isinstance(branches, dict) and branches:
        return sorted({str(b.get("path")) for b in branches.values() if isinstance(b, dict)})
    questions = version.table("questions", columns=["class1", "class2", "class3"])
    rows = zip(*(questions[c].to_pylist() for c in ("class1", "class2", "class3")), strict=True)
    return sorted({"/".join(c or "" for c in row) for row in rows})


def image_suffix(data: bytes, name: str | None) -> str:
    """The file suffix of an image: from its bytes (publish writes PNG or JPEG), else its name."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    suffix = posixpath.splitext(name or "")[1].lower()
    return suffix if suffix in {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"} else ".img"


@dataclass
class ImageFiles:
    """Images written as files under `root/folder`, once each (named by image id)."""

    root: Path
    folder: str = "images"
    written: dict[str, str] = field(default_factory=dict)

    def add(self, image_id: str, image: dict[str, Any]) -> str:
        """The path of the image's file relative to `root`, writing it the first time."""
        rel = self.written.get(image_id)
        if rel is None:
            data: bytes = image["bytes"]
            rel = f"{self.folder}/{image_id}{image_suffix(data, image.get('path'))}"
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.written[image_id] = rel
        return rel
