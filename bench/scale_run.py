"""A SPA-VL-sized synthetic run through the real flow, against the simulated server.

    python -m bench.scale_run --questions 30000 --models 12 [--latency-ms 50] [--concurrency 256]

Builds the whole SPA-VL taxonomy (53 branches) with typographic images, enough per branch for
`--questions` questions (3 per image), `--models` response models and the judge (safety, ratings,
pairwise in both orders), through `build_dataset` on a local Prefect server. Prints a JSON line
with end-to-end time, requests per stage, requests/s, and the flow process's peak RSS (the sim
server and the Prefect server are separate processes and not counted).

The pipeline-overhead target compares the build's requests/s with the model client's own on the
same requests (images, prompts, logprobs and answer sizes as the build sent them): after the timed
build, a few branches are rebuilt into a fresh workspace that shares the build's request journal
(every answer is a journal hit, so nothing is sent), recording the requests the stages hand the
model service; those are then replayed through `run_requests` with a fresh provider and a fresh
journal at the same concurrency, against the same sim server, with nothing else running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.report import code_revision
from vlpref.chat import ChatRequest
from vlpref.gctune import throughput_gc
from vlpref.journal import Journal
from vlpref.prefect_server import PrefectServer
from vlpref.providers import create_provider
from vlpref.runner import run_requests
from vlpref.service import ModelService
from vlpref.sim.testing import SimServer

REPO = Path(__file__).resolve().parent.parent
TAXONOMY = REPO / "taxonomy" / "spa_vl.yaml"
PERSONAS = ["refuser", "safe-helpful", "over-compliant", "jailbroken", "mixed", "filtered"]
STAGES = ("images", "questions", "responses", "judge", "pairs")


def sim_config(models: int, latency_ms: float) -> dict[str, Any]:
    served: dict[str, Any] = {
        f"sim-m{i:02d}": {"persona": PERSONAS[i % len(PERSONAS)]} for i in range(models)
    }
    # One persona more than the run uses: the model `--rerun` adds (sim-mNN) is already served.
    served[f"sim-m{models:02d}"] = {"persona": PERSONAS[models % len(PERSONAS)]}
    served["sim-judge"] = {"persona": "judge"}
    return {"latency": {"kind": "constant", "ms": latency_ms}, "models": served}


def run_config(root: Path, base_url: str, args: argparse.Namespace) -> str:
    per_branch = max(1, math.ceil(args.questions / 3 / 53))
    data = {
        "name": "scale",
        "taxonomy": str(TAXONOMY),
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
    # Scheduling settings left unset take the run config's own defaults, not copies of them.
    for option in ("parallel_branches", "responses_in_flight"):
        if getattr(args, option, None) is not None:
            data[option] = getattr(args, option)
    if getattr(args, "branches", None):
        data["only"] = leaf_paths()[: args.branches]
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def leaf_paths() -> list[str]:
    """The SPA-VL taxonomy's leaves, in file order."""
    from vlpref.taxonomy import load_taxonomy

    return [leaf.path for leaf in load_taxonomy(str(TAXONOMY)).leaves()]


