"""What a persona decided for one choice, apart from how it is written, and the text builder.

An `Answer` holds the decisions of one choice (each a distribution over canonical options, e.g.
`safe`/`unsafe`, `A`/`B`, `1`..`5`, and the option taken), a rationale and free fields (a
question object, a caption). Renderers turn it into a `Generation`: the canonical protocol
(`personas`), the drift styles (`styles`) and the output constraints (`constraints`). Every
renderer writes the option already taken, so the decision never depends on the format, and
records where each decision token starts and the distribution its `top_logprobs` report, keyed
by the token as written (" unsafe", " Unsafe", "a"), so the probabilities agree across formats.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "content_filter"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One choice's text; `decisions` maps char offsets of decision tokens to distributions."""

    text: str
    finish_reason: FinishReason = "stop"
    decisions: Mapping[int, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision token: P(option) over the canonical options, and the option taken."""

    name: str  # "verdict", "winner", or an aspect name as the prompt gives it
    dist: Mapping[str, float]
    value: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The content of one choice: `kind` is the task (safety, rating, pairwise, questions,
    caption, text) or the guard persona's name."""

    kind: str
    decisions: tuple[Decision, ...] = ()
    rationale: str = ""
    # questions: the question object; caption: {"caption": text}; text: {"response": text};
    # guards: e.g. {"categories": "S1,S10"}. Strings only.
    fields: Mapping[str, str] = field(default_factory=dict)
    malformed: bool = False  # questions: this choice's answer is truncated (malformed_rate)


@dataclass(frozen=True, slots=True)
class JsonDecision:
    """A decision written as a JSON value: `values` maps each option to what is written."""

    decision: Decision
    values: Mapping[str, str | int | bool]


class TextBuilder:
    """Appends text and decision tokens, keeping track of the decision offsets."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._len = 0
        self._decisions: dict[int, Mapping[str, float]] = {}

    def add(self, *texts: str) -> TextBuilder:
        """Append plain text."""
        for text in texts:
            self._parts.append(text)
            self._len += len(text)
        return self

    def decide(self, decision: Decision, tokens: Mapping[str, str] | None = None) -> TextBuilder:
        """Append the token of the option taken; `tokens` maps options to how they are written
        (default: as they are). Options without a token are left out of the distribution."""
        spelled = tokens if tokens is not None else {o: o for o in decision.dist}
        dist = {spelled[o]: p for o, p in decision.dist.items() if o in spelled}
        self._decisions[self._len] = dist
        return self.add(spelled[decision.value])

    def extend(self, gen: Generation) -> TextBuilder:
        """Append another generation's text and decisions."""
        for offset, dist in gen.decisions.items():
            self._decisions[self._len + offset] = dist
        return self.add(gen.text)

    def json(self, value: Any, *, indent: int | None = None) -> TextBuilder:
        """Append `value` as JSON (compact without `indent`); JsonDecision values are decisions."""
        self._json(value, indent, 0)
        return self

    def _json(self, value: Any, indent: int | None, level: int) -> None:
        if isinstance(value, JsonDecision):
            written = value.values[value.decision.value]
            if isinstance(written, str):
                # The token is the string's content; the quotes are punctuation around it.
                inner = {o: _dump(v)[1:-1] for o, v in value.values.items() if isinstance(v, str)}
                self.add('"').decide(value.decision, inner).add('"')
            else:
                self.decide(value.decision, {o: _dump(v) for o, v in value.values.items()})
            return
        if isinstance(value, dict | list) and value:
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
            inner_pad = "" if indent is None else "\n" + " " * (indent * (level + 1))
            outer_pad = "" if indent is None else "\n" + " " * (indent * level)
            colon = ":" if indent is None else ": "
            self.add(opening)
            for i, (key, item) in enumerate(items):
                self.add("," if i else "", inner_pad)
                if isinstance(value, dict):
                    self.add(_dump(str(key)), colon)
                self._json(item, indent, level + 1)
            self.add(outer_pad, closing)
            return
        self.add(_dump(value))

    def build(self, finish_reason: FinishReason = "stop") -> Generation:
        """The generation written so far."""
        return Generation("".join(self._parts), finish_reason, dict(self._decisions))


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def answer_object(answer: Answer) -> dict[str, Any]:
    """The answer as one JSON object: decisions (digits as integers), fields, rationale.

    safety {"verdict", "rationale"}; rating {aspect..., "rationale"}; pairwise {"winner",
    "rationale"}; questions its object; caption {"caption"}; text {"response"}.
    """
    obj: dict[str, Any] = {}
    for d in answer.decisions:
        values: dict[str, str | int | bool] = {o: int(o) if o.isdigit() else o for o in d.dist}
        obj[d.name.lower()] = JsonDecision(d, values)
    obj.update(answer.fields)
    if answer.rationale:
        obj["rationale"] = answer.rationale
    return obj


def pick_token(dist: Mapping[str, float], rng: random.Random, temperature: float) -> str:
    """Argmax at temperature 0 (first listed wins ties), else a draw from p ** (1 / T)."""
    if temperature <= 0:
        return max(dist, key=lambda t: dist[t])
    tokens = list(dist)
    weights = [max(dist[t], 1e-12) ** (1.0 / temperature) for t in tokens]
    return rng.choices(tokens, weights=weights)[0]
