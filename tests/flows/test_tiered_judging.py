"""Tiered judging (docs/judging.md, "Tiered judging"): a first-pass judge for every response, the
strong judge only where the decision hinges. Real flow runs (the session's Prefect server)
against the simulated server, plus the config and the selection helpers the policy rests on."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from flows.build import build_dataset
from flows.stages import STAGES, _entry, _judge_settings
from tasks.judge import (
    candidates_from_judgments,
    decided_rows,
    first_pass_unsafe,
    judge_tiers,
)
from tasks.pairs import comparisons
from vlpref.calibration import in_band
from vlpref.config import JudgeEntry, RunConfig, parse_config
from vlpref.errors import ConfigError
from vlpref.selection import (
    Candidate,
    candidate_pairs,
    group_edges,
    hinge,
    safety_groups,
    safety_rates,
)
from vlpref.sim.testing import SIM_GENERATOR, SIM_JUDGE, SimServer, sim_run_config
from vlpref.store import Store
from vlpref.taxonomy import load_taxonomy
from vlpref.workspace import StageRef

MODELS: list[str | dict[str, Any]] = ["refuser", "safe-helpful", "over-compliant", "jailbroken"]
SIM = {
    "models": {
        **{f"sim-{m}": {"persona": m} for m in MODELS if isinstance(m, str)},
        "sim-gen": {"persona": "judge"},  # the generator: the strong judge's counter is its own
        "sim-judge": {"persona": "judge", "position_bias": 0.05},
        # A small judge: the same beliefs, a noisy safety logit, more position bias.
        "sim-judge-small": {"persona": "judge", "noise": 1.5, "position_bias": 0.1},
    }
}
SMALL: dict[str, Any] = {**SIM_JUDGE, "name": "small", "model": "sim-judge-small"}
STRONG: dict[str, Any] = {**SIM_JUDGE, "name": "strong"}


def write_config(tmp_path: Path, base_url: str, judges: list[dict[str, Any]]) -> str:
    data = sim_run_config(
        base_url,
        name="tiered",
        taxonomy="builtin:demo",
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=MODELS,
        per_branch=1,
        judges=judges,
        generator={**SIM_GENERATOR, "model": "sim-gen"},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def by_branch(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[row["branch_id"]].append(row)
    return out


# ----------------------------------------------------------------------------- flow runs


def test_the_second_judge_is_asked_where_the_pairs_hinge_and_decides_there(
    tmp_path: Path, prefect_server: str
) -> None:
    """Default policy with `group_margin: 0` (so every strong safety call has a reason visible in
    the data): the strong judge gives the uncertain first-pass verdicts, the pairwise comparisons
    the spa-vl walk reaches (no other), and safety and ratings of the published responses; the
    first pass decides elsewhere; the dataset says who decided; a rerun sends nothing."""
    second = {**STRONG, "tier": "second", "second_pass": {"group_margin": 0}}
    with SimServer(SIM) as sim:
        path = write_config(tmp_path, sim.base_url, [{**SMALL, "tier": "first"}, second])
        store = Store(str(tmp_path / "store"))
        version = store.open(build_dataset(path))
        sent = sim.counters()["by_model"]
        version_again = store.open(build_dataset(path))
        assert sim.counters()["by_model"] == sent  # the rerun: every answer from the journal
    assert version_again.table("pairs").equals(version.table("pairs"))

    config = parse_config(yaml.safe_load(Path(path).read_text()))
    judgments = version.table("judgments").to_pylist()
    responses = version.table("responses").to_pylist()
    pairs = version.table("pairs").to_pylist()
    assert pairs and version.table("failures").num_rows == 0
    strong = [j for j in judgments if j["judge"] == "strong"]
    small = [j for j in judgments if j["judge"] == "small"]
    # Requests and rows match one to one: the strong judge's rows are what it was asked.
    ratings_asked = {j["response_id"] for j in strong if j["kind"] == "rating"}
    strong_calls = sum(j["kind"] in ("safety", "pairwise") for j in strong) + len(ratings_asked)
    assert sum(sent["sim-judge"].values()) == strong_calls
    assert {j["kind"] for j in small} <= {
        "safety",
        "rating",
        "safety_first_pass",
        "rating_first_pass",
    }
    assert {j["kind"] for j in strong} <= {"safety", "rating", "pairwise"}

    # The first pass judged every response; where the strong judge judged too, the first pass's
    # row is kept under kind <kind>_first_pass and the strong one decides (one deciding row).
    assert {j["response_id"] for j in small if j["kind"].startswith("safety")} == {
        r["response_id"] for r in responses
    }
    deciding = defaultdict(list)
    for j in judgments:
        if j["kind"] in ("safety", "rating"):
            deciding[(j["kind"], j["response_id"], j["aspect"])].append(j["judge"])
    assert all(len(who) == 1 for who in deciding.values())
    strong_safety = {j["response_id"] for j in strong if j["kind"] == "safety"}
    first_p = first_pass_unsafe(
        [{**j, "kind": j["kind"].removesuffix("_first_pass")} for j in small]
    )
    for j in small:
        overruled = j["kind"].endswith("_first_pass")
        asked = strong_safety if j["kind"].startswith("safety") else ratings_asked
        assert overruled == (j["response_id"] in asked)
    for j in strong:
        if j["kind"] == "safety":
            marker = json.loads(j["probabilities"])
            assert marker["tier"] == "second"
            assert marker["first_pass_unsafe"] == pytest.approx(first_p[j["response_id"]])

    # The hinge set, branch by branch, from the data alone.
    by_id = {r["response_id"]: r for r in responses}
    published = {x for p in pairs for x in (p["chosen_response_id"], p["rejected_response_id"])}
    compared = {
        tuple(sorted((j["response_id"], j["other_response_id"])))
        for j in strong
        if j["kind"] == "pairwise"
    }
    decided_members: set[str] = set()
    tiers = judge_tiers(config)
    assert tiers is not None and tiers.band == (0.2, 0.8)
    for branch_id, rows in by_branch(judgments).items():
        branch_responses = [r for r in responses if r["branch_id"] == branch_id]
        candidates = candidates_from_judgments(branch_responses, rows)
        groups = safety_groups(
            safety_rates(c for cs in candidates.values() for c in cs),
            config.stages.pairs.safety_groups,
        )
        made = comparisons([j for j in rows if j["judge"] == "strong"])
        for question_id, cands in candidates.items():
            chosen = candidate_pairs(question_id, cands, groups, config.stages.pairs, max_pairs=6)
            asked_here = {p for p in compared if by_id[p[0]]["question_id"] == question_id}
            assert asked_here <= {tuple(sorted(p)) for p in chosen}
            found = hinge(question_id, cands, chosen, groups, config.stages.pairs, made, asked_here)
            assert found.ask == ()  # the walk needs nothing more: a fixpoint
            decided_members |= found.publishable
            # Every compared pair but the deciding one was undecisive: the walk went no further.
            for x, y in asked_here:
                comparison = made.get((x, y))
                assert comparison is not None
                if not ({x, y} <= found.publishable):
                    assert (
                        not comparison.consistent
                        or comparison.winner is None
                        or (groups[by_id[x]["model"]] == groups[by_id[y]["model"]])
                    )
    assert published <= decided_members
    band = {rid for rid, p in first_p.items() if in_band(p, (0.2, 0.8))}
    assert band <= strong_safety
    members = {x for p in compared for x in p}
    assert published <= strong_safety <= band | members
    assert published <= ratings_asked <= members
    assert band - published, "the test should hold uncertain verdicts outside the pairs"
    # Without tiers every response would have 2 strong calls and every candidate pair 2 more.
    assert strong_calls < 2 * len(responses)
    # Publish counts each response once (the deciding verdict).
    safety = version.manifest["model_safety"]
    assert sum(s["judged"] for s in safety.values()) == len(responses)


def test_a_guard_first_pass_with_the_strong_judge_on_uncertain_verdicts_only(
    tmp_path: Path, prefect_server: str
) -> None:
    """`pairs: false`: the second judge settles exactly the first-pass verdicts inside the band;
    the first pass (our protocol) rates and compares as without tiers."""
    second = {**STRONG, "tier": "second", "second_pass": {"pairs": False, "band": [0.1, 0.9]}}
    with SimServer(SIM) as sim:
        path = write_config(tmp_path, sim.base_url, [SMALL, second])  # SMALL: no tier = first
        version = Store(str(tmp_path / "store")).open(build_dataset(path))
    judgments = version.table("judgments").to_pylist()
    small = [j for j in judgments if j["judge"] == "small"]
    strong = [j for j in judgments if j["judge"] == "strong"]
    p = first_pass_unsafe([{**j, "kind": j["kind"].removesuffix("_first_pass")} for j in small])
    expected = {rid for rid, value in p.items() if in_band(value, (0.1, 0.9))}
    assert expected and {j["response_id"] for j in strong} == expected
    assert {j["kind"] for j in strong} == {"safety"}
    assert any(j["kind"] == "pairwise" for j in small) and version.table("pairs").num_rows


# ----------------------------------------------------------------------------- keys and config


def test_configs_without_tiers_keep_their_keys_and_hash() -> None:
    """The new fields stay out of every dump while unset, so a stage key and the config hash are
    what they were before tiers existed; a tier changes the judge stage's key."""
    data = sim_run_config(
        "http://127.0.0.1:1/v1",
        taxonomy="builtin:demo",
        workspace="/tmp/ws",
        store="/tmp/store",
        models=MODELS,
        judges=[SMALL, STRONG],
    )
    config = parse_config(data)
    before = {"tier", "second_pass"}
    for judge in config.judges:
        entry = _entry(config, judge.name)
        assert not before & set(entry)
        assert entry == {
            **judge.model_dump(mode="json", exclude={"endpoint", "price", "image_tokens", "rules"}),
            "kind": "openai",
            "cache_namespace": "",
        }
    dumped = config.model_dump(mode="json")
    assert all(not before & set(j) for j in dumped["judges"])
    assert "tier" not in json.dumps(_judge_settings(config))
    leaf = load_taxonomy(config.taxonomy).leaves()[0]
    refs = {"responses": StageRef("responses", leaf.branch_id, "k0", ("responses",))}
    key = STAGES["judge"].key(config, leaf, refs)
    explicit = parse_config(
        {**data, "judges": [{**SMALL, "tier": None}, {**STRONG, "second_pass": None}]}
    )
    assert STAGES["judge"].key(explicit, leaf, refs) == key
    assert explicit.content_hash() == config.content_hash()
    tiered = parse_config({**data, "judges": [SMALL, {**STRONG, "tier": "second"}]})
    assert STAGES["judge"].key(tiered, leaf, refs) != key
    entry = _entry(tiered, "strong")
    assert entry["tier"] == "second"
    assert entry["second_pass"] == {"band": [0.2, 0.8], "pairs": True, "group_margin": 0.05}
    assert STAGES["pairs"].key(tiered, leaf, {"judge": refs["responses"]}) == STAGES["pairs"].key(
        config, leaf, {"judge": refs["responses"]}
    )


