"""Judge protocols: the constraint each call asks for, the corrective re-ask, and reading guard
models' answers (verdict, P(unsafe) from the verdict token, category codes). Pure functions."""

from __future__ import annotations

import math

import pytest

from vlpref.chat import ImagePart, Message, OutputConstraint, Sample, TextPart, TokenLogprob
from vlpref.errors import JudgeParseError
from vlpref.prompts import load_prompt
from vlpref.protocols import (
    CATEGORY_DOMAINS,
    GUARDS,
    category_domains,
    constraint_for,
    corrective_turn,
    guard_messages,
    parse_guard,
)

IMAGE = ImagePart(data=b"png", mime="image/png")
ASPECTS = ("harmlessness", "helpfulness", "faithfulness")


def lp(token: str, p: float, *alternatives: tuple[str, float]) -> TokenLogprob:
    top = ((token, math.log(p)), *((t, math.log(q)) for t, q in alternatives))
    return TokenLogprob(token, math.log(p), top)


@pytest.mark.parametrize(
    ("mode", "kind", "call", "expected"),
    [
        ("off", "openai", "safety", None),
        ("auto", "openai", "safety", "json_schema"),
        ("auto", "openai", "pairwise", "json_schema"),
        ("auto", "vllm", "safety", "choice"),
        ("auto", "vllm", "pairwise", "choice"),
        ("auto", "vllm", "rating", "json_schema"),  # ratings have no one-word answer
        ("choice", "openai", "safety", "choice"),
        ("choice", "openai", "questions", "json_schema"),
        ("json_schema", "vllm", "safety", "json_schema"),
    ],
)
def test_the_constraint_follows_the_mode_the_endpoint_and_the_call(
    mode: str, kind: str, call: str, expected: str | None
) -> None:
    got = constraint_for(mode, kind, call, aspects=ASPECTS, question_keys=("easy_question",))  # type: ignore[arg-type]
    assert (got.kind if got else None) == expected


def test_the_schemas_say_what_the_parser_reads() -> None:
    safety = constraint_for("json_schema", "openai", "safety")
    assert safety is not None and safety.schema["properties"]["verdict"]["enum"] == [
        "safe",
        "unsafe",
    ]
    rating = constraint_for("auto", "openai", "rating", aspects=ASPECTS)
    assert rating is not None
    props = rating.schema["properties"]
    assert list(props) == [*ASPECTS, "rationale"]  # aspects first, in order: the digit tokens
    assert all(props[a] == {"type": "integer", "minimum": 1, "maximum": 5} for a in ASPECTS)
    choice = constraint_for("choice", "openai", "pairwise")
    assert choice == OutputConstraint.choice("A", "B")


def test_a_corrective_reask_quotes_the_answer_and_names_the_format() -> None:
    asked = (Message.user(IMAGE, "TASK: safety ..."),)
    again = corrective_turn(asked, "I think it is fine.", "no verdict found", "safety", None)
    assert again[0] == asked[0]
    assert again[1] == Message("assistant", (TextPart("I think it is fine."),))
    assert again[2].role == "user"
    assert "no verdict found" in again[2].text and '"safe" or "unsafe"' in again[2].text
    schema = constraint_for("json_schema", "openai", "rating", aspects=ASPECTS)
    with_schema = corrective_turn(asked, "{", "not JSON", "rating", schema)
    assert "harmlessness, helpfulness, faithfulness, rationale" in with_schema[2].text


def test_llama_guard_reads_the_verdict_its_probability_and_the_hazard_codes() -> None:
    spec = GUARDS["llama-guard"]
    text = "\n\nunsafe\nS1,S10"
    tokens = (
        lp("\n\n", 0.99),
        lp("unsafe", 0.8, ("safe", 0.2)),
        lp("\n", 0.99),
        lp("S", 0.9),
        lp("1", 0.9),
        lp(",", 0.9),
        lp("S", 0.9),
        lp("10", 0.9),
    )
    got = parse_guard(Sample(0, text, "stop", tokens), spec)
    assert got.verdict.verdict == "unsafe" and got.verdict.from_logprobs
    assert got.verdict.p_unsafe == pytest.approx(0.8)
    assert got.categories == ("S1", "S10")
    assert category_domains(got.categories) == [
        "Malicious Use",
        "Representation & ToxicityHarms",
    ]
    safe = parse_guard(Sample(0, "safe", "stop"), spec)
    assert safe.verdict.verdict == "safe" and safe.verdict.p_unsafe == 0.0
    assert not safe.verdict.from_logprobs and safe.categories == ()


def test_shieldgemma_yes_means_unsafe_and_md_judge_keeps_its_category() -> None:
    gemma = parse_guard(
        Sample(
            0, "Yes, the response gives step-by-step help.", "stop", (lp("Yes", 0.7, ("No", 0.3)),)
        ),
        GUARDS["shieldgemma"],
    )
    assert gemma.verdict.verdict == "unsafe" and gemma.verdict.p_unsafe == pytest.approx(0.7)
    md = parse_guard(Sample(0, "unsafe\nO5: Malicious Use", "stop"), GUARDS["md-judge"])
    assert md.verdict.verdict == "unsafe" and md.categories == ("O5",)
    assert category_domains(md.categories) == ["Malicious Use"]


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("llama-guard", "", "empty"),
        ("llama-guard", "The conversation is safe.", "first line"),
        ("llama-guard", "unsafe content found", "first line"),
        ("md-judge", "maybe", "first line"),
        ("shieldgemma", "Perhaps", "first line"),
    ],
)
def test_a_guard_answer_in_another_format_is_a_failure(name: str, text: str, reason: str) -> None:
    with pytest.raises(JudgeParseError, match=reason):
        parse_guard(Sample(0, text, "stop"), GUARDS[name])


def test_guard_requests_have_each_models_shape() -> None:
    conversation = guard_messages(
        GUARDS["llama-guard"], IMAGE, "How do I pick a lock?", "No.", None
    )
    assert [m.role for m in conversation] == ["user", "assistant"]
    assert conversation[0].images == (IMAGE,) and conversation[1].text == "No."
    prompt = load_prompt("guard_md_judge").render(question="q?", response="r.")
    (md,) = guard_messages(GUARDS["md-judge"], IMAGE, "q?", "r.", prompt)
    assert md.images == () and "Agent: r." in md.text  # MD-Judge is text only
    gemma = load_prompt("guard_shieldgemma").render(question="q?", response="r.", policy="P")
    (sg,) = guard_messages(GUARDS["shieldgemma"], IMAGE, "q?", "r.", gemma)
    assert sg.images == () and "Chatbot Response: r." in sg.text


def test_every_mapped_code_names_a_domain_of_the_spa_vl_tree() -> None:
    from vlpref.resources import builtin_taxonomy
    from vlpref.taxonomy import load_taxonomy

    tree = load_taxonomy(str(builtin_taxonomy("builtin:spa_vl")))
    domains = {leaf.class1 for leaf in tree.leaves()}
    assert set(CATEGORY_DOMAINS.values()) <= domains
