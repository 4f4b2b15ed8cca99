"""In-process progress events: stage tasks report completions to whoever listens (the CLI's
progress display), and the flow hands over its run summary (printed by the CLI also when nothing
could be published). A no-op when nobody listens, e.g. on a remote worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Listener = Callable[[str, str, dict[str, object]], None]  # (stage, branch_id, counts)
SummaryListener = Callable[[object], None]  # a vlpref.run_summary.RunSummary

_listeners: list[Listener] = []
_summary_listeners: list[SummaryListener] = []
_lock = threading.Lock()


def _subscribe(listeners: list[Any], listener: Any) -> Callable[[], None]:
    with _lock:
        listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in listeners:
                listeners.remove(listener)

    return unsubscribe


def subscribe(listener: Listener) -> Callable[[], None]:
    return _subscribe(_listeners, listener)


def subscribe_summary(listener: SummaryListener) -> Callable[[], None]:
    return _subscribe(_summary_listeners, listener)


def notify(stage: str, branch_id: str, counts: dict[str, object]) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(stage, branch_id, counts)


def notify_summary(summary: object) -> None:
    with _lock:
        listeners = list(_summary_listeners)
    for listener in listeners:
        listener(summary)
