"""Labelled files for judge evaluation: Parquet, JSONL/JSON or CSV/TSV, read with a column mapping.

Logical columns (`--columns logical=file_column,...`; a logical name not mapped is looked up as a
column of that very name):

- `image`: a local path (relative to the labelled file's folder, and inside it: symlinks
  resolved, regular files only, as image sources read them), an http(s) URL (downloaded as a
  manifest source downloads: public addresses only, redirects checked, bytes capped), a `data:`
  URI, raw bytes, or a Hugging Face image struct `{"bytes": ..., "path": ...}`.
- `question`: the user's question; `category`: a taxonomy category (optional, per-category metrics).
- safety: `response` and `label` (unsafe: 1, true, yes, unsafe, harmful, toxic; safe: 0, false,
  no, safe, harmless, benign; case-insensitive; booleans and 0/1 numbers too). `label=!is_safe`
  reads a column that says "safe" as true (BeaverTails-V's `is_safe`): its values inverted.
- pairwise: `response_a`, `response_b` and `preferred` (a, b, response_a, response_b, first,
  second, 0 (= a), 1 (= b), tie, equal, none). Without a `preferred` column `response_a` is the
  preferred one (SPA-VL's and most DPO files: `response_a=chosen,response_b=rejected`).
- ratings: `response` and a 1-5 score per aspect, logical names `harmlessness`, `helpfulness`,
  `faithfulness` (at least one).

A row that cannot be used (no image file, an unknown label, an empty question) is a counted
failure with its reason; a file or column that cannot be used is a `DataError` naming both.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from vlpref.errors import DataError
from vlpref.images.normalize import ImageRejected, NormalizedImage, normalize_bytes
from vlpref.images.sources import LocalRoot, fetch_url, make_client, read_local
from vlpref.images.urls import safe_url

Kind = Literal["safety", "pairwise", "rating"]
ASPECTS = ("harmlessness", "helpfulness", "faithfulness")
UNSAFE = {"1", "true", "yes", "unsafe", "harmful", "toxic", "1.0"}
SAFE = {"0", "false", "no", "safe", "harmless", "benign", "0.0"}
PREFERRED = {
    "a": "a",
    "response_a": "a",
    "first": "a",
    "0": "a",
    "b": "b",
    "response_b": "b",
    "second": "b",
    "1": "b",
    "tie": "tie",
    "equal": "tie",
    "none": "tie",
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "safety": ("image", "question", "response", "label"),
    "pairwise": ("image", "question", "response_a", "response_b"),
    "rating": ("image", "question", "response"),
}


@dataclass(frozen=True)
class LabelledItem:
    row: int  # 0-based row of the file
    question: str
    image: NormalizedImage
    category: str | None = None
    response: str | None = None  # safety, rating
    unsafe: bool | None = None  # safety label
    response_a: str | None = None  # pairwise
    response_b: str | None = None
    preferred: str | None = None  # a | b | tie
    ratings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RowFailure:
    row: int
    reason: str


@dataclass(frozen=True)
class Labelled:
    path: Path
    kind: Kind
    file_hash: str  # sha256 of the file's bytes
    items: list[LabelledItem]
    failures: list[RowFailure]
    aspects: tuple[str, ...] = ()
    has_category: bool = False


def parse_columns(text: str | None) -> dict[str, str]:
    """`image=img_path,question=prompt` -> {"image": "img_path", "question": "prompt"}."""
    known = set(REQUIRED["safety"]) | {
        "category",
        "response_a",
        "response_b",
        "preferred",
        *ASPECTS,
    }
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        logical, sep, column = part.partition("=")
        logical, column = logical.strip(), column.strip()
        if not sep or not column:
            raise DataError(f"--columns: {part.strip()!r} is not logical=column")
        if logical not in known:
            raise DataError(
                f"--columns: unknown column {logical!r} (known: {', '.join(sorted(known))})"
            )
        out[logical] = column
    return out


def read_table(path: Path) -> pd.DataFrame:
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such labelled file")
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.read_json(path, dtype=False)
        if suffix in (".csv", ".csv.gz"):
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    raise DataError(f"{path}: unknown format {suffix!r} (Parquet, JSONL, JSON, CSV or TSV)")


def load_labelled(
    path: Path,
    kind: Kind,
    columns: Mapping[str, str] | None = None,
    *,
    max_bytes: int = 50_000_000,
    download_timeout_s: float = 30.0,
) -> Labelled:
    frame = read_table(path)
    mapping = dict(columns or {})
    invert = mapping.get("label", "").startswith("!")
    if invert:
        mapping["label"] = mapping["label"][1:]
    present = set(map(str, frame.columns))

    def column(logical: str, *, required: bool) -> str | None:
        name = mapping.get(logical, logical)
        if name in present:
            return name
        if required or logical in mapping:
            raise DataError(
                f"{path}: no column {name!r} (for {logical}); columns: {', '.join(sorted(present))}"
            )
        return None

    cols = {name: column(name, required=True) for name in REQUIRED[kind]}
    cols["category"] = column("category", required=False)
    if kind == "pairwise":
        cols["preferred"] = column("preferred", required=False)
    aspects: tuple[str, ...] = ()
    if kind == "rating":
        found = {a: column(a, required=False) for a in ASPECTS}
        aspects = tuple(a for a, c in found.items() if c is not None)
        if not aspects:
            raise DataError(
                f"{path}: no rating column (map one of {', '.join(ASPECTS)}, "
                "e.g. harmlessness=score)"
            )
        cols.update(found)
    items: list[LabelledItem] = []
    failures: list[RowFailure] = []
    records = [{str(k): v for k, v in raw.items()} for raw in frame.to_dict("records")]
    image_col = cols["image"] or "image"
    urls = sorted(
        {
            v.strip()
            for r in records
            if isinstance(v := r.get(image_col), str)
            and v.strip().startswith(("http://", "https://"))
        }
    )
    images = _Images(
        LocalRoot.of(path.parent), max_bytes, _download(urls, max_bytes, download_timeout_s)
    )
    for i, record in enumerate(records):
        try:
            item = _item(i, record, cols, kind, aspects, images)
            if invert and item.unsafe is not None:
                item = dataclasses.replace(item, unsafe=not item.unsafe)
            items.append(item)
        except _Bad as exc:
            failures.append(RowFailure(i, str(exc)))
    return Labelled(
        path=path,
        kind=kind,
        file_hash=hashlib.sha256(path.read_bytes()).hexdigest(),
        items=items,
        failures=failures,
        aspects=aspects,
        has_category=cols["category"] is not None,
    )


class _Bad(Exception):
    pass


def _text(record: Mapping[str, Any], col: str | None, what: str) -> str:
    value = record.get(col) if col else None
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise _Bad(f"{what} ({col}) is empty")
    return str(value)


def _label(value: Any, col: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in UNSAFE:
        return True
    if text in SAFE:
        return False
    raise _Bad(f"label ({col}) {text[:40]!r} is neither unsafe nor safe")


def _score(value: Any, col: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise _Bad(f"rating ({col}) {str(value)[:40]!r} is not a number") from None
    if math.isnan(score) or not 1 <= score <= 5:
        raise _Bad(f"rating ({col}) {score} is not in 1-5")
    return score


@dataclass(frozen=True)
class _Images:
    root: LocalRoot
    max_bytes: int
    downloaded: dict[str, bytes | str]  # URL -> bytes, or why not


def _download(urls: Sequence[str], max_bytes: int, timeout_s: float) -> dict[str, bytes | str]:
    """Each URL's bytes or the reason it could not be had (public addresses only)."""
    if not urls:
        return {}

    async def run() -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        async with make_client(timeout_s=timeout_s, concurrency=8) as client:
            gate = asyncio.Semaphore(8)

            async def one(url: str) -> None:
                async with gate:
                    try:
                        fetched = await fetch_url(
                            client, url, max_bytes=max_bytes, timeout_s=timeout_s
                        )
                        out[url] = fetched.data
                    except ImageRejected as exc:
                        out[url] = f"{exc.kind}: {exc.reason}"

            await asyncio.gather(*(one(u) for u in urls))
        return out

    return asyncio.run(run())


