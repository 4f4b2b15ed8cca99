"""A SPA-VL-sized synthetic run through the real flow, against the simulated server.

    python -m bench.scale_run --questions 30000 --models 12 [--latency-ms 50] [--concurrency 256]

Builds the whole SPA-VL taxonomy (53 branches) with typographic images, enough per branch for
`--questions` questions (3 per image), `--models` response models and the judge (safety, ratings,
pairwise in both orders), through `build_dataset` on a local Prefect server. Prints a JSON line
with end-to-end time, requests per stage, requests/s, and the flow process's peak RSS (the sim
server and the Prefect server are separate processes and not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from vlpref.prefect_server import PrefectServer
from vlpref.sim.testing import SimServer

REPO = Path(__file__).resolve().parent.parent
PERSONAS = ["refuser", "safe-helpful", "over-compliant", "jailbroken", "mixed", "filtered"]
STAGES = ("images", "questions", "responses", "judge", "pairs")


def sim_config(models: int, latency_ms: float) -> dict[str, Any]:
    served: dict[str, Any] = {
        f"sim-m{i:02d}": {"persona": PERSONAS[i % len(PERSONAS)]} for i in range(models)
    }
    served["sim-judge"] = {"persona": "judge"}
    return {"latency": {"kind": "constant", "ms": latency_ms}, "models": served}


def run_config(root: Path, base_url: str, args: argparse.Namespace) -> str:
    per_branch = max(1, math.ceil(args.questions / 3 / 53))
    data = {
        "name": "scale",
        "taxonomy": str(REPO / "taxonomy" / "spa_vl.yaml"),
        "workspace": str(root / "ws"),
        "store": str(root / "store"),
        "endpoints": {
            "sim": {"kind": "openai", "base_url": base_url, "concurrency": args.concurrency}
        },
        "models": [
            {
                "name": f"m{i:02d}",
                "endpoint": "sim",
                "model": f"sim-m{i:02d}",
                "sampling": {"temperature": 0.7, "max_tokens": 128},
            }
            for i in range(args.models)
        ],
        "generator": {
            "name": "gen",
            "endpoint": "sim",
            "model": "sim-judge",
            "sampling": {"temperature": 0.8},
        },
        "judges": [
            {
                "name": "judge",
                "endpoint": "sim",
                "model": "sim-judge",
                "sampling": {
                    "temperature": 0,
                    "max_tokens": 128,
                    "logprobs": True,
                    "top_logprobs": 5,
                },
            }
        ],
        "stages": {
            "images": {"source": {"kind": "typographic", "per_branch": per_branch, "size": 256}},
            "judge": {"max_pairs_per_question": args.pairs},
        },
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--pairs", type=int, default=3, help="pairwise candidate pairs per question"
    )
    parser.add_argument("--rerun", action="store_true", help="also time a no-change rerun")
    parser.add_argument("--root", default=None, help="keep the workspace and store here")
    args = parser.parse_args()
    from flows.build import build_dataset
    from vlpref.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        with (
            PrefectServer(root / "prefect") as server,
            server.as_current(),
            SimServer(sim_config(args.models, args.latency_ms)) as sim,
        ):
            path = run_config(root, sim.base_url, args)
            t0 = time.perf_counter()
            version_id = build_dataset(path)
            elapsed = time.perf_counter() - t0
            total = sim.counters()["total"]
            result: dict[str, Any] = {
                "questions_target": args.questions,
                "models": args.models,
                "latency_ms": args.latency_ms,
                "concurrency": args.concurrency,
                "seconds": round(elapsed, 1),
                "requests": total,
                "requests_per_s": round(total / elapsed, 1),
            }
            if args.rerun:
                t1 = time.perf_counter()
                build_dataset(path)
                result["rerun_seconds"] = round(time.perf_counter() - t1, 2)
                result["rerun_requests"] = sim.counters()["total"] - total
            manifest = Store(str(root / "store")).open(version_id).manifest
        stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        stage_req: Counter[str] = Counter()
        for branch in manifest["branches"].values():
            for stage in STAGES:
                counts = branch["stages"][stage]["counts"]
                stage_s[stage] += float(counts.get("elapsed_s", 0.0))
                stage_req[stage] += int(counts.get("requests_sent", 0))
        result["questions"] = manifest["counts"]["questions"]
        result["responses"] = manifest["counts"]["responses"]
        result["pairs"] = manifest["counts"]["pairs"]
        result["stage_requests"] = dict(stage_req)
        result["stage_task_seconds_summed"] = {k: round(v, 1) for k, v in stage_s.items()}
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
