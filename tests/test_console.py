"""The console of `vlpref run` (docs/pipeline.md, "The console"): the readable per-stage log
line, the live per-stage board and its 80-column rendering, the per-result event hook and the
log file's routing. The CLI run itself, piped, is tests/flows/test_console_run.py."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from rich.console import Console

from flows import progress
from vlpref import request_events
from vlpref.chat import ChatRequest, ChatResult, Failure, Message
from vlpref.console_board import StageBoard, finished_line, format_eta
from vlpref.redact import forget_secrets, register_secret
from vlpref.run_log import log_file_path, route_logs
from vlpref.stage_text import describe_counts

STAGES = ["images", "questions", "responses", "judge", "pairs"]
REQUESTING = ["questions", "responses", "judge"]


# --- describe_counts ----------------------------------------------------------------------------


def test_describe_counts_is_one_readable_line() -> None:
    counts = {
        "unit": "question slots",
        "in": 60,
        "out": 58,
        "failed": 2,
        "images": 20,
        "requests_sent": 20,
        "requests_cached": 40,
        "elapsed_s": 0.4321,
    }
    assert describe_counts("questions", counts, "cyber-4a02aa8c") == (
        "questions/cyber-4a02aa8c: 60 question slots in, 58 out, 2 failed; "
        "20 sent, 40 from the journal; 0.4 s"
    )


def test_describe_counts_says_only_what_the_stage_has() -> None:
    images = {"unit": "source items", "in": 5, "out": 4, "failed": 1, "duplicates": 1}
    assert describe_counts("images", images) == (
        "images: 5 source items in, 4 out, 1 failed; 1 duplicates"
    )
    pairs = {"unit": "questions", "in": 24, "out": 20, "failed": 4, "pairs": 31, "policy": "x"}
    line = describe_counts("pairs", pairs, "b")
    assert line == "pairs/b: 24 questions in, 20 out, 4 failed; 31 pairs"
    assert "{" not in line and "sent" not in line


# --- the board ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def board(branches: int = 4) -> tuple[StageBoard, Clock]:
    clock = Clock()
    return StageBoard(STAGES, branches, requesting=REQUESTING, clock=clock), clock


def view(b: StageBoard, stage: str) -> object:
    return next(v for v in b.views() if v.stage == stage)


def render(b: StageBoard, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    console.print(b)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_requests_are_counted_as_they_arrive_failures_included() -> None:
    b, clock = board()
    b.on_start("judge", "a")
    for i in range(10):
        clock.now += 0.1
        b.on_request("judge", "a", cached=False, failed=i < 3, sent=True)
    b.on_request("judge", "a", cached=True, failed=False, sent=False)
    b.on_request("judge", "a", cached=False, failed=True, sent=False)  # stopped: never sent
    v = view(b, "judge")
    assert (v.sent, v.cached, v.failed) == (10, 1, 4)  # type: ignore[attr-defined]
    assert v.rate == pytest.approx(10 / 0.9)  # type: ignore[attr-defined]
    assert v.done == 0 and v.eta_s is None  # type: ignore[attr-defined]  # no branch done: no basis


def test_eta_from_the_branches_done() -> None:
    b, clock = board()
    for _ in range(20):
        clock.now += 0.1
        b.on_request("judge", "a", cached=False, failed=False, sent=True)
    b.on_done("judge", "a", {"in": 20, "out": 20})
    for _ in range(5):
        clock.now += 0.1
        b.on_request("judge", "b", cached=False, failed=False, sent=True)
    v = view(b, "judge")
    # 3 branches not done, 20 each, 5 of b already sent: 55 left at 25 / 2.4 s.
    assert v.eta_s == pytest.approx(55 / (25 / 2.4))  # type: ignore[attr-defined]


def test_eta_from_the_plan_and_none_without_a_basis() -> None:
    b, clock = board()
    b.set_plan({"judge": {"to_send": 100, "from_journal": 0, "bound": 10}})
    for _ in range(20):
        clock.now += 0.1
        b.on_request("judge", "a", cached=False, failed=False, sent=True)
    assert view(b, "judge").eta_s == pytest.approx(80 / (20 / 1.9))  # type: ignore[attr-defined]
    assert view(b, "responses").eta_s is None  # type: ignore[attr-defined]  # nothing sent yet
    assert format_eta(None) == "–"
    assert format_eta(75) == "1:15" and format_eta(3725) == "1:02:05"


def test_a_stage_that_failed_shows_as_failed_not_complete() -> None:
    b, _ = board(2)
    # Every row failed: the output exists, the stage failed for the branch.
    assert b.on_done("judge", "a", {"in": 36, "out": 0, "failed": 36}) == []
    finished = b.on_done("judge", "b", {"in": 36, "out": 0, "failed": 36})
    assert finished == ["judge"]
    v = view(b, "judge")
    assert (v.done, v.failed_branches) == (0, 2)  # type: ignore[attr-defined]
    assert "failed" in render(b, 80).splitlines()[4]  # the judge row
    assert "2 failed" in finished_line(v, None)  # type: ignore[arg-type]


def test_a_stage_that_raised_fails_its_later_stages_for_the_branch_until_a_retry_heals() -> None:
    b, _ = board(2)
    b.on_failed("questions", "a")
    for stage in ("questions", "responses", "judge", "pairs"):
        assert view(b, stage).failed_branches == 1  # type: ignore[attr-defined]
    b.on_done("questions", "a", {"in": 3, "out": 3})  # Prefect's retry of the task succeeded
    assert view(b, "questions").done == 1  # type: ignore[attr-defined]
    assert view(b, "responses").failed_branches == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [80, 200])
def test_the_board_fits_the_terminal_with_its_counters(width: int) -> None:
    b, clock = board(12)
    b.set_plan({"judge": {"to_send": 99999, "from_journal": 0, "bound": 0}})
    for i in range(12):
        b.on_done("images", f"b{i}", {"in": 5, "out": 5})
    b.on_failed("questions", "b11")
    for i in range(5000):
        clock.now += 0.01
        b.on_request("judge", f"b{i % 3}", cached=i % 2 == 0, failed=i % 10 == 0, sent=i % 2 == 1)
    text = render(b, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= min(width, 100)
    header, judge = lines[0], next(line for line in lines if line.startswith("judge"))
    for name in ("sent", "journal", "failed", "req/s", "ETA"):
        assert name in header
    # b11 failed at questions: judge will not run for it. 97,499 of the plan left at 50 req/s.
    assert judge.split()[-7:] == ["1/12", "1✗", "2500", "2500", "500", "50.0", "32:29"]
    assert "12/12" in lines[1] and "done" in lines[1]
    assert "1/12 1✗" in lines[2]  # questions: b11 raised


# --- the request hook ---------------------------------------------------------------------------


def result(*, cached: bool = False, kind: str | None = None) -> ChatResult:
    request = ChatRequest(id="r", model="m", messages=(Message.user("hi"),))
    failure = Failure(kind, "x") if kind else None  # type: ignore[arg-type]
    return ChatResult(request, failure=failure, cached=cached)


@pytest.fixture
def heard() -> Iterator[list[tuple[str, str, bool, bool, bool]]]:
    events: list[tuple[str, str, bool, bool, bool]] = []
    unsubscribe = progress.subscribe_requests(lambda *event: events.append(event))
    yield events
    unsubscribe()


def test_results_of_a_stage_thread_are_heard_with_their_stage(
    heard: list[tuple[str, str, bool, bool, bool]],
) -> None:
    request_events.observe(result())  # outside a stage (e.g. `vlpref plan`): not heard
    with progress.stage_scope("judge", "b1"):
        request_events.observe(result())
        request_events.observe(result(cached=True))
        request_events.observe(result(kind="http_error"))
        request_events.observe(result(kind="stopped"))  # an early stop: not sent
    request_events.observe(result())
    assert heard == [
        ("judge", "b1", False, False, True),
        ("judge", "b1", True, False, False),
        ("judge", "b1", False, True, True),
        ("judge", "b1", False, True, False),
    ]


def test_a_stage_that_raises_is_told_and_the_error_propagates() -> None:
    failed: list[tuple[str, str]] = []
    unsubscribe = progress.subscribe_failures(lambda s, b, e: failed.append((s, b)))
    try:
        with pytest.raises(RuntimeError), progress.stage_scope("responses", "b2"):
            raise RuntimeError("endpoint gone")
    finally:
        unsubscribe()
    assert failed == [("responses", "b2")]
    assert request_events.current() is None


# --- the log file -------------------------------------------------------------------------------


def test_log_lines_go_to_the_file_redacted_and_not_to_prefects_console(tmp_path: object) -> None:
    from pathlib import Path

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # as a run has it (route_logs makes sure of it too)

    root = Path(str(tmp_path))
    logger = logging.getLogger("vlpref.test_console")  # propagates to the root, as Prefect's do
    logger.setLevel(logging.INFO)
    path = log_file_path(root / "ws")
    assert path.parent == root / "ws" / "logs" and path.name.startswith("run-")
    # As Prefect's logging.yml sets it up (pytest's own logging setup may have replaced it).
    prefects = PrefectConsoleHandler(stream=io.StringIO())
    logging.getLogger().addHandler(prefects)
    before = list(logging.getLogger().handlers)
    secret = "sk-live-this-is-not-a-real-key-0123456789"
    register_secret(secret)
    shown = io.StringIO()
    try:
        with route_logs(path, verbose=False, console=Console(file=shown)):
            assert not any(
                isinstance(h, PrefectConsoleHandler) for h in logging.getLogger().handlers
            )
            logger.info("judge/b: sent with key %s", secret)
    finally:
        forget_secrets()
    assert set(logging.getLogger().handlers) == set(before)  # put back
    text = path.read_text()
    assert "judge/b: sent with key [REDACTED]" in text and secret not in text
    assert shown.getvalue() == ""
    verbose = io.StringIO()
    with route_logs(log_file_path(root / "ws"), verbose=True, console=Console(file=verbose)):
        logger.info("pairs/b: 3 questions in")
    assert "pairs/b: 3 questions in" in verbose.getvalue()
    logging.getLogger().removeHandler(prefects)
    assert prefects.stream.getvalue() == ""  # type: ignore[attr-defined]
