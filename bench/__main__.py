"""`python -m bench`: client throughput against the simulated server, as a dated markdown report.

    python -m bench [--peers] [--requests 2000] [--repeats 5] [--concurrency 64 256]
                    [--latency-ms 0 50] [--peer-latency-ms 50] [--out bench/results]
    python -m bench --setup-peers      # only create the peers' virtual environments

`make bench` runs vlpref's model client against a bare aiohttp loop and bare
`openai.AsyncOpenAI` loops, at each concurrency and latency, plus the sim server alone, and a
profile of vlpref's client. `make bench-peers` adds curator and distilabel (each in its own venv
under bench/.venvs/, created when missing) to the same rounds. The report goes to
bench/results/YYYY-MM-DD-client.md. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import peer_envs
from bench.client_throughput import BASELINE, VARIANTS, VLPREF, Runner, vlpref_aiohttp
from bench.profiling import profile
from bench.report import Cell, Report, Run, SimAlone, Target
from bench.sim_server_alone import cpu_seconds, drive
from vlpref.sim.testing import SimServer

MODELS = {0.0: "fast", 50.0: "slow"}
TARGET_LATENCY_MS, TARGET_CONCURRENCY = 50.0, 64
TARGETS = {  # (client, threshold): vlpref's rate over this client's, in the same round
    BASELINE: 0.85,
    "curator": 3.0,
    "distilabel": 5.0,
}


def sim_config(latencies: list[float]) -> dict[str, Any]:
    return {
        "models": {
            _model(ms): {"persona": "echo", "latency": {"kind": "constant", "ms": ms}}
            for ms in latencies
        }
    }


def _model(latency_ms: float) -> str:
    return MODELS.get(latency_ms, f"lat{latency_ms:g}ms")


class Bench:
    def __init__(self, sim: SimServer, requests: int) -> None:
        self.sim = sim
        self.requests = requests

    def _counted(self, expected_extra: int, who: str) -> None:
        """Every request really reached the server and was answered (peers: no cache hits)."""
        counts = self.sim.counters()
        ok = counts["by_status"].get("200", 0)
        if ok != self.requests or counts["total"] > self.requests + expected_extra:
            raise RuntimeError(f"{who}: the sim counted {counts}, expected {self.requests} x 200")

    def in_process(self, name: str, runner: Runner, model: str, conc: int) -> Run:
        self.sim.reset()
        server0 = cpu_seconds(self.sim.pid)
        c0, t0 = time.process_time(), time.perf_counter()
        answered = asyncio.run(runner(self.sim.base_url, model, self.requests, conc))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        server = cpu_seconds(self.sim.pid) - server0
        if answered != self.requests:
            raise RuntimeError(f"{name}: {answered} of {self.requests} answered")
        self._counted(0, name)
        return Run(self.requests / elapsed, cpu / self.requests * 1e6, server / elapsed)

    def peer(self, peer: peer_envs.Peer, model: str, conc: int) -> Run:
        self.sim.reset()
        server0 = cpu_seconds(self.sim.pid)
        done = peer_envs.run_driver(peer, self.sim.base_url, model, self.requests, conc, 900)
        server = cpu_seconds(self.sim.pid) - server0  # the server works only while it is called
        if done.answered != self.requests:
            raise RuntimeError(f"{peer.name}: {done.answered} of {self.requests} answered")
        self._counted(1 if peer.name == "curator" else 0, peer.name)  # curator's probe: a 400
        return Run(
            self.requests / done.elapsed_s,
            done.cpu_s / self.requests * 1e6,
            server / done.elapsed_s,
        )

    def sim_alone(self, model: str, conc: int) -> tuple[float, float]:
        self.sim.reset()
        server0 = cpu_seconds(self.sim.pid)
        seconds, statuses = asyncio.run(drive(self.sim.base_url, self.requests, conc, model))
        server = cpu_seconds(self.sim.pid) - server0
        if statuses != {200: self.requests}:
            raise RuntimeError(f"sim alone: statuses {statuses}")
        return self.requests / seconds, server / self.requests * 1e6


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--peers", action="store_true", help="add curator and distilabel")
    parser.add_argument("--setup-peers", action="store_true", help="only create the peer venvs")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (>= 3 for the report)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--peer-latency-ms", type=float, nargs="+", default=[50.0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--no-profile", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    peers = list(peer_envs.PEERS.values()) if (args.peers or args.setup_peers) else []
    peer_versions = {p.distribution: peer_envs.ensure(p) for p in peers}
    if args.setup_peers:
        for name, ver in peer_versions.items():
            print(f"{name} {ver}")
        return 0
    latencies = sorted(set(args.latency_ms) | (set(args.peer_latency_ms) if peers else set()))
    report = Report(
        date=dt.date.today().isoformat(),
        command="python -m bench" + (" --peers" if peers else "") + _non_default(args),
        requests=args.requests,
        repeats=args.repeats,
        variants={name: desc for name, (_, desc) in VARIANTS.items()},
        baseline=BASELINE,
        peer_notes={p.name: p.setup_note for p in peers},
        peer_versions=peer_versions,
        load_before=os.getloadavg(),
    )
    with SimServer(sim_config(latencies)) as sim:
        bench = Bench(sim, args.requests)
        for latency in latencies:
            model = _model(latency)
            for conc in args.concurrency:
                with_peers = peers if latency in args.peer_latency_ms else []
                if latency not in args.latency_ms and not with_peers:
                    continue
                cell = Cell(latency, conc)
                report.cells.append(cell)
                asyncio.run(VARIANTS[BASELINE][0](sim.base_url, model, 200, conc))  # warm-up
                for round_no in range(1, args.repeats + 1):
                    for name, (runner, _) in VARIANTS.items():
                        run = bench.in_process(name, runner, model, conc)
                        cell.runs.setdefault(name, []).append(run)
                        _progress(latency, conc, round_no, name, run)
                    for peer in with_peers:
                        run = bench.peer(peer, model, conc)
                        cell.runs.setdefault(peer.name, []).append(run)
                        _progress(latency, conc, round_no, peer.name, run)
        for latency in args.latency_ms:
            for conc in args.concurrency:
                results = [bench.sim_alone(_model(latency), conc) for _ in range(args.repeats)]
                report.sim_alone.append(
                    SimAlone(latency, conc, [r for r, _ in results], [c for _, c in results])
                )
                print(f"sim alone {latency:g} ms c={conc}: {results}", flush=True)
        if not args.no_profile:
            for latency in args.latency_ms:
                prof = profile(
                    f"vlpref provider, concurrency {TARGET_CONCURRENCY}, {latency:g} ms",
                    vlpref_aiohttp,
                    sim.base_url,
                    _model(latency),
                    args.requests,
                    TARGET_CONCURRENCY,
                )
                if prof is None:
                    report.profile_note = (
                        "pyinstrument is not installed (`pip install -e '.[bench]'`)."
                    )
                    break
                report.profiles.append(prof)
    report.load_after = os.getloadavg()
    report.targets = _targets(report)
    report.reading = _reading(report)
    report.profile_note = report.profile_note or _profile_note(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{report.date}-client.md"
    path.write_text(report.render(), encoding="utf-8")
    print(f"\nwrote {path}")
    for t in report.targets:
        verdict = "      " if t.reference else "MET   " if t.met else "MISSED"
        print(f"  {verdict} {t.what}: {t.value:.2f}")
    return 0


def _cell(report: Report, latency_ms: float, concurrency: int) -> Cell | None:
    return next(
        (c for c in report.cells if (c.latency_ms, c.concurrency) == (latency_ms, concurrency)),
        None,
    )


def _targets(report: Report) -> list[Target]:
    """The targets at concurrency 64 / 50 ms, then the same ratios at the other concurrencies
    of that latency, for reference."""
    targets: list[Target] = []
    cells = sorted(
        (c for c in report.cells if c.latency_ms == TARGET_LATENCY_MS),
        key=lambda c: c.concurrency != TARGET_CONCURRENCY,
    )
    for cell in cells:
        reference = cell.concurrency != TARGET_CONCURRENCY
        for other, threshold in TARGETS.items():
            if other not in cell.runs:
                continue
            ratios = [1 / r for r in cell.ratios(other, VLPREF)]  # vlpref / other, per round
            what = (
                f"vlpref ≥ {threshold:.0%} of the {other}"
                if threshold < 1
                else f"vlpref ≥ {threshold:g}× {other}"
            )
            if reference:
                what = f"(reference, concurrency {cell.concurrency}) vlpref / {other}"
            targets.append(Target(what, threshold, ratios, reference))
    return targets


def _reading(report: Report) -> list[str]:
    """What the targets' figures mean: for each miss, the arithmetic or the cost behind it."""
    cell = _cell(report, TARGET_LATENCY_MS, TARGET_CONCURRENCY)
    if cell is None:
        return []
    ceiling = cell.concurrency / (cell.latency_ms / 1000)
    vlpref = statistics.median(cell.rates(VLPREF))
    lines = []
    for target in report.targets:
        if target.reference or target.met:
            continue
        other = next(name for name in TARGETS if target.what.endswith(name))
        rate = statistics.median(cell.rates(other))
        if other == BASELINE:
            v = statistics.median(r.client_cpu_us for r in cell.runs[VLPREF])
            b = statistics.median(r.client_cpu_us for r in cell.runs[BASELINE])
            lines.append(
                f"- *{target.what}*: missed. vlpref's client spends {v:,.0f} µs of CPU per "
                f"request against {b:,.0f} µs for the bare loop; the profiles at the end show "
                "where (mostly the SDK's request building and httpx2 over aiohttp)."
            )
        elif target.threshold * rate > ceiling:
            lines.append(
                f"- *{target.what}*: missed, and out of reach at this setting. With "
                f"{cell.concurrency} requests in flight and {cell.latency_ms:g} ms per answer no "
                f"client can pass {ceiling:,.0f} req/s; {target.threshold:g}× {other}'s "
                f"{rate:,.0f} req/s would be {target.threshold * rate:,.0f}. vlpref reached "
                f"{vlpref:,.0f} req/s ({vlpref / ceiling:.0%} of the ceiling), {other} "
                f"{rate / ceiling:.0%}. The reference rows at higher concurrency, where the "
                "ceiling is no longer the limit, show the clients' own speed."
            )
        else:
            lines.append(
                f"- *{target.what}*: missed: {other} reached {rate:,.0f} req/s against vlpref's "
                f"{vlpref:,.0f}; see the profiles at the end for vlpref's side."
            )
    return lines


