"""Heap trimming and Arrow's pool: on glibc (Linux, where CI and the scale runs are) freed memory
really goes back to the OS."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

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


def _pool_in_fresh_interpreter(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != heap.ARROW_POOL_ENV}
    done = subprocess.run(
        [sys.executable, "-c", code + "\nprint(pyarrow.default_memory_pool().backend_name)"],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_importing_vlpref_makes_the_system_allocator_arrows_pool() -> None:
    assert _pool_in_fresh_interpreter("import vlpref, pyarrow") == "system"
    # A pool the user chose stays; so does the one pyarrow chose when it loaded first.
    chosen = {heap.ARROW_POOL_ENV: "mimalloc"}
    assert _pool_in_fresh_interpreter("import vlpref, pyarrow", **chosen) == "mimalloc"
    assert _pool_in_fresh_interpreter("import pyarrow, vlpref") == "mimalloc"


def test_a_build_uses_the_system_pool_and_restores_the_previous_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(heap.ARROW_POOL_ENV, raising=False)
    mimalloc = pa.mimalloc_memory_pool()
    previous = pa.default_memory_pool()
    pa.set_memory_pool(mimalloc)
    try:
        with heap.system_arrow_pool() as pool:
            assert pool.backend_name == pa.default_memory_pool().backend_name == "system"
        assert pa.default_memory_pool().backend_name == "mimalloc"
        monkeypatch.setenv(heap.ARROW_POOL_ENV, "mimalloc")  # the user's choice is left alone
        with heap.system_arrow_pool() as pool:
            assert pool.backend_name == "mimalloc"
    finally:
        pa.set_memory_pool(previous)


def test_the_system_pool_returns_freed_buffers_to_the_os() -> None:
    with heap.system_arrow_pool():
        before = _rss_mb()
        column = pa.array(np.ones(32 * 2**20))  # 256 MB of float64, written (resident)
        grown = _rss_mb()
        del column
        after = _rss_mb()
    assert grown - before > 200, (before, grown)
    assert grown - after > 200, (grown, after)
