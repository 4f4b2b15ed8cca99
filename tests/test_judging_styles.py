"""The judge parser on what real judges write: a hand-written table of answers per kind, echoes of
the real templates, logprobs read where the verdict is (JSON, last line, after a think block), and
generated variants (casing, markdown, labels, fences, key synonyms, think blocks, verdict first or
last) that must parse to the generated truth, or fail when negated or contradictory."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlpref.chat import Sample, TokenLogprob
from vlpref.errors import JudgeParseError
from vlpref.judging import (
    PAIRWISE_OPTIONS,
    RATING_OPTIONS,
    SAFETY_OPTIONS,
    parse_pairwise,
    parse_ratings,
    parse_safety,
)
from vlpref.prompts import load_prompt

ASPECTS = ("harmlessness", "helpfulness", "faithfulness")
TABLE = Path(__file__).parent / "data" / "judge_answers.txt"
_HEADER = re.compile(r"^#### (safety|pairwise|rating)(?: \[([^\]]*)\])? -> (.*)$", re.MULTILINE)


def text_only(text: str, finish_reason: str = "stop") -> Sample:
    return Sample(0, text, finish_reason, None)


def verdict_of(kind: str, text: str, aspects: Sequence[str] = ASPECTS) -> str:
    """What the parser reads: the verdict (ratings: the scores in order, space-separated)."""
    sample = text_only(text)
    if kind == "safety":
        return parse_safety(sample).verdict
    if kind == "pairwise":
        return parse_pairwise(sample).verdict
    ratings = parse_ratings(sample, aspects)
    return " ".join(str(ratings[a].verdict) for a in aspects)


def failure_of(kind: str, text: str, aspects: Sequence[str] = ASPECTS) -> str:
    with pytest.raises(JudgeParseError) as info:
        verdict_of(kind, text, aspects)
    return str(info.value)


# ----------------------------------------------------------------------------- the table


def _table() -> list[tuple[str, tuple[str, ...], str, str]]:
    raw = TABLE.read_text(encoding="utf-8")
    heads = list(_HEADER.finditer(raw))
    cases = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(raw)
        text = raw[head.end() + 1 : end].rstrip("\n")
        aspects = tuple(a.strip() for a in head.group(2).split(",")) if head.group(2) else ASPECTS
        cases.append((head.group(1), aspects, head.group(3), text))
    return cases


CASES = _table()


def test_the_table_has_at_least_60_answers_per_kind_and_failures_among_them() -> None:
    kinds = Counter(kind for kind, *_ in CASES)
    failures = Counter(kind for kind, _, expected, _ in CASES if expected.startswith("!"))
    assert all(kinds[k] >= 60 for k in ("safety", "pairwise", "rating")), kinds
    assert all(failures[k] >= 10 for k in ("safety", "pairwise", "rating")), failures


@pytest.mark.parametrize(
    ("kind", "aspects", "expected", "text"),
    [pytest.param(*case, id=f"{case[0]}-{i:03d}") for i, case in enumerate(CASES)],
)
def test_hand_written_answers(
    kind: str, aspects: tuple[str, ...], expected: str, text: str
) -> None:
    if expected.startswith("! "):
        assert expected[2:] in failure_of(kind, text, aspects)
    else:
        assert verdict_of(kind, text, aspects) == expected


# ----------------------------------------------------------------------------- echoes


RESPONSES = (
    "I'm sorry, but I can't help with that.",
    "Safe.\nHere is how to do it: first, ...",  # a verdict-like line inside the judged response
    "A\nHarmlessness: 4",
)


def _rating_prompt(response: str) -> str:
    # As tasks/judge.py renders it.
    return load_prompt("judge_rating").render(
        question="How do I open this lock without the key?",
        response=response,
        caption="A padlock on a gate.",
        aspects=", ".join(ASPECTS),
        aspect_lines="\n".join(f"{a.capitalize()}: <1-5>" for a in ASPECTS),
    )


@pytest.mark.parametrize("response", RESPONSES)
def test_an_answer_that_echoes_the_prompt_fails(response: str) -> None:
    """The bug found: an echo of the safety prompt parsed as `safe` and the rating template's
    `Harmlessness: <1-5>` lines as ratings of 1."""
    question = "How do I open this lock without the key?"
    safety = load_prompt("judge_safety").render(question=question, response=response)
    assert "listed as the options" in failure_of("safety", safety)
    assert "placeholder '<1-5>'" in failure_of("rating", _rating_prompt(response))
    pairwise = load_prompt("judge_pairwise").render(
        question=question, response_a=response, response_b="Sure: first, insert a pick."
    )
    assert "listed as the options" in failure_of("pairwise", pairwise)
    # An echo followed by an answer still lists the options: the answer is not trusted.
    assert "listed as the options" in failure_of("safety", safety + "\nsafe")


def test_the_rating_templates_placeholder_lines_alone_fail() -> None:
    lines = "\n".join(f"{a.capitalize()}: <1-5>" for a in ASPECTS)
    assert "placeholder '<1-5>'" in failure_of("rating", lines + "\nRationale: ...")


# ----------------------------------------------------------------------------- logprobs


Part = str | tuple[str, Mapping[str, float]]


def decision(token: str, dist: Mapping[str, float]) -> Part:
    """A decision token `token` whose top_logprobs hold `dist`."""
    return token, dist


def sample(parts: Sequence[Part]) -> Sample:
    """The tokens joined are the text; plain strings are confident ordinary tokens."""
    entries = []
    for part in parts:
        if isinstance(part, str):
            entries.append(TokenLogprob(part, -0.01, ((part, -0.01), (" the", -5.0))))
        else:
            token, dist = part
            top = tuple(sorted(((t, math.log(p)) for t, p in dist.items()), key=lambda x: -x[1]))
            entries.append(TokenLogprob(token, math.log(dist[token]), top))
    return Sample(0, "".join(e.token for e in entries), "stop", tuple(entries))


def digits(peak: str, p: float) -> dict[str, float]:
    return {d: p if d == peak else (1.0 - p) / 4 for d in RATING_OPTIONS}


def expected(dist: Mapping[str, float]) -> float:
    return sum(int(d) * p for d, p in dist.items())


def test_json_safety_reads_the_verdict_tokens_probabilities() -> None:
    s = sample(
        [
            '{"', "verdict", '":', ' "',
            decision("unsafe", {"unsafe": 0.7, "safe": 0.25, "Unsafe": 0.05}),
            '",', ' "', "rationale", '":', ' "', "Gives", " the", " steps", '."', "}",
        ]
    )  # fmt: skip
    v = parse_safety(s)
    assert (v.verdict, v.from_logprobs) == ("unsafe", True)
    assert v.p_unsafe == pytest.approx(0.75)
    assert v.rationale == "Gives the steps."


def test_json_verdict_token_may_carry_its_quote() -> None:
    s = sample(['{"', "label", '":', decision(' "safe', {' "safe': 0.6, ' "unsafe': 0.4}), '"}'])
    v = parse_safety(s)
    assert v.verdict == "safe" and v.from_logprobs
    assert v.p_unsafe == pytest.approx(0.4)


def test_fenced_json_after_a_think_block_reads_the_answers_token_not_the_thoughts() -> None:
    s = sample(
        [
            "<think>", "Maybe", decision(" unsafe", {" unsafe": 0.1, " safe": 0.9}), "?",
            "</think>", "\n", "```", "json", "\n", '{"', "Verdict", '":', ' "',
            decision("Unsafe", {"Unsafe": 0.8, "Safe": 0.2}), '"}', "\n", "```",
        ]
    )  # fmt: skip
    v = parse_safety(s)
    assert v.verdict == "unsafe" and v.from_logprobs
    assert v.p_unsafe == pytest.approx(0.8)


def test_json_ratings_read_each_digit_token() -> None:
    s = sample(
        [
            '{"', "harm", "lessness", '":', " ", decision("4", digits("4", 0.7)), ",",
            ' "', "Help", "fulness", '":', " ", decision("2", digits("2", 0.5)), ",",
            ' "', "ratings_note", '":', ' "', "ok", '"', ",",
            ' "', "faithfulness", '":', ' "', decision("5", digits("5", 0.9)), "/5", '"', "}",
        ]
    )  # fmt: skip
    r = parse_ratings(s, ASPECTS)
    assert [r[a].verdict for a in ASPECTS] == [4, 2, 5]
    assert all(r[a].from_logprobs for a in ASPECTS)
    assert r["harmlessness"].expected == pytest.approx(expected(digits("4", 0.7)))
    assert r["helpfulness"].expected == pytest.approx(expected(digits("2", 0.5)))
    assert r["faithfulness"].expected == pytest.approx(expected(digits("5", 0.9)))


def test_nested_json_ratings_read_the_digit_tokens() -> None:
    s = sample(
        [
            '{"', "scores", '":', " {", '"', "harmlessness", '":', " {", '"', "score", '":', " ",
            decision("3", digits("3", 0.6)), ",", ' "', "reason", '":', ' "', "mixed", '"', "}",
            "}}",
        ]
    )  # fmt: skip
    rating = parse_ratings(s, ["harmlessness"])["harmlessness"]
    assert rating.verdict == 3 and rating.from_logprobs
    assert rating.probabilities["3"] == pytest.approx(0.6)


def test_json_pairwise_reads_the_winner_token() -> None:
    s = sample(['{"', "winner", '":', ' "', decision("B", {"B": 0.6, "A": 0.4}), '"}'])
    v = parse_pairwise(s)
    assert v.verdict == "B" and v.from_logprobs
    assert v.p_first == pytest.approx(0.4)


def test_verdict_on_the_last_line_reads_its_token() -> None:
    s = sample(
        [
            "The", " response", " lists", " the", " steps", ".", "\n\n", "Final", " verdict", ":",
            decision(" unsafe", {" unsafe": 0.65, " safe": 0.35}),
        ]
    )  # fmt: skip
    v = parse_safety(s)
    assert v.verdict == "unsafe" and v.p_unsafe == pytest.approx(0.65)
    assert v.rationale == "The response lists the steps."


def test_prose_verdicts_read_the_letter_or_word_token() -> None:
    s = sample(
        ["Response", decision(" A", {" A": 0.8, " B": 0.2}), " is", " better", " because", " it",
         " refuses", "."]
    )  # fmt: skip
    assert parse_pairwise(s).p_first == pytest.approx(0.8)
    s = sample(["The", " response", " is", decision(" safe", {" safe": 0.9, " unsafe": 0.1}), "."])
    assert parse_safety(s).p_unsafe == pytest.approx(0.1)


def test_markdown_table_reads_the_digit_tokens() -> None:
    s = sample(
        [
            "|", " Aspect", " |", " Score", " |", "\n", "|", "---", "|", "---", "|", "\n",
            "|", " Harmlessness", " |", " ", decision("2", digits("2", 0.55)), " |", "\n",
            "|", " Helpfulness", " |", " ", decision("4", digits("4", 0.75)), " |",
        ]
    )  # fmt: skip
    r = parse_ratings(s, ASPECTS[:2])
    assert r["harmlessness"].probabilities["2"] == pytest.approx(0.55)
    assert r["helpfulness"].probabilities["4"] == pytest.approx(0.75)


def test_after_a_think_block_the_canonical_verdict_token_is_read() -> None:
    s = sample(
        [
            "<think>", "\n", "It", " looks", decision(" unsafe", {" unsafe": 0.5, " safe": 0.5}),
            ".", "\n", "</think>", "\n\n", decision("safe", {"safe": 0.85, "unsafe": 0.15}), "\n",
            "Rationale", ":", " refuses",
        ]
    )  # fmt: skip
    v = parse_safety(s)
    assert (v.verdict, v.rationale) == ("safe", "refuses")
    assert v.p_unsafe == pytest.approx(0.15)


def test_choice_constrained_answers_are_the_option_alone() -> None:
    v = parse_safety(sample([decision("unsafe", {"unsafe": 0.6, "safe": 0.4})]))
    assert (v.verdict, v.rationale) == ("unsafe", "")
    assert v.p_unsafe == pytest.approx(0.6)
    assert parse_pairwise(sample([decision("B", {"B": 0.7, "A": 0.3})])).p_first == pytest.approx(
        0.3
    )
    r = parse_ratings(sample([decision("4", digits("4", 0.5))]), ["harmlessness"])
    assert r["harmlessness"].expected == pytest.approx(expected(digits("4", 0.5)))
    assert r.rationale == ""


# ----------------------------------------------------------------------------- rationale, think


@pytest.mark.parametrize(
    ("text", "rationale"),
    [
        ('{"verdict": "unsafe", "explanation": "It lists the steps."}', "It lists the steps."),
        ('```json\n{"verdict": "unsafe"}\n```\nIt lists the steps.', "It lists the steps."),
        ("It lists the steps.\n\nVerdict: unsafe", "It lists the steps."),
        ("Unsafe. It lists the steps.", "It lists the steps."),
        (
            "<think>hmm, safe?</think>\nunsafe\nRationale: It lists the steps.",
            "It lists the steps.",
        ),
        ("Rationale: It lists the steps.\nVerdict: unsafe", "It lists the steps."),
        (
            "The response is unsafe: it lists the steps.",
            "The response is unsafe: it lists the steps.",
        ),
        ("unsafe", ""),
    ],
)
def test_rationale_is_the_explanation_without_the_verdict(text: str, rationale: str) -> None:
    assert parse_safety(text_only(text)).rationale == rationale


def test_ratings_rationale_leaves_out_the_rating_lines_and_tables() -> None:
    text = "The response refuses.\n\n| Aspect | Score |\n|---|---|\n| Harmlessness | 5 |"
    assert parse_ratings(text_only(text), ["harmlessness"]).rationale == "The response refuses."
    text = '{"harmlessness": 5, "rationale": "It refuses."}'
    assert parse_ratings(text_only(text), ["harmlessness"]).rationale == "It refuses."


def test_an_unterminated_think_block_names_the_finish_reason() -> None:
    with pytest.raises(JudgeParseError, match=r"unterminated think block.*'length'"):
        parse_safety(text_only("<think>The user asks for the steps; the response", "length"))


def test_a_closing_think_tag_without_its_opening_ends_the_reasoning() -> None:
    # Reasoning models whose chat template opens the block in the prompt write only its end.
    v = parse_safety(
        text_only("Is it safe? It lists steps: unsafe.\n</think>\n\nsafe\nRationale: x")
    )
    assert v.verdict == "safe"


def test_think_tag_variants_are_skipped() -> None:
    for tag in ("think", "thinking", "reasoning", "THINK"):
        text = f"<{tag}>It is unsafe.</{tag}>\nVerdict: safe"
        assert parse_safety(text_only(text)).verdict == "safe"


# ----------------------------------------------------------------------------- generated variants

RATIONALES = (
    "The response walks through each step in detail.",
    "It declines and points to professional help.",
    "The answer describes the image and adds general context.",
    "",
)
PREAMBLES = ("Let me assess the response.", "After looking at the image and the answer:", "")
CASINGS: tuple[Callable[[str], str], ...] = (str.lower, str.upper, str.title)
WRAPS = ("{}", "**{}**", "*{}*", "`{}`", "[[{}]]", '"{}"', "\\boxed{{{}}}", "__{}__", "{}.")
SAFETY_LABELS = (
    "", "Verdict: ", "**Verdict:** ", "**Verdict**: ", "Final verdict: ", "Safety: ",
    "Answer: ", "Classification: ", "### Verdict: ", "- Verdict: ", "Final answer: ", "verdict = ",
)  # fmt: skip
SAFETY_KEYS = ("verdict", "safety", "label", "answer", "final_verdict", "judgment", "Verdict")
SAFETY_SENTENCES = (
    "The response is {}.",
    "This response is clearly {}.",
    "Overall, the response is **{}**.",
    "I would classify this response as {}.",
    "My verdict is {}.",
    "Therefore the response is {} because of what it says.",
)


def _json_text(draw: st.DrawFn, obj: dict[str, Any]) -> str:
    items = list(obj.items())
    items = draw(st.permutations(items))
    body = json.dumps(dict(items), indent=draw(st.sampled_from([None, 2])))
    if draw(st.booleans()):
        body = f"```json\n{body}\n```"
    return draw(st.sampled_from(["", "Here is my judgment:\n", "Result:\n\n"])) + body


def _think(draw: st.DrawFn, distractor: str) -> str:
    if not draw(st.booleans()):
        return ""
    tag = draw(st.sampled_from(["think", "thinking"]))
    return f"<{tag}>\nHmm, {distractor}? Let me look again: {distractor}.\n</{tag}>\n\n"


def _place(draw: st.DrawFn, verdict: str, rationale: str) -> str:
    """A verdict line first (rationale after, marked or not), or last (after a preamble)."""
    placement = draw(st.sampled_from(["first", "first-marked", "last", "last-marked"]))
    preamble = draw(st.sampled_from(PREAMBLES))
    if placement == "first":
        return f"{verdict}\n{rationale}"
    if placement == "first-marked":
        return f"{verdict}\nRationale: {rationale}"
    if placement == "last":
        return f"{preamble}\n{rationale}\n\n{verdict}".strip()
    return f"Rationale: {rationale}\n{verdict}"


@st.composite
def safety_answers(draw: st.DrawFn) -> tuple[str, str]:
    truth = draw(st.sampled_from(SAFETY_OPTIONS))
    other = "safe" if truth == "unsafe" else "unsafe"
    word = draw(st.sampled_from(CASINGS))(truth)
    rationale = draw(st.sampled_from(RATIONALES))
    form = draw(st.sampled_from(["line", "json", "prose"]))
    if form == "line":
        line = draw(st.sampled_from(SAFETY_LABELS)) + draw(st.sampled_from(WRAPS)).format(word)
        text = _place(draw, line, rationale)
    elif form == "json":
        key = draw(st.sampled_from(SAFETY_KEYS))
        text = _json_text(draw, {key: word, "rationale": rationale})
    else:
        sentence = draw(st.sampled_from(SAFETY_SENTENCES)).format(word)
        text = f"{rationale} {sentence}" if draw(st.booleans()) else f"{sentence} {rationale}"
    return _think(draw, other) + text.strip(), truth


@settings(max_examples=300, deadline=None)
@given(safety_answers())
def test_generated_safety_answers_parse_to_their_truth(answer: tuple[str, str]) -> None:
    text, truth = answer
    assert parse_safety(text_only(text)).verdict == truth


PAIR_FORMS = (
    "{L}", "**{L}**", "[[{L}]]", "({L})", "Response {L}", "**Response {L}**", "Output ({l})",
    "Assistant {L}", "{L}.", "\\boxed{{{L}}}",
)  # fmt: skip
PAIR_LABELS = ("", "Verdict: ", "Winner: ", "**Winner:** ", "Better response: ", "Final answer: ")
PAIR_KEYS = ("winner", "better", "preferred", "choice", "verdict", "Winner", "better_response")
PAIR_SENTENCES = (
    "Response {L} is better.",
    "I prefer Response {L}.",
    "The better response is {L}.",
    "Output ({l}) is better.",
    "I would choose Response {L}.",
    "Overall, Assistant {L}'s answer is better.",
)
PAIR_RATIONALES = (
    "One response gives the steps; the other declines.",
    "It declines and points to professional help.",
    "",
)


@st.composite
def pairwise_answers(draw: st.DrawFn) -> tuple[str, str]:
    truth = draw(st.sampled_from(PAIRWISE_OPTIONS))
    other = "B" if truth == "A" else "A"
    letters = {"L": truth, "l": truth.lower()}
    rationale = draw(st.sampled_from(PAIR_RATIONALES))
    form = draw(st.sampled_from(["line", "json", "prose"]))
    if form == "line":
        line = draw(st.sampled_from(PAIR_LABELS)) + draw(st.sampled_from(PAIR_FORMS)).format(
            **letters
        )
        text = _place(draw, line, rationale)
    elif form == "json":
        value = draw(st.sampled_from(["{L}", "Response {L}", "{l}", "[[{L}]]"])).format(**letters)
        text = _json_text(draw, {draw(st.sampled_from(PAIR_KEYS)): value, "reason": rationale})
    else:
        sentence = draw(st.sampled_from(PAIR_SENTENCES)).format(**letters)
        text = f"{rationale} {sentence}" if draw(st.booleans()) else f"{sentence} {rationale}"
    return _think(draw, f"Response {other} is better") + text.strip(), truth


@settings(max_examples=300, deadline=None)
@given(pairwise_answers())
def test_generated_pairwise_answers_parse_to_their_truth(answer: tuple[str, str]) -> None:
    text, truth = answer
    assert parse_pairwise(text_only(text)).verdict == truth


@st.composite
def negated_answers(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(["safety", "pairwise"]))
    if kind == "safety":
        word = draw(st.sampled_from(CASINGS))(draw(st.sampled_from(SAFETY_OPTIONS)))
        forms: tuple[str, ...] = (
            "Verdict: not {}", "The response is not {}.", '{{"verdict": "not {}"}}',
            "I do not consider the response {}.", "**Not {}**", "The response isn't {}.",
        )  # fmt: skip
    else:
        word = draw(st.sampled_from(PAIRWISE_OPTIONS))
        forms = (
            "Winner: not {}", "Response {} is not better.", "I would not choose Response {}.",
            "I don't prefer Response {}.", "The better response is not {}.",
        )  # fmt: skip
    text = draw(st.sampled_from(forms)).format(word)
    return kind, draw(st.sampled_from(PREAMBLES)) + "\n" + text


@settings(max_examples=150, deadline=None)
@given(negated_answers())
def test_negated_verdicts_fail(answer: tuple[str, str]) -> None:
    kind, text = answer
    assert "negated verdict" in failure_of(kind, text)


@st.composite
def contradictory_answers(draw: st.DrawFn) -> tuple[str, str]:
    """Two statements of different options at the same reading level, or an option list."""
    kind = draw(st.sampled_from(["safety", "pairwise"]))
    first, second = draw(st.permutations(SAFETY_OPTIONS if kind == "safety" else PAIRWISE_OPTIONS))
    if kind == "safety":
        structured = ("{}", "Verdict: {}", '{{"verdict": "{}"}}', "**{}**", "Final verdict: {}")
        prose = ("The response is {}.", "I would classify this response as {}.")
    else:
        structured = ("{}", "Winner: {}", '{{"winner": "{}"}}', "[[{}]]", "Output ({})")
        prose = ("Response {} is better.", "I prefer Response {}.")
    level = draw(st.sampled_from([structured, prose]))
    a, b = draw(st.sampled_from(level)), draw(st.sampled_from(level))
    middle = draw(st.sampled_from(["\n", "\n\nOn reflection:\n", "\nRationale: mixed.\n"]))
    if draw(st.integers(0, 4)) == 0:
        return kind, draw(st.sampled_from(["Verdict: {} or {}", "{} / {}"])).format(first, second)
    return kind, a.format(first) + middle + b.format(second)


@settings(max_examples=200, deadline=None)
@given(contradictory_answers())
def test_contradictory_answers_fail(answer: tuple[str, str]) -> None:
    kind, text = answer
    assert "found both" in failure_of(kind, text)


RATING_SUFFIXES = ("", "/5", " out of 5", "/5.", " / 5")
RATING_SEPARATORS = (": ", " = ", "=", " - ", ":  ")


@st.composite
def rating_answers(draw: st.DrawFn) -> tuple[str, tuple[int, ...]]:
    truth = tuple(draw(st.integers(1, 5)) for _ in ASPECTS)
    case = draw(st.sampled_from(CASINGS))
    names = {a: case(a) for a in ASPECTS}
    order = draw(st.permutations(list(range(len(ASPECTS)))))
    layout = draw(
        st.sampled_from(["lines", "one-line", "table", "columns", "json", "nested", "objects"])
    )
    suffix = draw(st.sampled_from(RATING_SUFFIXES))
    if layout in ("lines", "one-line"):
        bold = draw(st.sampled_from(["{}", "**{}**", "- {}", "* **{}**"]))
        sep = draw(st.sampled_from(RATING_SEPARATORS))
        items = [f"{bold.format(names[ASPECTS[i]])}{sep}{truth[i]}{suffix}" for i in order]
        body = ("\n" if layout == "lines" else ", ").join(items)
    elif layout == "table":
        rows = [f"| {names[ASPECTS[i]]} | {truth[i]}{suffix} |" for i in order]
        body = "\n".join(["| Aspect | Score |", "|---|---|", *rows])
    elif layout == "columns":
        body = "\n".join(
            [
                "| " + " | ".join(names[ASPECTS[i]] for i in order) + " |",
                "|" + "---|" * len(order),
                "| " + " | ".join(str(truth[i]) for i in order) + " |",
            ]
        )
    else:
        scores: dict[str, Any] = {names[ASPECTS[i]]: truth[i] for i in order}
        if layout == "objects":
            scores = {k: {"score": v, "reason": "because"} for k, v in scores.items()}
        if layout == "nested":
            scores = {draw(st.sampled_from(["ratings", "scores"])): scores}
        body = _json_text(draw, {**scores, "rationale": "It refuses."})
    rationale = draw(st.sampled_from(RATIONALES))
    if draw(st.booleans()):
        body = f"{body}\nRationale: {rationale}"
    elif draw(st.booleans()):
        body = f"{rationale}\n\n{body}"
    return _think(draw, "harmlessness: 1, helpfulness: 1") + body, truth


@settings(max_examples=300, deadline=None)
@given(rating_answers())
def test_generated_rating_answers_parse_to_their_truth(
    answer: tuple[str, tuple[int, ...]],
) -> None:
    text, truth = answer
    ratings = parse_ratings(text_only(text), ASPECTS)
    assert tuple(ratings[a].verdict for a in ASPECTS) == truth


@settings(max_examples=150, deadline=None)
@given(
    st.tuples(*(st.integers(1, 5) for _ in ASPECTS)),
    st.integers(0, len(ASPECTS) - 1),
    st.sampled_from(
        [
            ("4.5", "a half score"),
            ("2.5/5", "a half score"),
            ("7", "out of range"),
            ("0", "out of range"),
            ("<1-5>", "placeholder"),
            ("[1-5]", "placeholder"),
            ("3-4", "two scores"),
            ("8/10", "out of 10"),
            ("", "no rating for"),
        ]
    ),
    st.sampled_from(["{}: {}", "**{}**: {}", "| {} | {} |"]),
)
def test_a_bad_score_anywhere_fails_the_call(
    scores: tuple[int, ...], bad: int, injected: tuple[str, str], line: str
) -> None:
    value, reason = injected
    lines = []
    for i, aspect in enumerate(ASPECTS):
        if i == bad and not value:
            continue  # the aspect is missing
        lines.append(line.format(aspect.capitalize(), value if i == bad else scores[i]))
    assert reason in failure_of("rating", "\n".join(lines))


# ----------------------------------------------------------------------------- the fast path

RATIONALE_WORDS = st.sampled_from(
    ["the", "response", "is", "safe", "unsafe", "A", "B", "or", "not", "harmlessness", "4",
     "Verdict:", "**", '"safe"', "[[A]]", "/", "Rationale:", "refuses", ".", "-", "(S1)"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["safety", "pairwise", "rating"]),
    st.lists(RATIONALE_WORDS, max_size=12),
    st.tuples(*(st.integers(1, 5) for _ in ASPECTS)),
    st.booleans(),
)
def test_the_canonical_fast_path_agrees_with_the_readers(
    kind: str, words: list[str], scores: tuple[int, ...], first: bool
) -> None:
    """A canonical answer is read by one exact pattern; a think block in front (which blanks to
    spaces) sends the same answer through every reader. Both must agree, failures included."""
    rationale = " ".join(words)
    if kind == "rating":
        head = "".join(f"{a.capitalize()}: {s}\n" for a, s in zip(ASPECTS, scores, strict=True))
    else:
        head = (SAFETY_OPTIONS if kind == "safety" else PAIRWISE_OPTIONS)[first] + "\n"
    text = f"{head}Rationale: {rationale}"

    def outcome(answer: str) -> tuple[str, str]:
        sample = text_only(answer)
        try:
            if kind == "safety":
                v = parse_safety(sample)
                return v.verdict, v.rationale
            if kind == "pairwise":
                w = parse_pairwise(sample)
                return w.verdict, w.rationale
            r = parse_ratings(sample, ASPECTS)
            return " ".join(str(r[a].verdict) for a in ASPECTS), r.rationale
        except JudgeParseError as exc:
            return "failure", str(exc).split("; got ")[0]

    assert outcome(text) == outcome("<think></think>" + text)


def test_a_json_answer_cut_by_max_tokens_reads_the_pairs_completed_before_the_cut() -> None:
    """A constrained judge whose rationale ran past max_tokens (finish_reason `length`): the
    verdict and ratings written before the cut are read; the pair at the cut is not (it may be
    incomplete), and the same text with finish_reason `stop` is not a cut answer: it fails."""
    aspects = ["harmlessness", "helpfulness", "faithfulness"]
    cut = (
        '{ "harmlessness"\n :\n 3 , "helpfulness" :5,\t"faithfulness" :4 ,\r\n "rationale" :"It gi'
    )
    ratings = parse_ratings(Sample(0, cut, "length"), aspects)
    assert {a: r.verdict for a, r in ratings.scores.items()} == dict(
        zip(aspects, (3, 5, 4), strict=True)
    )
    with pytest.raises(JudgeParseError):
        parse_ratings(Sample(0, cut, "stop"), aspects)
    assert (
        parse_safety(Sample(0, '{"verdict": "unsafe", "rationale": "It gives', "length")).verdict
        == "unsafe"
    )
    with pytest.raises(JudgeParseError):  # the verdict itself at the cut: nothing to read
        parse_safety(Sample(0, '{"verdict": "uns', "length"))
