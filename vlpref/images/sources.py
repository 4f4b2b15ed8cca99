"""Where a branch's images come from: a folder tree, a manifest file, URLs.

Listing a source yields `SourceItem`s (one per image the source offers this branch) and
`FailureRow`s for manifest rows that cannot become an item; fetching an item gives its bytes or
raises `ImageRejected`. Decoding is `normalize`'s job.

Folder: `path/<class1>/<class2>/<class3>/**` (labels verbatim), or `path/**` when flat. Hidden
files are ignored; every other file is an item, so a stray non-image shows up as a failure.

Manifest: CSV/TSV (header row), JSONL (one object a line) or Parquet, with `path` (relative to
the manifest) or `url`, and `class1`, `class2`, `class3`. A row belongs to the branch whose three
labels it names exactly; rows of other branches are skipped and counted. A row with a missing or
non-text label, or a JSONL line that does not parse, cannot be placed, so it is reported as a
failure by every branch whose labels agree with what the row does say (all branches, for a line
with none): a broken row is never silently lost, at the price of being counted once per such
branch.

URL: GET over httpx with a total deadline per attempt, up to `attempts` tries on connect errors,
429 and 5xx (exponential backoff, Retry-After honoured up to a cap); the body must be `image/*`
and is cut off at `max_bytes` while streaming.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from vlpref.config import FolderSource, ManifestSource
from vlpref.errors import ConfigError, DataError
from vlpref.images.normalize import ImageRejected
from vlpref.stage import FailureRow
from vlpref.taxonomy import Subcategory

__all__ = [
    "CLASS_COLUMNS",
    "USER_AGENT",
    "Fetched",
    "ManifestRow",
    "SourceItem",
    "SourceListing",
    "fetch_url",
    "list_folder",
    "list_manifest",
    "make_client",
    "read_local",
    "read_manifest",
    "resolve_local",
]

CLASS_COLUMNS = ("class1", "class2", "class3")
USER_AGENT = "vlpref/0.1 (dataset image collection)"
_MANIFEST_KINDS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class SourceItem:
    """One image a source offers this branch, not yet read.

    `item_id` names it in failures (a file path, `manifest:line N`, a URL). Exactly one of `path`
    and `url` is set for folder and manifest items; typographic items carry neither.
    """

    item_id: str
    source: str  # folder | manifest | url | typographic
    meta: dict[str, Any]
    path: Path | None = None
    url: str | None = None


@dataclass
class SourceListing:
    items: list[SourceItem] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    skipped: int = 0  # manifest rows that belong to other branches
    notes: list[str] = field(default_factory=list)


def resolve_local(value: str, base_dir: Path, *, what: str) -> Path:
    """A source path from the config: absolute, or relative to the config's folder."""
    if "://" in value:
        raise ConfigError(f"{what} must be a local path, not a URL: {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


# --------------------------------------------------------------------------- folder


def list_folder(
    source: FolderSource, leaf: Subcategory, *, base_dir: Path, flat: bool
) -> SourceListing:
    """Every non-hidden file under the branch's folder, sorted by relative path."""
    root = resolve_local(source.path, base_dir, what="folder source")
    if not root.is_dir():
        raise ConfigError(f"folder source {str(root)!r} does not exist or is not a folder")
    folder = root if flat else root / leaf.class1 / leaf.class2 / leaf.class3
    listing = SourceListing()
    if not folder.is_dir():
        listing.notes.append(f"no folder for this branch: {folder}")
        return listing
    found: list[tuple[str, Path]] = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        found.append((rel.as_posix(), path))
    for rel_text, path in sorted(found):
        listing.items.append(
            SourceItem(
                item_id=str(path),
                source="folder",
                meta={"folder": str(folder), "path": rel_text},
                path=path,
            )
        )
    return listing


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row: `where` is `line N` (CSV/TSV/JSONL) or `row N` (Parquet), from 1."""

    where: str
    values: dict[str, Any]
    error: str | None = None  # the row could not be read at all


def read_manifest(path: Path) -> tuple[ManifestRow, ...]:
    """All rows of a manifest file, cached while the file is unchanged."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"manifest {str(path)!r} does not exist") from None
    return _read_manifest_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_manifest_cached(path_text: str, _mtime_ns: int, _size: int) -> tuple[ManifestRow, ...]:
    path = Path(path_text)
    kind = _MANIFEST_KINDS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(_MANIFEST_KINDS))
        raise ConfigError(f"manifest {path_text!r}: unknown file type (expected one of {known})")
    try:
        if kind == "parquet":
            return tuple(_parquet_rows(path))
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path_text!r} is not UTF-8 text: {exc}") from None
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataError(f"manifest {path_text!r} cannot be read: {exc}") from None
    if kind == "jsonl":
        return tuple(_jsonl_rows(text))
    return tuple(_csv_rows(path_text, text, "\t" if kind == "tsv" else ","))


