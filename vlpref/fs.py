"""One filesystem abstraction for the workspace, the journal and the store (fsspec).

A plain path means the local filesystem; any fsspec URI (`s3://bucket/prefix`, `gs://…`,
`memory://…`) works wherever a location is asked for, given the matching fsspec backend.
"""

from __future__ import annotations

import posixpath

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

__all__ = ["AbstractFileSystem", "is_local", "join", "resolve"]


def resolve(location: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the path inside it for a plain path or an fsspec URI."""
    fs, path = fsspec.core.url_to_fs(location)
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    """Local files can be appended to and flushed line by line; object stores cannot."""
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)
