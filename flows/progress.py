"""In-process progress events: stage tasks report completions to whoever listens (the CLI's
progress display). A no-op when nobody listens, e.g. on a remote worker."""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str, str, dict[str, object]], None]  # (stage, branch_id, counts)

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def notify(stage: str, branch_id: str, counts: dict[str, object]) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(stage, branch_id, counts)
