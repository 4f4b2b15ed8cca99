"""Garbage-collector settings for a build: fewer, cheaper collections while requests stream.

A build allocates a few objects per token of every answer (JSON bodies, result records, rows)
while Prefect, pydantic and the SDKs keep hundreds of thousands of long-lived objects alive.
CPython's default thresholds (700, 10, 10) then run a full collection, which walks every tracked
object, about every 70,000 net allocations: in a 1,000-question scale run this took 20 s of a
65 s build (measured with `gc.callbacks`), on the one thread that also drives every request.

`throughput_gc` freezes what is alive when the build starts (moved to the permanent generation,
never walked again) and raises the thresholds so the young generation is collected every 50,000
allocations and a full collection comes rarely. Reference counting still frees everything that
is not in a cycle at once, so memory does not wait for the collector; only cyclic garbage does.
The previous settings are restored on exit, so a long-lived process (`vlpref serve`) is left as
it was between builds.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

THROUGHPUT_THRESHOLDS = (50_000, 20, 20)
ENV_DISABLE = "VLPREF_DEFAULT_GC"  # set to 1 to keep CPython's own settings (e.g. to compare)

_lock = threading.Lock()
_depth = 0  # nested or concurrent builds in one process share one tuning
_saved: tuple[int, int, int] | None = None


@contextmanager
def throughput_gc() -> Iterator[None]:
    """Tune the collector for the duration of a build (see the module docstring)."""
    global _depth, _saved
    if os.environ.get(ENV_DISABLE) == "1":
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(*THROUGHPUT_THRESHOLDS)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                gc.unfreeze()
                _saved = None
