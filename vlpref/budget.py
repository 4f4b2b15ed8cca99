"""Budgets: at a limit, a run stops sending, lets what is in flight finish, and publishes nothing.

`budget:` in the run config limits requests, tokens (prompt + completion, as the endpoints bill
them) and cost (tokens x the model entry's `price`) for the whole run and per model or judge by
its entry name. Enforcement sits at the model seam (`tasks/common.py: provider_for` wraps the
entry's provider): before a request goes to the provider it is *admitted* (every limit still has
room, counting the requests in flight for `requests`), and when its answer arrives its tokens and
cost are *recorded*. Token and cost limits are checked against what has been billed, so a run may
overshoot them by what the requests in flight bill: at most those requests, never more. Requests
the journal answers cost nothing and are never counted.

A refused request fails with kind `stopped` ("budget: ..."), which a rerun asks again (vlpref/
retry.py), so the answers already paid for are kept in the journal and the stage outputs, and a
rerun with a larger budget pays only for what is missing. At the end of a run whose budget was
reached, the flow raises `BudgetReached` instead of publishing: a version is never partial.

Scope: one process. With the threads runner that is the whole run; with Dask or Ray workers,
each worker process enforces the limits on its own share (docs/storage.md).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from vlpref.chat import ChatRequest, ChatResult, Failure
from vlpref.config import Budget, BudgetLimits, ModelEntry, RunConfig
from vlpref.errors import VlprefError
from vlpref.providers.base import Provider

__all__ = ["BudgetGuard", "BudgetReached", "Spend", "guard_for", "reset"]


class BudgetReached(VlprefError):
    """A limit of `budget:` was reached: what was answered is kept, nothing is published."""


@dataclass
class Spend:
    """What was sent and billed."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    in_flight: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def describe(self) -> str:
        return (
            f"{self.requests:,} request(s), {self.tokens:,} token(s) "
            f"({self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion), "
            f"cost {self.cost:,.4f}"
        )


def _over(spend: Spend, limits: BudgetLimits, *, admitting: bool) -> str | None:
    """The limit `spend` has reached, or None. Admitting a request counts it and those in
    flight against `requests`; tokens and cost count what was billed."""
    if limits.requests is not None and spend.requests + (1 if admitting else 0) > limits.requests:
        return f"requests {limits.requests:,}"
    if limits.tokens is not None and spend.tokens >= limits.tokens:
        return f"tokens {limits.tokens:,}"
    if limits.cost is not None and spend.cost >= limits.cost:
        return f"cost {limits.cost:,.4f}"
    return None


@dataclass
class BudgetGuard:
    """The run's spend against its budget; thread-safe (stage threads and the service loop)."""

    budget: Budget
    entries: Mapping[str, ModelEntry]
    total: Spend = field(default_factory=Spend)
    by_model: dict[str, Spend] = field(default_factory=dict)
    refused: int = 0
    reached: str | None = None  # the first limit reached, as said to the user
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _wrappers: dict[tuple[int, str], Provider] = field(default_factory=dict, repr=False)

    def admit(self, name: str) -> str | None:
        """Count a request of model entry `name` as sent, or say which limit refuses it."""
        with self._lock:
            mine = self.by_model.setdefault(name, Spend())
            limit = _over(self.total, self.budget, admitting=True)
            if limit is None and name in self.budget.per_model:
                found = _over(mine, self.budget.per_model[name], admitting=True)
                limit = f"{name}: {found}" if found else None
            if limit is not None:
                self.refused += 1
                self.reached = self.reached or limit
                return limit
            for spend in (self.total, mine):
                spend.requests += 1
                spend.in_flight += 1
            return None

    def record(self, name: str, result: ChatResult) -> None:
        """Bill an answered request (its whole call's usage)."""
        usage = result.usage
        entry = self.entries.get(name)
        price = entry.price if entry is not None else None
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        cost = price.cost(prompt, completion) if price is not None else 0.0
        with self._lock:
            for spend in (self.total, self.by_model.setdefault(name, Spend())):
                spend.in_flight -= 1
                spend.prompt_tokens += prompt
                spend.completion_tokens += completion
                spend.cost += cost

    def wrap(self, provider: Provider, name: str) -> Provider:
        """The provider as model entry `name` uses it under this budget (one wrapper each)."""
        key = (id(provider), name)
        with self._lock:
            if key not in self._wrappers:
                batch = hasattr(provider, "complete_resumable") and hasattr(
                    provider, "chunk_requests"
                )
                kind = BudgetedBatch if batch else Budgeted
                self._wrappers[key] = kind(provider, self, name)
            return self._wrappers[key]

    def summary(self) -> str:
        """What was spent and what to do next, for the error a run ends with."""
        limits = [
            f"{k} {v:,}" if not isinstance(v, float) else f"{k} {v:,.4f}"
            for k in ("requests", "tokens", "cost")
            if (v := getattr(self.budget, k)) is not None
        ]
        per = ", ".join(
            f"{n}: {s.describe()}" for n, s in sorted(self.by_model.items()) if s.requests
        )
        return (
            f"budget reached ({self.reached}); spent {self.total.describe()}"
            + (f" [{per}]" if per else "")
            + (f" of the run's limits ({', '.join(limits)})" if limits else "")
            + f"; {self.refused:,} request(s) not sent; nothing published. What was answered is "
            "in the journal: rerun with a larger budget to pay only for what is missing "
            "(`vlpref plan` says how much that is)"
        )