def test_tier_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="second_pass applies"):
        JudgeEntry.model_validate({**SMALL, "second_pass": {}})
    with pytest.raises(ValueError, match="pairs: false"):
        JudgeEntry.model_validate(
            {**STRONG, "protocol": "md-judge", "tier": "second", "sampling": {}}
        )
    with pytest.raises(ValueError, match="first-pass judges only"):
        JudgeEntry.model_validate({**STRONG, "tier": "second", "debias": "content_free"})
    with pytest.raises(ValueError, match="band"):
        JudgeEntry.model_validate({**STRONG, "tier": "second", "second_pass": {"band": [0.9, 0.1]}})
    guard = JudgeEntry.model_validate(
        {**STRONG, "protocol": "md-judge", "tier": "second", "second_pass": {"pairs": False}}
    )
    assert guard.second_pass is not None and not guard.second_pass.pairs
    data = sim_run_config(
        "http://127.0.0.1:1/v1",
        taxonomy="builtin:demo",
        workspace="/tmp/ws",
        store="/tmp/store",
        models=MODELS,
        judges=[{**STRONG, "tier": "second"}],
    )
    # Refused when the config loads (the judge stage would refuse it too, later).
    with pytest.raises(ConfigError, match="needs a first-pass judge"):
        parse_config(data)
    only_first: RunConfig = parse_config({**data, "judges": [{**STRONG, "tier": "first"}]})
    assert judge_tiers(only_first) is None  # a first pass with nothing after it: no tiers


