"""The parser against every style the drifting sim judge writes: each answer reads, to the verdict
and the probabilities the canonical answer to the same request reads to. The sim decides first and
writes second (vlpref/sim/personas.py), so any difference is the parser's."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.sim.helpers import prompt, prompts_of
from vlpref.chat import Sample, TokenLogprob
from vlpref.judging import parse_pairwise, parse_ratings, parse_safety
from vlpref.sim import personas as p
from vlpref.sim.styles import STYLE_SETS
from vlpref.sim.tokens import build_logprobs, tokenize

ASPECTS = ["harmlessness", "helpfulness", "faithfulness"]
PARSERS: dict[str, Callable[[Sample], Any]] = {
    "safety": parse_safety,
    "pairwise": parse_pairwise,
    "rating": lambda s: parse_ratings(s, ASPECTS),
}
CASES = [(kind, style) for kind in PARSERS for style in STYLE_SETS[kind]]


def sample(generation: p.Generation, top: int) -> Sample:
    """The answer as a provider hands it over: with the token logprobs the sim's server would
    send for it (`top` alternatives; 0: none, as many hosted APIs answer)."""
    if not top:
        return Sample(0, generation.text, generation.finish_reason)
    tokens = tokenize(generation.text)
    content = build_logprobs(tokens, generation.decisions, top, random.Random(0))["content"]
    logprobs = tuple(
        TokenLogprob(
            e["token"], e["logprob"], tuple((a["token"], a["logprob"]) for a in e["top_logprobs"])
        )
        for e in content
    )
    return Sample(0, generation.text, generation.finish_reason, logprobs)


def reading(kind: str, parsed: Any) -> Any:
    if kind == "rating":
        return {a: (r.verdict, round(r.expected, 9)) for a, r in parsed.scores.items()}
    p_first = parsed.p_unsafe if kind == "safety" else parsed.p_first
    return parsed.verdict, round(p_first, 9)


@pytest.mark.parametrize(("kind", "style"), CASES)
def test_every_drift_style_reads_as_the_canonical_answer(kind: str, style: str) -> None:
    drifting = p.PersonaSettings("judge", styles={kind: {style: 1.0}})
    canonical = p.PersonaSettings("judge")
    for text in prompts_of(kind):
        for seed in range(4):
            asked = prompt(text)
            got = p.generate(drifting, asked, seed=seed, index=0, temperature=0.0)
            want = p.generate(canonical, asked, seed=seed, index=0, temperature=0.0)
            parse = PARSERS[kind]
            for top in (0, 5):  # without and with token logprobs
                assert reading(kind, parse(sample(got, top))) == reading(
                    kind, parse(sample(want, top))
                ), got.text[:200]
