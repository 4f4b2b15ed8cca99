"""Give freed heap memory back to the operating system between stages.

A stage frees what it allocated (rows, request bodies, parsed answers) when it ends, but glibc's
allocator keeps most freed memory in its arenas: the many small objects of other branches still
in flight pin the pages around them, and only the top of each arena is trimmed on its own. In a
2,000-question scale run the flow process's RSS crept from 700 to 810 MB, of which 182 MB came
back with one `malloc_trim(0)` (measured; `bench/scale_run.py`). Trimming after each stage keeps
RSS near what is really live. It costs milliseconds, a few hundred times a run.

Elsewhere than glibc (macOS, musl) `trim` does nothing.

Arrow's buffers are a second heap. pyarrow's wheels allocate them from a bundled mimalloc, which
keeps what it freed mapped for reuse: in a scale run with branches of 7,400 responses the flow
process held a 1 GiB mimalloc reservation with 287 MB resident while Arrow had about 30 MB
allocated, and the peak RSS was 856 MB; with the system allocator the same run peaked at 468 MB
at the same speed (`bench/scale_run.py --questions 30000 --branches 6`). Arrow picks its pool
once, when pyarrow loads, from `ARROW_DEFAULT_MEMORY_POOL`: importing vlpref sets it to `system`
unless it is set already or pyarrow was loaded first, and a build switches pyarrow's own default
for its length in that last case (`system_arrow_pool`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

# Arrow's own switch, read once when pyarrow loads.
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return free heap pages to the OS; True when the allocator released any."""
    return bool(_TRIM(0)) if _TRIM is not None else False


def prefer_system_arrow_pool() -> None:
    """Make the system allocator Arrow's default pool, if pyarrow has not loaded yet and nobody
    chose a pool (called when vlpref is imported)."""
    if "pyarrow" not in sys.modules:
        os.environ.setdefault(ARROW_POOL_ENV, "system")


@contextmanager
def system_arrow_pool() -> Iterator[pa.MemoryPool]:
    """Allocate pyarrow's buffers from the system allocator inside the block (the previous
    default comes back afterwards), unless `ARROW_DEFAULT_MEMORY_POOL` chose a pool. Covers
    pyarrow's own calls; Arrow's C++ internals follow the pool chosen at load. Yields the pool
    in use."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    if os.environ.get(ARROW_POOL_ENV):
        yield previous
        return
    pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(previous)
