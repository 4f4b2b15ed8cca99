"""Where a branch's images come from: a folder tree, a manifest file, URLs.

Listing a source yields `SourceItem`s (one per image the source offers this branch) and
`FailureRow`s for manifest rows that cannot become an item; fetching an item gives its bytes or
raises `ImageRejected`. Decoding is `normalize`'s job.

Folder: `path/<class1>/<class2>/<class3>/**` (labels verbatim), or `path/**` when flat. Hidden
files are ignored; every other entry is an item, so a stray non-image (or a FIFO, a device, a
symlink out of the root) shows up as a failure. Symlinked folders are followed only while they
stay inside the root.

Manifest: CSV/TSV (header row), JSONL (one object a line) or Parquet, with `path` (relative to
the manifest) or `url`, and `class1`, `class2`, `class3`. A row belongs to the branch whose three
labels it names exactly; rows of other branches are skipped and counted. A row with a missing or
non-text label, or a JSONL line that does not parse, cannot be placed, so it is reported as a
failure by every branch whose labels agree with what the row does say (all branches, for a line
with none): a broken row is never silently lost, at the price of being counted once per such
branch.

Local files stay local to the data (`read_local`): a file is read only if its resolved path
(every symlink followed) lies under the source's root (`root`, by default the folder source's
`path` or the manifest's folder), else `outside_root`; only a regular file is opened (a FIFO,
device or socket is `not_regular`, refused on `stat` before any open, and opened with
O_NONBLOCK besides); and at most `max_bytes + 1` bytes are read, whatever `stat` says. Item ids,
`source_meta` and failure reasons name files relative to the root, never by absolute path.

URL: GET over httpx with a total deadline per attempt, up to `attempts` tries on connect errors,
429 and 5xx (exponential backoff, Retry-After honoured up to a cap); the body must be `image/*`
and is cut off at `max_bytes` while streaming, counted after decoding: a gzip or deflate body is
decompressed 64 KB at a time, so a compression bomb is stopped having allocated little; other
content encodings are refused. Connections go only where the source's `HostGuard` allows
(`netguard`: loopback, private, link-local… refused by default, checked at connection time on
the checked address); redirects are followed here, at most `MAX_REDIRECTS`, each hop checked
before it is asked for. URLs are published as `safe_url` gives them (no userinfo, no
credential-like parameters), and failure reasons never repeat a server's error text.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import os
import stat
import zlib
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
from vlpref.images.netguard import HostGuard, HostRefused, guarded_transport
from vlpref.images.normalize import ImageRejected
from vlpref.images.urls import safe_url
from vlpref.stage import FailureRow
from vlpref.taxonomy import Subcategory

__all__ = [
    "CLASS_COLUMNS",
    "MAX_REDIRECTS",
    "USER_AGENT",
    "Fetched",
    "ImageClient",
    "LocalRoot",
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
    "source_guard",
]

CLASS_COLUMNS = ("class1", "class2", "class3")
USER_AGENT = "vlpref/0.1 (dataset image collection)"
MAX_REDIRECTS = 5
_MANIFEST_KINDS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_MAX_RETRY_AFTER_S = 30.0
_READ_CHUNK = 1 << 20  # bytes a read() of a local file
_DECODE_CHUNK = 1 << 16  # decoded bytes a step of a gzip/deflate body
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_FILE_TYPES = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class SourceItem:
    """One image a source offers this branch, not yet read.

    `item_id` names it in failures (a path relative to the root, `manifest.csv:line N`,
    `typographic:N`). Exactly one of `path` and `url` is set for folder and manifest items;
    typographic items carry neither. `url` is the full URL, for the download only: what is
    published is `meta["url"]`, its `safe_url`.
    """

    item_id: str
    source: str  # folder | manifest | url | typographic
    meta: dict[str, Any]
    path: Path | None = None
    url: str | None = None


@dataclass(frozen=True)
class LocalRoot:
    """The folder a source's local files must lie in: `path` as configured, `real` resolved."""

    path: Path
    real: str

    @classmethod
    def of(cls, path: Path) -> LocalRoot:
        path = Path(os.path.abspath(path))
        return cls(path, os.path.realpath(path))

    def contains(self, real: str) -> bool:
        """Whether a resolved path lies in the root (the root itself included)."""
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def show(self, path: Path) -> str:
        """`path` as published: relative to the root (as written, else resolved), or, for a
        path outside it, its file name only; never absolute."""
        lexical = os.path.normpath(os.path.abspath(path))
        for base, target in ((str(self.path), lexical), (self.real, os.path.realpath(path))):
            rel = os.path.relpath(target, base)
            if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
                return Path(rel).as_posix()
        return path.name


