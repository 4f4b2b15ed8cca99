"""The request journal: every answered sample, appended as it arrives, keyed by its request key.

Layout: a directory of JSON-lines *segments*. Each process that writes opens a new segment of its
own and never touches another's, so concurrent writers cannot interleave and a crash can only
damage the last line of its own segment. On the local filesystem every line is written and
flushed as its sample arrives (a process killed with SIGKILL loses only the requests in flight);
on object stores, which cannot append, lines are buffered and written as numbered part objects
every `flush_every` lines and at close.

Reading tolerates a torn last line (the crash case) and refuses anything else that is not JSON,
naming the segment and line. Only answers are journaled: a request that failed is not, so a rerun
asks for it again.

Usage: each line holds its call's whole usage (`u`) and the sample's own share of it (`s`:
prompt tokens, completion tokens, 1 if the completion count is the sample's own), so a sample
answered from the journal carries exactly the tokens it carried when it was answered. Lines
written before shares were recorded (no `s`) read as carrying their call's whole usage, not
exact: right for n=1 calls, an over-count by the sibling count for n>1 calls (what tables built
from fresh calls showed then); rebuilding such a journal is the only way to exact shares.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

import orjson

from vlpref.chat import Sample, SampleUsage, TokenLogprob, Usage
from vlpref.errors import JournalError
from vlpref.fs import AbstractFileSystem, is_local, join, resolve

SEGMENT_SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled sample; `sample.usage` is its share of the call (`SampleUsage`)."""

    key: str
    sample: Sample
    model: str
    usage: Usage  # of the whole call that produced the sample (shared by its siblings)
    call_id: str  # names that call (the runner's `call_id`): siblings of one call share it
    latency_s: float
    created: float

    @property
    def share(self) -> SampleUsage:
        """The sample's share of its call; a line without one (written before shares were
        recorded) reads as carrying its call's whole usage, not exact."""
        if self.sample.usage is not None:
            return self.sample.usage
        return SampleUsage(self.call_id, self.usage.prompt_tokens, self.usage.completion_tokens)

    def to_json(self) -> bytes:
        """One journal line (without its newline): compact UTF-8 JSON, key first."""
        record: dict[str, Any] = {
            "k": self.key,
            "i": self.sample.index,
            "m": self.model,
            "x": self.sample.text,
            "f": self.sample.finish_reason,
            "u": [self.usage.prompt_tokens, self.usage.completion_tokens],
            "c": self.call_id,
            "l": round(self.latency_s, 6),
            "t": round(self.created, 3),
        }
        share = self.sample.usage
        if share is not None:
            record["s"] = [share.prompt_tokens, share.completion_tokens, int(share.exact)]
        if self.sample.logprobs is not None:
            # Tuples serialise as arrays: no per-token list copies on this hot path.
            record["lp"] = [(t.token, t.logprob, t.top) for t in self.sample.logprobs]
        return orjson.dumps(record)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JournalEntry:
        lp = record.get("lp")
        logprobs = (
            tuple(
                TokenLogprob(t, float(v), tuple((a, float(b)) for a, b in top)) for t, v, top in lp
            )
            if lp is not None
            else None
        )
        prompt, completion = record["u"]
        call_id = record["c"]
        s = record.get("s")  # absent on lines written before shares were: `share` reads those
        share = None if s is None else SampleUsage(call_id, s[0], s[1], bool(s[2]))
        return cls(
            key=record["k"],
            sample=Sample(
                record["i"],
                record["x"],
                record["f"],
                logprobs,
                share.completion_tokens if share is not None and share.exact else None,
                share,
            ),
            model=record["m"],
            usage=Usage(prompt, completion),
            call_id=call_id,
            latency_s=float(record["l"]),
            created=float(record["t"]),
        )


_KEY_PREFIX = b'{"k":"'


@dataclass(frozen=True, slots=True)
class _Where:
    """Where an entry's line is: a segment file and a byte range, or still in the write buffer."""

    segment: str
    offset: int
    length: int
    line_number: int


