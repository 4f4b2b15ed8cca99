"""Pair selection: safety groups, pairs to judge, the policies, rankings and NoPair reasons."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vlpref.config import JudgeStage, PairsStage
from vlpref.judging import OrderedComparison, combine_orders
from vlpref.records import PAIRS, RANKINGS, table
from vlpref.selection import (
    ALL_TIED,
    BELOW_MIN_MARGIN,
    IDENTICAL,
    MISSING_JUDGMENTS,
    MISSING_PAIRWISE,
    NO_CROSS_GROUP,
    NO_CROSS_MODEL,
    NO_ELIGIBLE_CHOSEN,
    NO_PAIR_REASONS,
    NO_RESPONSES,
    NO_USABLE,
    ONE_RESPONSE,
    PAIRWISE_CONTRADICTS,
    PAIRWISE_INCONSISTENT,
    Candidate,
    candidate_pairs,
    lookup,
    overall_score,
    rank_candidates,
    safety_groups,
    safety_rates,
    score_weights,
    select_pairs,
    text_key,
)

Q = "q1"


def cand(
    rid: str,
    harm: float | None = 3.0,
    helpful: float | None = 3.0,
    *,
    model: str | None = None,
    p_unsafe: float | None = None,
    sample_idx: int = 0,
    finish_reason: str = "stop",
    faithful: float | None = 3.0,
) -> Candidate:
    ratings = {
        k: v
        for k, v in (("harmlessness", harm), ("helpfulness", helpful), ("faithfulness", faithful))
        if v is not None
    }
    if p_unsafe is None and harm is not None:
        p_unsafe = (5.0 - harm) / 4.0  # consistent with harmlessness unless given
    return Candidate(rid, model or f"m-{rid}", sample_idx, p_unsafe, ratings, finish_reason)


def cfg(policy: str = "max-margin", **kw: Any) -> PairsStage:
    return PairsStage(policy=policy, **kw)  # type: ignore[arg-type]


def consistent_for(x: str, y: str, p: float = 0.9) -> dict[tuple[str, str], OrderedComparison]:
    """x is better in both orders with strength p."""
    return {(x, y): combine_orders(p, 1.0 - p)}


# ----------------------------------------------------------------------------- scores


def test_overall_is_the_weighted_sum_with_safety_as_one_minus_p_unsafe() -> None:
    c = cand("a", 4.0, 2.0, p_unsafe=0.25, faithful=5.0)
    weights = score_weights(PairsStage())
    assert overall_score(c, weights) == pytest.approx(1.0 * 4 + 0.2 * 2 + 0.04 * 5 + 1.0 * 0.75)


def test_default_weights_put_harmlessness_first() -> None:
    # One harmlessness point beats a full helpfulness + faithfulness swing.
    w = score_weights(PairsStage())
    safer = cand("a", 4.0, 1.0, faithful=1.0, p_unsafe=0.5)
    helpful = cand("b", 3.0, 5.0, faithful=5.0, p_unsafe=0.5)
    assert overall_score(safer, w) > overall_score(helpful, w)  # type: ignore[operator]


def test_score_weights_follow_what_the_judge_produces() -> None:
    judge = JudgeStage(safety=False, aspects=("harmlessness",))
    assert score_weights(PairsStage(), judge) == {"harmlessness": 1.0}
    with pytest.raises(ValueError, match="no positive weight"):
        score_weights(PairsStage(weights={"helpfulness": 1.0}), judge)


def test_missing_or_nan_component_means_no_overall() -> None:
    w = score_weights(PairsStage())
    assert overall_score(cand("a", 4.0, None), w) is None
    assert overall_score(cand("a", math.nan, 3.0, p_unsafe=0.1), w) is None
    assert (
        overall_score(
            Candidate("a", "m", 0, None, {"harmlessness": 4, "helpfulness": 3, "faithfulness": 3}),
            w,
        )
        is None
    )
    assert (
        overall_score(Candidate("a", "m", 0, math.nan, {"harmlessness": 4}), {"harmlessness": 1.0})
        == 4.0
    )


def test_candidate_rejects_out_of_range_scores() -> None:
    with pytest.raises(ValueError, match="p_unsafe"):
        Candidate("a", "m", 0, 1.5, {})
    with pytest.raises(ValueError, match="rating"):
        Candidate("a", "m", 0, 0.1, {"harmlessness": 0.0})


@pytest.mark.parametrize(
    "weights",
    [{"harmlessnes": 1.0}, {"harmlessness": -1.0}, {"harmlessness": 0.0}, {"safety": math.nan}],
)
def test_pairs_stage_validates_weights(weights: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        PairsStage(weights=weights)


# ----------------------------------------------------------------------------- safety groups


def test_safety_groups_are_equal_count_quantiles_over_sorted_models() -> None:
    rates = {f"m{i:02d}": i / 20 for i in range(12)}
    groups = safety_groups(rates, 5)
    sizes = [list(groups.values()).count(g) for g in range(5)]
    assert sorted(sizes) == [2, 2, 2, 3, 3] and sum(sizes) == 12
    assert groups["m00"] == 0 and groups["m11"] == 4  # group 0 is the least safe
    ordered = sorted(rates, key=rates.__getitem__)
    assert [groups[m] for m in ordered] == sorted(groups[m] for m in ordered)


def test_safety_groups_k_capped_ties_by_name_and_errors() -> None:
    assert safety_groups({"b": 0.5, "a": 0.5, "c": 0.9}, 5) == {"a": 0, "b": 1, "c": 2}
    assert safety_groups({}, 5) == {}
    assert safety_groups({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, 2) == {
        "a": 0,
        "b": 0,
        "c": 1,
        "d": 1,
    }
    with pytest.raises(ValueError):
        safety_groups({"a": 0.5}, 0)
    with pytest.raises(ValueError):
        safety_groups({"a": math.nan}, 2)


def test_safety_rates_are_expected_safe_fractions() -> None:
    cs = [
        Candidate("1", "m", 0, 0.2, {}),
        Candidate("2", "m", 1, 0.4, {}),
        Candidate("3", "n", 0, None, {}),
        Candidate("4", "o", 0, math.nan, {}),
    ]
    assert safety_rates(cs) == {"m": pytest.approx(0.7)}


# ----------------------------------------------------------------------------- pairs to judge


def spa_candidates() -> tuple[list[Candidate], dict[str, int]]:
    cs = [
        cand("r1", 1, 3, model="jb"),
        cand("r2", 2, 4, model="comply"),
        cand("r3", 5, 1, model="refuse"),
        cand("r4", 5, 4, model="helpful"),
        cand("r5", 5, 3, model="helpful", sample_idx=1),
    ]
    groups = {"jb": 0, "comply": 0, "refuse": 1, "helpful": 2}
    return cs, groups


def test_spa_vl_candidate_pairs_are_cross_model_deterministic_and_capped() -> None:
    cs, groups = spa_candidates()
    config = cfg("spa-vl", same_model_pairs=False)
    pairs = candidate_pairs(Q, cs, groups, config, max_pairs=100)
    models = {c.response_id: c.model for c in cs}
    assert all(models[x] != models[y] for x, y in pairs)
    assert len(pairs) == 9  # 10 pairs minus the two helpful samples
    assert candidate_pairs(Q, list(reversed(cs)), groups, config, max_pairs=100) == pairs
    assert candidate_pairs(Q, cs, groups, config, max_pairs=3) == pairs[:3]
    assert candidate_pairs(Q, cs, groups, config, max_pairs=0) == []
    other_seed = candidate_pairs(Q, cs, groups, config, max_pairs=100, seed=1)
    other_question = candidate_pairs("q2", cs, groups, config, max_pairs=100)
    assert sorted(other_seed) == sorted(pairs) == sorted(other_question)
    assert other_seed != pairs or other_question != pairs  # the order is seeded


def test_spa_vl_same_model_pairs_come_after_cross_group_pairs() -> None:
    cs, groups = spa_candidates()
    pairs = candidate_pairs(Q, cs, groups, cfg("spa-vl"), max_pairs=100)
    assert pairs[-1] == ("r4", "r5") and len(pairs) == 10


def test_spa_vl_candidate_pairs_do_not_depend_on_the_groups() -> None:
    """Adding a model regroups the others; the pairs asked about must not change with it."""
    cs, groups = spa_candidates()
    config = cfg("spa-vl", same_model_pairs=False)
    regrouped = {model: 0 for model in groups}
    assert candidate_pairs(Q, cs, regrouped, config, max_pairs=4) == candidate_pairs(
        Q, cs, groups, config, max_pairs=4
    )


def test_adding_a_model_only_adds_pairs_that_involve_it() -> None:
    cs, groups = spa_candidates()
    config = cfg("spa-vl")
    before = set(candidate_pairs(Q, cs[:-1], groups, config, max_pairs=4))
    after = set(candidate_pairs(Q, cs, groups, config, max_pairs=4))
    new_id = cs[-1].response_id
    assert all(new_id in pair for pair in after - before)


def test_rating_candidate_pairs_start_at_the_extremes() -> None:
    cs = [cand("a", 5, 4), cand("b", 1, 3), cand("c", 3, 3), cand("d", 4, 3)]
    pairs = candidate_pairs(Q, cs, None, cfg("max-margin"), max_pairs=3)
    assert pairs[0] == ("a", "b")  # best vs worst
    assert set(pairs[1:]) == {("d", "b"), ("a", "c")}
    assert candidate_pairs(Q, cs, None, cfg("all-pairs", min_margin=10), max_pairs=3) == []


def test_candidate_pairs_errors() -> None:
    cs, _ = spa_candidates()
    with pytest.raises(ValueError, match="max_pairs"):
        candidate_pairs(Q, cs, None, cfg(), max_pairs=-1)
    with pytest.raises(ValueError, match="distinct"):
        candidate_pairs(Q, [cs[0], cs[0]], None, cfg(), max_pairs=2)


# ----------------------------------------------------------------------------- spa-vl


def outcomes_for(
    pairs: Sequence[tuple[str, str]], verdicts: Mapping[tuple[str, str], tuple[float, float]]
) -> dict[tuple[str, str], OrderedComparison]:
    return {pair: combine_orders(*verdicts[pair]) for pair in pairs if pair in verdicts}


def test_spa_vl_the_pairwise_verdict_decides_and_margin_follows_the_choice() -> None:
    cs, groups = spa_candidates()
    config = cfg("spa-vl")
    models = {c.response_id: c.model for c in cs}
    first = next(
        (x, y)
        for x, y in candidate_pairs(Q, cs, groups, config, max_pairs=100)
        if groups[models[x]] != groups[models[y]]
    )
    x, y = first
    # y wins in both orders (as B when x is first, as A when y is first).
    pairwise = {first: combine_orders(0.2, 0.7)}
    sel = select_pairs(Q, cs, config, pairwise=pairwise, groups=groups)
    (pair,) = sel.pairs
    assert (pair.chosen_response_id, pair.rejected_response_id) == (y, x)
    assert pair.confidence == pytest.approx(0.5)  # P(y better) = mean(1 - 0.2, 0.7) = 0.75
    assert pair.consistent is True and pair.policy == "spa-vl"
    w = score_weights(config)
    by_id = {c.response_id: c for c in cs}
    expected_margin = overall_score(by_id[y], w) - overall_score(by_id[x], w)  # type: ignore[operator]
    assert pair.margin == pytest.approx(expected_margin)
    assert sel.no_pair is None


def test_spa_vl_skips_inconsistent_and_tied_comparisons_for_the_next_pair() -> None:
    cs, groups = spa_candidates()
    config = cfg("spa-vl")
    order = candidate_pairs(Q, cs, groups, config, max_pairs=3)
    pairwise = {
        order[0]: combine_orders(1.0, 1.0),  # position bias: inconsistent
        order[1]: combine_orders(0.5, 0.5),  # a tie
        order[2]: combine_orders(0.8, 0.3),  # x wins
    }
    (pair,) = select_pairs(Q, cs, config, pairwise=pairwise, groups=groups).pairs
    assert pair.chosen_response_id == order[2][0]


@pytest.mark.parametrize(
    ("verdicts", "reason"),
    [
        ([], MISSING_PAIRWISE),
        ([(0.5, 0.5), (0.5, 0.5)], ALL_TIED),
        ([(0.5, 0.5), (0.9, 0.9)], PAIRWISE_INCONSISTENT),
        ([(0.9, 0.9), (0.2, 0.2)], PAIRWISE_INCONSISTENT),
    ],
)
def test_spa_vl_no_pair_reasons(verdicts: list[tuple[float, float]], reason: str) -> None:
    cs, groups = spa_candidates()
    config = cfg("spa-vl")
    order = candidate_pairs(Q, cs, groups, config, max_pairs=len(verdicts))
    pairwise = {pair: combine_orders(*v) for pair, v in zip(order, verdicts, strict=True)}
    sel = select_pairs(Q, cs, config, pairwise=pairwise, groups=groups)
    assert sel.pairs == () and sel.no_pair is not None
    assert sel.no_pair.reason == reason and sel.no_pair.question_id == Q
    assert len(sel.rankings) == len(cs)


def test_spa_vl_all_in_one_group_has_no_cross_group_pair() -> None:
    cs = [cand("a", 5, 3, model="m1"), cand("b", 1, 3, model="m2")]
    sel = select_pairs(Q, cs, cfg("spa-vl"), groups={"m1": 0, "m2": 0})
    assert sel.no_pair is not None and sel.no_pair.reason == NO_CROSS_GROUP


def test_spa_vl_winner_that_may_not_be_chosen_is_skipped() -> None:
    cs = [cand("a", 5, 3, model="m1", finish_reason="length"), cand("b", 1, 3, model="m2")]
    groups = {"m1": 1, "m2": 0}
    sel = select_pairs(Q, cs, cfg("spa-vl"), pairwise=consistent_for("a", "b"), groups=groups)
    assert sel.no_pair is not None and sel.no_pair.reason == NO_ELIGIBLE_CHOSEN
    # The loser may be truncated: it is only rejected.
    cs = [cand("a", 5, 3, model="m1"), cand("b", 1, 3, model="m2", finish_reason="length")]
    (pair,) = select_pairs(
        Q, cs, cfg("spa-vl"), pairwise=consistent_for("a", "b"), groups=groups
    ).pairs
    assert pair.chosen_response_id == "a"


def test_spa_vl_pairwise_stored_the_other_way_round_is_found() -> None:
    cs = [cand("a", 5, 3, model="m1"), cand("b", 1, 3, model="m2")]
    pairwise = consistent_for("b", "a", p=0.1)  # keyed (b, a): b loses
    (pair,) = select_pairs(Q, cs, cfg("spa-vl"), pairwise=pairwise, groups={"m1": 1, "m2": 0}).pairs
    assert pair.chosen_response_id == "a"
    assert pair.confidence == pytest.approx(0.8)
    found = lookup(pairwise, "a", "b")
    assert found is not None and found.p_x_better == pytest.approx(0.9)
    assert lookup(pairwise, "a", "c") is None


def test_spa_vl_same_model_fallback_and_unscored_margin() -> None:
    cs = [
        cand("a", 5, 3, model="m", sample_idx=0),
        Candidate("b", "m", 1, None, {}, "stop"),  # never rated: margin unknown
    ]
    pairwise = consistent_for("a", "b")
    (pair,) = select_pairs(Q, cs, cfg("spa-vl"), pairwise=pairwise, groups={"m": 0}).pairs
    assert pair.chosen_response_id == "a" and pair.margin is None
    sel = select_pairs(
        Q, cs, cfg("spa-vl", same_model_pairs=False), pairwise=pairwise, groups={"m": 0}
    )
    assert sel.no_pair is not None and sel.no_pair.reason == NO_CROSS_GROUP


def test_spa_vl_needs_groups() -> None:
    with pytest.raises(ValueError, match="safety groups"):
        select_pairs(Q, [cand("a"), cand("b")], cfg("spa-vl"))


# ----------------------------------------------------------------------------- max-margin


def test_max_margin_best_vs_worst() -> None:
    cs = [cand("a", 5, 4), cand("b", 1, 3), cand("c", 3, 3)]
    sel = select_pairs(Q, cs, cfg("max-margin"))
    (pair,) = sel.pairs
    w = score_weights(PairsStage())
    margin = overall_score(cs[0], w) - overall_score(cs[1], w)  # type: ignore[operator]
    assert (pair.chosen_response_id, pair.rejected_response_id) == ("a", "b")
    assert pair.margin == pytest.approx(margin)
    assert pair.confidence == pytest.approx(math.tanh(margin / 2))
    assert pair.consistent is None  # no pairwise verdict was asked
    assert [r.response_id for r in sel.rankings] == ["a", "c", "b"]


def test_max_margin_uses_pairwise_for_confidence_and_consistency() -> None:
    cs = [cand("a", 5, 4), cand("b", 1, 3)]
    (agreeing,) = select_pairs(Q, cs, cfg(), pairwise=consistent_for("a", "b", 0.9)).pairs
    (biased,) = select_pairs(Q, cs, cfg(), pairwise={("a", "b"): combine_orders(1.0, 1.0)}).pairs
    plain = math.tanh(agreeing.margin / 2)  # type: ignore[operator]
    assert agreeing.consistent is True
    assert agreeing.confidence == pytest.approx((plain + 0.8) / 2)
    assert biased.consistent is False
    assert biased.confidence == pytest.approx(plain / 2)


def test_max_margin_contradicted_pair_falls_back_to_the_next_margin() -> None:
    cs = [cand("a", 5, 4), cand("b", 1, 3), cand("c", 2, 3)]
    pairwise = consistent_for("b", "a")  # the judge prefers b over a in both orders
    (pair,) = select_pairs(Q, cs, cfg(), pairwise=pairwise).pairs
    assert (pair.chosen_response_id, pair.rejected_response_id) == ("a", "c")
    kept = select_pairs(Q, cs, cfg(drop_contradicted=False), pairwise=pairwise).pairs
    assert kept[0].rejected_response_id == "b" and kept[0].consistent is True


def test_max_margin_all_pairs_contradicted() -> None:
    cs = [cand("a", 5, 4), cand("b", 1, 3)]
    sel = select_pairs(Q, cs, cfg(), pairwise=consistent_for("b", "a"))
    assert sel.no_pair is not None and sel.no_pair.reason == PAIRWISE_CONTRADICTS


def test_max_margin_truncated_best_is_not_chosen() -> None:
    cs = [cand("a", 5, 4, finish_reason="length"), cand("b", 1, 3), cand("c", 4, 3)]
    (pair,) = select_pairs(Q, cs, cfg()).pairs
    assert (pair.chosen_response_id, pair.rejected_response_id) == ("c", "b")
    cs = [cand("a", 5, 4, finish_reason="content_filter"), cand("b", 1, 3)]
    sel = select_pairs(Q, cs, cfg())
    assert sel.no_pair is not None and sel.no_pair.reason == NO_ELIGIBLE_CHOSEN
    assert select_pairs(Q, cs, cfg(never_chosen=())).pairs


@pytest.mark.parametrize("policy", ["max-margin", "all-pairs"])
def test_all_refusals_are_all_tied(policy: str) -> None:
    refusals = [cand(f"r{i}", 5, 1, p_unsafe=0.0, faithful=2) for i in range(4)]
    sel = select_pairs(Q, refusals, cfg(policy))
    assert sel.pairs == () and sel.no_pair is not None and sel.no_pair.reason == ALL_TIED
    assert [r.rank for r in sel.rankings] == [1, 2, 3, 4]
    assert [r.response_id for r in sel.rankings] == ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("policy", ["spa-vl", "max-margin", "all-pairs"])
def test_no_and_one_response(policy: str) -> None:
    groups = {"m-a": 0}
    none = select_pairs(Q, [], cfg(policy), groups=groups)
    assert none.no_pair is not None and none.no_pair.reason == NO_RESPONSES and none.rankings == ()
    one = select_pairs(Q, [cand("a")], cfg(policy), groups=groups)
    assert one.no_pair is not None and one.no_pair.reason == ONE_RESPONSE
    assert [r.rank for r in one.rankings] == [1]


@pytest.mark.parametrize("policy", ["max-margin", "all-pairs"])
def test_missing_and_nan_judgments(policy: str) -> None:
    cs = [
        cand("a", 5, 4),
        cand("b", None, None),  # rating call failed
        cand("c", math.nan, 3.0, p_unsafe=0.2),  # NaN rating
        Candidate("d", "m", 0, math.nan, {"harmlessness": 1, "helpfulness": 1, "faithfulness": 1}),
    ]
    sel = select_pairs(Q, cs, cfg(policy))
    assert sel.no_pair is not None and sel.no_pair.reason == MISSING_JUDGMENTS
    assert sel.rankings[0].response_id == "a" and sel.rankings[0].overall is not None
    assert all(r.overall is None for r in sel.rankings[1:])
    assert [r.rank for r in sel.rankings] == [1, 2, 3, 4]


def test_below_min_margin() -> None:
    cs = [cand("a", 5, 4, p_unsafe=0.0), cand("b", 5, 3, p_unsafe=0.0)]  # 0.2 apart
    sel = select_pairs(Q, cs, cfg())
    assert sel.no_pair is not None and sel.no_pair.reason == BELOW_MIN_MARGIN
    (pair,) = select_pairs(Q, cs, cfg(min_margin=0.2)).pairs  # float noise forgiven at the edge
    assert pair.chosen_response_id == "a"


def test_same_model_pairs_switch() -> None:
    cs = [cand("a", 5, 4, model="m", sample_idx=0), cand("b", 1, 3, model="m", sample_idx=1)]
    assert select_pairs(Q, cs, cfg()).pairs[0].chosen_model == "m"
    sel = select_pairs(Q, cs, cfg(same_model_pairs=False))
    assert sel.no_pair is not None and sel.no_pair.reason == NO_CROSS_MODEL


# ----------------------------------------------------------------------------- all-pairs


def test_all_pairs_keeps_every_pair_above_the_margin_and_drops_ties() -> None:
    cs = [cand("a", 5, 4), cand("b", 5, 4), cand("c", 1, 3), cand("d", 3, 3)]
    sel = select_pairs(Q, cs, cfg("all-pairs"))
    got = {(p.chosen_response_id, p.rejected_response_id) for p in sel.pairs}
    assert got == {("a", "c"), ("b", "c"), ("a", "d"), ("b", "d"), ("d", "c")}  # a-b tied
    assert all(p.margin is not None and p.margin >= 0.5 for p in sel.pairs)
    margins = [p.margin for p in sel.pairs]
    assert margins == sorted(margins, reverse=True)  # type: ignore[type-var]
    assert all(p.policy == "all-pairs" for p in sel.pairs)
    assert len({p.pair_id for p in sel.pairs}) == len(sel.pairs)


def test_all_pairs_with_zero_min_margin_still_drops_ties() -> None:
    cs = [cand("a", 4, 4), cand("b", 4, 4), cand("c", 4, 3)]
    pairs = select_pairs(Q, cs, cfg("all-pairs", min_margin=0)).pairs
    assert {(p.chosen_response_id, p.rejected_response_id) for p in pairs} == {
        ("a", "c"),
        ("b", "c"),
    }


# ----------------------------------------------------------------------------- rankings and rows


def test_rankings_tie_break_is_deterministic() -> None:
    w = {"harmlessness": 1.0}
    cs = [
        Candidate("z", "m", 0, 0.3, {"harmlessness": 4, "helpfulness": 2}),
        Candidate("y", "m", 1, 0.1, {"harmlessness": 4, "helpfulness": 1}),  # safer: first
        Candidate("x", "m", 2, 0.3, {"harmlessness": 4, "helpfulness": 3}),  # more helpful
        Candidate("w", "m", 3, 0.3, {"harmlessness": 4, "helpfulness": 2}),  # id breaks the tie
        Candidate("v", "m", 4, 0.0, {}),  # unscored: last
    ]
    ranked = rank_candidates(Q, cs, w)
    assert [r.response_id for r in ranked] == ["y", "x", "w", "z", "v"]
    assert [r.rank for r in ranked] == [1, 2, 3, 4, 5]
    assert ranked[-1].overall is None and ranked[-1].harmlessness is None


def test_rows_fit_the_pairs_and_rankings_schemas() -> None:
    cs = [cand("a", 5, 4), cand("b", 1, 3), cand("c", 3, 3)]
    sel = select_pairs(Q, cs, cfg("all-pairs"))
    pairs = table([p.as_row("br") for p in sel.pairs], PAIRS)
    rankings = table([r.as_row("br") for r in sel.rankings], RANKINGS)
    assert pairs.num_rows == 3 and rankings.num_rows == 3
    assert rankings.column("rank").to_pylist() == [1, 2, 3]
    assert pairs.column("consistent").null_count == 3


def test_reasons_are_short_fixed_strings() -> None:
    assert len(set(NO_PAIR_REASONS)) == len(NO_PAIR_REASONS)
    assert all(r == r.lower() and len(r) <= 30 for r in NO_PAIR_REASONS)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("policy", ["spa-vl", "max-margin", "all-pairs"])
def test_same_inputs_same_outputs_in_any_candidate_order(policy: str) -> None:
    cs, groups = spa_candidates()
    config = cfg(policy)
    rng = random.Random(0)
    pairwise = {
        pair: combine_orders(rng.random(), rng.random())
        for pair in candidate_pairs(Q, cs, groups, config, max_pairs=10)
    }
    first = select_pairs(Q, cs, config, pairwise=pairwise, groups=groups)
    for _ in range(5):
        shuffled = cs[:]
        rng.shuffle(shuffled)
        assert select_pairs(Q, shuffled, config, pairwise=pairwise, groups=groups) == first


# ----------------------------------------------------------------------------- properties


rating = st.one_of(st.floats(min_value=1.0, max_value=5.0), st.just(math.nan))
candidates = st.lists(
    st.tuples(
        rating,
        rating,
        st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),
        st.sampled_from(["m1", "m2", "m3"]),
        st.sampled_from(["stop", "stop", "length"]),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(
    candidates,
    st.sampled_from(["max-margin", "all-pairs"]),
    st.floats(min_value=0.0, max_value=2.0),
    st.booleans(),
)
def test_rating_policies_choose_the_higher_overall(
    rows: list[tuple[float, float, float | None, str, str]],
    policy: str,
    min_margin: float,
    same_model: bool,
) -> None:
    cs = [
        Candidate(
            f"r{i}", model, i, p, {"harmlessness": h, "helpfulness": u, "faithfulness": 3.0}, fin
        )
        for i, (h, u, p, model, fin) in enumerate(rows)
    ]
    config = cfg(policy, min_margin=min_margin, same_model_pairs=same_model)
    w = score_weights(config)
    sel = select_pairs(Q, cs, config)
    overall = {c.response_id: overall_score(c, w) for c in cs}
    assert (sel.no_pair is None) == bool(sel.pairs)
    assert sel.no_pair is None or sel.no_pair.reason in NO_PAIR_REASONS
    assert sorted(r.rank for r in sel.rankings) == list(range(1, len(cs) + 1))
    for pair in sel.pairs:
        high, low = overall[pair.chosen_response_id], overall[pair.rejected_response_id]
        assert high is not None and low is not None
        assert high >= low
        assert pair.margin is not None and pair.margin >= min_margin - 1e-9 and pair.margin > 0
        assert 0.0 <= pair.confidence <= 1.0
    if policy == "max-margin":
        assert len(sel.pairs) <= 1


# ----------------------------------------------------------------------------- usable answers


def with_text(c: Candidate, text: str) -> Candidate:
    return dataclasses.replace(c, text_key=text_key(text))


def test_text_key_ignores_whitespace_and_marks_empty_answers() -> None:
    assert text_key("") is None and text_key(" \n\t ") is None and text_key(None) is None
    assert text_key("I can't  help\nwith that.") == text_key(" I can't help with that. ")
    assert text_key("I can't help.") != text_key("I cannot help.")


@pytest.mark.parametrize("policy", ["spa-vl", "max-margin", "all-pairs"])
def test_an_empty_answer_is_never_paired_ranked_or_sent_to_the_judge(policy: str) -> None:
    cs, groups = spa_candidates()
    cs = [with_text(c, "" if c.response_id == "r1" else f"answer {c.response_id}") for c in cs]
    config = cfg(policy, min_margin=0.0)
    asked = candidate_pairs(Q, cs, groups, config, max_pairs=100)
    assert asked and all("r1" not in pair for pair in asked)
    pairwise = {pair: combine_orders(0.9, 0.1) for pair in asked}
    sel = select_pairs(Q, cs, config, pairwise=pairwise, groups=groups)
    assert sel.pairs and all(
        "r1" not in (p.chosen_response_id, p.rejected_response_id) for p in sel.pairs
    )
    assert "r1" not in {r.response_id for r in sel.rankings}


@pytest.mark.parametrize("policy", ["spa-vl", "max-margin"])
def test_fewer_than_two_usable_answers_is_its_own_reason(policy: str) -> None:
    cs, groups = spa_candidates()
    cs = [with_text(c, "only me" if c.response_id == "r3" else "  ") for c in cs]
    sel = select_pairs(Q, cs, cfg(policy), groups=groups)
    assert sel.pairs == () and sel.no_pair is not None and sel.no_pair.reason == NO_USABLE


@pytest.mark.parametrize("policy", ["spa-vl", "max-margin"])
def test_two_answers_with_the_same_text_are_never_paired(policy: str) -> None:
    refusal = "I can't help with that."
    x = with_text(cand("x", 5, 1, model="a"), refusal)
    y = with_text(cand("y", 1, 1, model="b"), " I can't help   with that.")
    groups = {"a": 0, "b": 1}
    config = cfg(policy, min_margin=0.0)
    assert candidate_pairs(Q, [x, y], groups, config, max_pairs=10) == []
    sel = select_pairs(Q, [x, y], config, pairwise=consistent_for("x", "y"), groups=groups)
    assert sel.pairs == () and sel.no_pair is not None and sel.no_pair.reason == IDENTICAL
    # A third, different answer is paired with one of them instead.
    z = with_text(cand("z", 3, 3, model="c"), "Here is a safe overview.")
    groups["c"] = 2
    pairwise = {
        **consistent_for("x", "z"),
        **consistent_for("z", "y"),
        **consistent_for("x", "y"),
    }
    sel = select_pairs(Q, [x, y, z], config, pairwise=pairwise, groups=groups)
    assert sel.pairs
    for p in sel.pairs:
        assert {p.chosen_response_id, p.rejected_response_id} != {"x", "y"}
