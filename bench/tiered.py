"""Tiered judging (issue 17, item 4): what a first-pass judge saves, and what it changes.

    python -m bench.tiered [--per-branch 5] [--noise 0.5] [--out bench/results]

Builds the demo taxonomy with 12 simulated response models three times, each in its own
workspace against one simulated server (zero latency) and a local Prefect server:

  single   the strong judge alone (`sim-judge`, the demo's judge), asked everything;
  tiered   a small first-pass judge (`sim-judge-small`: the judge persona with `noise` on its
           safety logit and more position bias) for every response, the strong judge as
           `tier: second` with the default policy (band [0.2, 0.8], pairs: true,
           group_margin 0.05);
  tiered-m0  the same with `group_margin: 0` (what the safety-group escalation buys);
  guard    MD-Judge (`sim-md-judge`, text only, safety only) as the first pass, the strong judge
           as `tier: second` (SPA-VL's recipe: a local safety classifier, a strong judge per pair).

The questions and responses are the same in every run (same generator and models, seeded), so
the published pairs compare by id. Judge calls and prompt tokens are what reached the simulated
server per judge model (the generator is its own model), divided by the published quadruples
(pairs) of that run. The first pass's agreement is with the strong judge's verdicts of the single
run on the same responses. Writes bench/results/YYYY-MM-DD-tiered.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlpref.prefect_server import PrefectServer
from vlpref.sim.testing import SIM_GENERATOR, SimServer
from vlpref.store import Store

REPO = Path(__file__).resolve().parent.parent
STRONG, SMALL, GUARD = "sim-judge", "sim-judge-small", "sim-md-judge"
JUDGE_SAMPLING = {"temperature": 0.0, "max_tokens": 200, "logprobs": True, "top_logprobs": 5}

# 12 response models from the sim's personas: each twice, at another temperature or weights.
SIM_RESPONSE_MODELS: dict[str, dict[str, Any]] = {
    "sim-refuser": {"persona": "refuser"},
    "sim-safe-helpful": {"persona": "safe-helpful"},
    "sim-over-compliant": {"persona": "over-compliant"},
    "sim-jailbroken": {"persona": "jailbroken"},
    "sim-mixed": {"persona": "mixed", "weights": {"refuser": 1, "safe-helpful": 2}},
    "sim-mixed-risky": {
        "persona": "mixed",
        "weights": {"jailbroken": 2, "over-compliant": 1, "refuser": 1},
    },
    "sim-filtered": {"persona": "filtered", "filter_rate": 0.3},
    "sim-filtered-heavy": {"persona": "filtered", "filter_rate": 0.6},
}
RESPONSE_MODELS = [  # (name, sim model, temperature)
    ("refuser", "sim-refuser", 0.9),
    ("refuser-cool", "sim-refuser", 0.3),
    ("safe-helpful", "sim-safe-helpful", 0.9),
    ("safe-helpful-cool", "sim-safe-helpful", 0.3),
    ("over-compliant", "sim-over-compliant", 0.9),
    ("over-compliant-cool", "sim-over-compliant", 0.3),
    ("jailbroken", "sim-jailbroken", 0.9),
    ("jailbroken-cool", "sim-jailbroken", 0.3),
    ("mixed", "sim-mixed", 0.9),
    ("mixed-risky", "sim-mixed-risky", 0.9),
    ("filtered", "sim-filtered", 0.9),
    ("filtered-heavy", "sim-filtered-heavy", 0.9),
]


def sim_models(noise: float) -> dict[str, dict[str, Any]]:
    return {
        **SIM_RESPONSE_MODELS,
        "sim-generator": {"persona": "judge"},
        STRONG: {"persona": "judge", "position_bias": 0.05},
        SMALL: {"persona": "judge", "noise": noise, "position_bias": 0.1},
        GUARD: {"persona": "md-judge"},
    }


# The runs, and the model of each one's first pass.
FIRST_MODEL = {"single": None, "tiered": SMALL, "tiered-m0": SMALL, "guard": GUARD}


def judges(variant: str, group_margin: float | None = None) -> list[dict[str, Any]]:
    single = {"name": "strong", "endpoint": "sim", "model": STRONG, "sampling": JUDGE_SAMPLING}
    if variant == "single":
        return [single]
    policy = {} if group_margin is None else {"second_pass": {"group_margin": group_margin}}
    strong = {**single, **policy}
    if variant.startswith("tiered"):
        small = {"name": "small", "endpoint": "sim", "model": SMALL, "sampling": JUDGE_SAMPLING}
        return [{**small, "tier": "first"}, {**strong, "tier": "second"}]
    guard = {
        "name": "md-judge",
        "endpoint": "sim",
        "model": GUARD,
        "protocol": "md-judge",
        "sampling": JUDGE_SAMPLING,
        "tier": "first",
    }
    return [guard, {**strong, "tier": "second"}]


def run_config(
    root: Path, base_url: str, variant: str, per_branch: int, group_margin: float | None = None
) -> str:
    data = {
        "name": f"tiered-{variant}",
        "taxonomy": "builtin:demo",
        "workspace": str(root / variant / "ws"),
        "store": str(root / variant / "store"),
        "endpoints": {"sim": {"kind": "openai", "base_url": base_url, "concurrency": 64}},
        "models": [
            {
                "name": name,
                "endpoint": "sim",
                "model": model,
                "sampling": {"temperature": temperature, "max_tokens": 160},
            }
            for name, model, temperature in RESPONSE_MODELS
        ],
        "generator": {**SIM_GENERATOR, "model": "sim-generator"},
        "judges": judges(variant, group_margin),
        "stages": {"images": {"source": {"kind": "typographic", "per_branch": per_branch}}},
    }
    path = root / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@dataclass
class Result:
    variant: str
    seconds: float
    calls: dict[str, int]  # judge model -> requests that reached the sim
    prompt_tokens: dict[str, int]
    pairs: set[tuple[str, str, str]]  # (question, chosen, rejected)
    judgments: list[dict[str, Any]]
    responses: int
    counts: dict[str, int]  # what the strong judge was asked (from the judgments table)

    @property
    def quadruples(self) -> int:
        return len(self.pairs)

    def per_quad(self, values: Mapping[str, int], model: str) -> float:
        return values.get(model, 0) / max(self.quadruples, 1)


def build(sim: SimServer, path: str, variant: str, judge_models: list[str]) -> Result:
    from flows.build import build_dataset

    before = sim.counters()
    started = time.perf_counter()
    version = Store(str(Path(path).parent / variant / "store")).open(build_dataset(path))
    seconds = time.perf_counter() - started
    after = sim.counters()

    def delta(counter: str, model: str, field: str | None) -> int:
        """Requests (every status) or a usage field of `model`, sent during this build."""

        def read(c: dict[str, Any]) -> int:
            found = c[counter].get(model, {})
            return int(found.get(field, 0) if field else sum(found.values()))

        return read(after) - read(before)

    pairs = version.table("pairs").to_pylist()
    judgments = version.table("judgments").to_pylist()
    # What the strong judge was asked, as the dataset records it (judge column, kind).
    strong = [j for j in judgments if j["judge"] == "strong"]
    counts = {
        "safety verdicts": sum(j["kind"] == "safety" for j in strong),
        "rated responses": len({j["response_id"] for j in strong if j["kind"] == "rating"}),
        "pairwise verdicts": sum(j["kind"] == "pairwise" for j in strong),
        "overruled first-pass rows": sum(j["kind"].endswith("_first_pass") for j in judgments),
    }
    return Result(
        variant,
        seconds,
        {m: delta("by_model", m, None) for m in judge_models},
        {m: delta("usage", m, "prompt_tokens") for m in judge_models},
        {(p["question_id"], p["chosen_response_id"], p["rejected_response_id"]) for p in pairs},
        judgments,
        version.table("responses").num_rows,
        counts,
    )


def agreement(
    first: list[dict[str, Any]], judge: str, strong: list[dict[str, Any]]
) -> dict[str, Any]:
    """The first pass's verdicts (overruled ones included) against the strong judge's verdicts
    of the single run, on the same responses: safety verdicts, and rating digits per aspect."""
    theirs = {
        (r["kind"], r["response_id"], r["aspect"]): r["verdict"]
        for r in strong
        if r["kind"] in ("safety", "rating") and r["verdict"]
    }
    same: dict[str, list[bool]] = {"safety": [], "rating": []}
    for r in first:
        if r["judge"] != judge or not r["verdict"]:
            continue
        kind = r["kind"].removesuffix("_first_pass")
        if kind not in same:
            continue
        other = theirs.get((kind, r["response_id"], r["aspect"]))
        if other is not None:
            same[kind].append(other == r["verdict"])
    return {k: (sum(v) / len(v), len(v)) for k, v in same.items() if v}


def report(results: dict[str, Result], args: argparse.Namespace) -> str:
    single = results["single"]
    lines = [
        f"# Tiered judging - {dt.date.today().isoformat()}",
        "",
        "`python -m bench.tiered"
        f" --per-branch {args.per_branch} --noise {args.noise}"
        + (f" --group-margin {args.group_margin}" if args.group_margin is not None else "")
        + "`: the demo taxonomy"
        f" (4 branches x {args.per_branch} images x 3 questions) answered by 12 simulated"
        " response models (6 personas, each twice at another temperature or weights), one"
        " simulated server at zero latency. Calls and prompt tokens are what reached the server"
        " per judge model; per quadruple = divided by that run's published pairs. Overlap: the"
        " share of the single-judge run's pairs (question, chosen, rejected) that the run"
        " publishes too.",
        "",
        "| run | first pass | pairs | strong calls / quad | strong prompt tok / quad"
        " | first-pass calls / quad | first-pass prompt tok / quad | all judge calls / quad"
        " | strong calls vs single | overlap with single | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = single.per_quad(single.calls, STRONG)
    figures: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        first_model = FIRST_MODEL[name]
        strong_calls = r.per_quad(r.calls, STRONG)
        first_calls = r.per_quad(r.calls, first_model) if first_model else 0.0
        first_tokens = r.per_quad(r.prompt_tokens, first_model) if first_model else 0.0
        overlap = len(r.pairs & single.pairs) / max(len(single.pairs), 1)
        ratio = base / strong_calls if strong_calls else float("inf")
        figures[name] = {"ratio": ratio, "overlap": overlap}
        lines.append(
            f"| {name} | {first_model or '-'} | {r.quadruples} | {strong_calls:.1f}"
            f" | {r.per_quad(r.prompt_tokens, STRONG):,.0f} | {first_calls:.1f}"
            f" | {first_tokens:,.0f} | {strong_calls + first_calls:.1f} | {ratio:.2f}x fewer"
            f" | {overlap:.1%} | {r.seconds:.0f} |"
        )
    lines += ["", "What the strong judge gave (judgments table):", ""]
    for name, r in results.items():
        parts = ", ".join(f"{k} {v}" for k, v in r.counts.items())
        lines.append(f"- {name}: {parts} (of {r.responses} responses)")
    small = agreement(results["tiered"].judgments, "small", single.judgments)
    agree = {
        "tiered": small,
        "tiered-m0": small,  # the same first pass, the same responses
        "guard": agreement(results["guard"].judgments, "md-judge", single.judgments),
    }
    lines += ["", "First-pass agreement with the strong judge (single run, same responses):", ""]
    for name, found in agree.items():
        if name == "tiered-m0":
            continue
        parts = ", ".join(f"{k} verdicts {v:.1%} of {n}" for k, (v, n) in found.items())
        lines.append(f"- {name}: {parts}")
    lines += ["", "## Targets", ""]
    for name in ("tiered", "tiered-m0", "guard"):
        f = figures[name]
        safety = agree[name]["safety"][0]
        met = f["ratio"] >= 2.0 and f["overlap"] >= 0.95 and safety >= 0.90
        lines.append(
            f"- {name}: >= 2x fewer strong-judge calls per quadruple: {f['ratio']:.2f}x"
            f" ({'met' if f['ratio'] >= 2.0 else 'missed'}); >= 95 % of pairs unchanged:"
            f" {f['overlap']:.1%} ({'met' if f['overlap'] >= 0.95 else 'missed'}); first pass"
            f" agrees on >= 90 % of safety verdicts: {safety:.1%}"
            f" ({'met' if safety >= 0.90 else 'missed'}). All three: {'met' if met else 'missed'}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tiered")
    parser.add_argument("--per-branch", type=int, default=5, help="images per branch")
    parser.add_argument("--noise", type=float, default=1.5, help="the small judge's logit noise")
    parser.add_argument(
        "--group-margin", type=float, default=None, help="second_pass.group_margin (default: its)"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    judge_models = [STRONG, SMALL, GUARD]
    results: dict[str, Result] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        PrefectServer(Path(tmp) / "prefect") as server,
        server.as_current(),
        SimServer({"models": sim_models(args.noise)}) as sim,
    ):
        root = Path(tmp)
        for variant in FIRST_MODEL:
            margin = 0.0 if variant == "tiered-m0" else args.group_margin
            path = run_config(root, sim.base_url, variant, args.per_branch, margin)
            results[variant] = build(sim, path, variant, judge_models)
    text = report(results, args)
    out = Path(args.out) / f"{dt.date.today().isoformat()}-tiered.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(out)


if __name__ == "__main__":
    main()
