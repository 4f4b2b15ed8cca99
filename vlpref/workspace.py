"""The workspace: where a run keeps its request journals and its per-stage outputs.

    <workspace>/journal/<stage>/<branch_id>/*.jsonl        request journal, one per stage+branch
    <workspace>/stages/<stage>/<branch_id>/<key>/           one stage output
        <table>.parquet ...  failures.parquet  counts.json  (counts.json is written last: the
                                                              output exists once it does)
    <workspace>/stages/<stage>/<branch_id>/<key>.r<N>/      a later generation of the same key

A stage output's `key` hashes everything the output depends on (its inputs' output ids, the
stage's config, prompt versions, model entries), so an unchanged (stage, branch) is found and
reused without running anything, and a changed one gets a new directory instead of overwriting.

Outputs are immutable. When a rerun computes a key again (its failures were retried, see
`vlpref.retry`, or a file of the newest output was lost), the result is written as the next
*generation* `<key>.r<N>` and the newest complete one is what `find` returns. What the stages after
it depend on is the output's `output_id`: the key itself for an output without failures, else a
hash of the key and the failed items. So a rerun that heals failures gives the downstream stages
new keys (they are recomputed, mostly from the journal), and one that heals nothing changes
nothing downstream.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlpref.fs import is_local, join, resolve
from vlpref.journal import Journal
from vlpref.keys import canonical_json
from vlpref.parquet_read import read_parquet
from vlpref.stage import StageOutput

COUNTS_FILE = "counts.json"


def stage_key(*parts: Any) -> str:
    """Hash of a stage's inputs (any JSON-able values)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:20]


def output_id(key: str, failed_items: Iterable[str]) -> str:
    """What the stages after an output depend on: its key, plus the items that failed (the only
    part of an output that can differ between two computations of one key)."""
    failed = sorted(failed_items)
    return stage_key(key, "failed", failed) if failed else key


@dataclass(frozen=True)
class StageRef:
    """A small, picklable handle on one stage output; what Prefect tasks pass to each other.

    `output_id` is what downstream stage keys hash (see the module docstring); `failed_by_kind`
    counts the output's failures by kind, so a rerun can tell whether to retry them."""

    stage: str
    branch_id: str
    key: str
    tables: tuple[str, ...]
    counts: dict[str, Any] = field(default_factory=dict, compare=False)
    reused: bool = False
    generation: int = 0
    output_id: str = ""
    failed_by_kind: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.output_id:
            object.__setattr__(self, "output_id", self.key)

    @property
    def folder_name(self) -> str:
        return generation_folder(self.key, self.generation)


