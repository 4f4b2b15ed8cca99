"""The dataset store: immutable dataset versions on any fsspec filesystem.

Layout under the store location:

    LATEST                          the id of the newest published version (one line)
    .lock                           present while a publish commits (owner info, JSON)
    .staging/<stamp>_<pid>_<random>_<host>/
                                    a version being written; never read
    versions/<version_id>/
        tables/<table>/<part>.parquet   images, questions, responses, judgments, pairs, rankings,
                                        failures; one part per taxonomy branch
        data/<split>/<part>.parquet     SPA-VL quadruples, one part per branch
        manifest.json               what produced the version; files with size and sha256
        README.md                   the dataset card
        report.html                 the version report (any extra file a publisher asks for)
        _COMPLETE                   the visibility marker (JSON: id, parent, manifest sha256)

`version_id` is `<UTC yyyymmddTHHMMSS.ffffffZ>-<8 hex of the content hash>`: sorting ids sorts
versions by creation time.

Parts: a version is written as parts (one per branch), each either a new table or a `SharedFile`
of an earlier version. A shared part is hard-linked where the filesystem allows it (local files)
and copied otherwise; its manifest entry keeps the size, sha256 and the version it first came
from. Versions stay immutable: no file is ever written in place, so a hard link is never changed
under a version that shares it. Readers read a table or a split as all of its parts (a folder of
Parquet files that pyarrow, pandas, DuckDB and `datasets` read as one).

Extra files: `publish(extras={name: function})` writes more files at the version's top level
(the flow writes `report.html`, `vlpref.report_html`). Each function is called once the data
parts and the splits are written, with the staged version (`StagedVersion`: the `Version`
reading methods, over the staging folder, and the final manifest but for README.md and the
extras' own entries); it returns the file's bytes, or None to write nothing. The extras come
before README.md, so that the card (a function of the manifest) can link what they wrote. An
extra file is listed in the manifest's `files` with its size and sha256 like any other file, so
`Version.verify` checks it and every file of a version folder is accounted for; it is derived
from the manifest and the data, and the manifest is written after it (so it cannot show the
manifest's own hash).

Visibility: **a version exists only when its `_COMPLETE` marker exists.** Readers
(`list_versions`, `latest`, `open`) ignore everything else. On the local filesystem the version is
written completely (marker included) under `.staging/` and then renamed into `versions/` with one
atomic `os.rename`. On object stores, where a rename is a copy, the files are copied into
`versions/<id>/` and the marker is written last; a crash mid-copy leaves a folder without a
marker, which stays invisible. A version folder that exists, complete or not, is never written
again: publishing onto it is a StoreError.

Damage: a version whose `_COMPLETE` or `manifest.json` cannot be read (not JSON, empty, missing)
is *damaged*. `scan` lists it as a `DamagedVersion` with the reason (naming the file);
`list_versions` and `latest` leave it out (with a warning) so that one damaged version never hides
the others; `open` and reading it raise a StoreError naming the file. A Parquet part that does not
read is a StoreError naming the part.

Leftovers: a staging folder's name carries its writer (host name, pid), so a publish that was
killed leaves a folder whose owner can be judged. Every publish first removes the staging folders
of writers that are gone: a pid of this host that no longer runs, at once; a writer on another
host (or a folder without an owner in its name), once the folder is older than `stale_staging_s`
(24 h by default, measured from the time in its name). A folder of a live process on this host is
never removed, however old. A host name is compared as the process sees it, so processes that
share a host name must share a pid namespace (as for the lock below).

Lock: committing (the existence check, the rename or copy, and moving LATEST) happens under
`<store>/.lock`, created with an exclusive create (`O_EXCL` locally, a conditional put on object
stores that support it). Writing the staged files takes no lock, so concurrent runs only queue
for the short commit. A publish that finds the lock held polls until `lock_timeout_s` passes, then
fails with a StoreError naming the holder (user, host, pid, since when, what for). A lock older
than `stale_lock_s`, or held by a process of this host that no longer runs, is stale and removed
(with a warning); on object stores the commit includes the copy, so `stale_lock_s` must exceed
the longest copy. An empty or unreadable lock file (its writer died between creating and writing
it) names no holder that could still be alive: it is stale once `EMPTY_LOCK_GRACE_S` (10 s) have
passed, by the file's time or by how long the waiter has watched it. Exclusivity is as strong as
the backend's exclusive create (fsspec mode "xb").
LATEST moves only after the version is complete, and never backwards: it is
set to the new id unless it already names a newer one (two concurrent publishes finish in any
order, LATEST ends at the newest).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import IO, Any, Final, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlpref.config import SECRET_FIELDS
from vlpref.errors import StoreError
from vlpref.fs import AbstractFileSystem, is_local, join, resolve
from vlpref.parquet_read import read_parquet
from vlpref.records import SCHEMAS
from vlpref.redact import contains_secret

__all__ = [
    "COMPLETE",
    "EMPTY_LOCK_GRACE_S",
    "STALE_STAGING_S",
    "TABLES",
    "DamagedVersion",
    "ExtraFile",
    "Part",
    "SharedFile",
    "StagedVersion",
    "Store",
    "StoreLock",
    "Version",
    "VersionInfo",
    "find_secret",
    "parse_part",
]

log = logging.getLogger(__name__)

TABLES: Final = tuple(SCHEMAS)
COMPLETE: Final = "_COMPLETE"
LATEST: Final = "LATEST"
LOCK: Final = ".lock"
STAGING: Final = ".staging"
VERSIONS: Final = "versions"
LAYOUT: Final = 2
STORE_KEYS: Final = ("layout", "version_id", "created_at", "parent", "files", "splits")

# An empty lock file is stale after this many seconds; a staging folder of a writer that cannot be
# judged (another host, no owner in its name), after STALE_STAGING_S.
EMPTY_LOCK_GRACE_S: Final = 10.0
STALE_STAGING_S: Final = 24 * 3600.0

_VERSION_ID = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")
_STAMP = "%Y%m%dT%H%M%S.%fZ"
# <stamp>_<pid>_<random>_<host>; the older <stamp>-<random> names carry no owner.
_STAGING_NAME = re.compile(
    r"^(?P<stamp>\d{8}T\d{6}\.\d{6}Z)(?:_(?P<pid>\d+)_[0-9a-f]+_(?P<host>[A-Za-z0-9.-]*)|-.*)$"
)
_PART = re.compile(r"^(tables|data)/([A-Za-z][A-Za-z0-9_]*)/([A-Za-z0-9][A-Za-z0-9._-]*)\.parquet$")
EMPTY_PART: Final = "empty"  # the part written for a table that no branch has
_SECRET_VALUE = re.compile(
    r"^(sk-|Bearer\s|hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_|AKIA[0-9A-Z]{16}|xox[abpr]-)"
)
_SECRET_KEYS: Final = SECRET_FIELDS | {"secret_key", "access_token", "auth_token", "private_key"}
# Row groups of about this many bytes: image tables stay readable a slice at a time.
_ROW_GROUP_BYTES: Final = 32 * 1024 * 1024
_READ_CHUNK: Final = 8 * 1024 * 1024

CardSource = str | Callable[[Mapping[str, Any]], str]
# An extra file's content from the staged version (module docstring, "Extra files").
ExtraFile = Callable[["Version"], bytes | None]
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED_NAMES: Final = frozenset({"README.md", "manifest.json", COMPLETE})


@dataclass(frozen=True)
class SharedFile:
    """A file of an existing version, reused as it is by a new one (`rel` inside that version)."""

    version_id: str
    rel: str


Part: TypeAlias = pa.Table | SharedFile


def parse_part(rel: str) -> tuple[str, str, str]:
    """`tables/pairs/b1.parquet` -> ("tables", "pairs", "b1"); a StoreError for anything else."""
    match = _PART.match(rel)
    if match is None:
        raise StoreError(
            f"not a part path: {rel!r} "
            "(tables/<table>/<part>.parquet or data/<split>/<part>.parquet)"
        )
    kind, name, part = match.groups()
    if kind == "tables" and name not in TABLES:
        raise StoreError(f"unknown table {name!r} in {rel!r} (tables: {', '.join(TABLES)})")
    return kind, name, part


@dataclass(frozen=True)
class VersionInfo:
    """A complete version: its id, creation time (ISO, UTC), parent id and full location."""

    version_id: str
    created_at: str
    parent: str | None
    location: str


@dataclass(frozen=True)
class DamagedVersion:
    """A version folder with a marker that cannot be used: why (naming the file) and where."""

    version_id: str
    reason: str
    location: str


# --- secrets ------------------------------------------------------------------------------------


def find_secret(data: Any, where: str = "manifest") -> str | None:
    """The path of the first thing in `data` that looks like a secret, or None.

    A key named like a credential (api_key, token, password, secret, ...) counts whatever its
    value; so does a string value shaped like a known key format (`sk-...`, `hf_...`, ...), or
    one that `vlpref.redact` would redact (a registered key of this run, `Bearer ...`, a URL's
    password, the shapes of `vlpref.redact.KEY_SHAPES`).
    """
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{where}.{key}"
            if isinstance(key, str) and key.lower() in _SECRET_KEYS:
                return path
            found = find_secret(value, path)
            if found:
                return found
    elif isinstance(data, list | tuple):
        for index, value in enumerate(data):
            found = find_secret(value, f"{where}[{index}]")
            if found:
                return found
    elif isinstance(data, str) and (_SECRET_VALUE.match(data) or contains_secret(data)):
        return where
    return None


# --- writing files ------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self._sha.update(view)
        self.size += view.nbytes
        self._raw.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        """The owner of the raw file closes it."""

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self._sha.hexdigest()}


def _row_group_rows(tbl: pa.Table) -> int | None:
    if tbl.num_rows == 0:
        return None
    per_row = max(1, tbl.nbytes // tbl.num_rows)
    return int(max(1, min(100_000, _ROW_GROUP_BYTES // per_row)))


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """An error of the operating system while writing `path` (a full disk, no permission, a
    read-only filesystem) as a StoreError naming it: the error of a full disk names no file.
    Other OSErrors (an object store's network errors) pass as they are."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_parquet(fs: AbstractFileSystem, path: str, tbl: pa.Table) -> dict[str, Any]:
    with _writing(path), fs.open(path, "wb") as raw:
        writer = _HashingWriter(raw)
        pq.write_table(tbl, writer, row_group_size=_row_group_rows(tbl))
    return writer.entry()


def _write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> dict[str, Any]:
    with _writing(path), fs.open(path, "wb") as raw:
        raw.write(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_json(fs: AbstractFileSystem, path: str, what: str, shown: str) -> dict[str, Any]:
    """A JSON object file of a version; a StoreError naming the file (as `shown`) if it is missing
    or damaged."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(f"{shown}: {what} is missing") from None
    return _parse_json(raw, shown, what)


def _parse_json(raw: bytes, path: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        empty = "empty" if not raw.strip() else f"not JSON: {exc}"
        raise StoreError(f"{path}: {what} is damaged ({empty})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: {what} is damaged (not a JSON object)")
    return data


def _conform(name: str, tbl: pa.Table) -> pa.Table:
    """`tbl` with exactly the schema of table `name`: same columns, types cast where safe."""
    schema = SCHEMAS[name]
    if set(tbl.column_names) != set(schema.names):
        extra = sorted(set(tbl.column_names) - set(schema.names))
        missing = sorted(set(schema.names) - set(tbl.column_names))
        raise StoreError(
            f"table {name!r} does not match its schema: extra {extra}, missing {missing}"
        )
    try:
        return tbl.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"table {name!r} cannot be cast to its schema: {exc}") from None


def _split_counts(tbl: pa.Table) -> dict[str, Any]:
    counts: dict[str, Any] = {"rows": tbl.num_rows}
    for key, column in (("images", "image_id"), ("questions", "question_id")):
        if column in tbl.column_names:
            counts[key] = len(pc.unique(tbl[column]))
    if {"class1", "class2"} <= set(tbl.column_names):
        pairs = zip(tbl["class1"].to_pylist(), tbl["class2"].to_pylist(), strict=True)
        counts["categories"] = dict(sorted(Counter(f"{a} / {b}" for a, b in pairs).items()))
    if "question_type" in tbl.column_names:
        counts["question_types"] = dict(sorted(Counter(tbl["question_type"].to_pylist()).items()))
    return counts


def _finite(data: Any) -> Any:
    """`data` with NaN and infinities as None: strict JSON readers refuse them."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise StoreError(f"the manifest is not plain JSON: {exc}") from None


# --- the lock -----------------------------------------------------------------------------------


def _describe_holder(holder: Mapping[str, Any] | None) -> str:
    if holder is None:
        return "an unknown holder (the lock file is empty or unreadable)"
    return (
        f"{holder.get('user')}@{holder.get('host')} pid {holder.get('pid')} "
        f"since {holder.get('acquired_at')} ({holder.get('purpose')})"
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return f"uid {os.getuid()}"


def _host() -> str:
    """This host's name as staging folder names carry it."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64]


def _pid_gone(pid: Any) -> bool:
    """True only when `pid` surely does not run on this host (False when unsure)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class StoreLock:
    """The store's commit lock: an exclusively created file holding its owner (see the module)."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        path: str,
        *,
        purpose: str,
        timeout_s: float,
        stale_after_s: float,
        poll_s: float = 0.1,
        empty_grace_s: float = EMPTY_LOCK_GRACE_S,
    ) -> None:
        self.fs = fs
        self.path = path
        self.purpose = purpose
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.empty_grace_s = empty_grace_s
        self.token = secrets.token_hex(8)
        self._empty_since: float | None = None  # when this waiter first saw the lock empty

    def _record(self) -> bytes:
        now = time.time()
        record = {
            "user": _user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "purpose": self.purpose,
            "acquired_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "acquired_ts": now,
            "token": self.token,
        }
        return json.dumps(record).encode()

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record; None if there is no lock or it cannot be read."""
        try:
            data = json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _age_s(self, holder: Mapping[str, Any] | None) -> float | None:
        if holder is not None and isinstance(holder.get("acquired_ts"), int | float):
            return time.time() - float(holder["acquired_ts"])
        try:  # an unreadable lock: judge by the file's own time where the backend has one
            modified = self.fs.modified(self.path)
        except (FileNotFoundError, NotImplementedError, OSError):
            return None
        return time.time() - float(modified.timestamp())

    def _stale(self, holder: Mapping[str, Any] | None) -> bool:
        age = self._age_s(holder)
        if holder is None:
            # Empty or unreadable: its writer died between creating and writing it (a live one
            # writes its record at once), so it names nobody who could still hold it. Judged by
            # the file's time, or by how long we have watched it where the backend has no times.
            now = time.monotonic()
            if self._empty_since is None:
                self._empty_since = now
            return max(age or 0.0, now - self._empty_since) > self.empty_grace_s
        self._empty_since = None
        if age is not None and age > self.stale_after_s:
            return True
        # A lock left by a killed process on this very host need not wait for the timeout.
        same_host = holder is not None and holder.get("host") == socket.gethostname()
        return same_host and holder is not None and _pid_gone(holder.get("pid"))

    def _break(self, holder: Mapping[str, Any] | None) -> None:
        # Remove only the lock we judged stale, not one a third party took meanwhile.
        if self.holder() == holder:
            log.warning("removing a stale store lock held by %s", _describe_holder(holder))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(self._record())
                return
            except FileExistsError:
                pass
            holder = self.holder()
            if holder is None and not self.fs.exists(self.path):
                continue  # released between our attempt and our look: try again at once
            if self._stale(holder):
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"the store is locked by {_describe_holder(holder)}; waited "
                    f"{self.timeout_s:g} s. If that process is gone, delete {self.path} (it is "
                    f"also broken automatically once older than {self.stale_after_s:g} s)."
                )
            time.sleep(self.poll_s)

    def release(self) -> None:
        holder = self.holder()
        if holder is None or holder.get("token") != self.token:
            log.warning("store lock %s was taken over while held; leaving it", self.path)
            return
        self.fs.rm_file(self.path)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- reading ------------------------------------------------------------------------------------


class Version:
    """One complete version: its manifest, tables, splits and file locations."""

    def __init__(self, store: Store, info: VersionInfo) -> None:
        self.store = store
        self.info = info
        self.version_id = info.version_id
        self._dir = store._version_dir(info.version_id)

    def __repr__(self) -> str:
        return f"Version({self.info.location!r})"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The version's manifest; a StoreError naming manifest.json if it is missing or damaged."""
        rel = "manifest.json"
        manifest = _read_json(self.store.fs, join(self._dir, rel), "the manifest", self.path(rel))
        if not isinstance(manifest.get("files"), dict):
            raise StoreError(f"{self.path('manifest.json')}: the manifest is damaged (no files)")
        return manifest

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.get("splits", {}))

    def path(self, rel: str) -> str:
        """The location of a file of this version, as a path or URI other tools can open."""
        return self.store._location(join(self._dir, rel))

    def parts(self, folder: str) -> list[str]:
        """The part files under `folder` (e.g. `tables/pairs`, `data/train`), sorted."""
        prefix = folder.rstrip("/") + "/"
        return sorted(rel for rel in self.manifest["files"] if rel.startswith(prefix))

    def _read(self, folder: str, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for rel in self.parts(folder):
            try:
                with self.store.fs.open(join(self._dir, rel), "rb") as f:
                    tables.append(read_parquet(f, columns=columns))
            except FileNotFoundError:
                raise StoreError(f"{self.path(rel)}: a part of the version is missing") from None
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise  # the system's error (no permission...): it names the file itself
                # pyarrow reports some damage (bad metadata) as an OSError without an errno
                raise StoreError(f"{self.path(rel)}: not a readable Parquet file ({exc})") from None
        return pa.concat_tables(tables)

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        if name not in TABLES:
            raise StoreError(f"unknown table {name!r} (tables: {', '.join(TABLES)})")
        return self._read(f"tables/{name}", columns)

    def split(self, name: str, columns: list[str] | None = None) -> pa.Table:
        if name not in self.splits:
            raise StoreError(f"version {self.version_id} has no split {name!r} ({self.splits})")
        return self._read(f"data/{name}", columns)

    def verify(self) -> None:
        """Check every file against the manifest, and the manifest against the marker."""
        fs = self.store.fs
        marker = _read_json(fs, join(self._dir, COMPLETE), "the marker", self.path(COMPLETE))
        raw = fs.cat_file(join(self._dir, "manifest.json"))
        if hashlib.sha256(raw).hexdigest() != marker.get("manifest_sha256"):
            raise StoreError(f"version {self.version_id}: manifest.json does not match its marker")
        for rel, expected in self.manifest["files"].items():
            sha, size = hashlib.sha256(), 0
            with fs.open(join(self._dir, rel), "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
            if size != expected["size"] or sha.hexdigest() != expected["sha256"]:
                raise StoreError(f"version {self.version_id}: {rel} does not match the manifest")


class StagedVersion(Version):
    """A version being published, read from its staging folder: what an extra file's function
    gets (module docstring, "Extra files"). Not visible to any reader of the store."""

    def __init__(self, store: Store, directory: str, manifest: dict[str, Any]) -> None:
        info = VersionInfo(
            version_id=manifest["version_id"],
            created_at=manifest["created_at"],
            parent=manifest.get("parent"),
            location=store._location(directory),
        )
        self.store = store
        self.info = info
        self.version_id = info.version_id
        self._dir = directory
        self.__dict__["manifest"] = manifest  # the cached property, filled: no file to read yet


# --- the store ----------------------------------------------------------------------------------


class Store:
    """Dataset versions under one location (a path or an fsspec URI)."""

    def __init__(
        self,
        location: str,
        *,
        lock_timeout_s: float = 60.0,
        stale_lock_s: float = 1800.0,
        stale_staging_s: float = STALE_STAGING_S,
    ) -> None:
        self.location = location
        self.fs, self.root = resolve(location)
        self.lock_timeout_s = lock_timeout_s
        self.stale_lock_s = stale_lock_s
        self.stale_staging_s = stale_staging_s

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def _location(self, path: str) -> str:
        return path if is_local(self.fs) else str(self.fs.unstrip_protocol(path))

    def _version_dir(self, version_id: str) -> str:
        if not _VERSION_ID.match(version_id):
            raise StoreError(f"not a version id: {version_id!r}")
        return join(self.root, VERSIONS, version_id)

    # reading

    def _info(self, version_id: str) -> VersionInfo | None:
        """The version's info; None if it has no marker; a StoreError naming a damaged marker."""
        path = join(self._version_dir(version_id), COMPLETE)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        marker = _parse_json(raw, self._location(path), "the marker")
        return VersionInfo(
            version_id=version_id,
            created_at=str(marker.get("created_at")),
            parent=marker.get("parent"),
            location=self._location(self._version_dir(version_id)),
        )

    def scan(self) -> list[VersionInfo | DamagedVersion]:
        """Every version folder with a marker, oldest first: complete versions, and damaged ones
        (a marker that does not read) with the reason. Folders without a marker do not count."""
        found: list[VersionInfo | DamagedVersion] = []
        for marker in self.fs.glob(join(self.root, VERSIONS, "*", COMPLETE)):
            version_id = posixpath.basename(posixpath.dirname(marker))
            if not _VERSION_ID.match(version_id):
                continue
            location = self._location(self._version_dir(version_id))
            try:
                info = self._info(version_id)
            except StoreError as exc:
                found.append(DamagedVersion(version_id, str(exc), location))
                continue
            except OSError as exc:  # unreadable (no permission...): the others still list
                reason = f"{self._location(marker)}: {exc.strerror or exc}"
                found.append(DamagedVersion(version_id, reason, location))
                continue
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda entry: entry.version_id)

    def list_versions(self) -> list[VersionInfo]:
        """Complete versions, oldest first; folders without a `_COMPLETE` marker do not count, and
        damaged ones (see `scan`) are left out with a warning."""
        infos = []
        for entry in self.scan():
            if isinstance(entry, DamagedVersion):
                log.warning("skipping damaged version %s: %s", entry.version_id, entry.reason)
            else:
                infos.append(entry)
        return infos

    def _read_latest(self) -> str | None:
        try:
            text = self.fs.cat_file(join(self.root, LATEST)).decode().strip()
        except FileNotFoundError:
            return None
        return text or None

    def latest(self) -> VersionInfo | None:
        """The version LATEST names (the newest complete one if there is no LATEST yet)."""
        version_id = self._read_latest()
        if version_id is None:
            versions = self.list_versions()
            return versions[-1] if versions else None
        where = self._location(join(self.root, LATEST))
        if not _VERSION_ID.match(version_id):
            raise StoreError(f"{where}: names {version_id[:40]!r}, which is not a version id")
        info = self._info(version_id)
        if info is None:
            raise StoreError(f"{where}: names {version_id!r}, which is not a complete version")
        return info

    def open(self, version_id: str) -> Version:
        info = self._info(version_id)
        if info is None:
            known = ", ".join(v.version_id for v in self.list_versions()) or "none"
            raise StoreError(f"no complete version {version_id!r} in {self.location} ({known})")
        return Version(self, info)

    # writing

    def lock(self, purpose: str = "publish", *, timeout_s: float | None = None) -> StoreLock:
        """The store's commit lock, as a context manager."""
        self.fs.makedirs(self.root, exist_ok=True)
        return StoreLock(
            self.fs,
            join(self.root, LOCK),
            purpose=purpose,
            timeout_s=self.lock_timeout_s if timeout_s is None else timeout_s,
            stale_after_s=self.stale_lock_s,
        )

    def publish(
        self,
        parts: Mapping[str, Part] | Iterable[tuple[str, Part]],
        manifest: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        card: CardSource,
        *,
        parent: str | None = None,
        extras: Mapping[str, ExtraFile] | None = None,
    ) -> VersionInfo:
        """Write a new immutable version and move LATEST to it.

        `parts` maps part paths (`tables/<table>/<part>.parquet`, `data/<split>/<part>.parquet`)
        to a table (of the table's schema; quadruples as built) or a `SharedFile` of an earlier
        version; it may also be an iterable of (path, part) pairs, which is consumed lazily and
        each part written as it comes, so a caller can build one branch at a time and memory
        holds one branch's tables, not the dataset's. A table with no part is written as one
        empty part; at least one data part is required. `manifest` may be a function, called
        once every part is written (a lazy caller fills it in as it yields parts). The store adds
        `layout`, `version_id`, `created_at`, `parent`, `files` and `splits` to the manifest (a
        manifest that sets them, or holds anything that looks like a secret, is refused; NaN and
        infinities are written as null, which strict JSON readers accept). `card` is the README
        text, or a function of the final manifest that returns it. `extras` maps file names to
        functions that write more files at the version's top level (module docstring, "Extra
        files"). On any error the staging directory is removed and no version appears.
        """
        extras = dict(extras or {})
        for name in extras:
            if not _EXTRA_NAME.match(name) or name in _RESERVED_NAMES:
                raise StoreError(
                    f"extra file {name!r}: a plain file name at the version's top level, not "
                    f"{', '.join(sorted(_RESERVED_NAMES))}"
                )
        if not callable(manifest):
            self._check_manifest(manifest)  # before any writing; a factory's after it
        if parent is not None and self._info(parent) is None:
            raise StoreError(f"parent {parent!r} is not a complete version of {self.location}")
        self.clean_staging()
        now = datetime.now(UTC)
        stamp = now.strftime(_STAMP)
        owner = f"{os.getpid()}_{secrets.token_hex(4)}_{_host()}"
        staging = join(self.root, STAGING, f"{stamp}_{owner}")
        try:
            items = parts.items() if isinstance(parts, Mapping) else parts
            files = self._write_data(staging, items)
            if callable(manifest):
                final = manifest()
                self._check_manifest(final)
            else:
                final = manifest
            digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
            version_id = f"{stamp}-{digest[:8]}"
            full: dict[str, Any] = {
                **_finite(final),
                "layout": LAYOUT,
                "version_id": version_id,
                "created_at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "parent": parent,
                "splits": self._split_counts(staging, files),
                "files": files,
            }
            marker = self._write_meta(staging, full, card, extras)
            with self.lock(f"publish {version_id}"):
                self._commit(staging, version_id, marker)
                self._move_latest(version_id)
        except BaseException as exc:
            self._discard(staging)
            if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
                raise StoreError(f"publishing to {self.location}: {exc.strerror or exc}") from exc
            raise
        info = self._info(version_id)
        assert info is not None
        return info

    def clean_staging(self) -> list[str]:
        """Remove the staging folders of writers that are gone (module docstring, "Leftovers");
        returns their names. Never fails: what cannot be listed or removed is left with a
        warning (staging folders are invisible to readers)."""
        folder = join(self.root, STAGING)
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            log.warning("could not list %s: %s", folder, exc)
            return []
        removed = []
        for name in sorted(names):
            try:
                reason = self._staging_leftover(join(folder, name), name)
            except Exception as exc:  # a name that only looks like ours (a date that is none)
                log.warning("leaving staging folder %s: %s", name, exc)
                continue
            if reason is None:
                continue
            log.warning("removing staging folder %s (%s)", name, reason)
            self._discard(join(folder, name))
            removed.append(name)
        return removed

    def _staging_leftover(self, path: str, name: str) -> str | None:
        """Why the staging folder `name` is a leftover to remove, or None to keep it."""
        match = _STAGING_NAME.match(name)
        pid = int(match["pid"]) if match and match["pid"] is not None else None
        host = match["host"] if match else None
        if pid is not None and host == _host():
            if _pid_gone(pid):
                return f"its writer, pid {pid} of this host, is gone"
            return None  # a live process of this host: in use (or a reused pid), however old
        age: float | None = None
        if match:  # the time in the name: object stores have no folder times
            started = datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=UTC)
            age = time.time() - started.timestamp()
        else:
            with contextlib.suppress(NotImplementedError, OSError):
                age = time.time() - float(self.fs.modified(path).timestamp())
        if age is None or age <= self.stale_staging_s:
            return None
        writer = f"on host {host}" if host is not None else "unknown"
        return f"older than {self.stale_staging_s:g} s, its writer {writer}"

    def _check_manifest(self, manifest: Mapping[str, Any]) -> None:
        secret = find_secret(manifest)
        if secret:
            raise StoreError(
                f"refusing to publish: {secret} looks like a secret; manifests name where keys "
                "come from (api_key_env), never the keys"
            )
        reserved = sorted(set(manifest) & set(STORE_KEYS))
        if reserved:
            raise StoreError(f"the store sets {reserved} itself; leave them out of the manifest")

    @staticmethod
    def _check_part(rel: str, part: Part) -> tuple[str, str]:
        kind, name, _ = parse_part(rel)
        # A shared file stays in its table or split: anything else reads as another schema.
        if isinstance(part, SharedFile) and not part.rel.startswith(f"{kind}/{name}/"):
            raise StoreError(
                f"{part.rel!r} of version {part.version_id} cannot be shared as {rel!r}: "
                f"only a part of {kind}/{name}/ can"
            )
        return kind, name

    def _write_data(self, staging: str, parts: Iterable[tuple[str, Part]]) -> dict[str, Any]:
        files: dict[str, Any] = {}
        for rel, part in parts:
            kind, name = self._check_part(rel, part)
            if rel in files:
                raise StoreError(f"part {rel!r} given twice")
            files[rel] = self._write_part(staging, rel, kind, name, part)
        if not any(rel.startswith("data/") for rel in files):
            raise StoreError("a version needs at least one data part (data/<split>/<part>.parquet)")
        have_tables = {parse_part(rel)[1] for rel in files if rel.startswith("tables/")}
        for name in TABLES:
            if name not in have_tables:
                rel = f"tables/{name}/{EMPTY_PART}.parquet"
                files[rel] = self._write_part(
                    staging, rel, "tables", name, SCHEMAS[name].empty_table()
                )
        return dict(sorted(files.items()))

    def _write_part(self, staging: str, rel: str, kind: str, name: str, part: Part) -> Any:
        target = join(staging, rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if isinstance(part, SharedFile):
            return self._share(part, target)
        tbl = _conform(name, part) if kind == "tables" else part
        return _write_parquet(self.fs, target, tbl)

    def _share(self, shared: SharedFile, target: str) -> dict[str, Any]:
        """Reuse a file of a complete version: a hard link locally, a copy elsewhere."""
        version = self.open(shared.version_id)
        entry = version.manifest["files"].get(shared.rel)
        if entry is None:
            raise StoreError(f"version {shared.version_id} has no file {shared.rel!r} to share")
        source = join(version._dir, shared.rel)
        linked = False
        if is_local(self.fs):
            try:
                os.link(source, target)
                linked = True
            except OSError:  # another device, or links not allowed: fall back to a copy
                linked = False
        if not linked:
            with _writing(target):
                self.fs.copy(source, target)
        return {
            "size": entry["size"],
            "sha256": entry["sha256"],
            "shared_from": entry.get("shared_from", shared.version_id),
        }

    def _split_counts(self, staging: str, files: Mapping[str, Any]) -> dict[str, Any]:
        columns = ["image_id", "question_id", "class1", "class2", "question_type"]
        by_split: dict[str, list[pa.Table]] = {}
        for rel in sorted(files):
            kind, name, _ = parse_part(rel)
            if kind == "data":
                with self.fs.open(join(staging, rel), "rb") as f:
                    schema_names = pq.read_schema(f).names
                with self.fs.open(join(staging, rel), "rb") as f:
                    wanted = [c for c in columns if c in schema_names]
                    by_split.setdefault(name, []).append(read_parquet(f, columns=wanted))
        return {name: _split_counts(pa.concat_tables(t)) for name, t in sorted(by_split.items())}

    def _write_meta(
        self,
        staging: str,
        manifest: dict[str, Any],
        card: CardSource,
        extras: Mapping[str, ExtraFile],
    ) -> bytes:
        """The extra files, README.md and manifest.json; returns the marker (written into
        staging when local)."""
        for name, make in extras.items():
            content = make(StagedVersion(self, staging, manifest))
            if content is not None:
                manifest["files"][name] = _write_bytes(self.fs, join(staging, name), content)
        text = card(manifest) if callable(card) else card
        manifest["files"]["README.md"] = _write_bytes(
            self.fs, join(staging, "README.md"), text.encode()
        )
        raw = _json_bytes(manifest)
        _write_bytes(self.fs, join(staging, "manifest.json"), raw)
        marker = {
            "version_id": manifest["version_id"],
            "created_at": manifest["created_at"],
            "parent": manifest["parent"],
            "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        }
        data = _json_bytes(marker)
        if is_local(self.fs):  # renamed together with the rest, so it appears atomically
            _write_bytes(self.fs, join(staging, COMPLETE), data)
        return data

    def _commit(self, staging: str, version_id: str, marker: bytes) -> None:
        final = self._version_dir(version_id)
        if self.fs.exists(final):
            raise StoreError(
                f"version {version_id} already exists in {self.location}; versions are never "
                "overwritten"
            )
        self.fs.makedirs(join(self.root, VERSIONS), exist_ok=True)
        if is_local(self.fs):
            os.rename(staging, final)
            return
        staged = self.fs._strip_protocol(staging)
        for source in self.fs.find(staging):
            self.fs.copy(source, join(final, posixpath.relpath(source, staged)))
        _write_bytes(self.fs, join(final, COMPLETE), marker)  # last: now the version exists
        self._discard(staging)

    def _move_latest(self, version_id: str) -> None:
        current = self._read_latest()
        if current is not None and _VERSION_ID.match(current) and current > version_id:
            return  # a concurrent publish that started later already committed
        path = join(self.root, LATEST)
        data = f"{version_id}\n".encode()
        if is_local(self.fs):
            temp = f"{path}.{secrets.token_hex(4)}.tmp"
            _write_bytes(self.fs, temp, data)
            os.replace(temp, path)
        else:  # one small put: atomic on object stores
            self.fs.pipe_file(path, data)

    def _discard(self, staging: str) -> None:
        try:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        except OSError as exc:  # leftovers under .staging/ are invisible; say so and go on
            log.warning("could not remove staging folder %s: %s", staging, exc)
