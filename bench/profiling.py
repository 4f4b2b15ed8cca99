"""Where the vlpref client spends its time: one profiled run, summarised for the report.

pyinstrument (the `bench` extra) samples the main thread's stack; the summary gives the sampled
wall time to the package whose code ran, the standard library and built-ins it called included
(asyncio's own code, sockets and transports count as the event loop's; time in its `select` is
idle), and lists the functions with the most self time. Without pyinstrument the report says so
and goes on.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client_throughput import Runner

_SITE = re.compile(r"site-packages/([A-Za-z0-9_]+)")
IDLE = "idle (the event loop waiting for I/O)"
EVENT_LOOP = "asyncio (the event loop, its sockets and transports)"
_REPO = str(Path(__file__).resolve().parents[1]) + "/"


@dataclass(frozen=True)
class ProfileSummary:
    label: str
    rate: float  # req/s of the profiled run (lower than unprofiled: sampling costs)
    total_s: float
    by_package: list[tuple[str, float]]  # (package, share of sampled time)
    top_functions: list[tuple[str, float]]  # (function (file), share), by self time


def _package(path: str) -> str | None:
    """The third-party package, or vlpref / bench, that `path` belongs to; None for the standard
    library and built-ins (their time goes to the package that called them)."""
    match = _SITE.search(path)
    if match:
        return match.group(1)
    for name in ("vlpref", "bench"):
        if f"/{name}/" in path:
            return name
    return None


def profile(
    label: str, runner: Runner, base_url: str, model: str, count: int, conc: int
) -> ProfileSummary | None:
    """Profile one run of `runner`; None when pyinstrument is not installed."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return None
    import time

    profiler = Profiler(interval=0.001, async_mode="disabled", use_timing_thread=True)
    profiler.start()
    t0 = time.perf_counter()
    asyncio.run(runner(base_url, model, count, conc))
    elapsed = time.perf_counter() - t0
    session = profiler.stop()
    root = session.root_frame()
    if root is None:
        return None
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()

    def walk(frame: Any, owner: str, label: str) -> None:
        if not frame.is_synthetic:  # synthetic frames ([self], [await]) belong to their parent
            path = frame.file_path or ""
            if frame.function == "select" and path.endswith("selectors.py"):
                owner = IDLE
            elif "/asyncio/" in path:  # the loop's own work, its callbacks and its transports
                owner = EVENT_LOOP
            else:
                owner = _package(path) or owner
            short = path.split("site-packages/")[-1].split("/lib/python3.11/")[-1]
            short = short.removeprefix(_REPO)
            where = f"{short}, called from {owner}" if short.startswith("<") else short
            label = f"`{frame.function}` ({where})"
        own = frame.time - sum(child.time for child in frame.children)
        if own > 0:
            by_package[owner] += own
            by_function[label] += own
        for child in frame.children:
            walk(child, owner, label)

    walk(root, EVENT_LOOP, EVENT_LOOP)
    total = sum(by_package.values()) or 1.0
    return ProfileSummary(
        label=label,
        rate=count / elapsed,
        total_s=total,
        by_package=[(name, t / total) for name, t in by_package.most_common()],
        top_functions=[(name, t / total) for name, t in by_function.most_common(12)],
    )
