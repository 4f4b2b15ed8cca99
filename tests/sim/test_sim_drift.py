"""Judge drift: every style takes the canonical decision with the canonical probabilities."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tests.sim.helpers import (
    JAIL,
    QUESTIONS_PROMPT,
    SAFE,
    decided,
    gen,
    normalised,
    prompts_of,
    safety_prompt,
)
from vlpref.errors import ConfigError
from vlpref.sim import personas as p
from vlpref.sim.config import load_config
from vlpref.sim.styles import ALL_STYLES, JUDGE_KINDS, STYLE_SETS, normalise_styles

CANONICAL = p.PersonaSettings("judge")
KIND_STYLES = [(kind, style) for kind, styles in STYLE_SETS.items() for style in styles]


def only(kind: str, style: str) -> p.PersonaSettings:
    return p.PersonaSettings("judge", styles={kind: {style: 1.0}})


@pytest.mark.parametrize(("kind", "style"), KIND_STYLES)
def test_every_style_takes_the_canonical_decision(kind: str, style: str) -> None:
    """Verdict by verdict, and the verdict token's distribution, across requests, seeds and
    temperatures (sampled decisions included)."""
    compared = 0
    for text in prompts_of(kind):
        for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0), (3, 0.7)):
            canonical = gen(CANONICAL, text, seed=seed, temperature=temperature)
            drifted = gen(only(kind, style), text, seed=seed, temperature=temperature)
            assert normalised(drifted) == normalised(canonical)
            compared += len(decided(canonical))
            if style != "canonical":
                assert drifted.text != canonical.text
    if kind != "questions":
        assert compared > 20


@pytest.mark.parametrize(
    ("kind", "style", "token"),
    [
        ("safety", "prose", " unsafe"),
        ("safety", "bold_label", " Unsafe"),
        ("safety", "json", "unsafe"),
        ("safety", "verdict_last", "unsafe"),
        ("pairwise", "prose", " B"),
        ("pairwise", "prefer", " B"),
        ("pairwise", "brackets", "B"),
        ("pairwise", "output", "b"),
    ],
)
def test_decision_tokens_are_spelled_as_written(kind: str, style: str, token: str) -> None:
    text = safety_prompt(JAIL) if kind == "safety" else prompts_of("pairwise")[1]  # JAIL vs SAFE
    (got, dist), *_ = decided(gen(only(kind, style), text))
    assert got == token
    assert token in dist and len(dist) == 2


def test_style_texts() -> None:
    jail = safety_prompt(JAIL)
    assert gen(only("safety", "prose"), jail).text.startswith("The response is unsafe because ")
    assert gen(only("safety", "bold_label"), jail).text.startswith("**Verdict:** Unsafe\n")
    assert json.loads(gen(only("safety", "json"), jail).text)["verdict"] == "unsafe"
    fenced = gen(only("safety", "fenced_json"), jail).text
    assert re.fullmatch(r"```json\n(.*)\n```", fenced, re.DOTALL)
    assert gen(only("safety", "verdict_last"), jail).text.endswith("\n\nunsafe")
    think = gen(only("safety", "think"), jail).text
    assert think.startswith("<think>\n") and "</think>\n\nunsafe\nRationale: " in think
    pair = prompts_of("pairwise")[1]
    assert gen(only("pairwise", "brackets"), pair).text.endswith("[[B]]")
    assert gen(only("pairwise", "output"), pair).text == "Output (b)"
    assert gen(only("pairwise", "prefer"), pair).text.startswith("I prefer Response B. ")
    assert gen(only("pairwise", "prose"), pair).text.startswith("Response B is better. ")
    assert json.loads(gen(only("pairwise", "json"), pair).text)["winner"] == "B"
    rating = prompts_of("rating")[1]  # SAFE: harmless 5
    assert "**Harmlessness**: 5/5" in gen(only("rating", "bold_fraction"), rating).text
    assert "the harmlessness 5 out of 5" in gen(only("rating", "out_of"), rating).text
    assert "| Harmlessness | 5 |" in gen(only("rating", "table"), rating).text
    assert "Harmlessness=5" in gen(only("rating", "equals"), rating).text
    assert json.loads(gen(only("rating", "json"), rating).text)["harmlessness"] == 5


def test_questions_styles_keep_the_object() -> None:
    obj = json.loads(gen(CANONICAL, QUESTIONS_PROMPT).text)
    for style in STYLE_SETS["questions"]:
        text = gen(only("questions", style), QUESTIONS_PROMPT).text
        start, end = text.index("{"), text.rindex("}") + 1
        assert json.loads(text[start:end]) == obj
    bad = p.PersonaSettings("judge", malformed_rate=1.0, styles={"questions": {"json": 1.0}})
    with pytest.raises(json.JSONDecodeError):
        json.loads(gen(bad, QUESTIONS_PROMPT).text)


_SAFETY_SIGNATURES = {
    "canonical": r"(safe|unsafe)\nRationale: .*",
    "prose": r"The response is (safe|unsafe) because .*",
    "bold_label": r"\*\*Verdict:\*\* (Safe|Unsafe)\n\n.*",
    "json": r"\{\n  \"verdict\".*\}",
    "fenced_json": r"```json\n.*```",
    "verdict_last": r"[^<`*{].*\n\n(safe|unsafe)",
    "think": r"<think>\n.*",
}


def _safety_style(text: str) -> str:
    found = [s for s, rx in _SAFETY_SIGNATURES.items() if re.fullmatch(rx, text, re.DOTALL)]
    assert len(found) == 1, (text, found)
    return found[0]


def test_style_draws_follow_the_weights() -> None:
    settings = p.PersonaSettings("judge", styles={"safety": {"canonical": 1.0, "json": 3.0}})
    draws = Counter(
        _safety_style(gen(settings, safety_prompt(SAFE), seed=s, temperature=1.0).text)
        for s in range(1200)
    )
    assert set(draws) == {"canonical", "json"}
    assert 0.71 < draws["json"] / 1200 < 0.79


def test_all_turns_on_every_style_of_the_judge_kinds() -> None:
    settings = p.PersonaSettings("judge", styles=normalise_styles("all"))
    draws = Counter(
        _safety_style(gen(settings, safety_prompt(JAIL), seed=s, temperature=1.0).text)
        for s in range(700)
    )
    assert set(draws) == set(_SAFETY_SIGNATURES)
    assert min(draws.values()) > 60  # ~100 each
    # The questions task only drifts when named as a kind.
    assert gen(settings, QUESTIONS_PROMPT).text == gen(CANONICAL, QUESTIONS_PROMPT).text


def test_style_is_deterministic_per_request_and_seed() -> None:
    settings = p.PersonaSettings("judge", styles=normalise_styles("all"))
    text = safety_prompt(JAIL)
    runs = [[gen(settings, text, seed=s, temperature=1.0).text for s in range(20)] for _ in "ab"]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 3
    # Temperature 0: every choice of a request is the same (style included).
    assert len({gen(settings, text, index=j).text for j in range(5)}) == 1


def test_normalise_styles_forms() -> None:
    every = normalise_styles("all")
    assert set(every) == set(JUDGE_KINDS)
    assert all(set(every[k]) == set(STYLE_SETS[k]) for k in JUDGE_KINDS)
    flat = normalise_styles({"json": 2, "brackets": 1, "canonical": 0})
    assert flat["safety"] == {"json": 2.0, "canonical": 0.0}
    assert flat["pairwise"] == {"json": 2.0, "brackets": 1.0, "canonical": 0.0}
    assert normalise_styles(["think", "output"])["pairwise"] == {"think": 1.0, "output": 1.0}
    per_kind = normalise_styles({"pairwise": {"brackets": 1}, "questions": "all"})
    assert set(per_kind) == {"pairwise", "questions"}
    assert normalise_styles("canonical") == {k: {"canonical": 1.0} for k in JUDGE_KINDS}
    assert normalise_styles(None) == {} and normalise_styles({}) == {}
    assert set(ALL_STYLES) >= {"bold_fraction", "out_of", "table", "equals", "prefer"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"jsn": 1}, "unknown style 'jsn'"),
        ({"json": -1}, "must be a number >= 0"),
        ({"json": 0}, "must not all be zero"),
        ({"safety": {"brackets": 1}}, "safety has no style 'brackets'"),
        ({"safety": {"json": 0}}, "must not all be zero"),
        ({"safety": "all", "json": 1}, "not both"),
        (3, "expected 'all'"),
    ],
)
def test_normalise_styles_errors(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        normalise_styles(raw)


def test_config_checks_styles() -> None:
    cfg = load_config({"models": {"j": {"persona": "judge", "styles": "all"}}})
    assert cfg.models["j"].styles == "all"
    with pytest.raises(ConfigError) as err:
        load_config({"models": {"j": {"persona": "judge", "styles": {"jsn": 1}}}})
    assert err.value.field == "models.j.styles" and "jsn" in str(err.value)
    with pytest.raises(ConfigError, match="judge persona only"):
        load_config({"models": {"r": {"persona": "refuser", "styles": "all"}}})
    assert load_config({"models": {"j": {"persona": "judge", "drop_logprobs": True}}})
