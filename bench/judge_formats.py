"""Judges in the styles real models write: how many calls still yield a judgment, whether any
verdict changes, and what it does to the published pairs and to the bill.

    python -m bench.judge_formats [--per-branch 5] [--out bench/results/judge-formats.md]

Four builds of the demo taxonomy against the simulated server, same response models, same
questions; only the judge's answers differ:

    canonical       the judge answers in vlpref's own protocol, no constraint (the reference)
    drift           free text drifting across every real-model style the sim knows (JSON, fenced
                    JSON, prose, bold labels, verdict last, <think> blocks, [[A]], "Output (b)",
                    "4 out of 5", markdown tables, Aspect=d ...), with token logprobs
    drift, no lp    the same, and no logprobs at all (as many hosted APIs return)
    constrained     the drifting judge under structured outputs (JSON schemas, `structured: auto`)

The sim decides first and writes second, so a judge's decision is the same in every style
(vlpref/sim/personas.py): any verdict that differs from the canonical run is a parsing error.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlpref.sim.testing import SimServer, sim_run_config

REPO = Path(__file__).resolve().parent.parent
PERSONAS = ["refuser", "safe-helpful", "over-compliant", "jailbroken", "mixed", "filtered"]
JUDGE_SAMPLING = {"temperature": 0, "max_tokens": 300, "logprobs": True, "top_logprobs": 5}


@dataclass(frozen=True)
class Variant:
    name: str
    judge: dict[str, Any]  # the sim's judge model entry (persona options)
    structured: str  # the run config's judge `structured`


VARIANTS = (
    Variant("canonical", {"persona": "judge"}, "off"),
    Variant("drift", {"persona": "judge", "styles": "all"}, "off"),
    Variant(
        "drift, no logprobs", {"persona": "judge", "styles": "all", "drop_logprobs": True}, "off"
    ),
    Variant("constrained", {"persona": "judge", "styles": "all"}, "auto"),
)


def sim_config(judge: dict[str, Any]) -> dict[str, Any]:
    models: dict[str, Any] = {f"sim-{p}": {"persona": p} for p in PERSONAS}
    models["sim-filtered"] = {"persona": "filtered", "filter_rate": 0.3}
    models["sim-judge"] = judge
    # The generator writes the questions in every variant alike (canonical, unconstrained).
    models["sim-gen"] = {"persona": "judge"}
    return {"models": models}


def run_config(root: Path, base_url: str, per_branch: int, structured: str) -> str:
    data = sim_run_config(
        base_url,
        name="judge-formats",
        taxonomy="builtin:demo",
        workspace=str(root / "ws"),
        store=str(root / "store"),
        per_branch=per_branch,
        endpoint={"concurrency": 64},
        models=[
            {"name": p, "endpoint": "sim", "model": f"sim-{p}", "sampling": {"temperature": 0.9}}
            for p in PERSONAS
        ],
        generator={
            "name": "gen",
            "endpoint": "sim",
            "model": "sim-gen",
            "sampling": {"temperature": 0.8},
            "structured": "off",
        },
        judges=[
            {
                "name": "judge",
                "endpoint": "sim",
                "model": "sim-judge",
                "sampling": JUDGE_SAMPLING,
                "structured": structured,
            }
        ],
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@dataclass(frozen=True)
class Outcome:
    name: str
    calls: int  # judge calls planned
    judged: int  # calls that yielded their judgments
    requests: int  # judge requests sent (re-asks included)
    prompt_tokens: int
    completion_tokens: int
    verdicts: dict[str, str]  # judgment id -> verdict
    pairs: list[tuple[str, str]]  # (chosen, rejected) response ids, sorted

    @property
    def yield_rate(self) -> float:
        return self.judged / self.calls if self.calls else 0.0


def build(name: str, root: Path, sim: SimServer, per_branch: int, structured: str) -> Outcome:
    from flows.build import build_dataset
    from vlpref.store import Store

    before = sim.counters()
    version = Store(str(root / "store")).open(
        build_dataset(run_config(root, sim.base_url, per_branch, structured))
    )
    after = sim.counters()
    judge_usage = {
        k: after.get("usage", {}).get("sim-judge", {}).get(k, 0)
        - before.get("usage", {}).get("sim-judge", {}).get(k, 0)
        for k in ("prompt_tokens", "completion_tokens")
    }
    sent = sum(after["by_model"].get("sim-judge", {}).values()) - sum(
        before["by_model"].get("sim-judge", {}).values()
    )
    counts = [b["stages"]["judge"]["counts"] for b in version.manifest["branches"].values()]
    judgments = version.table("judgments", ["judgment_id", "verdict"]).to_pylist()
    pairs = version.table("pairs", ["chosen_response_id", "rejected_response_id"]).to_pylist()
    return Outcome(
        name=name,
        calls=sum(int(c["in"]) for c in counts),
        judged=sum(int(c["out"]) for c in counts),
        requests=sent,
        prompt_tokens=int(judge_usage["prompt_tokens"]),
        completion_tokens=int(judge_usage["completion_tokens"]),
        verdicts={j["judgment_id"]: j["verdict"] for j in judgments},
        pairs=sorted((p["chosen_response_id"], p["rejected_response_id"]) for p in pairs),
    )


def measure(root: Path, per_branch: int) -> list[Outcome]:
    """Build every variant under `root` (needs a Prefect API: the caller's server or context)."""
    outcomes = []
    with ExitStack() as stack:
        for variant in VARIANTS:
            sim = stack.enter_context(SimServer(sim_config(variant.judge)))
            folder = root / variant.name.replace(", ", "-").replace(" ", "-")
            outcomes.append(build(variant.name, folder, sim, per_branch, variant.structured))
    return outcomes


def differing_verdicts(reference: Outcome, other: Outcome) -> int:
    return sum(
        1
        for jid, verdict in other.verdicts.items()
        if reference.verdicts.get(jid, verdict) != verdict
    )


def report(outcomes: list[Outcome], per_branch: int) -> str:
    reference = outcomes[0]
    lines = [
        "# Judges in real-model styles: yield, verdicts, pairs, cost",
        "",
        f"Demo taxonomy (4 branches), {per_branch} images per branch, 6 response models, the sim "
        "judge at temperature 0 with top-5 logprobs; `python -m bench.judge_formats`.",
        "",
        "| judge answers | calls | yield a judgment | verdicts ≠ canonical | pairs "
        "| pairs = canonical | requests | per call | prompt tok | completion tok |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for o in outcomes:
        same = (
            "yes"
            if o.pairs == reference.pairs
            else f"no ({len(set(o.pairs) ^ set(reference.pairs))} differ)"
        )
        lines.append(
            f"| {o.name} | {o.calls} | {o.judged} ({o.yield_rate:.1%}) | "
            f"{differing_verdicts(reference, o)} | {len(o.pairs)} | {same} | {o.requests} | "
            f"{o.requests / o.calls:.2f} | {o.prompt_tokens} | {o.completion_tokens} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--per-branch", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "judge-formats.md")
    args = parser.parse_args(argv)
    from vlpref.prefect_server import PrefectServer

    with (
        tempfile.TemporaryDirectory() as tmp,
        PrefectServer(Path(tmp) / "prefect") as server,
        server.as_current(),
    ):
        outcomes = measure(Path(tmp), args.per_branch)
    text = report(outcomes, args.per_branch)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
