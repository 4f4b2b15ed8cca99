"""A process-wide stop request for interrupted runs.

Ctrl-C and SIGTERM reach the main thread; a stage task runs in a worker thread that no signal and
no asyncio cancellation reaches while it computes (rendering and normalising a branch's images
is minutes of CPU at a large `per_branch`), and Prefect's teardown waits for it. The task runner
sets this flag when it tears a run down for an interruption (`flows/runners.py`), and loops of
CPU work call `check()` between items, so a task ends within one item.

    stopping.request()   # the run is being interrupted
    stopping.check()     # raises StopRequested once requested
    stopping.reset()     # a new run starts (one process may run several flows)
"""

from __future__ import annotations

import threading

from vlpref.errors import VlprefError

_requested = threading.Event()


class StopRequested(VlprefError):
    """The run is being interrupted: the work in progress stops between two items."""


def request() -> None:
    _requested.set()


def reset() -> None:
    _requested.clear()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    if _requested.is_set():
        raise StopRequested("the run was interrupted; stopping between two items")