class Budgeted(Provider):
    """A provider that asks the guard before each request it sends and bills each answer. It
    has its provider's identity, so the journal keys are the ones a run without a budget uses."""

    kind = "budgeted"

    def __init__(self, inner: Provider, guard: BudgetGuard, name: str) -> None:
        self.inner, self.guard, self.name = inner, guard, name

    @property
    def identity(self) -> str:
        return self.inner.identity

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        raise NotImplementedError("built by vlpref.budget only")

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        held: list[tuple[ChatRequest, str]] = []

        def admitted() -> Iterator[ChatRequest]:
            # Pulled by the inner provider as its slots free up: a request is admitted only
            # when it is about to be sent, so what is refused was never in flight.
            for request in requests:
                limit = self.guard.admit(self.name)
                if limit is None:
                    yield request
                else:
                    held.append((request, limit))

        async for result in self.inner.complete(admitted()):
            self.guard.record(self.name, result)
            yield result
        for request, limit in held:
            message = f"budget: {limit} reached; not sent (a rerun with a larger budget asks it)"
            yield ChatResult(request, failure=Failure("stopped", message))

    async def aclose(self) -> None:
        """The inner provider belongs to the model service, which closes it."""


class BudgetedBatch(Budgeted):
    """A batch API's provider under a budget: a request is admitted when it would go into a
    batch file (the moment it is paid for), and the provider's resume and chunking hooks
    (vlpref/providers/openai_batch.py) pass through, so a killed run still resumes its batches."""

    def __init__(self, inner: Provider, guard: BudgetGuard, name: str) -> None:
        super().__init__(inner, guard, name)
        self.chunk_requests = getattr(inner, "chunk_requests")  # noqa: B009 - checked by wrap

    async def complete_resumable(
        self, requests: Sequence[ChatRequest], state: str | None
    ) -> AsyncIterator[ChatResult]:
        admitted: list[ChatRequest] = []
        held: list[tuple[ChatRequest, str]] = []
        for request in requests:
            limit = self.guard.admit(self.name)
            if limit is None:
                admitted.append(request)
            else:
                held.append((request, limit))
        if admitted:
            async for result in self.inner.complete_resumable(admitted, state):  # type: ignore[attr-defined]
                self.guard.record(self.name, result)
                yield result
        for request, limit in held:
            message = f"budget: {limit} reached; not sent (a rerun with a larger budget asks it)"
            yield ChatResult(request, failure=Failure("stopped", message))


_lock = threading.Lock()
_guards: dict[str, BudgetGuard] = {}


def _limited(budget: Budget) -> bool:
    limits = (budget.requests, budget.tokens, budget.cost)
    return any(v is not None for v in limits) or bool(budget.per_model)


def guard_for(config: RunConfig) -> BudgetGuard | None:
    """This process's guard for the run of `config` (None without limits): one per config
    name, made on first use, forgotten by `reset` (the flow calls it as a run starts)."""
    if not _limited(config.budget):
        return None
    with _lock:
        guard = _guards.get(config.name)
        if guard is None:
            entries = {e.name: e for e in (*config.models, config.generator, *config.judges)}
            guard = _guards[config.name] = BudgetGuard(config.budget, entries)
        return guard


def reset() -> None:
    """Forget the spend of earlier runs in this process."""
    with _lock:
        _guards.clear()


def reached(config: RunConfig) -> BudgetGuard | None:
    """The run's guard if its budget was reached."""
    with _lock:
        guard = _guards.get(config.name)
    return guard if guard is not None and guard.reached else None