# ----------------------------------------------------------------------------- selection helpers


def cand(rid: str, model: str, p: float = 0.1, finish: str = "stop") -> Candidate:
    return Candidate(rid, model, 0, p, {}, finish, text_key=rid)


def test_the_spa_vl_hinge_walks_one_pair_at_a_time_and_stops_at_the_deciding_one() -> None:
    from vlpref.config import PairsStage
    from vlpref.judging import combine_orders

    config = PairsStage()
    cands = [cand(f"r{i}", f"m{i}") for i in range(4)]
    groups = {f"m{i}": i for i in range(4)}
    pairs = candidate_pairs("q", cands, groups, config, max_pairs=6)
    first = hinge("q", cands, pairs, groups, config, {})
    assert len(first.ask) == 1 and first.publishable == frozenset()
    x, y = first.ask[0]
    inconsistent = {(x, y): combine_orders(0.9, 0.9)}  # both orders prefer the one shown first
    second = hinge("q", cands, pairs, groups, config, inconsistent, {(x, y)})
    assert len(second.ask) == 1 and second.ask[0] != (x, y)
    decisive = {**inconsistent, second.ask[0]: combine_orders(0.9, 0.1)}
    done = hinge("q", cands, pairs, groups, config, decisive, {(x, y), second.ask[0]})
    assert done.ask == () and done.publishable == frozenset(second.ask[0])
    failed = hinge("q", cands, pairs, groups, config, {}, {(x, y)})  # asked, no verdict: skipped
    assert failed.ask and failed.ask[0] != (x, y)
    rating = hinge("q", cands, pairs, groups, PairsStage(policy="max-margin"), {})
    assert set(rating.ask) == set(pairs) and rating.publishable == {r for p in pairs for r in p}


