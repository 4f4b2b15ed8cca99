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
  per ten-second window, each on a GCL *without* decay whose slots a process leases in blocks and
  keeps: a unit spent holds one of the block's slots for one window, then the slot serves again
  locally (`_LeasedRate`). Blocks are handed back when `hold_s` old or unused for a window, one
  window after their last use. Prefect's own rate limits (GCLs with slot decay) were tried first:
  a denied request moves the limit's `updated` time without applying the decay, so every denial
  throws away the decay accumulated since the last update, and with several processes polling a
  1,200 rpm limit granted 570-940 rpm; handing every spent block back and leasing a new one
  (the second design) used 28-63% of the rate with 2-4 processes (bench/results/*-limits.md).

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from vlpref.errors import ConfigError
from vlpref.providers.ratelimit import RateLimiter

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

LIMITS_ENV = "VLPREF_SHARED_LIMITS"
NAME_PREFIX = "vlpref-"
LEASE_S = 60.0  # Prefect's shortest lease; renewed every third of it while held
CLOSE_WAIT_S = 30.0  # the longest a closing limiter waits for its rate windows to end
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
        for rate in (self._rpm, self._tpm):
            if rate is not None:
                leases += await rate.close()
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
        self._spawn_release(lease.lease_id)

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
                self._keep_renewed()
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

    def _held(self) -> list[_Lease]:
        """Every lease this process holds: concurrency blocks and the rates' blocks."""
        held = list(self._leases)
        for rate in (self._rpm, self._tpm):
            if rate is not None:
                held += rate.leases
        return held

    def _keep_renewed(self) -> None:
        if self._renewing is None:
            self._renewing = asyncio.create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        try:
            while self._held():
                await asyncio.sleep(LEASE_S / 3)
                client = self._client
                for lease in self._held():
                    if client is None:
                        return
                    with contextlib.suppress(Exception):  # the next renewal tries again
                        self.round_trips += 1
                        async with self.calls():
                            await client.renew_concurrency_lease(lease.lease_id, LEASE_S)
        finally:
            self._renewing = None


@dataclass(eq=False, slots=True)
class _RateBlock:
    """A leased block of a rate GCL's slots, kept and reused: a unit spent at t holds one of its
    slots until t + window."""

    lease: _Lease
    spends: deque[tuple[float, int]] = field(default_factory=deque)  # (when, units), in window
    recent: int = 0  # units spent within the last window
    idle_check: bool = False  # a check for disuse is scheduled

    @property
    def last_use(self) -> float:
        """When a unit was last spent from it (its lease time if none is within the window:
        that is earlier still, so every decision on `last_use` is the same)."""
        return self.spends[-1][0] if self.spends else self.lease.taken_at


class _LeasedRate:
    """At most `capacity` units (requests or tokens) per `window_s`, on a GCL *without* decay.

    A process leases blocks of slots (a fifth of the capacity each) and keeps them, as it keeps
    its concurrency blocks: each unit it spends holds one of its block's slots for one window,
    after which the slot serves again here without a round trip. Every slot counted on the
    server serves at most one unit per window, so all processes together never spend more than
    `capacity` units in any window. A block is retired once it is `hold_s` old (what it frees
    another process may lease) or unused for a window, and handed back one window after its last
    use. A process whose blocks are spent asks the server for another block at most every
    `owner.max_poll_s` (an eighth of the window when it holds none), and otherwise waits for its
    own oldest spend to age out.

    Prefect's own rate limits (slot decay) lose the decay accumulated since the limit's last
    update whenever a request is denied (the row's `updated` moves, its active slots do not):
    with several processes polling, a decaying limit granted about half its rate here. Handing
    each spent block back and leasing a new one (the design before this one) cost two writes to
    the Prefect server per block and a poll per wait, and with 2-4 processes on SQLite used
    28-63% of the rate (bench/results/*-limits.md)."""

    def __init__(
        self, owner: PrefectLimiter, name: str, per_minute: float, window_s: float
    ) -> None:
        self.owner = owner
        self.name = name
        per_s = per_minute / 60.0
        self.window_s = max(window_s, 1.0 / per_s)  # at least one unit per window
        self.capacity = max(1, math.floor(per_s * self.window_s))
        self.block = max(1, min(self.capacity, math.ceil(self.capacity / 5)))
        self.hold_s = max(owner.hold_s, self.window_s)
        self.poll_s = min(owner.max_poll_s, self.window_s / 8)  # when this process holds none
        self.credit = 0.0  # settled estimates: + unused, - overspent (tpm)
        self._blocks: list[_RateBlock] = []
        self._retired: list[_RateBlock] = []  # handed back one window after their last use
        self._next_ask = 0.0
        self._lock = asyncio.Lock()

    @property
    def leases(self) -> list[_Lease]:
        """Every lease this rate holds on the server (kept or retired, not yet handed back)."""
        return [block.lease for block in (*self._blocks, *self._retired)]

    def _room(self, block: _RateBlock, now: float) -> int:
        cutoff = now - self.window_s
        while block.spends and block.spends[0][0] <= cutoff:
            block.recent -= block.spends.popleft()[1]
        return block.lease.size - block.recent

    def _usable(self, amount: int, now: float) -> _RateBlock | None:
        for block in list(self._blocks):
            if now - block.lease.taken_at >= self.hold_s:
                self._retire(block)
            elif self._room(block, now) >= amount:
                return block
        return None

    def _wait_for_room(self, amount: int, now: float) -> float | None:
        """Seconds until one of this process's blocks has room for `amount`, or None."""
        soonest: float | None = None
        for block in self._blocks:
            need = amount - self._room(block, now)
            freed = 0
            for when, units in block.spends:  # oldest first
                freed += units
                if freed >= need:
                    at = when + self.window_s - now
                    soonest = at if soonest is None else min(soonest, at)
                    break
        return soonest

    async def take(self, amount: int) -> None:
        amount = math.ceil(amount - self.credit)
        self.credit = 0.0
        if amount <= 0:
            self.credit = float(-amount)
            return
        amount = min(amount, self.capacity)  # a request larger than a window takes it whole
        if not self._lock.locked():
            now = time.monotonic()
            block = self._usable(amount, now)
            if block is not None:
                self._spend(block, amount, now)
                return
        async with self._lock:
            while True:
                now = time.monotonic()
                block = self._usable(amount, now)
                if block is not None:
                    self._spend(block, amount, now)
                    return
                if now >= self._next_ask:
                    if await self._lease_more(amount):
                        continue
                    poll = self.owner.max_poll_s if self._blocks else self.poll_s
                    self._next_ask = time.monotonic() + poll * random.uniform(0.5, 1.0)
                now = time.monotonic()
                wait = self._next_ask - now
                local = self._wait_for_room(amount, now)
                if local is not None:
                    wait = min(wait, local)
                await asyncio.sleep(max(wait, 0.001))

    async def _lease_more(self, amount: int) -> bool:
        """One more block from the server (a full one, else just `amount`); False if refused."""
        want = min(self.capacity, max(self.block, amount))
        for slots in dict.fromkeys((want, amount)):
            try:
                lease = await self.owner._try_lease(self.name, slots)
            except _Locked:
                continue
            self._blocks.append(_RateBlock(lease))
            self.owner._keep_renewed()
            return True
        return False

    def _spend(self, block: _RateBlock, amount: int, now: float) -> None:
        block.spends.append((now, amount))
        block.recent += amount
        if not block.idle_check:
            block.idle_check = True
            asyncio.get_running_loop().call_later(self.window_s, self._retire_if_idle, block)

    def _retire_if_idle(self, block: _RateBlock) -> None:
        block.idle_check = False
        if block not in self._blocks:
            return
        idle_for = time.monotonic() - block.last_use
        if idle_for >= self.window_s:
            self._retire(block)
        else:
            block.idle_check = True
            loop = asyncio.get_running_loop()
            loop.call_later(self.window_s - idle_for, self._retire_if_idle, block)

    def _retire(self, block: _RateBlock) -> None:
        """Stop spending from `block`; hand it back one window after its last use."""
        if block not in self._blocks:
            return
        self._blocks.remove(block)
        self._retired.append(block)
        delay = max(0.0, block.last_use + self.window_s - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._hand_back, block)

    def _hand_back(self, block: _RateBlock) -> None:
        if block in self._retired:
            self._retired.remove(block)
            self.owner._spawn_release(block.lease.lease_id)

    async def close(self, most_wait_s: float = CLOSE_WAIT_S) -> list[_Lease]:
        """The leases to hand back now (the limiter is closing), once the units spent from them
        are out of the window: other workers of the run go on, and a block handed back early
        would let them spend its units a second time within one window. Waits for that (an
        rpm window is a second, a tpm window ten) up to `most_wait_s`; a block whose window
        ends later still (a rate under 2 a minute) is kept, not renewed: it comes back when its
        lease expires on a server that runs its services, or when the run deletes its limits."""
        blocks = [*self._blocks, *self._retired]
        self._blocks, self._retired = [], []
        now = time.monotonic()
        ends: dict[int, float] = {}  # when each block's last spend leaves the window
        for block in blocks:
            self._room(block, now)  # drops the spends already out of the window
            ends[id(block)] = block.spends[-1][0] + self.window_s if block.spends else now
        soon = [b for b in blocks if ends[id(b)] - now <= most_wait_s]
        if soon:
            await asyncio.sleep(max(0.0, max(ends[id(b)] for b in soon) - now))
        return [b.lease for b in soon]

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
