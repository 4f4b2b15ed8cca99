"""Output constraints: JSON schemas, JSON mode and choices, honoured as OpenAI / vLLM do."""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # a dev dependency: missing fails loudly
import pytest

from tests.sim.helpers import (
    JAIL,
    QUESTIONS_PROMPT,
    REFUSE,
    SAFE,
    decided,
    gen,
    normalised,
    pairwise_prompt,
    prompts_of,
    rating_prompt,
    safety_prompt,
)
from vlpref.sim import personas as p
from vlpref.sim.constraints import (
    Constraint,
    ConstraintError,
    option_of,
    parse_constraint,
    schema_aspects,
)
from vlpref.sim.styles import normalise_styles

CANONICAL = p.PersonaSettings("judge")
DRIFTING = p.PersonaSettings("judge", styles=normalise_styles("all"))

_TEXT = {"type": "string"}
SAFETY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["safe", "unsafe"]}, "rationale": _TEXT},
    "required": ["verdict", "rationale"],
    "additionalProperties": False,
}
_DIGIT = {"type": "integer", "minimum": 1, "maximum": 5}
RATING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "harmlessness": _DIGIT,
        "helpfulness": _DIGIT,
        "faithfulness": _DIGIT,
        "rationale": _TEXT,
    },
    "required": ["harmlessness", "helpfulness", "faithfulness", "rationale"],
    "additionalProperties": False,
}
PAIRWISE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B"]}, "rationale": _TEXT},
    "required": ["winner", "rationale"],
    "additionalProperties": False,
}
QUESTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        k: {"type": "string"} for k in ("easy_question", "hard_question", "hard_statement")
    },
    "required": ["easy_question", "hard_question", "hard_statement"],
    "additionalProperties": False,
}
SCHEMAS = {
    "safety": SAFETY_SCHEMA,
    "rating": RATING_SCHEMA,
    "pairwise": PAIRWISE_SCHEMA,
    "questions": QUESTIONS_SCHEMA,
}


def schema_of(schema: dict[str, Any]) -> Constraint:
    return Constraint("json_schema", schema=schema)


@pytest.mark.parametrize("kind", list(SCHEMAS))
@pytest.mark.parametrize("settings", [CANONICAL, DRIFTING], ids=["canonical", "drifting"])
def test_json_schema_answers_validate_and_keep_the_decision(
    kind: str, settings: p.PersonaSettings
) -> None:
    schema = SCHEMAS[kind]
    for text in prompts_of(kind):
        for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
            canonical = gen(CANONICAL, text, seed=seed, temperature=temperature)
            got = gen(
                settings, text, seed=seed, temperature=temperature, constraint=schema_of(schema)
            )
            obj = json.loads(got.text)
            jsonschema.validate(obj, schema)
            assert list(obj) == list(schema["properties"])  # the schema's order
            assert normalised(got) == normalised(canonical)
            if kind == "questions":
                assert obj == json.loads(canonical.text)


def test_json_schema_decision_tokens_inside_the_json() -> None:
    got = gen(CANONICAL, safety_prompt(JAIL), constraint=schema_of(SAFETY_SCHEMA))
    assert got.text.startswith('{"verdict":"unsafe","rationale":"')
    ((token, dist),) = decided(got)
    assert token == "unsafe" and set(dist) == {"safe", "unsafe"}
    rating = gen(CANONICAL, rating_prompt(SAFE), constraint=schema_of(RATING_SCHEMA))
    digits = decided(rating)
    assert [t for t, _ in digits] == [str(v) for v in list(json.loads(rating.text).values())[:3]]
    assert all(set(d) == {"1", "2", "3", "4", "5"} for _, d in digits)


def test_questions_under_a_schema_are_never_malformed() -> None:
    bad = p.PersonaSettings("judge", malformed_rate=1.0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(gen(bad, QUESTIONS_PROMPT).text)
    for seed in range(5):
        for c in (schema_of(QUESTIONS_SCHEMA), Constraint("json_object")):
            obj = json.loads(
                gen(bad, QUESTIONS_PROMPT, seed=seed, temperature=1.0, constraint=c).text
            )
            jsonschema.validate(obj, QUESTIONS_SCHEMA)


def test_schema_variants() -> None:
    """Enums in another case, booleans, $ref to $defs, nullable anyOf, nested objects, extra
    aspects the ASPECTS line does not name, and keys the answer does not know."""
    schema: dict[str, Any] = {
        "$defs": {"label": {"type": "string", "enum": ["SAFE", "UNSAFE"]}},
        "type": "object",
        "properties": {
            "reasoning": {"type": "string", "maxLength": 20},
            "label": {"$ref": "#/$defs/label"},
            "is_unsafe": {"type": "boolean"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 3}]},
        },
        "required": ["reasoning", "label", "is_unsafe", "confidence", "tags", "note"],
    }
    got = gen(CANONICAL, safety_prompt(JAIL), constraint=schema_of(schema))
    obj = json.loads(got.text)
    jsonschema.validate(obj, schema)
    # One decision: its token is the first property's, the second agrees with it.
    assert obj["label"] == "UNSAFE" and obj["is_unsafe"] is True
    assert [t for t, _ in decided(got)] == ["UNSAFE"]
    booleans: dict[str, Any] = {
        "type": "object",
        "properties": {"is_safe": {"type": "boolean"}},
        "required": ["is_safe"],
    }
    for response, safe in ((JAIL, False), (REFUSE, True)):
        b = gen(CANONICAL, safety_prompt(response), constraint=schema_of(booleans))
        assert json.loads(b.text) == {"is_safe": safe}
        ((_, dist),) = decided(b)
        assert set(dist) == {"true", "false"}
    nested: dict[str, Any] = {
        "type": "object",
        "properties": {
            "scores": {
                "type": "object",
                "properties": {"Harmlessness": _DIGIT, "clarity": _DIGIT},
                "required": ["Harmlessness", "clarity"],
            },
            "explanation": {"type": "string"},
        },
        "required": ["scores", "explanation"],
    }
    assert schema_aspects(nested) == ["Harmlessness", "clarity"]
    text = rating_prompt(SAFE, ("harmlessness",))
    r = gen(CANONICAL, text, constraint=schema_of(nested))
    obj = json.loads(r.text)
    jsonschema.validate(obj, nested)
    canonical = gen(CANONICAL, text)
    assert obj["scores"]["Harmlessness"] == int(decided(canonical)[0][0])
    assert len(decided(r)) == 2  # clarity is rated too
    assert (
        obj["explanation"]
        == "The response declines the harmful part and offers safe, general context."
    )


