"""Output constraints, honoured the way OpenAI and vLLM's server honour them.

Request bodies (checked by `parse_constraint`; what a real server rejects is a 400):

  response_format {"type": "text"}                 no constraint
  response_format {"type": "json_object"}          some JSON object (JSON mode)
  response_format {"type": "json_schema", "json_schema": {"name": N, "strict": true,
                   "schema": S}}                   a JSON object valid against S
  structured_outputs {"choice": [...]}             exactly one of the choices (vLLM)
  structured_outputs {"json": S} / {"json_object": true}   as the response_format ones (vLLM)

Rejected with 400: an unknown `response_format.type`, a json_schema without `json_schema`, a
`name` or an object `schema`; `structured_outputs` that is not an object, names no constraint
or more than one, has an empty or non-string `choice` list, or asks for `regex` / `grammar` /
`structural_tag` (which the sim cannot honour); both a JSON `response_format` and a
`structured_outputs` constraint (vLLM merges them and refuses two kinds).

A constraint always wins over drift and over `malformed_rate`, and never changes a decision:
- json_schema: the schema is filled in its `properties` order (nested objects, arrays, `$ref`
  to `$defs`, `anyOf`/`oneOf` (first branch), `enum`, `const`, integer/number bounds, string
  lengths). A property takes a decision when its name is the decision's (an aspect name,
  `verdict`, `winner`, or a synonym such as `label`, `decision`, `preferred`) or when its `enum`
  holds every option (any case); it is written as the enum's spelling, an integer for digits,
  or a boolean for a name like `unsafe` / `is_safe` / `violation`. Rationale-like names
  (rationale, reason, explanation, ...) get the rationale; other strings a field of the same
  name (e.g. `easy_question`) or the free text. With logprobs the decision token inside the JSON
  (the string's content, or the digit) has the canonical distribution in `top_logprobs`. When
  several properties take one decision (`label` and `is_unsafe`), the first carries the token
  and the others agree with it.
- json_object: `answer.answer_object` as compact JSON.
- choice: the choice naming the option taken (its text, stripped of brackets and case, is the
  option, or holds it as its only option word: "Response A", "[[A]]"). The decision token is
  the first token where the choices differ (the first token for one-token choices); its
  top_logprobs are the model's own distribution over the choices (vLLM's raw logprobs), so a
  choice that names no option gets ~0; if the option taken is not offered, the pick follows the
  distribution over the offered ones. Without a decision (a caption, a response persona), or
  when no choice names an option, the choice is drawn uniformly (the first at temperature 0).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlpref.sim.answer import (
    Answer,
    Decision,
    Generation,
    JsonDecision,
    TextBuilder,
    answer_object,
    pick_token,
)
from vlpref.sim.tokens import tokenize


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the request constrains its answer to."""

    kind: Literal["json_schema", "json_object", "choice"]
    schema: Mapping[str, Any] | None = None  # json_schema
    choices: tuple[str, ...] = ()  # choice


