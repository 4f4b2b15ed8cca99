"""The markdown report of the scale runs: figures from `bench.scale_run --json-out`, targets judged.

    python -m bench.scale_report RESULTS.jsonl [--out bench/results/YYYY-MM-DD-scale.md]

Each line of RESULTS.jsonl is one `scale_run` result. Runs of the same size and latency are
repeats: a target's figure is their median with [min–max], each ratio taken within its own run
(`make bench-scale` repeats the 3,000-question builds; a 30,000-question build takes 15-20 minutes
here and runs once). The targets (issue 6) are judged on the runs present; one that has no run to
judge is "not run". The overhead target names *the scale run*, the SPA-VL-sized build of at least
30,000 questions; the 3,000-question figure is shown beside it for reference.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from bench.report import _version, machine, versions

SMALL, LARGE = 3_000, 30_000
OVERHEAD_TARGET = 0.70
MEMORY_RATIO_TARGET = 1.3
MEMORY_CAP_MB = 2048
RERUN_SHARE_TARGET = 0.05


def load(path: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not a JSON line ({exc})") from exc
    return rows


def _builds(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if "seconds" in r]


def _runs(
    rows: Sequence[Mapping[str, Any]], target: int, latency: float
) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["questions_target"] == target and r.get("latency_ms") == latency]


def _spread(values: Sequence[float], fmt: str) -> str:
    """'x' for one run, else 'median [min–max] of N runs'."""
    if len(values) == 1:
        return format(values[0], fmt)
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:{fmt}} [{low:{fmt}}–{high:{fmt}}] (median of {len(values)} runs)"


def _verdict(ok: bool) -> str:
    return "**MET**" if ok else "**MISSED**"


def _overhead(runs: Sequence[Mapping[str, Any]], latency: float, *, judged: bool) -> str | None:
    runs = [r for r in runs if "pipeline_vs_client" in r]
    if not runs:
        return None
    ratios = [float(r["pipeline_vs_client"]) for r in runs]
    ratio = statistics.median(ratios)
    figure = (
        f"{_spread([r['requests_per_s'] for r in runs], ',.0f')} req/s end to end vs "
        f"{_spread([r['client_requests_per_s'] for r in runs], ',.0f')} req/s for the client "
        f"alone on the same requests; ratio {_spread(ratios, '.3f')}×"
    )
    size = f"{runs[0]['questions_target']:,} questions, {latency:g} ms"
    if judged:
        return (
            f"- Pipeline overhead, the scale run ({size}): {figure} (target ≥ "
            f"{OVERHEAD_TARGET:.2f}×): {_verdict(ratio >= OVERHEAD_TARGET)}"
        )
    above = "at or above" if ratio >= OVERHEAD_TARGET else "below"
    return (
        f"- Pipeline overhead at {size}, for reference (the target names the scale run): "
        f"{figure}, {above} {OVERHEAD_TARGET:.2f}×"
    )


def targets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per target and latency: the figure, the threshold, MET / MISSED / not run."""
    builds = _builds(rows)
    lines = []
    for latency in sorted({float(r["latency_ms"]) for r in builds}):
        small, large = _runs(builds, SMALL, latency), _runs(builds, LARGE, latency)
        lines.append(
            _overhead(large, latency, judged=True)
            or f"- Pipeline overhead, the scale run ({LARGE:,} questions, {latency:g} ms): not run"
        )
        if reference := _overhead(small, latency, judged=False):
            lines.append(reference)
        if small and large:
            small_mb = [float(r["peak_rss_mb"]) for r in small]
            large_mb = [float(r["peak_rss_mb"]) for r in large]
            ratio = statistics.median(large_mb) / statistics.median(small_mb)
            ok = ratio <= MEMORY_RATIO_TARGET and max(large_mb) < MEMORY_CAP_MB
            lines.append(
                f"- Memory, {latency:g} ms: peak RSS {_spread(large_mb, ',.0f')} MB at "
                f"{large[0]['questions']:,} questions vs {_spread(small_mb, ',.0f')} MB at "
                f"{small[0]['questions']:,} = {ratio:.2f}× (target ≤ {MEMORY_RATIO_TARGET}× and "
                f"under {MEMORY_CAP_MB:,} MB): {_verdict(ok)}"
            )
        else:
            lines.append(f"- Memory, {latency:g} ms: not run (needs a 3,000 and a 30,000 run)")
        for run in large:
            if "rerun_requests" not in run:
                continue
            share = run["rerun_share_of_build"]
            ok = run["rerun_requests"] == 0 and share <= RERUN_SHARE_TARGET
            lines.append(
                f"- No-change rerun of the {run['questions']:,}-question build, {latency:g} ms: "
                f"{run['rerun_requests']} requests, {run['rerun_seconds']:,.1f} s = "
                f"{share:.1%} of the build's {run['seconds']:,.0f} s (target 0 requests and "
                f"≤ {RERUN_SHARE_TARGET:.0%}): {_verdict(ok)}"
            )
    return lines


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render(rows: Sequence[Mapping[str, Any]], title_date: str, notes: str = "") -> str:
    builds = _builds(rows)
    lines = [
        f"# vlpref scale runs, {title_date}",
        "",
        "`python -m bench.scale_run` (the SPA-VL taxonomy, 53 branches, typographic images, "
        "12 sim response models and the sim judge, concurrency 256) through the real flow on a "
        "local Prefect server. One build per line in the tables; the targets take the median of "
        "the builds of the same size and latency, each ratio taken within its own run.",
        "",
        "## Machine and versions",
        "",
        *_table(["", ""], [*machine(), *_versions(builds)]),
        "",
        "## Targets",
        "",
        *targets(rows),
        "",
        "## Builds",
        "",
        *_table(
            [
                "questions",
                "latency",
                "requests",
                "seconds",
                "req/s",
                "client alone, req/s",
                "pipeline / client",
                "flow CPU µs/request",
                "client CPU µs/request",
                "peak RSS MB",
            ],
            (
                [
                    f"{r['questions']:,}",
                    f"{r['latency_ms']:g} ms",
                    f"{r['requests']:,}",
                    f"{r['seconds']:,.0f}",
                    f"{r['requests_per_s']:,.0f}",
                    f"{r['client_requests_per_s']:,.0f}" if "client_requests_per_s" in r else "",
                    f"{r['pipeline_vs_client']:.2f}" if "pipeline_vs_client" in r else "",
                    r.get("cpu_us_per_request", ""),
                    r.get("client_cpu_us_per_request", ""),
                    f"{r['peak_rss_mb']:,.0f}",
                ]
                for r in builds
            ),
        ),
        "",
        "Requests per stage: requests sent, the stage's task seconds summed over branches (they "
        "overlap: several branches are in flight), and requests/s per branch task (requests / "
        "summed seconds; the end-to-end rate is about that times the branches in flight):",
        "",
        *_table(
            ["questions", "latency", *_stages(builds)],
            (
                [
                    f"{r['questions']:,}",
                    f"{r['latency_ms']:g} ms",
                    *(_stage_cell(r, s) for s in _stages(builds)),
                ]
                for r in builds
            ),
        ),
        "",
        "## Rerun costs",
        "",
        *_table(
            ["build", "run", "seconds", "requests", "share of the build's time"],
            _rerun_rows(rows),
        ),
        "",
    ]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return "\n".join(lines)


