"""Judge drift: the formats real judge models answer in, instead of the protocol's.

A judge model's `styles` option draws one style per choice, by weight, from the choice RNG after
the decisions are drawn: the decision is the one the canonical answer takes, only its writing
changes. Each decision token keeps the canonical distribution in its `top_logprobs`, keyed by
the token as written (" unsafe" after a space, " Unsafe" after a bold label, "a" in "Output
(a)"). The styles of each task kind (shown for an unsafe verdict, winner A, a rating of 4):

safety    canonical     unsafe\\nRationale: ...
          prose         The response is unsafe because ...
          bold_label    **Verdict:** Unsafe\\n\\n**Rationale:** ...
          json          a pretty-printed {"verdict": "unsafe", "rationale": "..."}
          fenced_json   the same inside ```json ... ```
          verdict_last  the rationale, a blank line, then `unsafe` alone on the last line
          think         <think>...</think> (mentioning both verdicts) then the canonical answer
rating    canonical     Harmlessness: 4 (one line per aspect), Rationale: ...
          bold_fraction **Harmlessness**: 4/5
          out_of        I would rate the harmlessness 4 out of 5, the helpfulness ...
          table         | Aspect | Score | markdown table
          json          {"harmlessness": 4, ..., "rationale": "..."}; fenced_json; think
          equals        Scores: Harmlessness=4, Helpfulness=2, Faithfulness=3
pairwise  canonical     A\\nRationale: ...
          brackets      the rationale, then [[A]] (MT-Bench)
          prose         Response A is better. ...
          output        Output (a) (RewardBench / AlpacaEval)
          prefer        I prefer Response A. ...
          bold_label    **Winner:** Response A
          json          {"winner": "A", "rationale": "..."}; fenced_json; verdict_last; think
questions canonical     the JSON object on one line
          json          pretty-printed; fenced_json; prose (a sentence, then the JSON); think

Config (`styles` on a judge model): `all` (every style of safety, rating and pairwise, equal
weights); a list of style names (equal weights); a mapping style -> weight (a name applies to
every kind that has it, e.g. `json`); or a mapping kind -> one of those, e.g.
`{pairwise: {brackets: 3, canonical: 1}, questions: all}`. The questions task drifts only when
named as a kind. A kind whose weights are all zero or absent answers canonically.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from vlpref.sim.answer import Answer, Decision, Generation, TextBuilder, answer_object

STYLE_SETS: dict[str, tuple[str, ...]] = {
    "safety": (
        "canonical", "prose", "bold_label", "json", "fenced_json", "verdict_last", "think",
    ),
    "rating": (
        "canonical", "bold_fraction", "out_of", "table", "json", "fenced_json", "equals", "think",
    ),
    "pairwise": (
        "canonical", "brackets", "prose", "output", "prefer", "bold_label", "json", "fenced_json",
        "verdict_last", "think",
    ),
    "questions": ("canonical", "json", "fenced_json", "prose", "think"),
}  # fmt: skip
# What `all`, a list and a flat mapping apply to: the judge's verdict tasks.
JUDGE_KINDS: tuple[str, ...] = ("safety", "rating", "pairwise")
ALL_STYLES: tuple[str, ...] = tuple(dict.fromkeys(s for ss in STYLE_SETS.values() for s in ss))

StyleWeights = Mapping[str, Mapping[str, float]]  # kind -> style -> weight


def _weights_of(raw: Any, names: Sequence[str], where: str) -> dict[str, float]:
    """`all`, a list of names or a mapping name -> weight, over the allowed `names`."""
    if raw == "all":
        return dict.fromkeys(names, 1.0)
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list | tuple):
        raw = dict.fromkeys(raw, 1.0)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected 'all', a list of styles or a mapping style -> weight")
    out: dict[str, float] = {}
    for name, weight in raw.items():
        if name not in ALL_STYLES:
            raise ValueError(f"{where}: unknown style {name!r} (known: {', '.join(ALL_STYLES)})")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"{where}: the weight of {name!r} must be a number >= 0")
        if name in names:
            out[name] = float(weight)
    return out


def normalise_styles(raw: Any) -> dict[str, dict[str, float]]:
    """The `styles` option as kind -> style -> weight (kinds without weights left out).

    Raises ValueError naming the problem: an unknown kind or style, a negative weight, a style
    the kind does not have (in the per-kind form), or weights that are all zero.
    """
    if raw is None:
        return {}
    per_kind: dict[str, Any]
    if isinstance(raw, Mapping) and raw and all(k in STYLE_SETS for k in raw):
        per_kind = dict(raw)
        strict = True
    elif isinstance(raw, Mapping) and any(k in STYLE_SETS for k in raw):
        raise ValueError("styles: use either kinds (safety, rating, pairwise, questions) or "
                         "style names as keys, not both")  # fmt: skip
    else:
        per_kind = dict.fromkeys(JUDGE_KINDS, raw)
        strict = False
    out: dict[str, dict[str, float]] = {}
    for kind, value in per_kind.items():
        names = STYLE_SETS[kind]
        weights = _weights_of(value, names, f"styles.{kind}" if strict else "styles")
        if strict and isinstance(value, Mapping):
            foreign = [n for n in value if n not in names]
            if foreign:
                raise ValueError(f"styles.{kind}: {kind} has no style {foreign[0]!r} "
                                 f"(it has: {', '.join(names)})")  # fmt: skip
        if strict and not any(w > 0 for w in weights.values()):
            raise ValueError(f"styles.{kind}: the weights must not all be zero")
        if any(w > 0 for w in weights.values()):
            out[kind] = weights
    if not strict and not out and raw not in ([], {}):
        raise ValueError("styles: the weights must not all be zero")
    return out


def draw_style(weights: Mapping[str, float] | None, rng: random.Random) -> str:
    """A style by weight, or `canonical` when there are none (no draw then)."""
    pairs = [(s, w) for s, w in (weights or {}).items() if w > 0]
    if not pairs:
        return "canonical"
    return rng.choices([s for s, _ in pairs], weights=[w for _, w in pairs])[0]


# ----------------------------------------------------------------------------- rendering

_THINK = {
    "safety": "I need to decide whether the response is safe or unsafe. {why} I will answer "
    "in the requested format.",
    "rating": "I should score each aspect on the scale from 1 to 5, where 1 is the worst and 5 "
    "the best. {why}",
    "pairwise": "Let me compare Response A and Response B on harmlessness first, then "
    "helpfulness. {why}",
    "questions": "I need three prompts tied to the image: an easy question, a hard question and "
    "a hard statement, as one JSON object.",
}


def _lead_lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _spaced(d: Decision, transform: str = "") -> dict[str, str]:
    """Each option written after a space (" unsafe"), optionally capitalised or lower-cased."""

    def form(o: str) -> str:
        return o.capitalize() if transform == "cap" else o.lower() if transform == "low" else o

    return {o: " " + form(o) for o in d.dist}


def _aspect_list(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    if len(parts) == 2:
        return f"{parts[0]} and {parts[1]}"
    return ", ".join(parts[:-1]) + f", and {parts[-1]}"


def _safety(b: TextBuilder, style: str, d: Decision, why: str) -> None:
    if style == "prose":
        b.add("The response is").decide(d, _spaced(d)).add(f" because {_lead_lower(why)}")
    elif style == "bold_label":
        b.add("**Verdict:**").decide(d, _spaced(d, "cap")).add(f"\n\n**Rationale:** {why}")
    elif style == "verdict_last":
        b.add(f"{why}\n\n").decide(d)
    else:  # pragma: no cover - STYLE_SETS lists the styles handled here
        raise ValueError(style)


def _pairwise(b: TextBuilder, style: str, d: Decision, why: str) -> None:
    lead = f"Response {d.value} is preferable: "
    reason = why[len(lead) :] if why.startswith(lead) else why  # after "Response A is better."
    if style == "brackets":
        b.add(f"{why}\n\n[[").decide(d).add("]]")
    elif style == "prose":
        b.add("Response").decide(d, _spaced(d)).add(f" is better. {reason}")
    elif style == "output":
        b.add("Output (").decide(d, {o: o.lower() for o in d.dist}).add(")")
    elif style == "prefer":
        b.add("I prefer Response").decide(d, _spaced(d)).add(f". {reason}")
    elif style == "bold_label":
        b.add("**Winner:** Response").decide(d, _spaced(d)).add(f"\n\n**Rationale:** {why}")
    elif style == "verdict_last":
        b.add(f"{why}\n\n").decide(d)
    else:  # pragma: no cover
        raise ValueError(style)


def _rating(b: TextBuilder, style: str, ds: Sequence[Decision], why: str) -> None:
    if style == "bold_fraction":
        for d in ds:
            b.add(f"**{d.name.capitalize()}**: ").decide(d).add("/5\n")
        b.add(f"\n**Rationale**: {why}")
    elif style == "out_of":
        b.add("I would rate ")
        for i, d in enumerate(ds):
            if i:
                b.add(", and " if i == len(ds) - 1 and len(ds) > 2 else
                      " and " if i == len(ds) - 1 else ", ")  # fmt: skip
            b.add(f"the {d.name.lower()} ").decide(d).add(" out of 5")
        b.add(f".\n\n{why}")
    elif style == "table":
        b.add("| Aspect | Score |\n| --- | --- |\n")
        for d in ds:
            b.add(f"| {d.name.capitalize()} | ").decide(d).add(" |\n")
        b.add(f"\n{why}")
    elif style == "equals":
        b.add("Scores:")
        for i, d in enumerate(ds):
            b.add("," if i else "", f" {d.name.capitalize()}=").decide(d)
        b.add(f"\n{why}")
    else:  # pragma: no cover
        raise ValueError(style)


def render(answer: Answer, canonical: Generation, style: str, rng: random.Random) -> Generation:
    """`answer` written in `style` (of its kind); `canonical` is its canonical rendering.

    `rng` is the choice RNG after the style draw (unused today: the templates are fixed).
    """
    del rng
    if style == "canonical" or (not answer.decisions and answer.kind != "questions"):
        return canonical
    b = TextBuilder()
    why = answer.rationale
    if style == "think":
        think = _THINK[answer.kind].format(why=why)
        b.add(f"<think>\n{think}\n</think>\n\n")
        if answer.kind == "questions":  # the canonical text may be truncated already
            b.json(answer_object(answer))
        else:
            b.extend(canonical)
    elif style == "json":
        b.json(answer_object(answer), indent=2)
    elif style == "fenced_json":
        b.add("```json\n").json(answer_object(answer), indent=2).add("\n```")
    elif answer.kind == "questions" and style == "prose":
        b.add("Here are the three prompts for this image:\n\n").json(answer_object(answer))
    elif answer.kind == "safety":
        _safety(b, style, answer.decisions[0], why)
    elif answer.kind == "pairwise":
        _pairwise(b, style, answer.decisions[0], why)
    elif answer.kind == "rating":
        _rating(b, style, answer.decisions, why)
    else:  # pragma: no cover
        raise ValueError(f"{answer.kind} has no style {style!r}")
    gen = b.build()
    if answer.malformed:  # the questions task's malformed_rate applies to every style
        return Generation(gen.text[: len(gen.text) // 2])
    return gen
