"""`make demo`: build a small dataset end to end against the simulated server.

Starts the sim server (a test double: personas, not real models) on a free loopback port, writes
a run config for the shipped demo taxonomy (`builtin:demo`, vlpref/resources/taxonomy/demo.yaml)
under `.vlpref/demo/` in the current folder, runs the Prefect flow, and prints where the new
version is with a short summary (counts per category, unsafe rate per model as in SPA-VL's
Table 1). Its last line is the path of the version's report (report.html: the plots and a sample
gallery; open it in a browser). Rerunning it reuses everything: the journal answers every
request, and the new version gets its own report.

It needs nothing from a checkout: an installed vlpref runs it from any folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from vlpref.sim.testing import SimServer

SIM_MODELS: dict[str, Any] = {
    "sim-refuser": {"persona": "refuser"},
    "sim-safe-helpful": {"persona": "safe-helpful"},
    "sim-over-compliant": {"persona": "over-compliant"},
    "sim-jailbroken": {"persona": "jailbroken"},
    "sim-mixed": {"persona": "mixed"},
    "sim-filtered": {"persona": "filtered", "filter_rate": 0.3},
    "sim-judge": {"persona": "judge", "position_bias": 0.05},
}

RESPONSE_MODELS = [
    ("refuser", "sim-refuser", 1),
    ("safe-helpful", "sim-safe-helpful", 1),
    ("over-compliant", "sim-over-compliant", 1),
    ("jailbroken", "sim-jailbroken", 1),
    ("mixed", "sim-mixed", 2),
    ("filtered", "sim-filtered", 1),
]


def demo_config(base_url: str, root: Path, per_branch: int = 5) -> dict[str, Any]:
    return {
        "name": "vlpref-demo",
        "taxonomy": "builtin:demo",
        "workspace": str(root / "workspace"),
        "store": str(root / "store"),
        "endpoints": {"sim": {"kind": "openai", "base_url": base_url, "concurrency": 64}},
        "models": [
            {
                "name": name,
                "endpoint": "sim",
                "model": model,
                "sampling": {"temperature": 0.9, "max_tokens": 160, "n": n},
            }
            for name, model, n in RESPONSE_MODELS
        ],
        "generator": {
            "name": "generator",
            "endpoint": "sim",
            "model": "sim-judge",
            "sampling": {"temperature": 0.8, "max_tokens": 400},
        },
        "judges": [
            {
                "name": "judge",
                "endpoint": "sim",
                "model": "sim-judge",
                "sampling": {
                    "temperature": 0.0,
                    "max_tokens": 200,
                    "logprobs": True,
                    "top_logprobs": 5,
                },
            }
        ],
        "stages": {"images": {"source": {"kind": "typographic", "per_branch": per_branch}}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vlpref.demo")
    parser.add_argument("--root", default=".vlpref/demo", help="where the demo keeps its files")
    parser.add_argument(
        "--per-branch", type=int, default=5, help="images per subcategory (4 subcategories)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show Prefect's log lines here"
    )
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with SimServer({"models": SIM_MODELS}) as sim:
        config_path = root / "run.yaml"
        # The port changes between runs; request keys never include the URL, so reruns reuse all.
        config = demo_config(sim.base_url, root, args.per_branch)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        from rich.console import Console

        from flows.build import build_dataset
        from vlpref.prefect_server import stop_temporary_server
        from vlpref.report import print_summary
        from vlpref.run_log import log_file_path, route_logs

        # As `vlpref run`: Prefect's lines go to the run's log file (docs/pipeline.md, "The
        # console"), so the terminal shows the summary, not a scroll of INFO lines.
        log = log_file_path(config["workspace"])
        print(f"log: {log}", file=sys.stderr)
        with route_logs(log, verbose=args.verbose, console=Console(stderr=True)):
            version_id = build_dataset(str(config_path))
            # Prefect would stop its temporary server at exit, logging it after the summary:
            # stopped now, the report's path is the demo's last line, on the terminal as on
            # stdout.
            stop_temporary_server()
        print_summary(str(config_path), version_id, time.perf_counter() - started, sim.counters())


if __name__ == "__main__":
    main()
