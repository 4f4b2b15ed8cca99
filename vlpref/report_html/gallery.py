"""The gallery's items: the sampled quadruples with a thumbnail and the judges' rationales.

Only the sample is read in full: the image bytes of the sampled images (from `tables/images`,
the parts of the sampled branches, a row group at a time) and the rationales of the judgments
about the sampled responses (`tables/judgments`, the same branches). A thumbnail is the image
downscaled with Pillow to at most THUMB_SIDE pixels a side, as a JPEG data URL (a PNG one where
the image has transparency that JPEG would lose to black).
"""

from __future__ import annotations

import base64
import io
import posixpath
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from vlpref.store import Version

__all__ = ["THUMB_SIDE", "GalleryItem", "Rationale", "gallery_items", "thumbnail"]

THUMB_SIDE: Final = 192
JPEG_QUALITY: Final = 72
TEXT_LIMIT: Final = 1200  # characters of a question, response or rationale shown in a card
# Judgments whose text a card shows, per kind.
_RATIONALE_COLUMNS: Final = [
    "kind",
    "response_id",
    "other_response_id",
    "aspect",
    "judge",
    "verdict",
    "score",
    "rationale",
]


@dataclass(frozen=True)
class Rationale:
    judge: str
    kind: str  # safety | rating | pairwise
    about: str  # "chosen", "rejected" or "pair"
    verdict: str | None
    text: str


@dataclass
class GalleryItem:
    row: dict[str, Any]  # the quadruple (without `image`), plus `split` and `category`
    thumbnail: str | None  # a data URL; None where the image could not be read
    rationales: list[Rationale] = field(default_factory=list)


def clip(text: str | None, limit: int = TEXT_LIMIT) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """`data` (an image file's bytes) as a data URL of at most `side` pixels a side; None when
    Pillow cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.thumbnail((side, side))
            alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
            out = io.BytesIO()
            if alpha:
                img.save(out, format="PNG", optimize=True)
                kind = "png"
            else:
                img.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
                kind = "jpeg"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:image/{kind};base64,{base64.b64encode(out.getvalue()).decode('ascii')}"


def _parts_of(version: Version, table: str, branches: Collection[str]) -> list[str]:
    """The table's parts of `branches` (parts are named by branch id); every part when none
    matches (a store written another way still gets its gallery, only slower)."""
    parts = version.parts(f"tables/{table}")
    mine = [rel for rel in parts if posixpath.basename(rel).removesuffix(".parquet") in branches]
    return mine or parts


def _matching(
    version: Version, rel: str, key: str, keys: pa.Array, columns: Sequence[str]
) -> Iterator[pa.Table]:
    """The rows of part `rel` whose `key` is in `keys`, a row group at a time (an image part's
    row group is ~32 MB; the whole part can be GBs)."""
    with version.store.fs.open(version.path(rel), "rb") as f:
        parquet = pq.ParquetFile(f)
        for group in range(parquet.num_row_groups):
            ids = parquet.read_row_group(group, columns=[key])[key]
            mask = pc.is_in(ids, value_set=keys)
            if pc.any(mask).as_py():
                yield parquet.read_row_group(group, columns=list(columns)).filter(mask)


def gallery_items(version: Version, sample: Sequence[dict[str, Any]]) -> list[GalleryItem]:
    """The sampled quadruples as gallery items: thumbnails and rationales read for them only."""
    if not sample:
        return []
    branches = {row["branch_id"] for row in sample}
    image_ids = pa.array(sorted({row["image_id"] for row in sample}), pa.string())
    thumbs: dict[str, str | None] = {}
    for rel in _parts_of(version, "images", branches):
        for tbl in _matching(version, rel, "image_id", image_ids, ["image_id", "bytes"]):
            for image_id, data in zip(
                tbl["image_id"].to_pylist(), tbl["bytes"].to_pylist(), strict=True
            ):
                thumbs[image_id] = thumbnail(data) if data else None
    wanted = {
        rid for row in sample for rid in (row["chosen_response_id"], row["rejected_response_id"])
    }
    response_ids = pa.array(sorted(wanted), pa.string())
    single: dict[str, list[dict[str, Any]]] = {}  # response -> its safety and rating judgments
    paired: dict[frozenset[str], list[dict[str, Any]]] = {}  # two responses -> pairwise ones
    for rel in _parts_of(version, "judgments", branches):
        for tbl in _matching(version, rel, "response_id", response_ids, _RATIONALE_COLUMNS):
            for j in tbl.to_pylist():
                if not j["rationale"]:
                    continue
                if j["kind"] == "pairwise":
                    if j["other_response_id"] in wanted:
                        key = frozenset((j["response_id"], j["other_response_id"]))
                        paired.setdefault(key, []).append(j)
                else:
                    single.setdefault(j["response_id"], []).append(j)
    items = []
    for row in sample:
        chosen, rejected = row["chosen_response_id"], row["rejected_response_id"]
        rationales = [
            _rationale(j, side)
            for side, rid in (("chosen", chosen), ("rejected", rejected))
            for j in single.get(rid, [])
        ]
        # Only the comparisons of this pair's two responses (a question can have more pairs).
        rationales += [_rationale(j, "pair") for j in paired.get(frozenset((chosen, rejected)), [])]
        items.append(GalleryItem(row, thumbs.get(row["image_id"]), _ordered(rationales)))
    return items


def _rationale(judgment: dict[str, Any], about: str) -> Rationale:
    kind = judgment["kind"]
    if kind == "rating":
        kind = f"rating: {judgment['aspect']}"
    return Rationale(
        judgment["judge"], kind, about, judgment["verdict"], clip(judgment["rationale"])
    )


def _ordered(rationales: list[Rationale]) -> list[Rationale]:
    order = {"safety": 0, "pairwise": 2}
    return sorted(
        rationales, key=lambda r: (order.get(r.kind, 1), r.about != "chosen", r.kind, r.judge)
    )
