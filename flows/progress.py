"""In-process progress events: stage tasks report completions to whoever listens (the CLI's
progress display), and the flow hands over its run summary (printed by the CLI also when nothing
could be published). A no-op when nobody listens, e.g. on a remote worker.

Besides completions: a stage that raised (`stage_scope`), the plan when `--plan` worked one out,
and every model result as the stage's thread takes it (`subscribe_requests`, carried by
`vlpref/request_events.py` because the model service below the flows hands them over)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vlpref import request_events
from vlpref.request_events import RequestListener

Listener = Callable[[str, str, dict[str, object]], None]  # (stage, branch_id, counts)
SummaryListener = Callable[[object], None]  # a vlpref.run_summary.RunSummary
FailureListener = Callable[[str, str, BaseException], None]  # (stage, branch_id, error)
StartListener = Callable[[str, str], None]  # (stage, branch_id)
PlanListener = Callable[[dict[str, dict[str, int]]], None]  # flows/plan.py: Plan.by_stage()

_listeners: list[Listener] = []
_summary_listeners: list[SummaryListener] = []
_failure_listeners: list[FailureListener] = []
_start_listeners: list[StartListener] = []
_plan_listeners: list[PlanListener] = []
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


def subscribe_failures(listener: FailureListener) -> Callable[[], None]:
    return _subscribe(_failure_listeners, listener)


def subscribe_starts(listener: StartListener) -> Callable[[], None]:
    return _subscribe(_start_listeners, listener)


def subscribe_plan(listener: PlanListener) -> Callable[[], None]:
    return _subscribe(_plan_listeners, listener)


def subscribe_requests(listener: RequestListener) -> Callable[[], None]:
    """(stage, branch_id, cached, failed, sent) for every model result of a stage task."""
    return request_events.subscribe(listener)


def notify_plan(by_stage: dict[str, dict[str, int]]) -> None:
    with _lock:
        listeners = list(_plan_listeners)
    for listener in listeners:
        listener(by_stage)


@contextmanager
def stage_scope(stage: str, branch_id: str) -> Iterator[None]:
    """Run one stage of one branch: its start is told, its model results are heard as (stage,
    branch_id), and an exception out of it is told to the failure listeners before it
    propagates, so that the display shows the stage as failed for the branch (a Prefect retry
    that then succeeds is a completion after it)."""
    with _lock:
        starts = list(_start_listeners)
    for start in starts:
        start(stage, branch_id)
    with request_events.scope(stage, branch_id):
        try:
            yield
        except BaseException as error:
            with _lock:
                listeners = list(_failure_listeners)
            for listener in listeners:
                listener(stage, branch_id, error)
            raise
