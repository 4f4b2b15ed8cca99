"""Throughput of the simulated server alone, driven by the lightest client we have.

    .venv/bin/python bench/sim_server_alone.py [--requests 2000] [--concurrency 64 256]
                                               [--latency-ms 0 50]

Starts one `python -m vlpref.sim` subprocess per latency setting and prints req/s for each
concurrency, with the server's CPU time per request (so its one-core capacity). The client runs
in this process, so on a 2-core machine client and server each get roughly one core.
`python -m bench` uses `drive` and `cpu_seconds` for its "sim server alone" section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import aiohttp

from vlpref.sim.testing import SimServer

MODEL = "sim-mixed"


def _body(i: int, model: str) -> bytes:
    # A pipeline-like request: a system prompt, a question, sampling parameters.
    return json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question {i}: how should one store kitchen knives?"},
            ],
            "temperature": 0.7,
            "max_tokens": 256,
            "seed": i,
        }
    ).encode()


async def drive(
    base_url: str, n: int, concurrency: int, model: str = MODEL
) -> tuple[float, dict[int, int]]:
    """Send `n` requests with `concurrency` workers, bodies serialised beforehand; returns
    (seconds, status counts)."""
    statuses: dict[int, int] = {}
    bodies = [_body(i, model) for i in range(n)]
    next_i = 0
    url = base_url + "/chat/completions"
    headers = {"content-type": "application/json", "authorization": "Bearer sim"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                body = bodies[next_i]
                next_i += 1
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, statuses


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) used so far by `pid`; 0.0 where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    """Run the benchmark grid and print one line per cell."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    args = parser.parse_args()
    for latency in args.latency_ms:
        config = {
            "latency": {"kind": "constant", "ms": latency},
            "models": {MODEL: {"persona": "mixed"}},
        }
        with SimServer(config) as sim:
            for conc in args.concurrency:
                # Warm-up run: first-request costs (imports, caches) stay out of the numbers.
                asyncio.run(drive(sim.base_url, min(200, args.requests), conc))
                cpu_before = cpu_seconds(sim.pid)
                seconds, statuses = asyncio.run(drive(sim.base_url, args.requests, conc))
                cpu_us = (cpu_seconds(sim.pid) - cpu_before) / args.requests * 1e6
                print(
                    f"latency={latency:>4.0f}ms concurrency={conc:>3} requests={args.requests} "
                    f"time={seconds:6.2f}s {args.requests / seconds:7.0f} req/s "
                    f"server-cpu={cpu_us:5.0f}us/req {statuses}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
