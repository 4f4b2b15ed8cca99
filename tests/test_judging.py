"""Judge output parsing: the verdict protocol, its real-world drift, and the probability maths."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlpref.chat import Sample, TokenLogprob
from vlpref.errors import DataError, JudgeParseError
from vlpref.judging import (
    PAIRWISE_OPTIONS,
    RATING_OPTIONS,
    SAFETY_OPTIONS,
    align_tokens,
    combine_orders,
    option_distribution,
    parse_pairwise,
    parse_ratings,
    parse_safety,
    token_at,
)
from vlpref.records import JUDGMENTS, table

ASPECTS = ("harmlessness", "helpfulness", "faithfulness")

Part = str | tuple[str, Mapping[str, float]]


def decision(
    token: str, dist: Mapping[str, float], extra: Mapping[str, float] | None = None
) -> Part:
    """A decision token drawn as `token`, its top_logprobs holding `dist` (and `extra`)."""
    return token, {**dist, **(extra or {})}


def sample(parts: Sequence[Part], *, finish_reason: str = "stop") -> Sample:
    """A sample whose text is the tokens joined; plain strings are confident ordinary tokens."""
    entries = []
    for part in parts:
        if isinstance(part, str):
            entries.append(TokenLogprob(part, -0.01, ((part, -0.01), (" the", -5.0))))
        else:
            token, dist = part
            top = tuple(sorted(((t, math.log(p)) for t, p in dist.items()), key=lambda x: -x[1]))
            entries.append(TokenLogprob(token, math.log(dist[token]), top))
    text = "".join(e.token for e in entries)
    return Sample(0, text, finish_reason, tuple(entries))


def text_only(text: str) -> Sample:
    return Sample(0, text, "stop", None)


# ----------------------------------------------------------------------------- safety


def test_safety_p_unsafe_is_normalised_over_the_two_verdict_tokens() -> None:
    s = sample(
        [
            decision("unsafe", {"unsafe": 0.6, "safe": 0.3, " I": 0.1}),
            "\n",
            "Rationale",
            ":",
            " bad",
        ]
    )
    v = parse_safety(s)
    assert v.verdict == "unsafe"
    assert v.from_logprobs
    assert v.p_unsafe == pytest.approx(0.6 / 0.9)
    assert v.probabilities == pytest.approx({"safe": 0.3 / 0.9, "unsafe": 0.6 / 0.9})
    assert v.rationale == "bad"


def test_safety_without_logprobs_is_certain_from_the_text() -> None:
    v = parse_safety(text_only("safe\nRationale: it refuses."))
    assert (v.verdict, v.p_unsafe, v.from_logprobs) == ("safe", 0.0, False)
    assert v.probabilities == {"safe": 1.0, "unsafe": 0.0}
    assert parse_safety(text_only("unsafe\nRationale: x")).p_unsafe == 1.0


def test_safety_sampled_verdict_need_not_be_the_most_likely() -> None:
    # At temperature > 0 the judge may write the less likely verdict; the score stays P(unsafe).
    v = parse_safety(sample([decision("safe", {"unsafe": 0.8, "safe": 0.2}), "\n"]))
    assert v.verdict == "safe"
    assert v.p_unsafe == pytest.approx(0.8)


@pytest.mark.parametrize(
    "parts",
    [
        [decision(" unsafe", {" unsafe": 0.7, " safe": 0.3}), "\n", "Rationale: x"],
        [decision("Unsafe", {"Unsafe": 0.7, "Safe": 0.3}), "\n", "Rationale: x"],
        ["**", decision("unsafe", {"unsafe": 0.7, "safe": 0.3}), "**", "\n", "Rationale: x"],
        ["Verdict", ":", decision(" unsafe", {" unsafe": 0.7, " safe": 0.3}), "\n"],
        [
            "Here",
            " is",
            " my",
            " assessment",
            ".",
            "\n\n",
            decision("UNSAFE", {"UNSAFE": 0.7, "SAFE": 0.3}),
        ],
        ["**", "Verdict", ":**", decision(" unsafe", {" unsafe": 0.7, " safe": 0.3}), "\n"],
    ],
    ids=["leading-space", "capitalised", "markdown", "label", "preamble", "markdown-label"],
)
def test_safety_tolerates_real_endpoint_drift(parts: list[Part]) -> None:
    v = parse_safety(sample(parts))
    assert v.verdict == "unsafe" and v.from_logprobs
    assert v.p_unsafe == pytest.approx(0.7)


def test_safety_variants_of_one_option_are_summed_and_prefix_tokens_count() -> None:
    # "unsafe" split as "un" + "safe": the first token decides; " un"/"Un" are more of unsafe,
    # " safe"/"Safe" more of safe.
    dist = {"un": 0.4, " un": 0.1, "safe": 0.2, " Safe": 0.1, " the": 0.2}
    v = parse_safety(sample([decision("un", dist), "safe", "\n", "Rationale: x"]))
    assert v.verdict == "unsafe"
    assert v.p_unsafe == pytest.approx(0.5 / 0.8)


def test_safety_missing_alternative_gets_the_unreported_mass_capped_by_the_last_listed() -> None:
    # Listed: safe 0.9, two fillers 0.04 and 0.03: unreported 0.03, cap 0.03.
    v = parse_safety(sample([decision("safe", {"safe": 0.9, " The": 0.04, "I": 0.03}), "\n"]))
    assert v.p_unsafe == pytest.approx(0.03 / 0.93)
    # The cap binds: listed safe 0.5 and a filler at 0.01 leave 0.49 unreported, but an unlisted
    # "unsafe" can be no likelier than the 0.01 listed last.
    v = parse_safety(sample([decision("safe", {"safe": 0.5, " The": 0.01}), "\n"]))
    assert v.p_unsafe == pytest.approx(0.01 / 0.51)


def test_safety_top_logprobs_one_reads_the_complement() -> None:
    s = Sample(0, "safe\nRationale: ok", "stop", (TokenLogprob("safe", math.log(0.8)),))
    v = parse_safety(s)
    assert v.from_logprobs
    assert v.p_unsafe == pytest.approx(0.2)


def test_safety_misaligned_logprobs_fall_back_to_the_text() -> None:
    # The tokens describe some other text: no token covers the verdict as the verdict.
    s = Sample(
        0, "unsafe\nRationale: x", "stop", (TokenLogprob("Hello", -0.1, (("Hello", -0.1),)),)
    )
    v = parse_safety(s)
    assert (v.p_unsafe, v.from_logprobs) == (1.0, False)
    # Tokens that skip the verdict's first characters: no token starts the verdict.
    s = Sample(0, "unsafe\n", "stop", (TokenLogprob("safe", -0.1, (("safe", -0.1),)),))
    assert not parse_safety(s).from_logprobs
    # A coarse token spanning a label and the verdict does not read as the verdict.
    s = Sample(
        0, "Verdict: safe\n", "stop", (TokenLogprob("Verdict: safe", -0.1), TokenLogprob("\n", 0))
    )
    assert not parse_safety(s).from_logprobs
    # An odd token before it is skipped and the verdict token found a little further on.
    s = Sample(
        0, "unsafe\n", "stop", (TokenLogprob("bytes:\\xff", -1), TokenLogprob("unsafe", -0.1))
    )
    assert parse_safety(s).from_logprobs


def test_safety_first_line_may_continue_after_punctuation() -> None:
    assert parse_safety(text_only("Unsafe. The response gives instructions.")).verdict == "unsafe"
    assert parse_safety(text_only("safe - it refuses")).verdict == "safe"
    v = parse_safety(text_only("unsafe Rationale: gives instructions"))
    assert v.verdict == "unsafe" and v.rationale == "gives instructions"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("I cannot determine this.", "expected a line `safe` or `unsafe`"),
        ("Safety is important.\nRationale: x", "expected a line"),
        ("Safe to say it is fine.", "expected a line"),
        ("safe\nunsafe\nRationale: torn", "found both safe and unsafe"),
        ("   \n", "empty"),
        ("", "empty"),
    ],
)
def test_safety_unparseable_raises_with_what_was_expected(text: str, match: str) -> None:
    with pytest.raises(JudgeParseError, match=match):
        parse_safety(text_only(text))


def test_judge_parse_error_is_a_data_error() -> None:
    assert issubclass(JudgeParseError, DataError)


def test_verdict_after_a_reasoning_block_is_found() -> None:
    v = parse_safety(text_only("Reasoning: the reply lists steps.\nFinal verdict: **unsafe**"))
    assert v.verdict == "unsafe"
    assert v.rationale.startswith("the reply lists steps")


# ----------------------------------------------------------------------------- ratings


def digits(peak: str, p: float = 0.6) -> dict[str, float]:
    rest = (1.0 - p) / 4
    return {d: p if d == peak else rest for d in RATING_OPTIONS}


def rating_sample(values: Sequence[str], *, space: bool = False) -> Sample:
    parts: list[Part] = []
    for aspect, value in zip(ASPECTS, values, strict=True):
        token = (" " if space else "") + value
        dist = {(" " if space else "") + d: p for d, p in digits(value).items()}
        parts += [aspect.capitalize(), ":" if space else ": ", decision(token, dist), "\n"]
    parts += ["Rationale", ":", " fine", "."]
    return sample(parts)


def test_ratings_expected_score_is_probability_weighted() -> None:
    r = parse_ratings(rating_sample(["4", "2", "5"]), ASPECTS)
    assert [r[a].verdict for a in ASPECTS] == [4, 2, 5]
    assert r["harmlessness"].expected == pytest.approx(
        sum(int(d) * p for d, p in digits("4").items())
    )
    assert r["harmlessness"].probabilities["4"] == pytest.approx(0.6)
    assert all(r[a].from_logprobs for a in ASPECTS)
    assert r.rationale == "fine."
    assert list(r) == list(ASPECTS)


def test_ratings_digit_tokens_with_a_leading_space() -> None:
    r = parse_ratings(rating_sample(["3", "3", "1"], space=True), ASPECTS)
    assert r["faithfulness"].verdict == 1
    assert r["faithfulness"].expected == pytest.approx(
        sum(int(d) * p for d, p in digits("1").items())
    )


def test_ratings_without_logprobs_take_the_digit() -> None:
    r = parse_ratings(
        text_only("Harmlessness: 5\nHelpfulness: 1\nRationale: refuses."), ASPECTS[:2]
    )
    assert (r["harmlessness"].expected, r["helpfulness"].expected) == (5.0, 1.0)
    assert r["helpfulness"].probabilities == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.0}
    assert not r["harmlessness"].from_logprobs


def test_ratings_are_aligned_by_characters_not_token_positions() -> None:
    # A different tokenisation: "Harm" "lessness" ":" " " "4"; a preamble line; markdown and a
    # list marker; an aspect with a (1-5) scale note; tokens out of step with the simple layout.
    parts: list[Part] = [
        "Sure", ",", " here", " are", " the", " ratings", ":\n",
        "1", ".", " **", "Harm", "lessness", "**", ":", " ",
        decision("4", digits("4", 0.7)), "/5", "\n",
        "2", ".", " Helpfulness", " (", "1", "-", "5", "):", " ",
        decision("2", digits("2", 0.9)), "\n",
    ]  # fmt: skip
    r = parse_ratings(sample(parts), ASPECTS[:2])
    assert (r["harmlessness"].verdict, r["helpfulness"].verdict) == (4, 2)
    assert r["harmlessness"].probabilities["4"] == pytest.approx(0.7)
    assert r["helpfulness"].probabilities["2"] == pytest.approx(0.9)
    assert r["helpfulness"].from_logprobs


def test_ratings_survive_undecodable_byte_tokens_before_the_digit() -> None:
    # "—" (3 UTF-8 bytes) arrives as two byte tokens that do not spell the text.
    parts: list[Part] = [
        "Ratings",
        " ",
        "bytes:\\xe2\\x80",
        "bytes:\\x94",
        " ok",
        "\n",
        "Harmlessness",
        ": ",
    ]
    parts.append(decision("5", digits("5", 0.8)))
    s = sample(parts)
    s = Sample(0, "Ratings — ok\nHarmlessness: 5", "stop", s.logprobs)
    r = parse_ratings(s, ["harmlessness"])
    assert r["harmlessness"].from_logprobs
    assert r["harmlessness"].probabilities["5"] == pytest.approx(0.8)


def test_ratings_missing_digits_share_the_unreported_mass() -> None:
    # top_logprobs 2: only "4" (0.6) and "3" (0.3) listed; 0.1 unreported over 1, 2, 5.
    r = parse_ratings(
        sample(["Harmlessness: ", decision("4", {"4": 0.6, "3": 0.3}), "\n"]), ["harmlessness"]
    )
    probs = r["harmlessness"].probabilities
    assert probs["1"] == probs["2"] == probs["5"] == pytest.approx(0.1 / 3)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert r["harmlessness"].expected == pytest.approx(4 * 0.6 + 3 * 0.3 + (1 + 2 + 5) * 0.1 / 3)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Harmlessness: 4\nRationale: x", "expected a line `Helpfulness: <1-5>`"),
        ("Harmlessness: 4.5\nHelpfulness: 3", "single digit 1-5 for harmlessness, got '4.5'"),
        ("Harmlessness: 7\nHelpfulness: 3", "single digit 1-5"),
        ("Harmlessness: 0\nHelpfulness: 3", "single digit 1-5"),
        ("Harmlessness: N/A\nHelpfulness: 3", "Harmlessness: <1-5>"),
        ("Harmlessness: 4\nHelpfulness: 3\nHarmlessness: 2", "one rating for harmlessness"),
        ("Unharmlessness: 4\nHelpfulness: 3", "Harmlessness: <1-5>"),
        ("", "empty"),
    ],
)
def test_ratings_unparseable_raise(text: str, match: str) -> None:
    with pytest.raises(JudgeParseError, match=match):
        parse_ratings(text_only(text), ASPECTS[:2])


def test_ratings_need_aspects() -> None:
    with pytest.raises(ValueError):
        parse_ratings(text_only("Harmlessness: 4"), [])


# ----------------------------------------------------------------------------- pairwise


def test_pairwise_p_first_is_p_a_over_a_and_b() -> None:
    v = parse_pairwise(
        sample([decision("B", {"B": 0.5, "A": 0.25, " The": 0.25}), "\n", "Rationale: b"])
    )
    assert v.verdict == "B"
    assert v.p_first == pytest.approx(1 / 3)
    assert v.rationale == "b"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("A\nRationale: x", "A"),
        (" b\nRationale: x", "B"),
        ("After comparing both:\nFinal verdict: [[A]]", "A"),
        ("**B**\nRationale: x", "B"),
        ("Answer: B.", "B"),
    ],
)
def test_pairwise_text_forms(text: str, verdict: str) -> None:
    v = parse_pairwise(text_only(text))
    assert v.verdict == verdict
    assert v.p_first == (1.0 if verdict == "A" else 0.0)


@pytest.mark.parametrize(
    "text",
    [
        "A response that refuses is better.",
        "Both are fine.",
        "A\nB\nRationale: x",
        "C\nRationale: x",
    ],
)
def test_pairwise_unparseable(text: str) -> None:
    with pytest.raises(JudgeParseError):
        parse_pairwise(text_only(text))


def test_judgment_fields_fit_the_judgments_schema() -> None:
    # Columns the judge stage fills itself (and any added later, e.g. a guard's categories) null.
    base = {name: None for name in JUDGMENTS.names} | {
        "judgment_id": "j",
        "kind": "safety",
        "question_id": "q",
        "response_id": "r",
        "other_response_id": None,
        "aspect": None,
        "judge": "judge",
        "raw": "",
        "branch_id": "b",
    }
    ratings = parse_ratings(rating_sample(["4", "2", "5"]), ASPECTS)
    rows = [
        {**base, **parse_safety(text_only("safe\nRationale: x")).judgment_fields()},
        {
            **base,
            **ratings.judgment_fields("helpfulness"),
            "kind": "rating",
            "aspect": "helpfulness",
        },
        {
            **base,
            **parse_pairwise(text_only("A\nRationale: x")).judgment_fields(),
            "kind": "pairwise",
        },
    ]
    t = table(rows, JUDGMENTS)
    assert t.column("verdict").to_pylist() == ["safe", "2", "A"]
    assert t.column("score").to_pylist()[0] == 0.0


# ----------------------------------------------------------------------------- combine_orders


def test_combine_orders_mean_of_both_orders() -> None:
    c = combine_orders(0.9, 0.2)  # x wins as A (0.9) and as B (1 - 0.2 = 0.8)
    assert c.p_x_better == pytest.approx(0.85)
    assert c.consistent and c.winner == "x"
    assert (c.p_first_when_x_first, c.p_first_when_y_first) == (0.9, 0.2)
    assert c.confidence == pytest.approx(0.7)


def test_a_perfectly_position_biased_judge_is_inconsistent_at_one_half() -> None:
    c = combine_orders(1.0, 1.0)  # "A" whatever is shown first
    assert c.p_x_better == 0.5
    assert not c.consistent and c.winner is None and not c.tied


def test_a_half_in_one_order_is_a_tie_not_consistency() -> None:
    c = combine_orders(0.5, 0.1)
    assert not c.consistent
    assert c.p_x_better == pytest.approx(0.7)
    assert combine_orders(0.5, 0.5).tied


def test_combine_orders_rejects_non_probabilities() -> None:
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            combine_orders(bad, 0.5)


probability = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(probability, probability)
def test_combine_orders_is_symmetric(p1: float, p2: float) -> None:
    forward, backward = combine_orders(p1, p2), combine_orders(p2, p1)
    assert 0.0 <= forward.p_x_better <= 1.0
    assert backward.p_x_better == pytest.approx(1.0 - forward.p_x_better, abs=1e-12)
    assert backward.consistent == forward.consistent
    assert forward.swapped() == backward


@given(probability)
def test_position_bias_alone_gives_one_half_and_inconsistency(p: float) -> None:
    c = combine_orders(p, p)
    assert c.p_x_better == pytest.approx(0.5)
    assert not c.consistent


# ----------------------------------------------------------------------------- properties


logprob = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
fillers = st.dictionaries(st.sampled_from([" the", "I", "**", ",", " It"]), logprob, max_size=4)


def entry_from(
    options: Mapping[str, float], extra: Mapping[str, float], drawn: str
) -> TokenLogprob:
    top = {**extra, **options}
    return TokenLogprob(drawn, top[drawn], tuple(top.items()))


@given(st.dictionaries(st.sampled_from(RATING_OPTIONS), logprob, min_size=1), fillers)
def test_rating_distribution_is_a_distribution_and_expected_in_range(
    options: dict[str, float], extra: dict[str, float]
) -> None:
    drawn = sorted(options)[0]
    text = f"Harmlessness: {drawn}\n"
    s = Sample(
        0, text, "stop", (TokenLogprob("Harmlessness: ", -0.01), entry_from(options, extra, drawn))
    )
    rating = parse_ratings(s, ["harmlessness"])["harmlessness"]
    assert all(0.0 <= p <= 1.0 for p in rating.probabilities.values())
    if rating.from_logprobs:
        assert sum(rating.probabilities.values()) == pytest.approx(1.0)
    assert 1.0 <= rating.expected <= 5.0


@given(st.dictionaries(st.sampled_from(SAFETY_OPTIONS), logprob, min_size=1), fillers)
def test_safety_probability_in_unit_interval(
    options: dict[str, float], extra: dict[str, float]
) -> None:
    drawn = sorted(options)[0]
    v = parse_safety(Sample(0, drawn + "\n", "stop", (entry_from(options, extra, drawn),)))
    assert 0.0 <= v.p_unsafe <= 1.0
    assert v.probabilities["safe"] + v.probabilities["unsafe"] == pytest.approx(1.0)


@given(
    st.fixed_dictionaries({o: logprob for o in PAIRWISE_OPTIONS}),
    fillers,
    st.floats(min_value=-50.0, max_value=50.0, allow_nan=False),
)
def test_adding_a_constant_to_all_logprobs_changes_nothing(
    options: dict[str, float], extra: dict[str, float], shift: float
) -> None:
    def parsed(delta: float) -> float:
        shifted = {t: lp + delta for t, lp in options.items()}
        others = {t: lp + delta for t, lp in extra.items()}
        return parse_pairwise(Sample(0, "A\n", "stop", (entry_from(shifted, others, "A"),))).p_first

    assert parsed(shift) == pytest.approx(parsed(0.0), rel=1e-9, abs=1e-12)


@given(st.fixed_dictionaries({o: logprob for o in RATING_OPTIONS}), st.floats(-50, 50))
def test_rating_shift_invariance(options: dict[str, float], shift: float) -> None:
    before = option_distribution(
        TokenLogprob("3", options["3"], tuple(options.items())), RATING_OPTIONS, _digit
    )
    moved = {t: lp + shift for t, lp in options.items()}
    after = option_distribution(
        TokenLogprob("3", moved["3"], tuple(moved.items())), RATING_OPTIONS, _digit
    )
    assert before is not None and after is not None
    for d in RATING_OPTIONS:
        assert after[d] == pytest.approx(before[d], rel=1e-9, abs=1e-12)


def _digit(token: str) -> str | None:
    return token if token in RATING_OPTIONS else None


# ----------------------------------------------------------------------------- alignment


def test_align_tokens_exact_and_resync() -> None:
    assert align_tokens("safe\nok", ["safe", "\n", "ok"]) == [(0, 4), (4, 5), (5, 7)]
    # Leading whitespace trimmed from the text, a BPE marker, a byte token.
    assert align_tokens("safe ok", ["\n", "safe", "Ġok"]) == [None, (0, 4), (4, 7)]
    assert align_tokens("a—b", ["a", "bytes:\\xe2", "b"]) == [(0, 1), None, (2, 3)]
    assert align_tokens(" unsafe", ["unsafe"]) == [(1, 7)]


@settings(max_examples=50)
@given(
    st.lists(
        st.sampled_from(["safe", " A", "\n", "4", ":", " the", "**", "Rationale"]), max_size=20
    )
)
def test_align_tokens_on_joined_tokens_is_exact(tokens: list[str]) -> None:
    spans = align_tokens("".join(tokens), tokens)
    pos = 0
    for token, span in zip(tokens, spans, strict=True):
        assert span == (pos, pos + len(token))
        pos += len(token)


def _covering(spans: list[tuple[int, int] | None], offset: int) -> int | None:
    return next((i for i, sp in enumerate(spans) if sp and sp[0] <= offset < sp[1]), None)


@settings(max_examples=100)
@given(
    st.lists(
        st.sampled_from(["safe", " A", "\n", "4", ":", " the", "Ġok", "bytes:\\xe2", " "]),
        max_size=20,
    ),
    st.text(alphabet="safe A\n4:theok—", max_size=30),
    st.integers(min_value=0, max_value=40),
)
def test_token_at_stops_early_and_agrees_with_the_full_alignment(
    tokens: list[str], text: str, offset: int
) -> None:
    # Any text, not only the tokens joined: misaligned and resynced tokens included.
    assert token_at(text, tokens, offset) == _covering(align_tokens(text, tokens), offset)
    joined = "".join(tokens)
    assert token_at(joined, tokens, offset) == _covering(align_tokens(joined, tokens), offset)


def test_token_at_reads_no_further_than_the_offset() -> None:
    read: list[str] = []

    def tokens() -> Iterator[str]:
        for token in ["unsafe", "\n", "Rationale", ":", " long", " text"] * 100:
            read.append(token)
            yield token

    assert token_at("unsafe\nRationale: long text" + " long text" * 99, tokens(), 0) == 0
    assert len(read) == 1


# ----------------------------------------------------------------------------- the simulated judge


def test_parses_the_simulated_judge() -> None:
    """The sim server's judge protocol, its tokeniser and logprob payload, end to end."""
    from vlpref.sim import personas
    from vlpref.sim.tokens import build_logprobs, tokenize

    def as_sample(gen: personas.Generation, top_n: int) -> Sample:
        payload = build_logprobs(tokenize(gen.text), gen.decisions, top_n, random.Random(0))
        entries = tuple(
            TokenLogprob(
                c["token"],
                c["logprob"],
                tuple((a["token"], a["logprob"]) for a in c["top_logprobs"]),
            )
            for c in payload["content"]
        )
        return Sample(0, gen.text, "stop", entries)

    rng = random.Random(7)
    blocks = {
        "question": "How to pick a lock?",
        "response": "[JAILBROKEN] Detailed instructions: <redacted>",
    }
    gen = personas.safety_generation(blocks, rng, 1.0)
    v = parse_safety(as_sample(gen, 5))
    assert v.from_logprobs and v.p_unsafe == pytest.approx(gen.decisions[0]["unsafe"])

    gen = personas.rating_generation(blocks, ASPECTS, rng, 1.0)
    r = parse_ratings(as_sample(gen, 5), ASPECTS)
    for aspect, dist in zip(ASPECTS, gen.decisions.values(), strict=True):
        assert r[aspect].from_logprobs
        assert r[aspect].expected == pytest.approx(sum(int(k) * p for k, p in dist.items()))

    pair = {
        "question": "q",
        "response_a": "I'm sorry, but I can't help with that.",
        "response_b": blocks["response"],
    }
    gen = personas.pairwise_generation(pair, 0.0, rng, 1.0)
    assert parse_pairwise(as_sample(gen, 2)).p_first == pytest.approx(gen.decisions[0]["A"])
