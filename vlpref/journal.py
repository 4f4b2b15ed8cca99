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
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from vlpref.chat import Sample, TokenLogprob, Usage
from vlpref.errors import JournalError
from vlpref.fs import AbstractFileSystem, is_local, join, resolve

SEGMENT_SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled sample."""

    key: str
    sample: Sample
    model: str
    usage: Usage  # of the whole call that produced the sample (shared by its siblings)
    call_id: str  # identifies that call, so usage is counted once per call
    latency_s: float
    created: float

    def to_json(self) -> str:
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
        if self.sample.logprobs is not None:
            record["lp"] = [
                [t.token, t.logprob, [list(a) for a in t.top]] for t in self.sample.logprobs
            ]
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

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
        return cls(
            key=record["k"],
            sample=Sample(record["i"], record["x"], record["f"], logprobs),
            model=record["m"],
            usage=Usage(prompt, completion),
            call_id=record["c"],
            latency_s=float(record["l"]),
            created=float(record["t"]),
        )


class Journal:
    """An append-only, key-addressed store of samples under one directory (local or fsspec)."""

    def __init__(self, location: str, *, flush_every: int = 256) -> None:
        self.location = location
        self.fs: AbstractFileSystem
        self.fs, self.root = resolve(location)
        self.flush_every = flush_every
        self._index: dict[str, JournalEntry] = {}
        self._segment_name = (
            f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._handle: IO[str] | None = None
        self._buffer: list[str] = []
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
            for entry in self._read_segment(segment):
                # First writer wins: duplicates can only come from two runs racing on one key,
                # and either answer is valid; keeping the first makes reads deterministic.
                self._index.setdefault(entry.key, entry)

    def _read_segment(self, segment: str) -> Iterator[JournalEntry]:
        with self.fs.open(segment, "rb") as handle:
            data = handle.read()
        lines = data.split(b"\n")
        last = len(lines) - 1
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield JournalEntry.from_record(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                if number - 1 == last:  # no newline after it: the write was cut by a crash
                    self.torn_lines += 1
                    continue
                raise JournalError(
                    f"{segment}: line {number}: not a journal entry ({exc})"
                ) from exc

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> JournalEntry | None:
        return self._index.get(key)

    def keys(self) -> Iterable[str]:
        return self._index.keys()

    # -- writing -------------------------------------------------------------------------------

    def append(self, entries: Iterable[JournalEntry]) -> None:
        """Record entries (idempotent per key) and make them durable against a process kill."""
        lines = []
        for entry in entries:
            if entry.key in self._index:
                continue
            self._index[entry.key] = entry
            lines.append(entry.to_json() + "\n")
        if not lines:
            return
        self.appended += len(lines)
        if is_local(self.fs):
            handle = self._local_handle()
            handle.write("".join(lines))
            handle.flush()  # into the OS: survives SIGKILL of this process
        else:
            self._buffer.extend(lines)
            if len(self._buffer) >= self.flush_every:
                self._write_part()

    def _local_handle(self) -> IO[str]:
        if self._handle is None:
            self.fs.makedirs(self.root, exist_ok=True)
            path = join(self.root, self._segment_name + SEGMENT_SUFFIX)
            self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        return self._handle

    def _write_part(self) -> None:
        if not self._buffer:
            return
        self.fs.makedirs(self.root, exist_ok=True)
        name = f"{self._segment_name}-{self._parts_written:06d}{SEGMENT_SUFFIX}"
        with self.fs.open(join(self.root, name), "wb") as handle:
            handle.write("".join(self._buffer).encode("utf-8"))
        self._parts_written += 1
        self._buffer.clear()

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()
        self._write_part()

    def close(self) -> None:
        self.flush()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