def record_requests(
    root: Path, base_url: str, args: argparse.Namespace, requests_sent: int, min_requests: int
) -> list[ChatRequest]:
    """The requests a rebuild of the first few branches hands the model service (see the module
    docstring); enough branches for at least `min_requests` (the build sent `requests_sent`),
    all answered from the journal."""
    from flows.build import build_dataset

    replay = root / "replay"
    shutil.copytree(root / "ws" / "journal", replay / "ws" / "journal", copy_function=os.link)
    leaves = len(leaf_paths())
    per_branch = max(1, requests_sent // leaves)
    branches = min(leaves, math.ceil(min_requests / per_branch))
    path = run_config(replay, base_url, argparse.Namespace(**{**vars(args), "branches": branches}))

    recorded: list[ChatRequest] = []
    original = ModelService.run

    def tee(requests: Any) -> Any:
        for request in requests:
            recorded.append(request)
            yield request

    def recording_run(self: ModelService, batches: Any, journal: Any, *a: Any, **kw: Any) -> Any:
        return original(self, [(p, tee(r)) for p, r in batches], journal, *a, **kw)

    ModelService.run = recording_run  # type: ignore[method-assign]
    try:
        build_dataset(path)
    finally:
        ModelService.run = original  # type: ignore[method-assign]
    return recorded


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def replay(
    requests: list[ChatRequest], base_url: str, concurrency: int, root: Path
) -> tuple[float, float]:
    """Send `requests` through the client alone (provider + journal); returns requests/s and
    CPU microseconds per request."""

    async def go() -> float:
        provider = create_provider("openai", {"base_url": base_url, "concurrency": concurrency})
        journal = Journal(str(root / "replay-journal"))
        async with provider:
            t0 = time.perf_counter()
            async for _ in run_requests(provider, requests, journal):
                pass
            elapsed = time.perf_counter() - t0
        journal.close()
        return len(requests) / elapsed

    cpu0 = _cpu_seconds()
    with throughput_gc():  # the settings the build runs its client under
        rate = asyncio.run(go())
    return rate, (_cpu_seconds() - cpu0) / len(requests) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--pairs", type=int, default=3, help="pairwise candidate pairs per question"
    )
    parser.add_argument(
        "--parallel-branches", type=int, default=None, help="the run config's (default: its own)"
    )
    parser.add_argument(
        "--responses-in-flight",
        type=int,
        default=None,
        help="the run config's answer budget, in response samples (default: its own)",
    )
    parser.add_argument(
        "--branches",
        type=int,
        default=None,
        help="build only the first N branches, each as large as in the full run (a quick proxy "
        "for the full run's peak memory, which depends on the branches in flight)",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="after the build, time a no-change rerun, a one-branch rerun and adding a model",
    )
    parser.add_argument(
        "--reruns-only",
        action="store_true",
        help="skip the build: --root holds one made with the same arguments; time the reruns",
    )
    parser.add_argument("--json-out", default=None, help="append the result line to this file")
    parser.add_argument(
        "--client-requests",
        type=int,
        default=20_000,
        help="at least this many of the build's requests replayed through the client alone "
        "(0: skip the client baseline)",
    )
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
            if args.reruns_only:
                result = {"questions_target": args.questions, "models": args.models}
                result.update(time_reruns(path, sim, build_seconds=None))
                _emit(result, args.json_out)
                return
            cpu0 = _cpu_seconds()
            t0 = time.perf_counter()
            version_id = build_dataset(path)
            elapsed = time.perf_counter() - t0
            cpu = _cpu_seconds() - cpu0
            total = sim.counters()["total"]
            result = {
                "questions_target": args.questions,
                "models": args.models,
                "vlpref": code_revision(),  # what was measured, whenever the report is made
                "latency_ms": args.latency_ms,
                "concurrency": args.concurrency,
                "seconds": round(elapsed, 1),
                "requests": total,
                "requests_per_s": round(total / elapsed, 1),
                # CPU of the flow process (all its threads) per request sent: what the pipeline
                # costs on top of the client, whose own figure the replay below reports.
                "cpu_us_per_request": round(cpu / total * 1e6),
                "cpu_utilisation": round(cpu / elapsed, 2),
            }
            # Read before anything else runs: the replay below holds its requests in memory.
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            manifest = Store(str(root / "store")).open(version_id).manifest
            if args.rerun:
                result.update(time_reruns(path, sim, build_seconds=elapsed))
            if args.client_requests:
                before = sim.counters()["total"]
                recorded = record_requests(
                    root, sim.base_url, args, total, min_requests=args.client_requests
                )
                if sim.counters()["total"] != before:
                    raise RuntimeError("the recording rebuild sent requests: journal not shared")
                rate, cpu_us = replay(recorded, sim.base_url, args.concurrency, root)
                result["client_requests"] = len(recorded)
                result["client_requests_per_s"] = round(rate, 1)
                result["client_cpu_us_per_request"] = round(cpu_us)
                result["pipeline_vs_client"] = round(result["requests_per_s"] / rate, 3)
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
        result["peak_rss_mb"] = round(peak_rss_mb, 1)
        _emit(result, args.json_out)


def _emit(result: dict[str, Any], json_out: str | None) -> None:
    line = json.dumps(result)
    print(line)
    sys.stdout.flush()
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def time_reruns(path: str, sim: SimServer, build_seconds: float | None) -> dict[str, Any]:
    """The rerun costs of the issue, on the build at `path`: a no-change rerun, a rerun of one
    branch (the taxonomy's first, unchanged) and the same config with one more response model.
    Seconds of wall time and requests that reached the sim server, each."""
    from flows.build import build_dataset

    data = yaml.safe_load(Path(path).read_text())
    first_leaf = leaf_paths()[0]
    out: dict[str, Any] = {}

    def timed(name: str, config_path: str, only: list[str] | None = None) -> None:
        before = sim.counters()["total"]
        t0 = time.perf_counter()
        build_dataset(config_path, only=only)
        seconds = time.perf_counter() - t0
        out[f"{name}_seconds"] = round(seconds, 2)
        out[f"{name}_requests"] = sim.counters()["total"] - before
        if build_seconds:
            out[f"{name}_share_of_build"] = round(seconds / build_seconds, 4)

    timed("rerun", path)
    timed("one_branch_rerun", path, only=[first_leaf])
    extra = dict(data)
    n = len(data["models"])
    extra["models"] = [
        *data["models"],
        {**data["models"][0], "name": f"m{n:02d}", "model": f"sim-m{n:02d}"},
    ]
    extra_path = str(Path(path).with_name("run-plus-one-model.yaml"))
    Path(extra_path).write_text(yaml.safe_dump(extra, sort_keys=False))
    timed("add_model", extra_path)
    return out


if __name__ == "__main__":
    main()