def generation_folder(key: str, generation: int) -> str:
    return key if generation == 0 else f"{key}.r{generation}"


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

    def _branch_dir(self, stage: str, branch_id: str) -> str:
        return join(self.root, "stages", stage, branch_id)

    def _dir(self, stage: str, branch_id: str, key: str, generation: int = 0) -> str:
        return join(self._branch_dir(stage, branch_id), generation_folder(key, generation))

    def _generations(self, stage: str, branch_id: str, key: str) -> list[int]:
        """The generations of `key` that have a folder (complete or not), oldest first."""
        parent = self._branch_dir(stage, branch_id)
        if not self.fs.exists(parent):
            return []
        found = []
        prefix = key + ".r"
        for path in self.fs.ls(parent, detail=False):
            name = posixpath.basename(str(path).rstrip("/"))
            if name == key:
                found.append(0)
            elif name.startswith(prefix) and name[len(prefix) :].isdigit():
                found.append(int(name[len(prefix) :]))
        return sorted(found)

    def find(self, stage: str, branch_id: str, key: str) -> StageRef | None:
        """The newest complete output for this key, if there is one. An output one of whose
        files is missing (deleted by hand, lost by a store) is not reused: the stage is computed
        again into the next generation."""
        for generation in reversed(self._generations(stage, branch_id, key)):
            folder = self._dir(stage, branch_id, key, generation)
            counts_path = join(folder, COUNTS_FILE)
            if not self.fs.exists(counts_path):
                continue  # an object-store write still in progress, or one that died
            with self.fs.open(counts_path, "rb") as handle:
                meta = json.loads(handle.read())
            tables = tuple(meta["tables"])
            if not all(self.fs.exists(join(folder, f"{t}.parquet")) for t in (*tables, "failures")):
                return None
            if "output_id" in meta:
                oid, by_kind = meta["output_id"], meta.get("failed_by_kind", {})
            else:  # written before outputs recorded these: read them from the failures
                oid, by_kind = self._legacy_ids(folder, key, int(meta["counts"].get("failed", 0)))
            return StageRef(
                stage,
                branch_id,
                key,
                tables,
                meta["counts"],
                reused=True,
                generation=generation,
                output_id=oid,
                failed_by_kind=by_kind,
            )
        return None

    def _legacy_ids(self, folder: str, key: str, n_failed: int) -> tuple[str, dict[str, int]]:
        if n_failed == 0:
            return key, {}
        with self.fs.open(join(folder, "failures.parquet"), "rb") as handle:
            failures = read_parquet(io.BytesIO(handle.read()), columns=["item_id", "kind"])
        items = failures.column("item_id").to_pylist()
        return output_id(key, items), dict(Counter(failures.column("kind").to_pylist()))

    def write(self, output: StageOutput, key: str, tables: dict[str, pa.Table]) -> StageRef:
        """Write a stage output as the next generation of `key` (the first is generation 0).

        Two runs may produce the same key at once: each writes into a private folder and renames
        it into place, so a reader never sees a half-written output; the loser of the race
        discards its copy and gets the winner's."""
        existing = self._generations(output.stage, output.branch_id, key)
        generation = existing[-1] + 1 if existing else 0
        final = self._dir(output.stage, output.branch_id, key, generation)
        temp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(temp, exist_ok=True)
        for name, tbl in {**tables, "failures": output.failures_table()}.items():
            buffer = io.BytesIO()
            pq.write_table(tbl, buffer, compression="zstd")
            with self.fs.open(join(temp, f"{name}.parquet"), "wb") as handle:
                handle.write(buffer.getvalue())
        oid = output_id(key, (f.item_id for f in output.failures))
        by_kind = dict(sorted(Counter(f.kind for f in output.failures).items()))
        meta = {
            "tables": sorted(tables),
            "counts": output.counts(),
            "output_id": oid,
            "failed_by_kind": by_kind,
        }
        with self.fs.open(join(temp, COUNTS_FILE), "wb") as handle:
            handle.write(json.dumps(meta, indent=1).encode())
        if not self._move_into_place(temp, final):
            found = self.find(output.stage, output.branch_id, key)
            if found is not None:
                return replace(found, reused=False)
        return StageRef(
            output.stage,
            output.branch_id,
            key,
            tuple(sorted(tables)),
            output.counts(),
            generation=generation,
            output_id=oid,
            failed_by_kind=by_kind,
        )

    def _move_into_place(self, temp: str, final: str) -> bool:
        """Rename the private folder to its final name; False when another writer won."""
        if self.fs.exists(final):
            self.fs.rm(temp, recursive=True)
            return False
        if is_local(self.fs):
            try:
                os.rename(temp, final)  # atomic; fails if another writer got there first
            except OSError:
                shutil.rmtree(temp, ignore_errors=True)
                return False
            return True
        # Object stores: objects are written whole; counts.json goes last and marks completion.
        for name in sorted(self.fs.ls(temp, detail=False), key=lambda p: p.endswith(COUNTS_FILE)):
            self.fs.mv(name, join(final, posixpath.basename(name)))
        self.fs.rm(temp, recursive=True)
        return True

    def read(self, ref: StageRef, table_name: str) -> pa.Table:
        folder = self._dir(ref.stage, ref.branch_id, ref.key, ref.generation)
        path = join(folder, f"{table_name}.parquet")
        with self.fs.open(path, "rb") as handle:
            return read_parquet(io.BytesIO(handle.read()))