class Journal:
    """An append-only, key-addressed store of samples under one directory (local or fsspec).

    Memory holds only where each key's line is (segment, byte range), not the entries: a branch's
    judge journal at SPA-VL scale has tens of thousands of answers with token logprobs, and a run
    keeps several open. `get` reads and parses the one line it needs.
    """

    def __init__(self, location: str, *, flush_every: int = 256) -> None:
        self.location = location
        self.fs: AbstractFileSystem
        self.fs, self.root = resolve(location)
        self.flush_every = flush_every
        self._index: dict[str, _Where] = {}
        self._segment_name = (
            f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._handle: IO[bytes] | None = None
        self._own_path = ""
        self._own_size = 0
        self._own_lines = 0
        self._buffer: list[bytes] = []
        self._buffered: dict[str, bytes] = {}  # object stores: lines not yet written as a part
        self._readers: dict[str, IO[bytes]] = {}
        self._parts_written = 0
        self.torn_lines = 0  # last lines cut short by a crash, skipped on load
        self.appended = 0
        self._load()

    # -- reading -------------------------------------------------------------------------------

    def _segments(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(
            p for p in self.fs.ls(self.root, detail=False) if str(p).endswith(SEGMENT_SUFFIX)
        )

    def _load(self) -> None:
        for segment in self._segments():
            with self.fs.open(segment, "rb") as handle:
                data = handle.read()
            self._index_segment(segment, data)

    def _index_segment(self, segment: str, data: bytes) -> None:
        offset, number = 0, 0
        size = len(data)
        while offset < size:
            end = data.find(b"\n", offset)
            torn = end == -1
            line_end = size if torn else end
            number += 1
            line = data[offset:line_end]
            if line.strip():
                key = self._key_of(line, segment, number, last=torn)
                if key is not None:
                    # First writer wins: duplicates only come from two runs racing on one key,
                    # and either answer is valid; keeping the first makes reads deterministic.
                    self._index.setdefault(key, _Where(segment, offset, len(line), number))
            offset = line_end + 1

    def _key_of(self, line: bytes, segment: str, number: int, *, last: bool) -> str | None:
        """The key of a line, cheaply: our writer puts `"k"` first. A line without a newline is
        the crash case (skipped); anything else that is not an entry is an error."""
        if not last and line.startswith(_KEY_PREFIX) and line.endswith(b"}"):
            end = line.find(b'"', len(_KEY_PREFIX))
            if end > 0:
                return line[len(_KEY_PREFIX) : end].decode("ascii")
        try:
            return JournalEntry.from_record(json.loads(line)).key
        except (ValueError, KeyError, TypeError) as exc:
            if last:
                self.torn_lines += 1
                return None
            raise JournalError(f"{segment}: line {number}: not a journal entry ({exc})") from exc

    def __contains__(self, key: object) -> bool:
        return key in self._index or key in self._buffered

    def __len__(self) -> int:
        return len(self._index) + len(self._buffered)

    def get(self, key: str) -> JournalEntry | None:
        buffered = self._buffered.get(key)
        if buffered is not None:
            return JournalEntry.from_record(json.loads(buffered))
        where = self._index.get(key)
        if where is None:
            return None
        reader = self._readers.get(where.segment)
        if reader is None:
            reader = self.fs.open(where.segment, "rb")
            self._readers[where.segment] = reader
        reader.seek(where.offset)
        line = reader.read(where.length)
        try:
            return JournalEntry.from_record(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(
                f"{where.segment}: line {where.line_number}: not a journal entry ({exc})"
            ) from exc

    def keys(self) -> Iterable[str]:
        return [*self._index, *self._buffered]

    # -- writing -------------------------------------------------------------------------------

    def append(self, entries: Iterable[JournalEntry]) -> None:
        """Record entries (idempotent per key) and make them durable against a process kill."""
        lines: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for entry in entries:
            if entry.key in self or entry.key in seen:
                continue
            seen.add(entry.key)
            lines.append((entry.key, entry.to_json() + b"\n"))
        if not lines:
            return
        self.appended += len(lines)
        if is_local(self.fs):
            handle = self._local_handle()
            handle.write(b"".join(line for _, line in lines))
            handle.flush()  # into the OS: survives SIGKILL of this process
            for key, line in lines:
                self._own_lines += 1
                self._index[key] = _Where(
                    self._own_path, self._own_size, len(line) - 1, self._own_lines
                )
                self._own_size += len(line)
            self._readers.pop(self._own_path, None)  # a reader opened earlier may be stale
        else:
            for key, line in lines:
                self._buffered[key] = line
            if len(self._buffered) >= self.flush_every:
                self._write_part()

    def _local_handle(self) -> IO[bytes]:
        if self._handle is None:
            self.fs.makedirs(self.root, exist_ok=True)
            self._own_path = join(self.root, self._segment_name + SEGMENT_SUFFIX)
            self._handle = open(self._own_path, "ab")  # noqa: SIM115 - closed in close()
        return self._handle

    def _write_part(self) -> None:
        if not self._buffered:
            return
        self.fs.makedirs(self.root, exist_ok=True)
        name = f"{self._segment_name}-{self._parts_written:06d}{SEGMENT_SUFFIX}"
        path = join(self.root, name)
        data = b"".join(self._buffered.values())
        with self.fs.open(path, "wb") as handle:
            handle.write(data)
        self._parts_written += 1
        self._buffered.clear()
        self._index_segment(path, data)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()
        self._write_part()

    def close(self) -> None:
        self.flush()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