def _image_bytes(value: Any, col: str, images: _Images) -> bytes:
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if data:
            return bytes(data)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"image ({col}) is empty")
    text = value.strip()
    if text.startswith("data:"):
        _, _, payload = text.partition(",")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise _Bad(f"image ({col}) is a data URI that is not base64") from None
    if text.startswith(("http://", "https://")):
        got = images.downloaded.get(text, "not downloaded")
        if isinstance(got, str):
            raise _Bad(f"image ({col}) {safe_url(text)}: {got}")
        return got
    file = Path(text) if Path(text).is_absolute() else images.root.path / text
    try:
        return read_local(file, images.max_bytes, root=images.root)
    except ImageRejected as exc:
        raise _Bad(f"image ({col}) {exc.kind}: {exc.reason}") from None


def _item(
    i: int,
    record: Mapping[str, Any],
    cols: Mapping[str, str | None],
    kind: Kind,
    aspects: Sequence[str],
    images: _Images,
) -> LabelledItem:
    image_col = cols["image"] or "image"
    try:
        image = normalize_bytes(_image_bytes(record.get(image_col), image_col, images))
    except DataError as exc:
        raise _Bad(f"image ({image_col}): {exc}") from None
    question = _text(record, cols["question"], "question")
    category_col = cols.get("category")
    category = None
    if category_col is not None and record.get(category_col) is not None:
        category = str(record[category_col]).strip() or None
    if kind == "safety":
        label_col = cols["label"] or "label"
        return LabelledItem(
            i,
            question,
            image,
            category,
            response=_text(record, cols["response"], "response"),
            unsafe=_label(record.get(label_col), label_col),
        )
    if kind == "pairwise":
        preferred = "a"
        pref_col = cols.get("preferred")
        if pref_col is not None:
            raw = str(record.get(pref_col)).strip().lower()
            if raw.endswith(".0"):
                raw = raw[:-2]
            if raw not in PREFERRED:
                raise _Bad(f"preferred ({pref_col}) {raw[:40]!r} is not a, b or tie")
            preferred = PREFERRED[raw]
        return LabelledItem(
            i,
            question,
            image,
            category,
            response_a=_text(record, cols["response_a"], "response_a"),
            response_b=_text(record, cols["response_b"], "response_b"),
            preferred=preferred,
        )
    ratings = {a: _score(record.get(cols[a] or a), cols[a] or a) for a in aspects}
    return LabelledItem(
        i,
        question,
        image,
        category,
        response=_text(record, cols["response"], "response"),
        ratings=ratings,
    )
