"""Run-wide endpoint limits (issue 20 item 1): do `concurrency` and `rpm` hold with 1, 2 and 4
Dask or Ray workers, and what does the shared limiter cost per request?

    python -m bench.shared_limits [--requests 1600] [--rate-requests 400] [--out bench/results]

One simulated server (constant 50 ms latency) and one local Prefect server. Each Dask worker (a
process of a `LocalCluster`) or Ray worker (a task of a local Ray given N CPUs, the scope handed
over in its `runtime_env` as `flows/runners.py` does) builds the endpoint's provider, as a stage
task would, and sends
its share of the requests through it (`OpenAICompatProvider.complete`, `concurrency` coroutines
per process, so without shared limits every process alone fills the limit):

  threads      one process, process-local limits (`LocalLimiter`): the threads runner;
  dask N       N worker processes under `vlpref.limits.shared_limits()` (`PrefectLimiter`);
  ray N        N Ray worker processes under the same scope;
  dask 4 local 4 worker processes with process-local limits: what the runner did before.

Read from the sim's request log (`GET /sim/requests`: arrival time of each call): the peak of
calls in flight (each arrival busy for the 50 ms latency) and the requests per minute (over the
busiest 10 s window, x6, and over the whole run). The limiter's own cost is timed in one
process: `admit` + taking a slot + giving it back, per request, with as many senders as slots
(no waiting for a slot another sender holds; what remains is bookkeeping and the amortised
round trips to the Prefect server). Writes bench/results/YYYY-MM-DD-limits.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlpref import limits
from vlpref.chat import ChatRequest, Message, SamplingParams
from vlpref.prefect_server import PrefectServer, api_url_in_environment
from vlpref.sim.testing import SimServer

LATENCY_S = 0.05
MODEL = "sim-refuser"
SIM = {
    "latency": {"kind": "constant", "ms": LATENCY_S * 1000},
    "models": {MODEL: {"persona": "refuser"}},
}


def send(base_url: str, endpoint: dict[str, Any], count: int, tag: str) -> int:
    """Send `count` requests through the endpoint's provider in this process; how many got 200.
    Runs in a Dask worker (or here for the threads row): the limiter is the process's."""
    from vlpref.providers.openai_compat import OpenAICompatProvider

    provider = OpenAICompatProvider.from_config(
        {"kind": "openai", "base_url": base_url, **endpoint}
    )
    requests = [
        ChatRequest(
            id=f"{tag}-{i}",
            model=MODEL,
            messages=(Message.user(f"{tag} question {i}"),),
            params=SamplingParams(max_tokens=16),
        )
        for i in range(count)
    ]

    async def go() -> int:
        ok = 0
        try:
            async for result in provider.complete(requests):
                ok += result.failure is None
        finally:
            await provider.aclose()
        return ok

    return asyncio.run(go())


def peak_in_flight(arrivals: list[float]) -> int:
    edges = sorted([(t, 1) for t in arrivals] + [(t + LATENCY_S, -1) for t in arrivals])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def busiest_rpm(arrivals: list[float], window_s: float = 10.0) -> float:
    arrivals = sorted(arrivals)
    most, lo = 0, 0
    for hi, t in enumerate(arrivals):
        while arrivals[lo] < t - window_s:
            lo += 1
        most = max(most, hi - lo + 1)
    return most * 60.0 / window_s


def run_case(
    sim: SimServer,
    endpoint: dict[str, Any],
    requests: int,
    workers: int | None,
    shared: bool,
    runner: str = "dask",
) -> dict[str, Any]:
    """One row: `workers` Dask or Ray processes (None: this process alone)."""
    sim.reset()
    started = time.monotonic()
    if workers is None:
        ok = send(sim.base_url, endpoint, requests, "threads")
    else:
        # The run's scope, as the runners open it (per-process limits: none).
        with limits.shared_limits() if shared else contextlib.nullcontext("") as scope:
            if runner == "ray":
                ok = send_on_ray(sim.base_url, endpoint, requests, workers, scope)
            else:
                ok = send_on_dask(sim.base_url, endpoint, requests, workers)
    took = time.monotonic() - started
    arrivals = [e["t"] for e in sim.requests_log() if e["model"] == MODEL]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0
    return {
        "ok": ok,
        "sent": len(arrivals),
        "peak": peak_in_flight(arrivals),
        "busiest_rpm": busiest_rpm(arrivals),
        "mean_rpm": len(arrivals) / span * 60 if span else 0.0,
        "took_s": took,
    }


def send_on_dask(base_url: str, endpoint: dict[str, Any], requests: int, workers: int) -> int:
    """`workers` Dask worker processes, each sending its share; they inherit the scope and the
    Prefect API from this process's environment, as the runner's local workers do."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, threads_per_worker=1, processes=True
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        share = requests // workers
        futures = [
            client.submit(send, base_url, endpoint, share, f"w{i}", pure=False)
            for i in range(workers)
        ]
        return sum(client.gather(futures))


def send_on_ray(
    base_url: str, endpoint: dict[str, Any], requests: int, workers: int, scope: str
) -> int:
    """`workers` Ray tasks on a local Ray of `workers` CPUs (one task per worker process), each
    with the run's scope and Prefect API in its `runtime_env`, as the Ray runner gives them."""
    import ray

    variables = {limits.LIMITS_ENV: scope, "PREFECT_API_URL": os.environ["PREFECT_API_URL"]}
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(send).options(runtime_env={"env_vars": variables})
        share = requests // workers
        refs = [remote.remote(base_url, endpoint, share, f"r{i}") for i in range(workers)]
        return sum(ray.get(refs))
    finally:
        ray.shutdown()


