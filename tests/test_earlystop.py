"""The early-stop decision alone (vlpref/earlystop.py): pure, no I/O."""

from __future__ import annotations

import pytest

from vlpref.chat import ChatRequest, ChatResult, Failure, Message, Sample
from vlpref.earlystop import DEFAULT_EARLY_STOP_AFTER, Cause, EarlyStop, cause_of

AUTH = Cause("auth", 401, "HTTP 401: Incorrect API key provided")
NOT_FOUND = Cause("bad_request", 404, "HTTP 404: The model `x` does not exist")


def test_the_same_lasting_cause_n_times_stops() -> None:
    guard = EarlyStop(3)
    for i in range(3):
        assert guard.probing and guard.remaining == 3 - i
        guard.observe(AUTH, "gpt-x")
    assert guard.stopped and guard.remaining == 0
    failure = guard.failure()
    assert failure.kind == "stopped" and failure.status == 401 and failure.attempts == 0
    assert failure.message == (
        "not sent: the first 3 requests to gpt-x all failed: auth 401: Incorrect API key provided"
    )


@pytest.mark.parametrize(
    "other",
    [
        None,  # one usable answer
        Cause("server_error", 500, "HTTP 500: boom"),  # transient: retrying heals it
        Cause("rate_limit", 429, "HTTP 429: slow down"),
        Cause("timeout", None, "request timed out"),
        Cause("connection", None, "cannot connect"),
        Cause("malformed", 200, "not a chat completion"),
        NOT_FOUND,  # lasting, but not the same cause
        Cause("auth", 403, "HTTP 403: forbidden"),  # same kind, other status
    ],
)
def test_anything_but_the_same_lasting_cause_passes_for_good(other: Cause | None) -> None:
    guard = EarlyStop(3)
    guard.observe(AUTH)
    guard.observe(other)
    assert guard.state == "passed" and guard.remaining == 0
    for _ in range(10):  # decided: later failures change nothing
        guard.observe(AUTH)
    assert guard.state == "passed"


def test_transient_causes_never_trip_it() -> None:
    guard = EarlyStop(2)
    guard.observe(Cause("server_error", 500, "HTTP 500"))
    assert guard.state == "passed"


def test_unparseable_answers_trip_it_and_the_reason_quotes_the_parser() -> None:
    guard = EarlyStop(2)
    guard.observe(Cause("unparseable", None, "no verdict token in 'I cannot'"), "sim-refuser")
    guard.observe(Cause("unparseable", None, "no verdict token in 'Sorry'"), "sim-refuser")
    assert guard.stopped
    assert guard.reason() == (
        "not sent: the first 2 requests to sim-refuser all failed: "
        "unparseable: no verdict token in 'I cannot'"
    )


def test_a_limit_of_zero_is_refused_here() -> None:
    assert DEFAULT_EARLY_STOP_AFTER == 8
    with pytest.raises(ValueError):
        EarlyStop(0)


def test_cause_of_a_result() -> None:
    request = ChatRequest("r", "m", (Message.user("hi"),))
    ok = ChatResult(request, samples=(Sample(0, "fine", "stop"),))
    failed = ChatResult(request, failure=Failure("auth", "HTTP 401: no", 401))
    assert cause_of(ok) is None
    assert cause_of(failed) == Cause("auth", 401, "HTTP 401: no")
    assert cause_of(ok, lambda r: "does not parse") == Cause("unparseable", None, "does not parse")
    assert cause_of(ok, lambda r: None) is None
    assert cause_of(failed, lambda r: "never asked") == Cause("auth", 401, "HTTP 401: no")