@dataclass
class SourceListing:
    items: list[SourceItem] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    skipped: int = 0  # manifest rows that belong to other branches
    notes: list[str] = field(default_factory=list)
    root: LocalRoot | None = None  # where local items must lie (folder and manifest sources)


def resolve_local(value: str, base_dir: Path, *, what: str) -> Path:
    """A source path from the config: absolute, or relative to the config's folder."""
    if "://" in value:
        raise ConfigError(f"{what} must be a local path, not a URL: {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _root(configured: str | None, default: Path, base_dir: Path, *, what: str) -> LocalRoot:
    if configured is None:
        return LocalRoot.of(default)
    path = resolve_local(configured, base_dir, what=f"{what} root")
    if not path.is_dir():
        raise ConfigError(f"{what} root {configured!r} does not exist or is not a folder")
    return LocalRoot.of(path)


# --------------------------------------------------------------------------- folder


def list_folder(
    source: FolderSource, leaf: Subcategory, *, base_dir: Path, flat: bool
) -> SourceListing:
    """Every non-hidden entry under the branch's folder, sorted by relative path."""
    top = resolve_local(source.path, base_dir, what="folder source")
    if not top.is_dir():
        raise ConfigError(f"folder source {source.path!r} does not exist or is not a folder")
    root = _root(source.root, top, base_dir, what="folder source")
    if not root.contains(os.path.realpath(top)):
        raise ConfigError(f"folder source {source.path!r} is outside its root {source.root!r}")
    folder = top if flat else top / leaf.class1 / leaf.class2 / leaf.class3
    listing = SourceListing(root=root)
    if not folder.is_dir():
        listing.notes.append(f"no folder for this branch: {root.show(folder)}")
        return listing
    shown_folder = root.show(folder)
    for rel_text, path in _walk(folder, root):
        listing.items.append(
            SourceItem(
                item_id=root.show(path),
                source="folder",
                meta={"folder": shown_folder, "path": rel_text},
                path=path,
            )
        )
    return listing


def _walk(folder: Path, root: LocalRoot) -> list[tuple[str, Path]]:
    """(relative path, path) of every non-hidden entry that is not a folder, sorted.

    A symlinked folder is descended into only if it resolves inside the root (and was not seen
    yet: no loops); one pointing out is listed as an entry, so that reading it fails as
    `outside_root` instead of it vanishing. Nothing here reads a file.
    """
    found: list[tuple[str, Path]] = []
    seen = {os.path.realpath(folder)}
    pending: list[tuple[Path, str]] = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel, path = prefix + entry.name, Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if not is_dir:
                found.append((rel, path))
                continue
            real = os.path.realpath(path)
            if not root.contains(real):
                found.append((rel, path))
            elif real not in seen:
                seen.add(real)
                pending.append((path, rel + "/"))
    return sorted(found)


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
        stat_result = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"manifest {str(path)!r} does not exist") from None
    return _read_manifest_cached(str(path), stat_result.st_mtime_ns, stat_result.st_size)


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
    root = _root(source.root, path.parent, base_dir, what="manifest source")
    name = root.show(path)
    listing = SourceListing(root=root)
    wanted = (leaf.class1, leaf.class2, leaf.class3)
    for row in read_manifest(path):
        item_id = f"{name}:{row.where}"
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
        item = _manifest_item(row, item_id, path, name, root)
        if isinstance(item, FailureRow):
            listing.failures.append(item)
        else:
            listing.items.append(item)
    return listing