def _check_columns(path_text: str, columns: list[str]) -> None:
    missing = [c for c in CLASS_COLUMNS if c not in columns]
    if "path" not in columns and "url" not in columns:
        missing.append("path or url")
    if missing:
        has = ", ".join(columns) or "none"
        raise DataError(f"manifest {path_text!r} lacks column(s) {', '.join(missing)} (has: {has})")


def _csv_rows(path_text: str, text: str, delimiter: str) -> Iterator[ManifestRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    _check_columns(path_text, list(reader.fieldnames or []))
    previous_end = reader.line_num  # the header's last line
    for values in reader:
        yield ManifestRow(f"line {previous_end + 1}", {k: v for k, v in values.items() if k})
        previous_end = reader.line_num


def _jsonl_rows(text: str) -> Iterator[ManifestRow]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as exc:
            yield ManifestRow(f"line {number}", {}, f"invalid JSON: {exc.msg}")
            continue
        if not isinstance(values, dict):
            yield ManifestRow(f"line {number}", {}, "expected a JSON object")
            continue
        yield ManifestRow(f"line {number}", values)


def _parquet_rows(path: Path) -> Iterator[ManifestRow]:
    schema = pq.read_schema(path)
    _check_columns(str(path), list(schema.names))
    wanted = [c for c in ("path", "url", *CLASS_COLUMNS) if c in schema.names]
    table = pq.read_table(path, columns=wanted)
    for number, values in enumerate(table.to_pylist(), start=1):
        yield ManifestRow(f"row {number}", values)


def list_manifest(source: ManifestSource, leaf: Subcategory, *, base_dir: Path) -> SourceListing:
    """The manifest rows of this branch as items; its unusable rows as failures."""
    path = resolve_local(source.path, base_dir, what="manifest source")
    listing = SourceListing()
    wanted = (leaf.class1, leaf.class2, leaf.class3)
    for row in read_manifest(path):
        item_id = f"{path}:{row.where}"
        if row.error is not None:
            listing.failures.append(FailureRow(item_id, "manifest_row", f"{item_id}: {row.error}"))
            continue
        labels = [row.values.get(c) for c in CLASS_COLUMNS]
        valid = [isinstance(v, str) and v.strip() != "" for v in labels]
        stated = [str(v).strip() for v in labels]
        agrees = all(s == w for s, w, ok in zip(stated, wanted, valid, strict=True) if ok)
        if not agrees:
            listing.skipped += 1
            continue
        if not all(valid):
            bad = [c for c, ok in zip(CLASS_COLUMNS, valid, strict=True) if not ok]
            reason = f"{item_id}: missing or non-text {', '.join(bad)}"
            listing.failures.append(FailureRow(item_id, "manifest_row", reason))
            continue
        item = _manifest_item(row, item_id, path)
        if isinstance(item, FailureRow):
            listing.failures.append(item)
        else:
            listing.items.append(item)
    return listing


def _manifest_item(row: ManifestRow, item_id: str, manifest: Path) -> SourceItem | FailureRow:
    local, url = row.values.get("path"), row.values.get("url")
    meta: dict[str, Any] = {"manifest": str(manifest), "row": row.where}
    if isinstance(local, str) and local.strip():
        meta["path"] = local
        if isinstance(url, str) and url.strip():
            meta["url"] = url  # provenance only: the local copy is what we read
        target = Path(local).expanduser()
        if not target.is_absolute():
            target = manifest.parent / target
        return SourceItem(item_id, "manifest", meta, path=target)
    if isinstance(url, str) and url.strip():
        url = url.strip()
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            return FailureRow(item_id, "manifest_row", f"{item_id}: invalid url {url!r}: {exc}")
        if parsed.scheme not in ("http", "https") or not parsed.host:
            reason = f"{item_id}: url must be http(s) with a host, got {url!r}"
            return FailureRow(item_id, "manifest_row", reason)
        meta["url"] = url
        return SourceItem(item_id, "url", meta, url=url)
    return FailureRow(item_id, "manifest_row", f"{item_id}: row has neither path nor url")


# --------------------------------------------------------------------------- reading


def read_local(path: Path, max_bytes: int) -> bytes:
    """A local file's bytes; a missing, unreadable or oversized file is `ImageRejected`."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageRejected("too_large", f"{path}: {size} bytes is over max_bytes={max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageRejected("missing", f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImageRejected("missing", f"a folder, not a file: {path}") from None
    except OSError as exc:
        raise ImageRejected("unreadable", f"{path}: {exc}") from None


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    final_url: str
    attempts: int


class _RetryableStatus(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


_RETRY_ON = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, _RetryableStatus)


def make_client(*, timeout_s: float, concurrency: int, trust_env: bool = True) -> httpx.AsyncClient:
    """The client `fetch_url` expects: redirects followed, one pool bounded by `concurrency`."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=True,
        headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        trust_env=trust_env,
    )


