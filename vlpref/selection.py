"""Pair selection: which responses the judge compares, which pairs are kept, every response ranked.

Pure functions over one question's `Candidate`s; no I/O.

Overall score (higher is better). With the weights of `PairsStage.weights`,

    overall = w_harm * harmlessness + w_help * helpfulness + w_faith * faithfulness
              + w_safety * (1 - P(unsafe))

ratings being expected ratings on 1-5. The defaults (1.0, 0.2, 0.04, 1.0) make it
harmlessness-dominant, SPA-VL's "harmlessness first, then helpfulness": a full 1->5 swing of
helpfulness and faithfulness together (4 * 0.24 = 0.96) is worth less than one harmlessness point,
and one point of overall is one harmlessness point. Only components with a positive weight that the
judge produced count (`score_weights`); a candidate missing any of them (a failed call, None, NaN)
has no overall score, is ranked after all scored ones, and takes part in no rating-based pair.

Policies (`PairsStage.policy`):

    spa-vl      SPA-VL: two responses from different safety groups; the both-orders pairwise
                verdict picks the chosen one. Pairs are tried in a pseudo-random order seeded by
                (seed, question id); an inconsistent or tied comparison, or a winner that may not
                be chosen, is skipped for the next pair. At most one pair per question.
                confidence = |2p - 1|, p = P(chosen better); margin = overall(chosen) -
                overall(rejected), which may be negative or None.
    max-margin  best vs worst by overall; dropped when the margin < min_margin.
    all-pairs   every pair with margin >= min_margin and > 0 (VLFeedback; ties dropped).

A rating-selected pair has confidence tanh(margin / 2) - the margin read as a Bradley-Terry logit,
so that |2 sigma(margin) - 1| matches the pairwise |2p - 1|. When a both-orders comparison of the
pair exists, confidence = (tanh(margin / 2) + max(0, 2p - 1)) / 2 and `consistent` records whether
the two orders agreed; with `drop_contradicted`, a pair whose two orders both prefer the rejected
response is dropped (max-margin then falls back to the next-largest margin).

Same-model pairs (two samples of one model, RLAIF-V: they differ in quality, not in style) are
allowed by `same_model_pairs` in the rating policies as any other pair; in spa-vl, where one model
is one safety group, they are tried only after every cross-group pair. A response whose
finish_reason is in `never_chosen` (truncated, content-filtered) may be rejected, never chosen.

Only usable answers are paired or ranked: a response whose text is empty or whitespace (a
`content_filter` stop that returned nothing, a model that answered nothing) takes part in no pair
and no ranking, and two responses with the same text (whitespace aside; two identical refusals)
are never paired with each other, so a published pair always has a non-empty `chosen` and
`rejected` that differ. Such responses stay in the responses table, with their judgments.

A question that yields no pair gets a `NoPair` with one of the reasons below.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vlpref.config import JudgeStage, PairsStage
from vlpref.judging import OrderedComparison
from vlpref.records import stable_id

POLICIES: Final = ("spa-vl", "max-margin", "all-pairs")
COMPONENTS: Final = ("harmlessness", "helpfulness", "faithfulness", "safety")

# NoPair reasons: short fixed strings, so they can be counted.
NO_RESPONSES: Final = "no responses"  # the question has no response at all
ONE_RESPONSE: Final = "one response"  # a single response: nothing to pair it with
MISSING_JUDGMENTS: Final = "missing judgments"  # fewer than two responses have every score
ALL_TIED: Final = "all tied"  # every scored response equal (or every pairwise verdict a 0.5 tie)
BELOW_MIN_MARGIN: Final = "below min margin"  # some difference, none reaching min_margin
NO_CROSS_MODEL: Final = "no cross-model pair"  # same-model pairs off; only those differed
NO_CROSS_GROUP: Final = "no cross-group pair"  # spa-vl: every response in one safety group
MISSING_PAIRWISE: Final = "missing pairwise"  # spa-vl: no both-orders verdict for any pair
PAIRWISE_INCONSISTENT: Final = "pairwise inconsistent"  # spa-vl: the orders disagreed every time
PAIRWISE_CONTRADICTS: Final = "pairwise contradicts ratings"  # every rating pair reversed
NO_ELIGIBLE_CHOSEN: Final = "no eligible chosen"  # every would-be chosen is in never_chosen
NO_USABLE: Final = "under two usable responses"  # the others are empty or whitespace
IDENTICAL: Final = "identical responses"  # every pair that could be kept has the same text twice
NO_PAIR_REASONS: Final = (
    NO_RESPONSES,
    ONE_RESPONSE,
    MISSING_JUDGMENTS,
    ALL_TIED,
    BELOW_MIN_MARGIN,
    NO_CROSS_MODEL,
    NO_CROSS_GROUP,
    MISSING_PAIRWISE,
    PAIRWISE_INCONSISTENT,
    PAIRWISE_CONTRADICTS,
    NO_ELIGIBLE_CHOSEN,
    NO_USABLE,
    IDENTICAL,
)

# Float noise allowed when comparing overall scores (sums of weighted expected ratings).
SCORE_EPSILON: Final = 1e-9


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Candidate:
    """One response to a question with its scores (None or NaN: not judged / judging failed).

    `text_key` identifies the answer's text (see `text_key`): None for an empty or whitespace
    answer, which is never paired; "" when unknown (every such candidate counts as distinct)."""

    response_id: str
    model: str
    sample_idx: int
    p_unsafe: float | None
    ratings: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "stop"
    text_key: str | None = ""

    @property
    def usable(self) -> bool:
        return self.text_key is not None

    def __post_init__(self) -> None:
        p = self.p_unsafe
        if p is not None and not math.isnan(p) and not 0.0 <= p <= 1.0:
            raise ValueError(f"{self.response_id}: p_unsafe {self.p_unsafe} is not in [0, 1]")
        for aspect, value in self.ratings.items():
            if not math.isnan(value) and not 1.0 <= value <= 5.0:
                raise ValueError(f"{self.response_id}: {aspect} rating {value} is not in [1, 5]")

    def component(self, name: str) -> float | None:
        """A score of the overall formula: `safety` = 1 - P(unsafe), else a rating."""
        value = self.p_unsafe if name == "safety" else self.ratings.get(name)
        if value is None or math.isnan(value):
            return None
        return 1.0 - value if name == "safety" else value


@dataclass(frozen=True, slots=True)
class SelectedPair:
    """A preference pair; `margin` = overall(chosen) - overall(rejected) (None when unscored),
    `consistent` None when no both-orders comparison was made."""

    question_id: str
    chosen_response_id: str
    rejected_response_id: str
    chosen_model: str
    rejected_model: str
    margin: float | None
    confidence: float
    consistent: bool | None
    policy: str

    @property
    def pair_id(self) -> str:
        return stable_id(
            "pair",
            self.question_id,
            self.chosen_response_id,
            self.rejected_response_id,
            self.policy,
        )

    def as_row(self, branch_id: str) -> dict[str, Any]:
        """A PAIRS row."""
        return {
            "pair_id": self.pair_id,
            "question_id": self.question_id,
            "chosen_response_id": self.chosen_response_id,
            "rejected_response_id": self.rejected_response_id,
            "chosen_model": self.chosen_model,
            "rejected_model": self.rejected_model,
            "margin": self.margin,
            "confidence": self.confidence,
            "consistent": self.consistent,
            "policy": self.policy,
            "branch_id": branch_id,
        }


@dataclass(frozen=True, slots=True)
class NoPair:
    """A question that yields no pair, and why (one of NO_PAIR_REASONS)."""

    question_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RankedResponse:
    """A response's place among its question's responses (rank 1 = best)."""

    question_id: str
    response_id: str
    model: str
    rank: int
    p_unsafe: float | None
    harmlessness: float | None
    helpfulness: float | None
    faithfulness: float | None
    overall: float | None

    def as_row(self, branch_id: str) -> dict[str, Any]:
        """A RANKINGS row."""
        return {
            "question_id": self.question_id,
            "response_id": self.response_id,
            "model": self.model,
            "rank": self.rank,
            "p_unsafe": self.p_unsafe,
            "harmlessness": self.harmlessness,
            "helpfulness": self.helpfulness,
            "faithfulness": self.faithfulness,
            "overall": self.overall,
            "branch_id": branch_id,
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """What one question yields: its pairs, or why there are none, and its ranking."""

    question_id: str
    pairs: tuple[SelectedPair, ...]
    no_pair: NoPair | None
    rankings: tuple[RankedResponse, ...]


# ----------------------------------------------------------------------------- scores


def score_weights(config: PairsStage, judge: JudgeStage | None = None) -> dict[str, float]:
    """The positive weights of `config`, limited to what `judge` produces when given (a run
    without the safety call scores without the safety term instead of scoring nothing)."""
    produced: Collection[str] = COMPONENTS
    if judge is not None:
        produced = {*judge.aspects, *(("safety",) if judge.safety else ())}
    weights = {k: w for k, w in config.weights.items() if w > 0 and k in produced}
    if not weights:
        raise ValueError("no positive weight for any score the judge produces")
    return weights


def overall_score(candidate: Candidate, weights: Mapping[str, float]) -> float | None:
    """sum_k w_k * s_k over the weighted components; None when any of them is missing."""
    total = 0.0
    for name, weight in weights.items():
        value = candidate.component(name)
        if value is None:
            return None
        total += weight * value
    return total


def safety_rates(candidates: Iterable[Candidate]) -> dict[str, float]:
    """Per model, the expected fraction of safe responses: mean(1 - P(unsafe)) over its judged
    responses. Models with no judged response are left out."""
    sums: dict[str, list[float]] = {}
    for c in candidates:
        safe = c.component("safety")
        if safe is not None:
            sums.setdefault(c.model, []).append(safe)
    return {model: sum(v) / len(v) for model, v in sorted(sums.items())}


def safety_groups(safety_rates: Mapping[str, float], k: int) -> dict[str, int]:
    """SPA-VL's safety groups: models sorted by safety rate (ties by name) and cut into
    min(k, n) equal-count groups; group 0 is the least safe. Model i of n goes to
    floor(i * k / n), so group sizes differ by at most one."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    for model, rate in safety_rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"safety rate of {model!r} is {rate}, expected a value in [0, 1]")
    ordered = sorted(safety_rates, key=lambda m: (safety_rates[m], m))
    n = len(ordered)
    groups = min(k, n)
    return {model: i * groups // n for i, model in enumerate(ordered)}


def rank_candidates(
    question_id: str, candidates: Sequence[Candidate], weights: Mapping[str, float]
) -> tuple[RankedResponse, ...]:
    """Every candidate, best first: overall descending, then P(unsafe) ascending, harmlessness and
    helpfulness descending, then response id; unscored candidates last."""

    def key(c: Candidate) -> tuple[bool, float, float, float, float, str]:
        overall = overall_score(c, weights)
        safe = c.component("safety")
        return (
            overall is None,
            -_or(overall, 0.0),
            -_or(safe, -1.0),  # P(unsafe) ascending, unjudged last
            -_or(c.component("harmlessness"), 0.0),
            -_or(c.component("helpfulness"), 0.0),
            c.response_id,
        )

    return tuple(
        RankedResponse(
            question_id=question_id,
            response_id=c.response_id,
            model=c.model,
            rank=rank,
            p_unsafe=None if c.component("safety") is None else c.p_unsafe,
            harmlessness=c.component("harmlessness"),
            helpfulness=c.component("helpfulness"),
            faithfulness=c.component("faithfulness"),
            overall=overall_score(c, weights),
        )
        for rank, c in enumerate(sorted(candidates, key=key), start=1)
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def text_key(text: str | None) -> str | None:
    """A short digest of an answer's text with whitespace runs collapsed; None when there is no
    text to train on (empty or whitespace only)."""
    words = (text or "").split()
    if not words:
        return None
    return hashlib.blake2b(" ".join(words).encode(), digest_size=12).hexdigest()


def same_text(x: Candidate, y: Candidate) -> bool:
    return bool(x.text_key) and x.text_key == y.text_key


# ----------------------------------------------------------------------------- pairs to judge


def candidate_pairs(
    question_id: str,
    candidates: Sequence[Candidate],
    groups: Mapping[str, int] | None,
    config: PairsStage,
    *,
    max_pairs: int,
    seed: int | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[tuple[str, str]]:
    """The (response_id_x, response_id_y) pairs the judge should compare in both orders, at most
    `max_pairs`, in the order `select_pairs` will try them.

    spa-vl: pairs of responses from different models, in a deterministic pseudo-random order (a
    hash of seed, question id and the two ids; `seed` defaults to `config.seed`), then same-model
    pairs if allowed. Deliberately *not* limited to different safety groups: groups are measured
    over all models, so adding a model would regroup the others and ask for new verdicts on pairs
    of old models. Ordered by a per-pair hash, adding a model can only add pairs that involve it
    (displacing others from the top `max_pairs`), never new pairs of old models; `select_pairs`
    then keeps the cross-group ones. Rating policies: the pairs a policy could keep, largest
    overall margin first - around the top and the bottom of the ranking - so the verdicts can
    confirm them (also stable: a pair's margin depends only on its two responses).
    """
    if max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
    _check_unique(candidates)
    candidates = [c for c in candidates if c.usable]  # never paid for: never published
    if config.policy == "spa-vl":
        seed = config.seed if seed is None else seed
        every_model_apart = {c.model: i for i, c in enumerate(candidates)}
        order = _spa_vl_order(
            question_id, candidates, every_model_apart, config.same_model_pairs, seed
        )
        order = [(x, y) for x, y in order if not same_text(x, y)]
        return [(x.response_id, y.response_id) for x, y in order[:max_pairs]]
    scored = _scored(candidates, weights or score_weights(config))
    kept = [
        p for p in _rated_pairs(scored, config) if p.margin >= config.min_margin - SCORE_EPSILON
    ]
    kept = [p for p in kept if _may_be_chosen(p.high, config) and not same_text(p.high, p.low)]
    return [(p.high.response_id, p.low.response_id) for p in kept[:max_pairs]]


def group_edges(rates: Mapping[str, float], k: int, margin: float) -> set[str]:
    """The models whose safety group hinges on small differences: each within `margin` of the
    rate of a model on the other side of a group boundary (`safety_groups` with `k`), so that a
    shift of that size could move it across. Empty when `margin` is 0."""
    if margin <= 0 or not rates:
        return set()
    groups = safety_groups(rates, k)
    ordered = sorted(rates, key=lambda m: (rates[m], m))
    edges: set[str] = set()
    for low, high in itertools.pairwise(ordered):
        if groups[low] == groups[high]:
            continue
        edges.update(
            m for m in ordered if groups[m] <= groups[low] and rates[m] >= rates[high] - margin
        )
        edges.update(
            m for m in ordered if groups[m] >= groups[high] and rates[m] <= rates[low] + margin
        )
    return edges


@dataclass(frozen=True, slots=True)
class Hinge:
    """Where one question's published pairs hinge, given the comparisons made so far (tiered
    judging, tasks/judge.py): `ask`, the candidate pairs the selection needs compared next;
    `publishable`, the responses that can end up in a published pair."""

    ask: tuple[tuple[str, str], ...]
    publishable: frozenset[str]


def hinge(
    question_id: str,
    candidates: Sequence[Candidate],
    pairs: Sequence[tuple[str, str]],
    groups: Mapping[str, int],
    config: PairsStage,
    pairwise: Mapping[tuple[str, str], OrderedComparison],
    asked: Collection[tuple[str, str]] = (),
) -> Hinge:
    """What the selection of one question still needs from the judge that decides, among the
    candidate `pairs` (`candidate_pairs`) and with the comparisons `pairwise` made so far (pairs
    in `asked` without a comparison failed: skipped, as `select_pairs` skips them).

    spa-vl walks its order as `select_pairs` does and stops at the first pair it cannot judge
    yet: that pair is asked next, alone, so that the pairs after the one that decides are never
    compared; once a pair decides, its two responses are the publishable ones. The same
    comparisons therefore give the same pair as comparing every candidate up front. Rating
    policies keep pairs by overall margin, so every candidate pair may be kept: all are asked,
    and their responses are publishable."""
    members = frozenset(r for pair in pairs for r in pair)
    if config.policy != "spa-vl":
        missing = tuple(
            (x, y) for x, y in pairs if lookup(pairwise, x, y) is None and (x, y) not in asked
        )
        return Hinge(missing, members)
    usable = [c for c in candidates if c.usable]
    wanted = {frozenset(p) for p in pairs}
    done = {frozenset(p) for p in asked}
    order = _spa_vl_order(question_id, usable, groups, config.same_model_pairs, config.seed)
    for x, y in order:
        if same_text(x, y) or frozenset((x.response_id, y.response_id)) not in wanted:
            continue
        comparison = lookup(pairwise, x.response_id, y.response_id)
        if comparison is None:
            if frozenset((x.response_id, y.response_id)) in done:
                continue  # asked and failed: no verdict to walk on (a rerun asks again)
            return Hinge(((x.response_id, y.response_id),), frozenset())
        if comparison.tied or not comparison.consistent or comparison.winner is None:
            continue
        chosen = x if comparison.winner == "x" else y
        if _may_be_chosen(chosen, config):
            return Hinge((), frozenset((x.response_id, y.response_id)))
    return Hinge((), frozenset())


@dataclass(frozen=True, slots=True)
class _RatedPair:
    high: Candidate
    low: Candidate
    margin: float


def _spa_vl_order(
    question_id: str,
    candidates: Sequence[Candidate],
    groups: Mapping[str, int],
    same_model_pairs: bool,
    seed: int,
) -> list[tuple[Candidate, Candidate]]:
    ordered = sorted(candidates, key=lambda c: c.response_id)
    cross: list[tuple[Candidate, Candidate]] = []
    same: list[tuple[Candidate, Candidate]] = []
    for i, x in enumerate(ordered):
        for y in ordered[i + 1 :]:
            gx, gy = groups.get(x.model), groups.get(y.model)
            if gx is not None and gy is not None and gx != gy:
                cross.append((x, y))
            elif same_model_pairs and x.model == y.model and x.sample_idx != y.sample_idx:
                same.append((x, y))

    # A hash per pair, not a shuffle: a pair's place does not depend on which others exist.
    def draw(pair: tuple[Candidate, Candidate]) -> str:
        return stable_id("spa-vl", seed, question_id, pair[0].response_id, pair[1].response_id)

    return sorted(cross, key=draw) + sorted(same, key=draw)


def _scored(
    candidates: Sequence[Candidate], weights: Mapping[str, float]
) -> list[tuple[Candidate, float]]:
    scored = []
    for c in candidates:
        overall = overall_score(c, weights)
        if overall is not None:
            scored.append((c, overall))
    return scored


def _rated_pairs(scored: Sequence[tuple[Candidate, float]], config: PairsStage) -> list[_RatedPair]:
    """Every pair with a positive margin, oriented high -> low, largest margin first (ties by
    ids), without same-model pairs unless allowed."""
    pairs = []
    for i, (x, sx) in enumerate(scored):
        for y, sy in scored[i + 1 :]:
            if x.model == y.model and not config.same_model_pairs:
                continue
            if abs(sx - sy) <= SCORE_EPSILON:
                continue  # a tie says nothing about preference
            high, low = (x, y) if sx > sy else (y, x)
            pairs.append(_RatedPair(high, low, abs(sx - sy)))
    return sorted(pairs, key=lambda p: (-p.margin, p.high.response_id, p.low.response_id))


def _may_be_chosen(candidate: Candidate, config: PairsStage) -> bool:
    return candidate.finish_reason not in config.never_chosen


def _check_unique(candidates: Sequence[Candidate]) -> None:
    ids = [c.response_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError("candidates must have distinct response ids")


def lookup(
    pairwise: Mapping[tuple[str, str], OrderedComparison], x: str, y: str
) -> OrderedComparison | None:
    """The comparison of (x, y) from x's side, whichever way round it was stored."""
    found = pairwise.get((x, y))
    if found is not None:
        return found
    reverse = pairwise.get((y, x))
    return None if reverse is None else reverse.swapped()


# ----------------------------------------------------------------------------- selection


def select_pairs(
    question_id: str,
    candidates: Sequence[Candidate],
    config: PairsStage,
    *,
    pairwise: Mapping[tuple[str, str], OrderedComparison] | None = None,
    groups: Mapping[str, int] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Selection:
    """Apply `config.policy` to one question: its pairs (or a NoPair) and its ranking.

    `pairwise` maps (response_id_x, response_id_y) to the both-orders comparison (either key
    order is found); `groups` maps models to safety groups (needed by spa-vl); `weights` default to
    `score_weights(config)`. Same inputs, same output.
    """
    _check_unique(candidates)
    weights = weights or score_weights(config)
    pairwise = pairwise or {}
    usable = [c for c in candidates if c.usable]
    rankings = rank_candidates(question_id, usable, weights)
    if not candidates:
        return _none(question_id, NO_RESPONSES, rankings)
    if len(candidates) == 1:
        return _none(question_id, ONE_RESPONSE, rankings)
    if len(usable) < 2:
        return _none(question_id, NO_USABLE, rankings)
    candidates = usable
    if config.policy == "spa-vl":
        if groups is None:
            raise ValueError("the spa-vl policy needs safety groups (see safety_groups)")
        found = _select_spa_vl(question_id, candidates, config, pairwise, groups, weights)
    else:
        found = _select_by_rating(question_id, candidates, config, pairwise, weights)
    if isinstance(found, str):
        return _none(question_id, found, rankings)
    return Selection(question_id, tuple(found), None, rankings)


def _none(question_id: str, reason: str, rankings: tuple[RankedResponse, ...]) -> Selection:
    return Selection(question_id, (), NoPair(question_id, reason), rankings)


# How far a spa-vl attempt got, for the NoPair reason: the furthest any pair reached.
_SPA_VL_STOPS: Final = (MISSING_PAIRWISE, ALL_TIED, PAIRWISE_INCONSISTENT, NO_ELIGIBLE_CHOSEN)


def _select_spa_vl(
    question_id: str,
    candidates: Sequence[Candidate],
    config: PairsStage,
    pairwise: Mapping[tuple[str, str], OrderedComparison],
    groups: Mapping[str, int],
    weights: Mapping[str, float],
) -> list[SelectedPair] | str:
    order = _spa_vl_order(question_id, candidates, groups, config.same_model_pairs, config.seed)
    if not order:
        return NO_CROSS_GROUP
    order = [(x, y) for x, y in order if not same_text(x, y)]
    if not order:
        return IDENTICAL
    reached = 0
    for x, y in order:
        comparison = lookup(pairwise, x.response_id, y.response_id)
        if comparison is None:
            continue
        if comparison.tied:
            reached = max(reached, 1)
            continue
        if not comparison.consistent or comparison.winner is None:
            reached = max(reached, 2)
            continue
        chosen, rejected = (x, y) if comparison.winner == "x" else (y, x)
        if not _may_be_chosen(chosen, config):
            reached = max(reached, 3)
            continue
        p_chosen = comparison.p_x_better if chosen is x else 1.0 - comparison.p_x_better
        high, low = overall_score(chosen, weights), overall_score(rejected, weights)
        pair = SelectedPair(
            question_id=question_id,
            chosen_response_id=chosen.response_id,
            rejected_response_id=rejected.response_id,
            chosen_model=chosen.model,
            rejected_model=rejected.model,
            margin=None if high is None or low is None else high - low,
            confidence=abs(2.0 * p_chosen - 1.0),
            consistent=True,
            policy="spa-vl",
        )
        return [pair]
    return _SPA_VL_STOPS[reached]


def _select_by_rating(
    question_id: str,
    candidates: Sequence[Candidate],
    config: PairsStage,
    pairwise: Mapping[tuple[str, str], OrderedComparison],
    weights: Mapping[str, float],
) -> list[SelectedPair] | str:
    scored = _scored(candidates, weights)
    if len(scored) < 2:
        return MISSING_JUDGMENTS
    values = [s for _, s in scored]
    if max(values) - min(values) <= SCORE_EPSILON:
        return ALL_TIED
    pairs = _rated_pairs(scored, config)
    if not pairs:
        return NO_CROSS_MODEL  # differences exist, so only the same-model rule removed them
    pairs = [p for p in pairs if not same_text(p.high, p.low)]
    if not pairs:
        return IDENTICAL
    pairs = [p for p in pairs if p.margin >= config.min_margin - SCORE_EPSILON]
    if not pairs:
        return BELOW_MIN_MARGIN
    pairs = [p for p in pairs if _may_be_chosen(p.high, config)]
    if not pairs:
        return NO_ELIGIBLE_CHOSEN
    selected = []
    for p in pairs:
        comparison = lookup(pairwise, p.high.response_id, p.low.response_id)
        if config.drop_contradicted and comparison is not None and _reversed(comparison):
            continue
        selected.append(_rating_pair(question_id, p, comparison, config.policy))
        if config.policy == "max-margin":
            break
    return selected or PAIRWISE_CONTRADICTS


def _reversed(comparison: OrderedComparison) -> bool:
    """Both orders agree that the lower-rated response (y) is better."""
    return comparison.consistent and comparison.winner == "y"


def _rating_pair(
    question_id: str, pair: _RatedPair, comparison: OrderedComparison | None, policy: str
) -> SelectedPair:
    confidence = math.tanh(pair.margin / 2.0)
    if comparison is not None:
        agreement = max(0.0, 2.0 * comparison.p_x_better - 1.0)
        confidence = (confidence + agreement) / 2.0
    return SelectedPair(
        question_id=question_id,
        chosen_response_id=pair.high.response_id,
        rejected_response_id=pair.low.response_id,
        chosen_model=pair.high.model,
        rejected_model=pair.low.model,
        margin=pair.margin,
        confidence=confidence,
        consistent=None if comparison is None else comparison.consistent,
        policy=policy,
    )
