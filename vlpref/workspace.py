"""The workspace: where a run keeps its request journals and its per-stage outputs.

    <workspace>/journal/<stage>/<branch_id>/*.jsonl        request journal, one per stage+branch
    <workspace>/stages/<stage>/<branch_id>/<key>/           one stage output
        <table>.parquet ...  failures.parquet  counts.json  (counts.json is written last: the
                                                              output exists once it does)

A stage output's `key` hashes everything the output depends on (its inputs' keys, the stage's
config, prompt versions, model entries), so an unchanged (stage, branch) is found and reused
without running anything, and a changed one gets a new directory instead of overwriting.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlpref.fs import is_local, join, resolve
from vlpref.journal import Journal
from vlpref.keys import canonical_json
from vlpref.stage import StageOutput

COUNTS_FILE = "counts.json"


def stage_key(*parts: Any) -> str:
    """Hash of a stage's inputs (any JSON-able values)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class StageRef:
    """A small, picklable handle on one stage output; what Prefect tasks pass to each other."""

    stage: str
    branch_id: str
    key: str
    tables: tuple[str, ...]
    counts: dict[str, Any] = field(default_factory=dict, compare=False)
    reused: bool = False


class Workspace:
    def __init__(self, location: str) -> None:
        self.location = location
        self.fs, self.root = resolve(location)

    def journal(self, stage: str, branch_id: str) -> Journal:
        return Journal(self._uri(join("journal", stage, branch_id)))

    def _uri(self, relative: str) -> str:
        # Journals take a location, not a (fs, path) pair: rebuild it with the protocol.
        if "://" in self.location:
            return self.location.rstrip("/") + "/" + relative
        return join(self.root, relative)

    def _dir(self, stage: str, branch_id: str, key: str) -> str:
        return join(self.root, "stages", stage, branch_id, key)

    def find(self, stage: str, branch_id: str, key: str) -> StageRef | None:
        """The finished output for this key, if there is one."""
        folder = self._dir(stage, branch_id, key)
        counts_path = join(folder, COUNTS_FILE)
        if not self.fs.exists(counts_path):
            return None
        with self.fs.open(counts_path, "rb") as handle:
            meta = json.loads(handle.read())
        return StageRef(stage, branch_id, key, tuple(meta["tables"]), meta["counts"], reused=True)

    def write(self, output: StageOutput, key: str, tables: dict[str, pa.Table]) -> StageRef:
        """Write a stage output. Two runs may produce the same key at once: each writes into a
        private folder and renames it into place, so a reader never sees a half-written output;
        the loser of the race discards its copy (the contents are the same by construction)."""
        final = self._dir(output.stage, output.branch_id, key)
        temp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(temp, exist_ok=True)
        for name, tbl in {**tables, "failures": output.failures_table()}.items():
            buffer = io.BytesIO()
            pq.write_table(tbl, buffer, compression="zstd")
            with self.fs.open(join(temp, f"{name}.parquet"), "wb") as handle:
                handle.write(buffer.getvalue())
        meta = {"tables": sorted(tables), "counts": output.counts()}
        with self.fs.open(join(temp, COUNTS_FILE), "wb") as handle:
            handle.write(json.dumps(meta, indent=1).encode())
        self._move_into_place(temp, final)
        return StageRef(output.stage, output.branch_id, key, tuple(sorted(tables)), output.counts())

    def _move_into_place(self, temp: str, final: str) -> None:
        if self.fs.exists(join(final, COUNTS_FILE)):
            self.fs.rm(temp, recursive=True)
            return
        if is_local(self.fs):
            try:
                os.rename(temp, final)  # atomic; fails if another writer got there first
            except OSError:
                shutil.rmtree(temp, ignore_errors=True)
            return
        # Object stores: objects are written whole; counts.json goes last and marks completion.
        for name in sorted(self.fs.ls(temp, detail=False), key=lambda p: p.endswith(COUNTS_FILE)):
            self.fs.mv(name, join(final, posixpath.basename(name)))
        self.fs.rm(temp, recursive=True)

    def read(self, ref: StageRef, table_name: str) -> pa.Table:
        path = join(self._dir(ref.stage, ref.branch_id, ref.key), f"{table_name}.parquet")
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(io.BytesIO(handle.read()))