async def fetch_url(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    attempts: int = 3,
    backoff_s: float = 0.5,
) -> Fetched:
    """Download one image; raises `ImageRejected` (with the attempts made) on any failure."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryableStatus) and exc.retry_after is not None:
            return min(exc.retry_after, _MAX_RETRY_AFTER_S)
        return float(min(backoff_s * 2 ** (state.attempt_number - 1), _MAX_RETRY_AFTER_S))

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry_if_exception_type(_RETRY_ON),
        reraise=True,
    )
    tries = 0
    try:
        async for attempt in retrying:
            with attempt:
                tries = attempt.retry_state.attempt_number
                data, content_type, final_url = await _fetch_once(
                    client, url, max_bytes=max_bytes, timeout_s=timeout_s, attempt=tries
                )
                return Fetched(data, content_type, final_url, tries)
    except ImageRejected:
        raise
    except _RetryableStatus as exc:
        raise ImageRejected(
            "http", f"{url}: HTTP {exc.status} after {tries} attempt(s)", attempts=tries
        ) from None
    except (TimeoutError, httpx.TimeoutException):
        raise ImageRejected(
            "timeout", f"{url}: no complete answer within {timeout_s} s", attempts=tries
        ) from None
    except httpx.HTTPError as exc:
        raise ImageRejected(
            "network",
            f"{url}: {type(exc).__name__}: {exc} (after {tries} attempt(s))",
            attempts=tries,
        ) from None
    raise AssertionError("unreachable: tenacity either returns or raises")


async def _fetch_once(
    client: httpx.AsyncClient, url: str, *, max_bytes: int, timeout_s: float, attempt: int
) -> tuple[bytes, str, str]:
    # httpx's timeout bounds each read; this bounds the whole answer, so a server that drips
    # one byte a second cannot hold a worker for ever.
    async with asyncio.timeout(timeout_s), client.stream("GET", url) as response:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _RetryableStatus(status, _retry_after(response.headers.get("retry-after")))
        if status >= 400:
            raise ImageRejected("http", f"{url}: HTTP {status}", attempts=attempt)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/"):
            shown = content_type or "none"
            raise ImageRejected(
                "content_type", f"{url}: content-type {shown!r} is not image/*", attempts=attempt
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise ImageRejected(
                "too_large",
                f"{url}: content-length {declared} is over max_bytes={max_bytes}",
                attempts=attempt,
            )
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > max_bytes:
                raise ImageRejected(
                    "too_large",
                    f"{url}: body is over max_bytes={max_bytes} (stopped reading)",
                    attempts=attempt,
                )
            chunks.append(chunk)
        return b"".join(chunks), content_type, str(response.url)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
