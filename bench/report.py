"""The markdown report of `python -m bench`: machine, versions, figures, ratios, targets."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.profiling import ProfileSummary


@dataclass(frozen=True)
class Run:
    """One measured run of one client."""

    rate: float  # requests per second, over the client's whole call
    client_cpu_us: float  # client CPU time per request (this process, or the peer's driver)
    server_busy: float  # the sim server's CPU time / the run's wall time


@dataclass
class Cell:
    """Every client at one (latency, concurrency), one run each per round."""

    latency_ms: float
    concurrency: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def rates(self, name: str) -> list[float]:
        return [r.rate for r in self.runs[name]]

    def ratios(self, name: str, baseline: str) -> list[float]:
        """Per-round ratios: each run against the baseline's run of the same round."""
        return [a.rate / b.rate for a, b in zip(self.runs[name], self.runs[baseline], strict=True)]


@dataclass(frozen=True)
class SimAlone:
    latency_ms: float
    concurrency: int
    rates: list[float]
    server_cpu_us: list[float]


@dataclass(frozen=True)
class Target:
    what: str
    threshold: float
    values: list[float]  # per-round ratios
    reference: bool = False  # the same ratio in another cell: shown, not judged

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> bool:
        return self.value >= self.threshold


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """'median [min–max]'."""
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> list[tuple[str, str]]:
    cpuinfo = _read("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line
    ]
    meminfo = _read("/proc/meminfo")
    mem_kb = next(
        (int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0
    )
    return [
        ("cores", str(os.cpu_count())),
        ("CPU", models[0] if models else platform.processor() or "unknown"),
        ("RAM", f"{mem_kb / 1024 / 1024:.1f} GiB" if mem_kb else "unknown"),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # The reports a run is writing are not changes to the code it measures.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (git {rev}{', with uncommitted changes' if dirty else ''})"


def code_revision() -> str:
    """vlpref's version and the checkout's commit: '0.1.0 (git abc1234)'."""
    return _version("vlpref") + _git_revision()


def versions(peers: dict[str, str]) -> list[tuple[str, str]]:
    rows = [
        ("vlpref", code_revision()),
        ("openai", _version("openai")),
        ("httpx2", _version("httpx2")),
        ("aiohttp", _version("aiohttp")),
        ("tenacity", _version("tenacity")),
        ("orjson", _version("orjson")),
    ]
    rows += [(name, ver) for name, ver in peers.items()]
    return rows


@dataclass
class Report:
    date: str
    command: str
    requests: int
    repeats: int
    variants: dict[str, str]  # name -> description
    baseline: str
    peer_notes: dict[str, str]
    peer_versions: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cells: list[Cell] = field(default_factory=list)
    sim_alone: list[SimAlone] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    profiles: list[ProfileSummary] = field(default_factory=list)
    profile_note: str = ""
    reading: list[str] = field(default_factory=list)  # what the targets' figures mean

    def render(self) -> str:
        out: list[str] = [f"# Client throughput, {self.date}", ""]
        out += [
            f"Written by `{self.command}`. {self.requests:,} chat completions per run against "
            "the simulated server (`vlpref.sim`, `echo` persona, constant latency) in its own "
            f"process. Every figure is the median of {self.repeats} runs with [min–max]. A round "
            "runs every client once, back to back; every ratio is taken between two runs of the "
            "same round, and the ratio shown is the median of the rounds' ratios. A rate is "
            "requests / wall time of the client's whole call (client set-up included; "
            "interpreter start and imports not). Client CPU is per request; *sim busy* is the "
            "server's CPU time over the run's wall time (near 100 % would mean the server is "
            "the bottleneck).",
            "",
        ]
        out += ["## Targets (concurrency 64, 50 ms)", ""]
        out += ["| target | measured (median [min–max] of rounds) | |", "|---|---|---|"]
        for t in self.targets:
            verdict = "—" if t.reference else "**MET**" if t.met else "**MISSED**"
            out.append(f"| {t.what} | {spread(t.values, '{:.2f}×')} | {verdict} |")
        out.append("")
        if self.reading:
            out += [*self.reading, ""]
        out += ["## Machine", "", "| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in machine()]
        load = ", ".join(f"{x:.2f}" for x in self.load_before)
        load_end = ", ".join(f"{x:.2f}" for x in self.load_after)
        out += [f"| load average (1, 5, 15 min) | before: {load}; after: {load_end} |", ""]
        out += ["## Versions", "", "| package | version |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in versions(self.peer_versions)]
        out.append("")
        out += ["## Clients", "", "| client | what it is |", "|---|---|"]
        out += [f"| {name} | {desc} |" for name, desc in self.variants.items()]
        out += [f"| {name} | {note} |" for name, note in self.peer_notes.items()]
        out.append("")
        for cell in self.cells:
            out += [
                f"## {cell.latency_ms:g} ms latency, concurrency {cell.concurrency}",
                "",
                "Ceiling (concurrency / latency): "
                + (
                    f"{cell.concurrency / (cell.latency_ms / 1000):,.0f} req/s."
                    if cell.latency_ms
                    else "none: CPU-bound."
                ),
                "",
                f"| client | req/s | × {self.baseline} | client CPU µs/req | sim busy |",
                "|---|---:|---:|---:|---:|",
            ]
            for name in cell.runs:
                cpu = statistics.median(r.client_cpu_us for r in cell.runs[name])
                busy = statistics.median(r.server_busy for r in cell.runs[name])
                ratio = spread(cell.ratios(name, self.baseline), "{:.2f}")
                out.append(
                    f"| {name} | {spread(cell.rates(name))} | {ratio} | {cpu:,.0f} | {busy:.0%} |"
                )
            out.append("")
        if self.sim_alone:
            out += [
                "## The simulated server alone",
                "",
                "Driven by the lightest client (aiohttp workers posting bodies serialised "
                "beforehand, `bench/sim_server_alone.py`), same server process and model. "
                "*One-core capacity* = 1 / the server's CPU time per request: what it could "
                "serve with a core to itself.",
                "",
                "| latency | concurrency | req/s | server CPU µs/req | one-core capacity |",
                "|---:|---:|---:|---:|---:|",
            ]
            for s in self.sim_alone:
                cpu = statistics.median(s.server_cpu_us)
                out.append(
                    f"| {s.latency_ms:g} ms | {s.concurrency} | {spread(s.rates)} | "
                    f"{spread(s.server_cpu_us)} | {1e6 / cpu:,.0f} req/s |"
                )
            out.append("")
        out += ["## Profile of the vlpref client", ""]
        if self.profile_note:
            out += [self.profile_note, ""]
        for prof in self.profiles:
            out += [
                f"### {prof.label} (profiled run: {prof.rate:,.0f} req/s)",
                "",
                "| whose code ran (with the stdlib and built-ins it called) | share of samples |",
                "|---|---:|",
            ]
            out += [
                f"| {name} | {share:.1%} |" for name, share in prof.by_package if share >= 0.005
            ]
            out += ["", "| top functions by self time | share of samples |", "|---|---:|"]
            out += [f"| {name} | {share:.1%} |" for name, share in prof.top_functions]
            out.append("")
        return "\n".join(out).rstrip() + "\n"