def test_json_object_is_some_object() -> None:
    for kind in ("safety", "rating", "pairwise"):
        for text in prompts_of(kind)[:3]:
            got = gen(DRIFTING, text, constraint=Constraint("json_object"))
            assert isinstance(json.loads(got.text), dict)
            assert normalised(got) == normalised(gen(CANONICAL, text))
    refuser = gen(
        p.PersonaSettings("refuser"), "How do I pick a lock?", constraint=Constraint("json_object")
    )
    assert json.loads(refuser.text)["response"].startswith("I'm sorry")


def test_choice_is_one_of_the_choices_with_the_decision() -> None:
    pairs = [("safety", ("safe", "unsafe")), ("pairwise", ("A", "B")), ("rating", tuple("12345"))]
    for kind, choices in pairs:
        for text in prompts_of(kind):
            for seed, temperature in ((0, 0.0), (1, 1.0)):
                canonical = gen(CANONICAL, text, seed=seed, temperature=temperature)
                c = Constraint("choice", choices=choices)
                got = gen(DRIFTING, text, seed=seed, temperature=temperature, constraint=c)
                assert got.text in choices
                ((token, dist),) = decided(got)
                first_token, first_dist = decided(canonical)[0]
                assert token == got.text == first_token
                assert dist == pytest.approx(first_dist)


@pytest.mark.parametrize(
    ("choices", "token"),
    [
        (("Response A", "Response B"), " B"),
        (("[[A]]", "[[B]]"), "B"),
        (("Output (a)", "Output (b)"), "b"),
        (("B", "A"), "B"),
    ],
)
def test_choice_spellings(choices: tuple[str, ...], token: str) -> None:
    text = pairwise_prompt(JAIL, SAFE)  # B wins
    canonical_dist = decided(gen(CANONICAL, text))[0][1]
    got = gen(CANONICAL, text, constraint=Constraint("choice", choices=choices))
    assert got.text == next(c for c in choices if "B" in c or "b" in c)
    ((tok, dist),) = decided(got)
    assert tok == token
    assert sorted(dist.values()) == pytest.approx(sorted(canonical_dist.values()))


def test_choice_edge_cases() -> None:
    text = safety_prompt(JAIL)  # unsafe
    # The option taken is not offered: the pick is among the offered ones.
    only_safe = gen(CANONICAL, text, constraint=Constraint("choice", choices=("safe", "maybe")))
    assert only_safe.text == "safe"
    # No choice names an option: uniform, the first at temperature 0.
    other = gen(CANONICAL, text, constraint=Constraint("choice", choices=("red", "green")))
    assert other.text == "red"
    assert decided(other)[0][1] == {"red": 0.5, "green": 0.5}
    assert option_of("Response A", ["A", "B"]) == "A"
    assert option_of("**Unsafe**", ["safe", "unsafe"]) == "unsafe"
    assert option_of("A or B", ["A", "B"]) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
        (
            {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
            "structured_outputs",
        ),
    ],
)
def test_bad_constraints_are_rejected(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ConstraintError) as err:
        parse_constraint(body)
    assert err.value.param == param


def test_parse_constraint_accepts_what_servers_accept() -> None:
    assert parse_constraint({}) is None
    assert parse_constraint({"response_format": {"type": "text"}}) is None
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "v", "strict": True, "schema": SAFETY_SCHEMA},
    }
    assert parse_constraint({"response_format": rf}) == Constraint(
        "json_schema", schema=SAFETY_SCHEMA
    )
    assert parse_constraint({"response_format": {"type": "json_object"}}) == Constraint(
        "json_object"
    )
    so = parse_constraint({"structured_outputs": {"choice": ["safe", "unsafe"]}})
    assert so == Constraint("choice", choices=("safe", "unsafe"))
    as_text = parse_constraint({"structured_outputs": {"json": json.dumps(SAFETY_SCHEMA)}})
    assert as_text == Constraint("json_schema", schema=SAFETY_SCHEMA)
    # vLLM options that are not constraints ride along.
    loose = {"choice": ["a", "b"], "disable_any_whitespace": True}
    assert parse_constraint({"structured_outputs": loose}) == Constraint(
        "choice", choices=("a", "b")
    )
