"""Heap trimming: on glibc (Linux, where CI and the scale runs are) it really returns freed
memory to the OS."""

from __future__ import annotations

import os

from vlpref import heap


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_trim_returns_fragmented_free_memory() -> None:
    # 10,000 strings of 16 KB (from malloc's heap: past pymalloc's 512 bytes, under its mmap
    # threshold), every other one kept: the freed half lies between live blocks, where glibc
    # keeps it until trimmed.
    blocks = [("x" * 16_000) + str(i) for i in range(10_000)]
    kept = blocks[::2]
    del blocks
    before = _rss_mb()
    assert heap.trim()
    after = _rss_mb()
    assert before - after > 50, (before, after)
    assert len(kept) == 5_000