def _manifest_item(
    row: ManifestRow, item_id: str, manifest: Path, name: str, root: LocalRoot
) -> SourceItem | FailureRow:
    local, url = row.values.get("path"), row.values.get("url")
    meta: dict[str, Any] = {"manifest": name, "row": row.where}
    if isinstance(local, str) and local.strip():
        target = Path(local).expanduser()
        if not target.is_absolute():
            target = manifest.parent / target
        meta["path"] = root.show(target)
        if isinstance(url, str) and url.strip():
            meta["url"] = safe_url(url)  # provenance only: the local copy is what we read
        return SourceItem(item_id, "manifest", meta, path=target)
    if isinstance(url, str) and url.strip():
        url = url.strip()
        shown = safe_url(url)
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            return FailureRow(item_id, "manifest_row", f"{item_id}: invalid url {shown!r}")
        if parsed.scheme not in ("http", "https") or not parsed.host:
            reason = f"{item_id}: url must be http(s) with a host, got {shown!r}"
            return FailureRow(item_id, "manifest_row", reason)
        meta["url"] = shown
        return SourceItem(item_id, "url", meta, url=url)
    return FailureRow(item_id, "manifest_row", f"{item_id}: row has neither path nor url")


# --------------------------------------------------------------------------- reading


def read_local(path: Path, max_bytes: int, *, root: LocalRoot) -> bytes:
    """A local file's bytes, if it lies in `root` and is a regular file of at most `max_bytes`.

    Anything else is `ImageRejected`: `outside_root`, `not_regular`, `too_large`, `missing`,
    `unreadable`. Reasons name the file as `root.show` does, and never carry its content.
    """
    shown = root.show(path)
    real = os.path.realpath(path)  # every symlink resolved, the last one included
    if not root.contains(real):
        raise ImageRejected(
            "outside_root",
            f"{shown}: outside the image root (symlinks resolved); not read "
            "(set the source's `root` to a folder that holds it)",
        )
    try:
        info = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageRejected("missing", f"file not found: {shown}") from None
    except OSError as exc:
        raise ImageRejected(
            "unreadable", f"{shown}: {exc.strerror or type(exc).__name__}"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageRejected("missing", f"a folder, not a file: {shown}")
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected("not_regular", f"{shown}: {_file_type(info.st_mode)}; not read")
    if info.st_size > max_bytes:
        raise ImageRejected(
            "too_large", f"{shown}: {info.st_size} bytes is over max_bytes={max_bytes}"
        )
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:  # ELOOP: the file became a symlink since it was resolved
        raise ImageRejected(
            "unreadable", f"{shown}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        opened = os.fstat(fd)  # what was opened, not what was checked
        if not stat.S_ISREG(opened.st_mode):
            raise ImageRejected("not_regular", f"{shown}: {_file_type(opened.st_mode)}; not read")
        data = _read_capped(fd, max_bytes)
    except OSError as exc:
        raise ImageRejected(
            "unreadable", f"{shown}: {exc.strerror or type(exc).__name__}"
        ) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # `stat` said less (a /proc file, a file still growing)
        raise ImageRejected("too_large", f"{shown}: over max_bytes={max_bytes} (stopped reading)")
    return data


def _read_capped(fd: int, max_bytes: int) -> bytes:
    """At most `max_bytes + 1` bytes (one more tells that there was more)."""
    chunks: list[bytes] = []
    left = max_bytes + 1
    while left > 0:
        chunk = os.read(fd, min(_READ_CHUNK, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _file_type(mode: int) -> str:
    kind = _FILE_TYPES.get(stat.S_IFMT(mode), "special file")
    return f"a {kind}, not a regular file"


# --------------------------------------------------------------------------- downloading


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    final_url: str  # as `safe_url` gives it
    attempts: int


class ImageClient(httpx.AsyncClient):
    """The client `fetch_url` expects: an httpx client whose every connection goes through
    `guard` (see `netguard`), which `fetch_url` also asks before each redirect hop."""

    def __init__(self, guard: HostGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard


def source_guard(source: ManifestSource) -> HostGuard:
    """The address policy a manifest source's URLs are fetched under."""
    return HostGuard(allow_private=source.allow_private, allow_hosts=source.allow_hosts)


class _RetryableStatus(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


_RETRY_ON = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, _RetryableStatus)


def make_client(
    *,
    timeout_s: float,
    concurrency: int,
    trust_env: bool = True,
    guard: HostGuard | None = None,
) -> ImageClient:
    """The client `fetch_url` expects: one pool bounded by `concurrency`, redirects left to
    `fetch_url`, connections only where `guard` (default: public addresses only) allows.

    With `trust_env`, proxies from the environment are honoured as httpx would (hosts in
    NO_PROXY connect directly, through the guard); a proxied request is checked by `fetch_url`
    as this machine resolves its host, the proxy resolving it again.
    """
    guard = guard or HostGuard()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return ImageClient(
        guard,
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,  # fetch_url follows them, checking each hop
        headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        transport=guarded_transport(guard, limits=limits, trust_env=trust_env),
        mounts=_proxy_mounts(limits, trust_env),
        trust_env=trust_env,
    )


def _proxy_mounts(
    limits: httpx.Limits, trust_env: bool
) -> dict[str, httpx.AsyncBaseTransport | None]:
    """The environment's proxies as httpx mounts them itself (a custom transport turns that off)."""
    if not trust_env:
        return {}
    try:
        from httpx._utils import get_environment_proxies
    except ImportError:  # pragma: no cover - httpx moved it: no proxies rather than no guard
        return {}
    return {
        pattern: (
            httpx.AsyncHTTPTransport(proxy=url, limits=limits, trust_env=trust_env) if url else None
        )
        for pattern, url in get_environment_proxies().items()
    }


async def fetch_url(
    client: ImageClient,
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    attempts: int = 3,
    backoff_s: float = 0.5,
) -> Fetched:
    """Download one image; raises `ImageRejected` (with the attempts made) on any failure."""
    shown = safe_url(url)

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
                return Fetched(data, content_type, safe_url(final_url), tries)
    except ImageRejected:
        raise
    except HostRefused as exc:  # at connection time: the host resolved differently than before
        raise ImageRejected("refused_host", f"{shown}: {exc.reason}", attempts=tries) from None
    except _RetryableStatus as exc:
        # Named as the model seam names them, so the rerun policy retries them (vlpref/retry.py);
        # `http` is left for the 4xx answers that retrying cannot heal.
        kind = "rate_limit" if exc.status == 429 else "server_error"
        raise ImageRejected(
            kind, f"{shown}: HTTP {exc.status} after {tries} attempt(s)", attempts=tries
        ) from None
    except (TimeoutError, httpx.TimeoutException):
        raise ImageRejected(
            "timeout", f"{shown}: no complete answer within {timeout_s} s", attempts=tries
        ) from None
    except httpx.HTTPError as exc:
        raise ImageRejected(
            "network",
            f"{shown}: {_network_error(exc)} (after {tries} attempt(s))",
            attempts=tries,
        ) from None
    raise AssertionError("unreachable: tenacity either returns or raises")


def _network_error(exc: httpx.HTTPError) -> str:
    """What went wrong, in our words: a server's (or resolver's) own text is never repeated."""
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the connection broke off or the answer was not HTTP"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "the connection failed while talking"
    return f"network error ({type(exc).__name__})"


async def _fetch_once(
    client: ImageClient, url: str, *, max_bytes: int, timeout_s: float, attempt: int
) -> tuple[bytes, str, str]:
    shown = safe_url(url)
    # httpx's timeout bounds each read; this bounds the whole answer (every hop and the body),
    # so a server that drips one byte a second cannot hold a worker for ever.
    async with asyncio.timeout(timeout_s):
        current = httpx.URL(url)
        for hop in range(MAX_REDIRECTS + 1):
            await _check_hop(client.guard, current, shown, hop, attempt)
            async with client.stream("GET", current) as response:
                location = response.headers.get("location")
                if response.status_code not in _REDIRECT_CODES or not location:
                    data, content_type = await _read_body(response, shown, max_bytes, attempt)
                    return data, content_type, str(current)
            try:
                following = current.join(location)
            except httpx.InvalidURL:
                reason = f"{shown}: redirect {hop + 1} to an invalid location"
                raise ImageRejected("http", reason, attempts=attempt) from None
            if following.scheme not in ("http", "https"):
                reason = f"{shown}: redirect {hop + 1} to a {following.scheme!r} URL refused"
                raise ImageRejected("refused_host", reason, attempts=attempt)
            current = following
        reason = f"{shown}: more than {MAX_REDIRECTS} redirects"
        raise ImageRejected("http", reason, attempts=attempt)


async def _check_hop(guard: HostGuard, url: httpx.URL, shown: str, hop: int, attempt: int) -> None:
    """Refuse a hop before it is asked for (the connection itself is checked again)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        await guard.addresses(url.host, port)
    except HostRefused as exc:
        where = f" (redirect {hop} to {safe_url(str(url))})" if hop else ""
        raise ImageRejected(
            "refused_host", f"{shown}{where}: {exc.reason}", attempts=attempt
        ) from None
    except OSError:
        raise httpx.ConnectError("cannot resolve the host") from None


async def _read_body(
    response: httpx.Response, shown: str, max_bytes: int, attempt: int
) -> tuple[bytes, str]:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _RetryableStatus(status, _retry_after(response.headers.get("retry-after")))
    if status >= 400:
        raise ImageRejected("http", f"{shown}: HTTP {status}", attempts=attempt)
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type.startswith("image/"):
        raise ImageRejected(
            "content_type",
            f"{shown}: content-type {content_type or 'none'!r} is not image/*",
            attempts=attempt,
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageRejected(
            "too_large",
            f"{shown}: content-length {declared} is over max_bytes={max_bytes}",
            attempts=attempt,
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    decoder = _BodyDecoder.for_encoding(encoding)
    if decoder is None:
        raise ImageRejected(
            "content_encoding",
            f"{shown}: content-encoding {encoding!r} is not supported (identity, gzip, deflate)",
            attempts=attempt,
        )
    chunks: list[bytes] = []
    total = 0
    try:
        # Raw bytes, decoded here a bounded step at a time: httpx's own decoding would inflate a
        # whole network chunk (up to ~64 MB from 64 KB of gzip) before anything could count it.
        async for raw in response.aiter_raw():
            for piece in decoder.feed(raw):
                total += len(piece)
                if total > max_bytes:
                    raise ImageRejected(
                        "too_large",
                        f"{shown}: body is over max_bytes={max_bytes} (stopped reading)",
                        attempts=attempt,
                    )
                chunks.append(piece)
    except zlib.error:
        raise ImageRejected(
            "corrupt", f"{shown}: invalid {encoding} content-encoding", attempts=attempt
        ) from None
    return b"".join(chunks), content_type


class _BodyDecoder:
    """A content-encoding decoded in steps of at most `_DECODE_CHUNK` bytes."""

    def __init__(self, wbits: int | None) -> None:
        self._wbits = wbits  # None: identity; 31: gzip; 15: zlib (HTTP deflate)
        self._inflate = zlib.decompressobj(wbits) if wbits is not None else None
        self._started = False

    @classmethod
    def for_encoding(cls, encoding: str) -> _BodyDecoder | None:
        wbits = {"identity": None, "": None, "gzip": 31, "x-gzip": 31, "deflate": 15}
        return cls(wbits[encoding]) if encoding in wbits else None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._inflate is None or self._wbits is None:
            if data:
                yield data
            return
        if not self._started and data:
            self._started = True
            if self._wbits == 15 and not _zlib_header(data):
                self._wbits = -15  # a raw deflate stream, as some servers send
                self._inflate = zlib.decompressobj(-15)
        while True:
            out = self._inflate.decompress(data, _DECODE_CHUNK)
            if out:
                yield out
            if self._inflate.eof:
                data = self._inflate.unused_data
                if not data or self._wbits != 31:
                    return
                self._inflate = zlib.decompressobj(31)  # the next member of a gzip stream
                continue
            data = self._inflate.unconsumed_tail
            if not data and len(out) < _DECODE_CHUNK:
                return  # all input consumed and no output pending


def _zlib_header(data: bytes) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