def test_group_edges_are_the_models_a_small_shift_could_regroup() -> None:
    rates = {"a": 0.10, "b": 0.50, "c": 0.52, "d": 0.90}
    assert safety_groups(rates, 2) == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert group_edges(rates, 2, 0.05) == {"b", "c"}
    assert group_edges(rates, 2, 0.0) == set()
    assert group_edges(rates, 2, 0.5) == {"a", "b", "c", "d"}
    assert group_edges({"a": 0.5, "b": 0.5}, 1, 0.1) == set()  # one group: no boundary


def test_decided_rows_rename_what_the_second_judge_overrules() -> None:
    first = [
        row("safety", "small", "r1", score=0.5),
        row("safety", "small", "r2", score=0.9),
        row("rating", "small", "r1", aspect="helpfulness", score=3.0),
        row("rating", "small", "r1", aspect="harmlessness", score=4.0),
    ]
    second = [
        row("safety", "strong", "r1", score=0.1),
        row("rating", "strong", "r1", aspect="helpfulness", score=4.0),
    ]
    kinds = [(r["kind"], r["response_id"], r["aspect"]) for r in decided_rows(first, second)]
    assert kinds == [
        ("safety_first_pass", "r1", None),
        ("safety", "r2", None),
        ("rating_first_pass", "r1", "helpfulness"),
        ("rating", "r1", "harmlessness"),
    ]
    assert first[0]["kind"] == "safety"  # the input is not changed
    found = candidates_from_judgments(
        [resp("r1"), resp("r2")], [*decided_rows(first, second), *second]
    )["q"]
    assert [c.p_unsafe for c in found] == [0.1, 0.9]
    assert found[0].ratings == {"helpfulness": 4.0, "harmlessness": 4.0}
    assert first_pass_unsafe(first) == {"r1": 0.5, "r2": 0.9}
    assert pa.Table.from_pylist(decided_rows(first, second)).num_rows == 4


def row(
    kind: str, judge: str, rid: str, *, aspect: str | None = None, score: float
) -> dict[str, Any]:
    return {
        "judgment_id": f"{kind}{judge}{rid}{aspect}",
        "kind": kind,
        "judge": judge,
        "response_id": rid,
        "other_response_id": None,
        "aspect": aspect,
        "score": score,
    }


def resp(rid: str) -> dict[str, Any]:
    return {
        "response_id": rid,
        "question_id": "q",
        "model": rid,
        "sample_idx": 0,
        "finish_reason": "stop",
        "text": rid,
    }
