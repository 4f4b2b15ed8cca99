"""One filesystem abstraction for the workspace, the journal and the store (fsspec).

A plain path means the local filesystem; any fsspec URI (`s3://bucket/prefix`, `gs://…`,
`memory://…`) works wherever a location is asked for, given the matching fsspec backend.

Storage options (an S3 endpoint, a region, the names of the credential variables) come from the
run config's `storage:` section, by URL prefix (vlpref/config.py: `StorageLocation`,
docs/cluster.md). The config registers them with `use_storage` in every process that holds it:
where it is loaded, and on a Dask or Ray worker when a task's config arrives (unpickled). So
`resolve` needs no argument beyond the location, and the Workspace, the Journal and the Store
open their filesystems the same way on every host. The options are turned into fsspec keyword
arguments only here, when a filesystem is opened: credentials are read from the environment of
the process that opens it, and never travel in the config.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "AbstractFileSystem",
    "StorageSpec",
    "is_local",
    "join",
    "protocol_of",
    "resolve",
    "storage_for",
    "use_storage",
]


class StorageSpec(Protocol):
    """What `use_storage` keeps for a URL prefix: something that gives fsspec's keyword arguments
    for a location of that protocol, read at the time the filesystem is opened."""

    def fsspec_options(self, protocol: str) -> dict[str, Any]: ...


_storage: dict[str, StorageSpec] = {}
_storage_lock = threading.Lock()


def _prefix(prefix: str) -> str:
    return prefix.rstrip("/")


def use_storage(storage: Mapping[str, StorageSpec]) -> None:
    """Open the locations under each prefix with its options from now on, in this process. A
    prefix given again replaces its options (the newest config wins); others stay."""
    with _storage_lock:
        for prefix, spec in storage.items():
            _storage[_prefix(prefix)] = spec


def forget_storage(prefixes: Mapping[str, object] | None = None) -> None:
    """Drop the options of these prefixes (all of them without an argument)."""
    with _storage_lock:
        if prefixes is None:
            _storage.clear()
        for prefix in prefixes or ():
            _storage.pop(_prefix(prefix), None)


def storage_for(location: str) -> tuple[str, StorageSpec] | None:
    """The registered prefix that holds `location` (the longest, so `s3://b/team` can differ
    from `s3://b`), with its options; None when none does. A prefix holds a location when it is
    the location or a folder above it: `s3://data` does not hold `s3://data-eu/x`."""
    with _storage_lock:
        found = [
            (prefix, spec)
            for prefix, spec in _storage.items()
            if location == prefix or location.startswith(prefix + "/")
        ]
    return max(found, key=lambda item: len(item[0])) if found else None


def protocol_of(location: str) -> str:
    """`s3` for `s3://bucket/x`; `file` for a plain path."""
    return location.split("://", 1)[0] if "://" in location else "file"


def resolve(location: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the path inside it for a plain path or an fsspec URI, opened with the
    storage options registered for it (`use_storage`), if any."""
    found = storage_for(location)
    options = found[1].fsspec_options(protocol_of(location)) if found else {}
    fs, path = fsspec.core.url_to_fs(location, **options)
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    """Local files can be appended to and flushed line by line; object stores cannot."""
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)