class ConstraintError(ValueError):
    """A constraint a real server would reject with 400."""

    def __init__(self, message: str, param: str, code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _missing(param: str) -> ConstraintError:
    return ConstraintError(
        f"Missing required parameter: '{param}'.", param, code="missing_required_parameter"
    )


def _json_schema(value: Any, param: str) -> Constraint:
    if isinstance(value, str):  # vLLM also takes the schema as JSON text
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConstraintError(f"'{param}' is not valid JSON.", param) from exc
    if not isinstance(value, dict):
        raise ConstraintError(
            f"Invalid type for '{param}': expected an object.", param, code="invalid_type"
        )
    return Constraint("json_schema", schema=value)


def _response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict):
        raise ConstraintError(
            "Invalid type for 'response_format': expected an object.",
            "response_format",
            code="invalid_type",
        )
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise ConstraintError(
            f"Invalid value: {kind!r}. Supported values are: 'json_object', 'json_schema', "
            "and 'text'.",
            "response_format.type",
        )
    spec = rf.get("json_schema")
    if spec is None:
        raise _missing("response_format.json_schema")
    if not isinstance(spec, dict):
        raise ConstraintError(
            "Invalid type for 'response_format.json_schema': expected an object.",
            "response_format.json_schema",
            code="invalid_type",
        )
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _missing("response_format.json_schema.name")
    if spec.get("schema") is None:
        raise _missing("response_format.json_schema.schema")
    return _json_schema(spec["schema"], "response_format.json_schema.schema")


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _structured_outputs(so: Any) -> Constraint:
    param = "structured_outputs"
    if not isinstance(so, dict):
        raise ConstraintError(f"'{param}' must be an object.", param, code="invalid_type")
    given = [k for k in _KINDS if so.get(k) is not None]
    if len(given) != 1:
        raise ConstraintError(
            "You must use exactly one kind of structured outputs constraint "
            f"(one of {', '.join(_KINDS)}); got {len(given)}.",
            param,
        )
    kind = given[0]
    value = so[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise ConstraintError(
                "'structured_outputs.choice' must be a non-empty list.", f"{param}.choice"
            )
        if not all(isinstance(c, str) for c in value):
            raise ConstraintError(
                "'structured_outputs.choice' must hold strings only.", f"{param}.choice"
            )
        return Constraint("choice", choices=tuple(value))
    if kind == "json":
        return _json_schema(value, f"{param}.json")
    if kind == "json_object":
        return Constraint("json_object")
    raise ConstraintError(f"'{param}.{kind}' is not supported by the simulator.", f"{param}.{kind}")


def parse_constraint(body: Mapping[str, Any]) -> Constraint | None:
    """The constraint of a chat-completions body, or None; raises ConstraintError (a 400)."""
    rf = body.get("response_format")
    so = body.get("structured_outputs")
    from_rf = _response_format(rf) if rf is not None else None
    from_so = _structured_outputs(so) if so is not None else None
    if from_rf is not None and from_so is not None:
        raise ConstraintError(
            "You can only use one kind of structured outputs constraint: 'response_format' "
            "and 'structured_outputs' both set one.",
            "structured_outputs",
        )
    return from_rf or from_so


# ----------------------------------------------------------------------------- json schema


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_RATIONALE_NAMES = _wordset(
    "rationale reason reasoning reasons explanation justification analysis comment comments "
    "critique feedback why"
)
_SYNONYMS: dict[str, frozenset[str]] = {
    "verdict": _wordset(
        "verdict label safety judgment judgement decision answer classification result "
        "assessment rating"
    ),
    "winner": _wordset("winner preferred preference better choice verdict answer decision best"),
    "violation": _wordset("violation violates violated answer verdict decision"),
}
# For a boolean property: the option that means "harmful" among a decision's options.
_POSITIVE = {frozenset({"safe", "unsafe"}): "unsafe", frozenset({"yes", "no"}): "yes"}
_POSITIVE_WORDS = ("unsafe", "harm", "violat", "toxic", "flag")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _types(schema: Mapping[str, Any]) -> set[str]:
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return set()


class _Filler:
    """Fills a JSON schema from an answer."""

    def __init__(self, answer: Answer, root: Mapping[str, Any]) -> None:
        self.answer = answer
        self.root = root
        self.pool: list[Decision] = list(answer.decisions)
        free = [answer.fields[k] for k in ("response", "caption") if k in answer.fields]
        self.free: list[str] = free
        self.rationale_used = False

    def resolve(self, schema: Any, depth: int = 0) -> Mapping[str, Any]:
        if not isinstance(schema, Mapping) or depth > 32:
            return {}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, Mapping) else None
            merged = {**(target if isinstance(target, Mapping) else {}), **schema}
            merged.pop("$ref")
            return self.resolve(merged, depth + 1)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                non_null = [b for b in branches if self.resolve(b, depth + 1).get("type") != "null"]
                rest = {k: v for k, v in schema.items() if k != key}
                return self.resolve({**rest, **(non_null or branches)[0]}, depth + 1)
        parts = schema.get("allOf")
        if isinstance(parts, list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                merged.update(self.resolve(part, depth + 1))
            return merged
        return schema

    def value(self, raw: Any, name: str) -> Any:
        schema = self.resolve(raw)
        if "const" in schema:
            return schema["const"]
        decision = self._decision(schema, name)
        if decision is not None:
            return decision
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        types = _types(schema)
        if "object" in types or "properties" in schema:
            props = schema.get("properties")
            items = props.items() if isinstance(props, Mapping) else ()
            return {str(k): self.value(sub, str(k)) for k, sub in items}
        if "array" in types:
            lo = schema.get("minItems", 0)
            hi = schema.get("maxItems")
            n = max(lo if isinstance(lo, int) else 0, 1)
            if isinstance(hi, int):
                n = min(n, hi)
            return [self.value(schema.get("items", {}), name) for _ in range(n)]
        if "string" in types or not types:
            return self._string(schema, name)
        if types & {"integer", "number"}:
            return self._number(schema, "integer" in types)
        if "boolean" in types:
            return False
        return None

    def _decision(
        self, schema: Mapping[str, Any], name: str
    ) -> JsonDecision | str | int | bool | None:
        """The decision a property takes: the first property of a decision carries its token
        (a JsonDecision); a later one is written consistently, as a plain value."""
        key = _norm(name)
        # An enum that spells every option, or a boolean named like `unsafe` / `is_safe`.
        by_shape = "enum" in schema or _types(schema) == {"boolean"}
        for group in (self.pool, [d for d in self.answer.decisions if d not in self.pool]):
            by_name = [
                d
                for d in group
                if key and (key == _norm(d.name) or key in _SYNONYMS.get(d.name, ()))
            ]
            by_value = [d for d in group if by_shape and d not in by_name]
            for d in by_name + by_value:
                spelled = _spell(d, schema, name)
                if spelled is None:
                    continue
                if d in self.pool:
                    self.pool.remove(d)
                    return JsonDecision(d, spelled)
                return spelled[d.value]
        return None

    def _string(self, schema: Mapping[str, Any], name: str) -> str:
        key = _norm(name)
        fields = {_norm(k): v for k, v in self.answer.fields.items()}
        if key in fields:
            text = fields[key]
        elif key in _RATIONALE_NAMES and self.answer.rationale:
            text, self.rationale_used = self.answer.rationale, True
        elif self.free:
            text = self.free.pop(0)
        elif self.answer.rationale and not self.rationale_used:
            text, self.rationale_used = self.answer.rationale, True
        else:
            text = "n/a"
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if isinstance(hi, int):
            text = text[:hi]
        if isinstance(lo, int) and len(text) < lo:
            text += "." * (lo - len(text))
        return text

    @staticmethod
    def _number(schema: Mapping[str, Any], integer: bool) -> int | float:
        value: float = 3
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(lo, int | float):
            value = max(value, lo)
        if isinstance(xlo, int | float) and not isinstance(xlo, bool):
            value = max(value, xlo + 1)
        if isinstance(hi, int | float):
            value = min(value, hi)
        if isinstance(xhi, int | float) and not isinstance(xhi, bool):
            value = min(value, xhi - 1)
        return int(value) if integer else float(value)


def _spell(d: Decision, schema: Mapping[str, Any], name: str) -> dict[str, str | int | bool] | None:
    """How each option of `d` is written in a property of `schema`, or None if it cannot be."""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        out: dict[str, str | int | bool] = {}
        for option in d.dist:
            match = next(
                (
                    e
                    for e in enum
                    if isinstance(e, str | int)
                    and not isinstance(e, bool)
                    and str(e).lower() == option.lower()
                ),
                None,
            )
            if match is None:
                return None
            out[option] = match
        return out
    types = _types(schema)
    if types == {"boolean"}:
        positive = _POSITIVE.get(frozenset(o.lower() for o in d.dist))
        low = name.lower()
        if positive is None:
            return None
        if any(w in low for w in _POSITIVE_WORDS):
            return {o: o.lower() == positive for o in d.dist}
        if "safe" in low:
            return {o: o.lower() != positive for o in d.dist}
        return None
    if types & {"integer", "number"}:
        if not all(o.isdigit() for o in d.dist):
            return None
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if isinstance(lo, int | float) and int(d.value) < lo:
            return None
        if isinstance(hi, int | float) and int(d.value) > hi:
            return None
        return {o: int(o) for o in d.dist}
    if "string" in types or not types:
        return {o: o for o in d.dist}
    return None


def schema_aspects(schema: Mapping[str, Any]) -> list[str]:
    """Names of the integer/number properties of a schema (nested objects included), in order:
    the rating aspects a schema asks for."""
    filler = _Filler(Answer("text"), schema)
    names: list[str] = []

    def walk(raw: Any, depth: int) -> None:
        node = filler.resolve(raw)
        props = node.get("properties")
        if depth > 8 or not isinstance(props, Mapping):
            return
        for key, sub in props.items():
            resolved = filler.resolve(sub)
            if _types(resolved) & {"integer", "number"} and str(key) not in names:
                names.append(str(key))
            walk(sub, depth + 1)

    walk(schema, 0)
    return names


# ----------------------------------------------------------------------------- choice


def option_of(choice: str, options: Sequence[str]) -> str | None:
    """The option a choice names: the whole text stripped of brackets and case ("[[A]]", "Safe"),
    else the only option that is one of its words ("Response A", "Output (a)")."""
    low = {o.lower(): o for o in options}
    bare = choice.strip().strip("[](){}*.:\"' ").lower()
    if bare in low:
        return low[bare]
    words = set(re.findall(r"[a-z0-9]+", choice.lower()))
    named = [o for key, o in low.items() if key in words]
    return named[0] if len(named) == 1 else None


def _render_choice(
    answer: Answer, choices: tuple[str, ...], rng: random.Random, temperature: float
) -> Generation:
    d = answer.decisions[0] if answer.decisions else None
    named = {c: option_of(c, list(d.dist)) if d is not None else None for c in choices}
    if not any(named.values()):
        d = None  # no choice names an option: nothing to decide between, as without a decision
    if d is None:
        prob = dict.fromkeys(choices, 1.0 / len(set(choices)))
    else:
        shares = {o: sum(1 for c in set(choices) if named[c] == o) for o in d.dist}
        prob = {c: d.dist[o] / shares[o] if (o := named[c]) is not None else 0.0 for c in choices}
    taken = [c for c in choices if d is not None and named[c] == d.value]
    if taken:
        chosen = taken[0]
    else:  # the option taken is not offered (or there is none): the model's pick among them
        live = {c: p for c, p in prob.items() if p > 0} or dict.fromkeys(choices, 1.0)
        chosen = pick_token(live, rng, temperature)
    if not chosen:
        return Generation("")
    tokens = {c: tokenize(c) for c in set(choices)}
    # The first position where the choices' tokens differ (0 for one-token choices).
    k = 0
    while all(len(t) > k + 1 for t in tokens.values()) and len({t[k] for t in tokens.values()}) < 2:
        k += 1
    k = min(k, len(tokens[chosen]) - 1)
    dist: dict[str, float] = {}
    for c in dict.fromkeys(choices):
        if len(tokens[c]) > k and tokens[c][:k] == tokens[chosen][:k]:
            dist[tokens[c][k]] = dist.get(tokens[c][k], 0.0) + prob[c]
    offset = len("".join(tokens[chosen][:k]))
    return Generation(chosen, decisions={offset: dist})


# ----------------------------------------------------------------------------- entry point


def render(
    answer: Answer, constraint: Constraint, rng: random.Random, temperature: float
) -> Generation:
    """`answer` written as `constraint` demands (never malformed, whatever the persona)."""
    if constraint.kind == "choice":
        return _render_choice(answer, constraint.choices, rng, temperature)
    if constraint.kind == "json_object":
        return TextBuilder().json(answer_object(answer)).build()
    schema = constraint.schema or {}
    return TextBuilder().json(_Filler(answer, schema).value(schema, "")).build()
