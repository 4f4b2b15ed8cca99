"""An endpoint's `concurrency`, `rpm` and `tpm` for the whole run, whatever the task runner.

One small interface, `SharedLimiter`, with two implementations:

- `LocalLimiter` (the threads runner, and any process on its own): the limits hold per process,
  which is the whole run when the run is one process. Concurrency is the provider's own
  semaphore; the rates are this process's `RateLimiter` buckets.
- `PrefectLimiter` (the Dask and Ray runners, chosen by `shared_limits()`): the limits live on the
  run's Prefect server as global concurrency limits (GCLs), so every worker process on every host
  that talks to that server shares them. Concurrency is a GCL without decay; `rpm` and `tpm` are
  GCLs whose slots are held for a window after each use.

A round trip to the Prefect server costs about 5 ms (measured here against a local server,
bench/results/*-limits.md), a tenth of a 50 ms request, so slots are leased in blocks and used
locally:

- concurrency: a process leases a block of slots (`increment-with-lease`) and passes a freed slot
  straight to its next waiting request, without asking the server. A block is handed back once it
  has been idle for `linger_s`, or, for fairness between processes, once it is older than
  `hold_s` (30 s) and its requests have finished: a busy process keeps its slots that long while
  another waits (the endpoint's total is the same). Re-leasing every 5 s made requests wait for
  the new block (15.6 ms a request, measured with another bench beside it); with 30 s the limiter
  costs 0.3 ms a request, mostly the first lease (bench/results/*-limits.md). Leases are renewed
  while held, so a killed worker's slots come back when its lease expires (on a server that runs
  its services; vlpref's own temporary server runs none, and the run's limits are deleted when
  the run ends anyway).
- rates: `rpm` as at most rpm/60 requests per one-second window, `tpm` as at most tpm/6 tokens
  per ten-second window, each on a GCL *without* decay whose slots a process leases in blocks,
  spends locally and hands back one window after the block's last use (`_LeasedRate`). Prefect's
  own rate limits (GCLs with slot decay) were tried first: a denied request moves the limit's
  `updated` time without applying the decay, so every denial throws away the decay accumulated
  since the last update, and with several processes polling a 1,200 rpm limit granted 570-940
  rpm (bench/results/*-limits.md).

The server's own signals (`x-ratelimit-*` headers, a 429's Retry-After cool-down) stay per
process, in each limiter's `rate` (a `RateLimiter`): every worker sees them on its own answers.

Which one a process uses is said by the environment variable `VLPREF_SHARED_LIMITS`
(`prefect:<run token>`), which `shared_limits()` sets for the run's processes; the GCLs are named
`vlpref-<run token>-<endpoint digest>-{concurrency,rpm,tpm}` and deleted when the run ends, so a
run never inherits slots a crashed run left taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from vlpref.errors import ConfigError
from vlpref.providers.ratelimit import RateLimiter

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

LIMITS_ENV = "VLPREF_SHARED_LIMITS"
NAME_PREFIX = "vlpref-"
LEASE_S = 60.0  # Prefect's shortest lease; renewed every third of it while held
logger = logging.getLogger(__name__)


class SharedLimiter(Protocol):
    """An endpoint's limits as a provider uses them: `slot()` around each attempt's HTTP call
    (concurrency), `admit(tokens)` before it (rpm, tpm and the server's cool-downs), `settle`
    once its real usage is known. `rate` is this process's view of the server's signals."""

    rate: RateLimiter

    def slot(self) -> contextlib.AbstractAsyncContextManager[object]: ...

    async def admit(self, tokens: int) -> None: ...

    def settle(self, estimated: int, actual: int) -> None: ...

    async def aclose(self) -> None: ...


class LocalLimiter:
    """Limits of this process only (the threads runner's whole run)."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self.rate = RateLimiter(rpm, tpm)

    def slot(self) -> contextlib.AbstractAsyncContextManager[object]:
        # The provider's own semaphore (`concurrency` per process) is the limit here.
        return contextlib.nullcontext()

    async def admit(self, tokens: int) -> None:
        await self.rate.acquire(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        self.rate.settle(estimated, actual)

    async def aclose(self) -> None:
        return None


def scope() -> str:
    """This process's limits scope: `prefect:<token>` under `shared_limits()`, else ''."""
    return os.environ.get(LIMITS_ENV, "")


def limit_prefix(token: str, endpoint: str) -> str:
    """The GCL names' common part for one endpoint entry of one run."""
    digest = hashlib.sha256(endpoint.encode()).hexdigest()[:12]
    return f"{NAME_PREFIX}{token}-{digest}"


def limiter_for(
    endpoint: str,
    *,
    concurrency: int,
    rpm: float | None = None,
    tpm: float | None = None,
    limits_scope: str | None = None,
) -> SharedLimiter:
    """The limiter for an endpoint entry (`endpoint`: a canonical text of its options, so the
    same entry gets the same limits in every process) under `limits_scope` (default: this
    process's `scope()`)."""
    value = scope() if limits_scope is None else limits_scope
    if not value:
        return LocalLimiter(rpm, tpm)
    kind, _, token = value.partition(":")
    if kind != "prefect" or not token:
        raise ConfigError(f"{LIMITS_ENV}={value!r}: expected prefect:<token> or nothing")
    return PrefectLimiter(limit_prefix(token, endpoint), concurrency, rpm, tpm)


@dataclass(eq=False, slots=True)
class _Lease:
    lease_id: UUID
    size: int
    taken_at: float
    in_use: int = 0
    draining: bool = False  # older than hold_s: no new request, handed back once free
    idle_since: float | None = None


class _Locked(Exception):
    """The server said 423: no slot now; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"locked, retry after {retry_after:.3f} s")
        self.retry_after = retry_after


def _retry_after(exc: Exception) -> float | None:
    """The Retry-After of a 423 from the Prefect server, else None (another error)."""
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) != 423:
        return None
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0.1")))  # type: ignore[union-attr]
    except ValueError:
        return 0.1


class PrefectLimiter:
    """An endpoint's limits as global concurrency limits on the Prefect server (module
    docstring). Lives on one event loop (the model service's), like the provider."""

    def __init__(
        self,
        prefix: str,
        concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        block: int | None = None,
        hold_s: float = 30.0,
        linger_s: float = 0.25,
        max_poll_s: float = 0.5,
        tpm_window_s: float = 10.0,
    ) -> None:
        self.prefix = prefix
        self.concurrency = concurrency
        self.rate = RateLimiter()  # the server's headers and cool-downs, this process
        # A quarter of the limit per lease: a few round trips fill a process, and up to four
        # processes each get a block at once.
        self.block = block or max(1, concurrency // 4)
        self.hold_s = hold_s
        self.linger_s = linger_s
        self.max_poll_s = max_poll_s
        self.round_trips = 0  # for the bench: requests to the Prefect server
        self._client: PrefectClient | None = None
        self._ready = False
        self._setup_lock: asyncio.Lock | None = None
        self._leases: list[_Lease] = []
        self._waiters: deque[asyncio.Future[_Lease]] = deque()
        self._leasing: asyncio.Task[None] | None = None
        self._renewing: asyncio.Task[None] | None = None
        # Set when this process hands a lease back: its own waiting leaser asks at once instead
        # of sleeping out a poll (a block re-leased after `hold_s` would otherwise wait for it).
        self._freed: asyncio.Event | None = None
        # One call to the Prefect server at a time from this process: a lease and a release
        # arriving together contend for SQLite's write lock, and the loser waited ~1.9 s in
        # Prefect's client retries (measured); one after the other each takes ~8 ms.
        self._calls: asyncio.Lock | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Requests over a one-second window (as the local bucket's burst), tokens over ten: one
        # request's estimate (an image is ~800 tokens) must fit a window's capacity.
        self._rpm = _LeasedRate(self, f"{prefix}-rpm", rpm, 1.0) if rpm else None
        self._tpm = _LeasedRate(self, f"{prefix}-tpm", tpm, tpm_window_s) if tpm else None

    @property
    def names(self) -> list[str]:
        found = [f"{self.prefix}-concurrency"]
        found += [r.name for r in (self._rpm, self._tpm) if r is not None]
        return found

    # -- setup ---------------------------------------------------------------------------------

    def calls(self) -> asyncio.Lock:
        if self._calls is None:
            self._calls = asyncio.Lock()
        return self._calls

    async def client(self) -> PrefectClient:
        if not self._ready:
            await self._setup()
        assert self._client is not None
        return self._client

    async def _setup(self) -> None:
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self._ready:
                return
            from prefect.client.orchestration import get_client

            client = get_client()
            await client.__aenter__()
            try:
                await _upsert(client, f"{self.prefix}-concurrency", self.concurrency, None)
                for rate in (self._rpm, self._tpm):
                    if rate is not None:
                        await _upsert(client, rate.name, rate.capacity, None)
            except BaseException:
                await client.__aexit__(None, None, None)
                raise
            self._client = client
            self._ready = True

    # -- the interface -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[object]:
        lease = await self._acquire()
        try:
            yield lease
        finally:
            self._release(lease)

    async def admit(self, tokens: int) -> None:
        await self.rate.acquire(tokens)
        if self._rpm is not None:
            await self._rpm.take(1)
        if self._tpm is not None and tokens:
            await self._tpm.take(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        self.rate.settle(estimated, actual)
        if self._tpm is not None:
            self._tpm.settle(estimated, actual)

    async def aclose(self) -> None:
        """Hand every lease back and close the client (the provider is closing)."""
        for task in (self._leasing, self._renewing, *self._background):
            if task is not None:
                task.cancel()
        client, self._client, self._ready = self._client, None, False
        if client is None:
            return
        leases, self._leases = self._leases, []
        for rate in (self._rpm, self._tpm):  # units spent from these stay counted: the
            if rate is not None and rate._lease is not None:  # run's window is over anyway
                leases.append(rate._lease)
                rate._lease = None
        for lease in leases:
            with contextlib.suppress(Exception):  # best effort: the run deletes its limits
                await client.release_concurrency_slots_with_lease(lease.lease_id)
        await client.__aexit__(None, None, None)

    # -- concurrency: leased blocks ------------------------------------------------------------

    async def _acquire(self) -> _Lease:
        if not self._waiters:  # FIFO: nobody overtakes a request already waiting
            for lease in self._leases:
                if not lease.draining and lease.in_use < lease.size:
                    lease.in_use += 1
                    lease.idle_since = None
                    return lease
        waiter: asyncio.Future[_Lease] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._leasing is None:
            self._leasing = asyncio.create_task(self._lease_while_waited())
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # granted as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self, lease: _Lease) -> None:
        lease.in_use -= 1
        now = time.monotonic()
        if not lease.draining and now - lease.taken_at >= self.hold_s:
            lease.draining = True
        if not lease.draining:
            self._hand_out(lease)
        if lease.in_use == 0 and lease in self._leases:
            if lease.draining:
                self._give_back(lease)
            else:
                lease.idle_since = now
                asyncio.get_running_loop().call_later(self.linger_s, self._give_back_idle, lease)

    def _hand_out(self, lease: _Lease) -> None:
        while self._waiters and lease.in_use < lease.size:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled meanwhile
                continue
            lease.in_use += 1
            lease.idle_since = None
            waiter.set_result(lease)

    def _give_back_idle(self, lease: _Lease) -> None:
        idle = lease.idle_since
        if lease.in_use == 0 and idle is not None and time.monotonic() - idle >= self.linger_s / 2:
            self._give_back(lease)

    def _give_back(self, lease: _Lease) -> None:
        if lease not in self._leases:
            return
        self._leases.remove(lease)
        self._spawn(self._release_lease(lease.lease_id))

    async def _release_lease(self, lease_id: UUID) -> None:
        client = self._client
        if client is None:
            return
        self.round_trips += 1
        try:
            async with self.calls():
                await client.release_concurrency_slots_with_lease(lease_id)
        except Exception as exc:  # the lease expires on its own; the run deletes its limits
            logger.warning("could not hand back concurrency lease %s: %s", lease_id, exc)
        if self._freed is not None:
            self._freed.set()

    def _spawn_release(self, lease_id: UUID) -> None:
        self._spawn(self._release_lease(lease_id))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def _lease_while_waited(self) -> None:
        try:
            while self._waiting():
                want = min(self._waiting(), self.block, self.concurrency)
                lease = await self._lease_or_wait(f"{self.prefix}-concurrency", want, 1)
                if lease is None:
                    continue
                self._leases.append(lease)
                if self._renewing is None:
                    self._renewing = asyncio.create_task(self._renew_while_held())
                self._hand_out(lease)
                if lease.in_use == 0:  # nobody left to take it
                    lease.idle_since = time.monotonic()
                    asyncio.get_running_loop().call_later(
                        self.linger_s, self._give_back_idle, lease
                    )
        except Exception as exc:  # the Prefect server is unreachable: the requests fail
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            self._waiters.clear()
        finally:
            self._leasing = None

    async def _lease_or_wait(self, name: str, want: int, least: int) -> _Lease | None:
        """`want` slots of GCL `name` as one lease, else `least` (all or nothing on the
        server), else None after a wait: the server's Retry-After, capped at `max_poll_s` (it
        grows with how long slots are held, and ours are held for whole stages), cut short when
        this process hands a lease back."""
        try:
            try:
                return await self._try_lease(name, want)
            except _Locked:
                if want <= least:
                    raise
            return await self._try_lease(name, least)
        except _Locked as locked:
            wait = min(locked.retry_after, self.max_poll_s) * random.uniform(0.5, 1.0)
            if self._freed is None:
                self._freed = asyncio.Event()
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), wait)
            return None

    async def _try_lease(self, name: str, slots: int) -> _Lease:
        """One round trip: `slots` slots of GCL `name` as one lease, or _Locked."""
        from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

        client = await self.client()
        self.round_trips += 1
        try:
            async with self.calls():
                response = await client.increment_concurrency_slots_with_lease(
                    names=[name], slots=slots, mode="concurrency", lease_duration=LEASE_S
                )
        except Exception as exc:
            retry_after = _retry_after(exc)
            if retry_after is None:
                raise
            raise _Locked(retry_after) from exc
        granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        if not granted.limits:  # deleted under us (the run ended): nothing was counted
            raise ConfigError(f"concurrency limit {name} is gone")
        return _Lease(granted.lease_id, slots, time.monotonic())

    async def _renew_while_held(self) -> None:
        try:
            while self._leases:
                await asyncio.sleep(LEASE_S / 3)
                client = self._client
                for lease in list(self._leases):
                    if client is None:
                        return
                    with contextlib.suppress(Exception):  # the next renewal tries again
                        self.round_trips += 1
                        async with self.calls():
                            await client.renew_concurrency_lease(lease.lease_id, LEASE_S)
        finally:
            self._renewing = None


class _LeasedRate:
    """At most `capacity` units (requests or tokens) per `window_s`, on a GCL *without* decay:
    a unit spent at t keeps its slot taken until t + window_s, so the units spent in any window
    never exceed the slots. Prefect's own rate limits (slot decay) lose the decay accumulated
    since the limit's last update whenever a request is denied (the row's `updated` moves, its
    active slots do not): with several processes polling, a decaying limit granted about half
    its rate here. Slots are leased in blocks of a fifth of the capacity, spent locally, and
    handed back `window_s` after the block's last use; a block takes units only within
    `window_s` of its lease (what is left then is dropped, on the safe side)."""

    def __init__(
        self, owner: PrefectLimiter, name: str, per_minute: float, window_s: float
    ) -> None:
        self.owner = owner
        self.name = name
        per_s = per_minute / 60.0
        self.window_s = max(window_s, 1.0 / per_s)  # at least one unit per window
        self.capacity = max(1, math.floor(per_s * self.window_s))
        self.block = max(1, min(self.capacity, math.ceil(self.capacity / 5)))
        self.credit = 0.0  # settled estimates: + unused, - overspent (tpm)
        self._lease: _Lease | None = None
        self._left = 0
        self._lock = asyncio.Lock()

    def _usable(self, amount: int) -> bool:
        lease = self._lease
        return (
            lease is not None
            and self._left >= amount
            and time.monotonic() < lease.taken_at + self.window_s
        )

    async def take(self, amount: int) -> None:
        amount = math.ceil(amount - self.credit)
        self.credit = 0.0
        if amount <= 0:
            self.credit = float(-amount)
            return
        amount = min(amount, self.capacity)  # a request larger than a window takes it whole
        if not self._lock.locked() and self._usable(amount):
            self._spend(amount)
            return
        async with self._lock:
            while not self._usable(amount):
                self._retire()
                want = min(self.capacity, max(self.block, amount))
                lease = await self.owner._lease_or_wait(self.name, want, amount)
                if lease is not None:
                    self._lease, self._left = lease, lease.size
                    lease.idle_since = lease.taken_at
                    loop = asyncio.get_running_loop()
                    loop.call_later(self.window_s, self._retire_if_current, lease)
            self._spend(amount)

    def _spend(self, amount: int) -> None:
        assert self._lease is not None
        self._left -= amount
        self._lease.idle_since = time.monotonic()  # here: when it was last spent from

    def _retire_if_current(self, lease: _Lease) -> None:
        if self._lease is lease:
            self._retire()

    def _retire(self) -> None:
        """Stop spending from the current block; hand it back `window_s` after its last use."""
        lease, self._lease, self._left = self._lease, None, 0
        if lease is None:
            return
        last = lease.idle_since if lease.idle_since is not None else lease.taken_at
        delay = max(0.0, last + self.window_s - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self.owner._spawn_release, lease.lease_id)

    def settle(self, estimated: int, actual: int) -> None:
        self.credit = min(float(self.capacity), self.credit + estimated - actual)


async def _upsert(client: PrefectClient, name: str, limit: int, decay: float | None) -> None:
    """Create or update a GCL; several workers do it at once, so a 409 means another won."""
    from prefect.exceptions import ObjectAlreadyExists

    for _ in range(3):
        try:
            await client.upsert_global_concurrency_limit_by_name(name, limit, decay)
            return
        except ObjectAlreadyExists:
            continue  # created meanwhile: read it again and update if it differs


@contextlib.contextmanager
def shared_limits() -> Iterator[str]:
    """Run-wide limits for this process and every worker it starts: `VLPREF_SHARED_LIMITS` set
    to `prefect:<new token>` for the block (workers inherit it, or get it from the runner), then
    the run's GCLs deleted from the Prefect server. Inside an enclosing scope, that scope is
    used (and cleaned up by its owner). Yields the scope's value."""
    current = scope()
    if current:
        yield current
        return
    token = secrets.token_hex(4)
    value = f"prefect:{token}"
    os.environ[LIMITS_ENV] = value
    try:
        yield value
    finally:
        os.environ.pop(LIMITS_ENV, None)
        delete_run_limits(token)


def delete_run_limits(token: str) -> int:
    """Delete every GCL of run `token` from the current Prefect server; how many."""
    from prefect.client.orchestration import get_client

    prefix = f"{NAME_PREFIX}{token}-"
    deleted = 0
    try:
        with get_client(sync_client=True) as client:
            names: list[str] = []
            offset = 0
            while True:
                page = client.read_global_concurrency_limits(limit=200, offset=offset)
                names += [str(gcl.name) for gcl in page if str(gcl.name).startswith(prefix)]
                if len(page) < 200:
                    break
                offset += 200
            for name in names:
                client.delete_global_concurrency_limit_by_name(name)
                deleted += 1
    except Exception as exc:  # the server is gone already: so are its limits
        logger.warning("could not delete the run's concurrency limits (%s*): %s", prefix, exc)
    return deleted
