"""Give freed heap memory back to the operating system between stages.

A stage frees what it allocated (rows, request bodies, parsed answers) when it ends, but glibc's
allocator keeps most freed memory in its arenas: the many small objects of other branches still
in flight pin the pages around them, and only the top of each arena is trimmed on its own. In a
2,000-question scale run the flow process's RSS crept from 700 to 810 MB, of which 182 MB came
back with one `malloc_trim(0)` (measured; `bench/scale_run.py`). Trimming after each stage keeps
RSS near what is really live. It costs milliseconds, a few hundred times a run.

Elsewhere than glibc (macOS, musl) `trim` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable


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