async def limiter_cost(limiter: limits.SharedLimiter, requests: int, senders: int) -> float:
    """Mean seconds per request inside the limiter (admit + slot in + slot out)."""
    spent: list[float] = []
    left = iter(range(requests))

    async def sender() -> None:
        while next(left, None) is not None:
            t0 = time.perf_counter()
            await limiter.admit(0)
            slot = limiter.slot()
            await slot.__aenter__()
            t1 = time.perf_counter()
            await asyncio.sleep(LATENCY_S)
            t2 = time.perf_counter()
            await slot.__aexit__(None, None, None)
            spent.append(t1 - t0 + time.perf_counter() - t2)

    await asyncio.gather(*(sender() for _ in range(senders)))
    await limiter.aclose()
    return statistics.fmean(spent)


def overhead(requests: int, concurrency: int) -> dict[str, float]:
    local = asyncio.run(limiter_cost(limits.LocalLimiter(), requests, concurrency))
    shared = limits.PrefectLimiter(f"vlpref-bench{os.getpid()}", concurrency)
    prefect = asyncio.run(limiter_cost(shared, requests, concurrency))
    return {"local": local, "prefect": prefect, "round_trips": shared.round_trips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--rate-requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    conc = {"concurrency": args.concurrency}
    rate = {"concurrency": 64, "rpm": args.rpm}
    rows: list[tuple[str, str, dict[str, Any]]] = []
    with (
        tempfile.TemporaryDirectory() as home,
        PrefectServer(home, services=False) as server,
        server.as_current(),
        api_url_in_environment(server.api_url),
        SimServer(SIM) as sim,
    ):
        cases: list[tuple[str, int | None, bool]] = [
            ("threads", None, False),
            ("dask 1", 1, True),
            ("dask 2", 2, True),
            ("dask 4", 4, True),
            ("ray 1", 1, True),
            ("ray 2", 2, True),
            ("ray 4", 4, True),
            ("dask 4, per-process limits", 4, False),
        ]
        for kind, endpoint, count in (
            ("concurrency", conc, args.requests),
            ("rpm", rate, args.rate_requests),
        ):
            for label, workers, shared in cases:
                runner = label.split()[0]
                result = run_case(sim, endpoint, count, workers, shared, runner)
                rows.append((kind, label, result))
                print(kind, label, result, flush=True)
        cost = overhead(2000, args.concurrency)
        print("overhead", cost, flush=True)
    write_report(args, rows, cost)


def table_rows(
    rows: list[tuple[str, str, dict[str, Any]]], kind: str, middle: Callable[[dict[str, Any]], str]
) -> list[str]:
    """The table lines of one kind of case: runner, sent (200), `middle`'s cells, took."""
    return [
        f"| {label} | {r['sent']} ({r['ok']}) | {middle(r)} | {r['took_s']:.1f} s |"
        for case_kind, label, r in rows
        if case_kind == kind
    ]


def write_report(
    args: argparse.Namespace, rows: list[tuple[str, str, dict[str, Any]]], cost: dict[str, float]
) -> None:
    today = dt.date.today().isoformat()
    out = args.out / f"{today}-limits.md"
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Run-wide endpoint limits ({today})",
        "",
        "`python -m bench.shared_limits` (bench/shared_limits.py): a simulated endpoint with a "
        f"constant {LATENCY_S * 1000:.0f} ms latency, a local Prefect server (SQLite, no "
        "services), Dask `LocalCluster` worker processes or local Ray worker processes, each "
        "sending its share through the endpoint's provider; 2 shared CPU cores. Peak in flight "
        "and requests per minute are read from the sim's request log.",
        "",
        f"## concurrency: {args.concurrency} ({args.requests} requests)",
        "",
        "| runner | sent (200) | peak in flight | limit | req/min (busiest 10 s) | took |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += table_rows(
        rows,
        "concurrency",
        lambda r: f"{r['peak']} | {args.concurrency} | {r['busiest_rpm']:.0f}",
    )
    lines += [
        "",
        f"## rpm: {args.rpm:.0f} (concurrency 64, {args.rate_requests} requests)",
        "",
        "The threads runner's local bucket allows a burst of one second's worth, then the "
        "rate, so its busiest 10 s may exceed the rate by up to 6 x the burst per minute; the "
        "shared limiter allows at most rpm/60 requests in any one-second window (a spent slot "
        "stays taken for a second).",
        "",
        "| runner | sent (200) | req/min (busiest 10 s) | req/min (whole run) | limit | took |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += table_rows(
        rows, "rpm", lambda r: f"{r['busiest_rpm']:.0f} | {r['mean_rpm']:.0f} | {args.rpm:.0f}"
    )
    per_request_us = cost["prefect"] * 1e6
    lines += [
        "",
        "## Limiter cost per request",
        "",
        f"2000 requests of {LATENCY_S * 1000:.0f} ms, {args.concurrency} senders on "
        f"{args.concurrency} slots, one process: time inside `admit` + taking a slot + giving "
        "it back.",
        "",
        "| limiter | µs per request | share of a 50 ms request | Prefect round trips |",
        "|---|---:|---:|---:|",
        f"| LocalLimiter (threads) | {cost['local'] * 1e6:.1f} "
        f"| {cost['local'] / LATENCY_S:.4%} | 0 |",
        f"| PrefectLimiter (shared) | {per_request_us:.1f} "
        f"| {cost['prefect'] / LATENCY_S:.4%} | {cost['round_trips']:.0f} |",
        "",
    ]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