def _profile_note(report: Report) -> str:
    cell = _cell(report, TARGET_LATENCY_MS, TARGET_CONCURRENCY)
    if cell is None:
        return ""
    v = statistics.median(r.client_cpu_us for r in cell.runs[VLPREF])
    b = statistics.median(r.client_cpu_us for r in cell.runs[BASELINE])
    return (
        f"At concurrency {cell.concurrency} / {cell.latency_ms:g} ms vlpref's client spends "
        f"{v:,.0f} µs of CPU per request, the bare aiohttp loop {b:,.0f} µs. The difference is "
        "the openai SDK's path, kept by design (requests go through `openai.AsyncOpenAI`): "
        "building the request (`FinalRequestOptions`, headers, URL) and httpx2's layer over "
        "the aiohttp transport. vlpref's own code (provider, rate limiter, retries, runner) is "
        "the `vlpref` row. Sampling slows the profiled runs down; shares, not rates, are the "
        "point here."
    )


def _progress(latency: float, conc: int, round_no: int, name: str, run: Run) -> None:
    print(
        f"{latency:>4g} ms c={conc:<3} round {round_no}: {name:<36} {run.rate:8,.0f} req/s "
        f"cpu {run.client_cpu_us:6,.0f} us/req  sim busy {run.server_busy:4.0%}",
        flush=True,
    )


def _non_default(args: argparse.Namespace) -> str:
    parts = []
    if args.requests != 2000:
        parts.append(f"--requests {args.requests}")
    if args.repeats != 5:
        parts.append(f"--repeats {args.repeats}")
    if args.concurrency != [64, 256]:
        parts.append("--concurrency " + " ".join(map(str, args.concurrency)))
    if args.latency_ms != [0.0, 50.0]:
        parts.append("--latency-ms " + " ".join(f"{x:g}" for x in args.latency_ms))
    return "".join(f" {p}" for p in parts)


if __name__ == "__main__":
    sys.exit(main())
