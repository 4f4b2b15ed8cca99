"""Early stop: a batch whose first N sent requests all fail for the same lasting reason stops.

A batch is one stage's requests for one model (or judge) on one endpoint. When its first N
results that were actually sent (journal hits do not count) all failed with the same cause that
retrying cannot heal, the rest of the batch would fail the same way and be paid for: a wrong or
missing key (`auth`, 401/403), a model the endpoint does not serve (`bad_request` 404), a request
the endpoint refuses (`bad_request` 400/422), or answers that never parse (`unparseable`, judged
by the stage). The model service then answers every remaining request of that batch, without
sending it, as `Failure(kind="stopped")` whose message names the cause.

Transient causes (rate limits, 5xx, timeouts, connection errors, malformed bodies) never trip it:
the provider already retries them and a rerun heals them. Neither does a mix of causes, nor a
single success: any of those ends the probe for the batch, which then runs at full speed.

`EarlyStop` is the decision alone, pure and synchronous; `vlpref.service` feeds it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from vlpref.chat import ChatResult, Failure

# 8: enough that one odd request (a corrupt image, one 404) cannot stop a model, few enough that
# a wrong key costs 8 requests per batch instead of thousands.
DEFAULT_EARLY_STOP_AFTER: Final = 8

# Causes that retrying the same request cannot heal. `unparseable` comes from a stage's check of
# the answers (the judge's verdict protocol, the questions' JSON), not from the provider.
TRIPPING_KINDS: Final = frozenset({"auth", "bad_request", "unparseable"})

STOPPED: Final = "stopped"  # the FailureKind of a request answered without being sent

Check = Callable[[ChatResult], str | None]
"""A stage's check of a successful answer: why it is unusable (it does not parse), or None."""

_HTTP_PREFIX = re.compile(r"^HTTP \d{3}: ")


@dataclass(frozen=True, slots=True)
class Cause:
    """Why one sent request produced nothing usable."""

    kind: str
    status: int | None
    message: str

    def describe(self) -> str:
        """`auth 401: Incorrect API key provided` (the provider's `HTTP 401: ` prefix dropped)."""
        status = f" {self.status}" if self.status is not None else ""
        return f"{self.kind}{status}: {_HTTP_PREFIX.sub('', self.message, count=1)}"


def cause_of(result: ChatResult, check: Check | None = None) -> Cause | None:
    """The cause of a sent result's failure, or None if it is usable."""
    failure = result.failure
    if failure is not None:
        return Cause(failure.kind, failure.status, failure.message)
    if check is not None:
        reason = check(result)
        if reason is not None:
            return Cause("unparseable", None, reason)
    return None


class EarlyStop:
    """Watches the first `limit` sent results of one batch and decides: stop or pass.

    `observe` takes each sent result's cause (None for a usable one) in arrival order. The state
    is `probing` until the decision: `stopped` once `limit` causes in a row were the same
    tripping cause (same kind and status), `passed` at the first usable result, transient cause
    or different cause. After the decision further observations change nothing.
    """

    __slots__ = ("first", "limit", "model", "seen", "state")

    def __init__(self, limit: int = DEFAULT_EARLY_STOP_AFTER) -> None:
        if limit < 1:
            raise ValueError("the early-stop limit must be at least 1 (0 turns it off upstream)")
        self.limit = limit
        self.seen = 0
        self.first: Cause | None = None
        self.model = ""
        self.state: Literal["probing", "passed", "stopped"] = "probing"

    @property
    def probing(self) -> bool:
        return self.state == "probing"

    @property
    def stopped(self) -> bool:
        return self.state == "stopped"

    @property
    def remaining(self) -> int:
        """Sent results still needed for a decision: the most the probe may send now."""
        return self.limit - self.seen if self.probing else 0

    def observe(self, cause: Cause | None, model: str = "") -> None:
        if self.state != "probing":
            return
        first = self.first
        if (
            cause is None
            or cause.kind not in TRIPPING_KINDS
            or (first is not None and (cause.kind, cause.status) != (first.kind, first.status))
        ):
            self.state = "passed"
            return
        if first is None:
            self.first, self.model = cause, model
        self.seen += 1
        if self.seen >= self.limit:
            self.state = "stopped"

    def reason(self) -> str:
        """What a stopped batch's failures and its log line say."""
        assert self.first is not None, "only a stopped batch has a reason"
        target = f" to {self.model}" if self.model else ""
        return (
            f"not sent: the first {self.limit} requests{target} all failed: {self.first.describe()}"
        )

    def failure(self) -> Failure:
        """The failure every remaining request of a stopped batch gets (attempts: none)."""
        assert self.first is not None, "only a stopped batch has a failure"
        return Failure(STOPPED, self.reason(), self.first.status, 0)
