"""What reruns cost: full build vs no-change rerun vs one-branch rerun vs adding a model.

    python -m bench.rerun_costs [--per-branch 5] [--taxonomy taxonomy/demo.yaml]

Against the simulated server (zero latency) and a local Prefect server started for the run;
seconds are wall time of the flow run, requests are what reached the sim server.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from vlpref.prefect_server import PrefectServer
from vlpref.sim.testing import SimServer, sim_run_config

REPO = Path(__file__).resolve().parent.parent
PERSONAS = ["refuser", "safe-helpful", "over-compliant", "jailbroken", "mixed"]


def config(
    root: Path, base_url: str, taxonomy: str, per_branch: int, models: list[str], **stages: Any
) -> str:
    data = sim_run_config(
        base_url,
        name="rerun-costs",
        taxonomy=str(REPO / taxonomy),
        workspace=str(root / "ws"),
        store=str(root / "store"),
        endpoint={"concurrency": 64},
        models=[
            {"name": m, "endpoint": "sim", "model": f"sim-{m}", "sampling": {"temperature": 0.7}}
            for m in models
        ],
        stages={"images": {"source": {"kind": "typographic", "per_branch": per_branch}, **stages}},
    )
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-branch", type=int, default=5)
    parser.add_argument("--taxonomy", default="taxonomy/demo.yaml")
    parser.add_argument("--branch", default="Malicious Use/Security threats/cyber")
    args = parser.parse_args()
    from flows.build import build_dataset

    sims = {f"sim-{p}": {"persona": p} for p in [*PERSONAS, "judge"]}
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        PrefectServer(Path(tmp) / "prefect") as server,
        server.as_current(),
        SimServer({"models": sims}) as sim,
    ):
        root = Path(tmp)
        models = PERSONAS[:4]

        def measure(label: str, path: str, only: list[str] | None = None) -> None:
            before = sim.counters()["total"]
            t0 = time.perf_counter()
            build_dataset(path, only)
            rows.append((label, time.perf_counter() - t0, sim.counters()["total"] - before))

        base = config(root, sim.base_url, args.taxonomy, args.per_branch, models)
        measure("full build", base)
        measure("no-change rerun", base)
        measure("one-branch rerun, unchanged", base, [args.branch])
        changed = config(
            root,
            sim.base_url,
            args.taxonomy,
            args.per_branch,
            models,
            overrides={args.branch: {"kind": "typographic", "per_branch": args.per_branch + 2}},
        )
        measure("one-branch rerun, branch changed (+2 images)", changed, [args.branch])
        added = config(
            root,
            sim.base_url,
            args.taxonomy,
            args.per_branch,
            [*models, PERSONAS[4]],
            overrides={args.branch: {"kind": "typographic", "per_branch": args.per_branch + 2}},
        )
        measure("add a response model", added)
    full_s, full_r = rows[0][1], rows[0][2]
    print(f"# rerun costs ({args.taxonomy}, {args.per_branch} images per branch, sim at 0 ms)\n")
    print("| run | seconds | vs full | requests | vs full |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, requests in rows:
        share_s, share_r = seconds / full_s, requests / full_r
        print(f"| {label} | {seconds:.2f} | {share_s:.0%} | {requests:,} | {share_r:.1%} |")


if __name__ == "__main__":
    main()