def _versions(builds: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """This environment's versions; vlpref's is the one each build recorded, when they did (a
    report may be made later, from another commit)."""
    rows = versions({"prefect": _version("prefect")})
    measured = sorted({str(b["vlpref"]) for b in builds if "vlpref" in b})
    if measured:
        rows = [("vlpref", "; ".join(measured)) if k == "vlpref" else (k, v) for k, v in rows]
    return rows


def _stage_cell(run: Mapping[str, Any], stage: str) -> str:
    sent = run["stage_requests"].get(stage, 0)
    seconds = run["stage_task_seconds_summed"].get(stage, 0)
    rate = f", {sent / seconds:,.0f} req/s" if sent and seconds else ""
    return f"{sent:,} in {seconds:,.0f} s{rate}"


def _stages(builds: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(builds[0]["stage_requests"]) if builds else []


def _rerun_rows(rows: Sequence[Mapping[str, Any]]) -> Iterable[list[str]]:
    names = {
        "rerun": "no-change rerun",
        "one_branch_rerun": "one-branch rerun (unchanged)",
        "add_model": "add a 13th response model",
    }
    for r in rows:
        if "rerun_requests" not in r:
            continue
        label = f"{r.get('questions', r['questions_target']):,} questions"
        if "seconds" in r:
            yield [label, "full build", f"{r['seconds']:,.1f}", f"{r['requests']:,}", "1"]
        for key, name in names.items():
            if f"{key}_requests" in r:
                share = r.get(f"{key}_share_of_build")
                yield [
                    label,
                    name,
                    f"{r[f'{key}_seconds']:,.1f}",
                    f"{r[f'{key}_requests']:,}",
                    f"{share:.1%}" if share is not None else "",
                ]


def report_date(results: str) -> str:
    """The runs' date (a runs file named YYYY-MM-DD-...), not the report's: an hour of runs
    started before midnight is that day's. Today for any other name."""
    named = re.match(r"\d{4}-\d{2}-\d{2}", Path(results).name)
    return named.group(0) if named else date.today().isoformat()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", help="JSON lines written by bench.scale_run --json-out")
    parser.add_argument("--out", default=None)
    parser.add_argument("--notes", default=None, help="a markdown file appended as the notes")
    args = parser.parse_args()
    day = report_date(args.results)
    out = Path(args.out or Path(__file__).parent / "results" / f"{day}-scale.md")
    notes = Path(args.notes).read_text() if args.notes else ""
    out.write_text(render(load(args.results), day, notes))
    print(out)


if __name__ == "__main__":
    main()
