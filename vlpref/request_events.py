"""Per-request events for a live display: each model result, as the stage's thread takes it.

`ModelService.run` calls `observe(result)` for every result it yields. The flow marks the thread
that runs a stage with `scope(stage, branch_id)`; a listener (the CLI's progress board,
`vlpref/console_board.py`) then hears `(stage, branch_id, cached, failed, sent)` per result.

The standard library only, so that the service (which must not know about flows) can import it.
Nobody listening, or a thread outside a stage (`vlpref plan`, the judge-drift checks, a worker
process of Dask or Ray, which has no CLI), costs one attribute read and a truth test per result.
Listeners run in the stage's thread, one result at a time: they must be quick and thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlpref.chat import ChatResult

# (stage, branch_id, cached, failed, sent). `sent`: the request went to the endpoint; a result
# from the journal and a failure of kind `stopped` (an early stop or a budget: never sent) were
# not, exactly as `BatchStats.sent` counts them.
RequestListener = Callable[[str, str, bool, bool, bool], None]

_local = threading.local()
_lock = threading.Lock()
# Replaced, never mutated: `observe` reads it without the lock (one atomic attribute read).
_listeners: tuple[RequestListener, ...] = ()


def subscribe(listener: RequestListener) -> Callable[[], None]:
    """Hear every observed result of a scoped thread; returns the function that unsubscribes."""
    global _listeners
    with _lock:
        _listeners = (*_listeners, listener)

    def unsubscribe() -> None:
        global _listeners
        with _lock:
            _listeners = tuple(x for x in _listeners if x is not listener)

    return unsubscribe


@contextmanager
def scope(stage: str, branch_id: str) -> Iterator[None]:
    """Results observed in this thread meanwhile belong to (stage, branch_id). Nests: the outer
    scope comes back on exit (a Prefect retry of a task runs in the same thread)."""
    previous = getattr(_local, "scope", None)
    _local.scope = (stage, branch_id)
    try:
        yield
    finally:
        _local.scope = previous


def current() -> tuple[str, str] | None:
    """The (stage, branch_id) of this thread, if a stage runs in it."""
    scoped: tuple[str, str] | None = getattr(_local, "scope", None)
    return scoped


def observe(result: ChatResult) -> None:
    """Tell the listeners about one result taken in this thread (none: nothing happens)."""
    listeners = _listeners
    if not listeners:
        return
    scoped = getattr(_local, "scope", None)
    if scoped is None:
        return
    failure = result.failure
    failed = failure is not None
    sent = not result.cached and not (failure is not None and failure.kind == "stopped")
    for listener in listeners:
        listener(scoped[0], scoped[1], result.cached, failed, sent)
