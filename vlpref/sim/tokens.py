"""A small deterministic GPT-like tokenizer and the logprob payload built from it.

Tokens follow cl100k's shape in spirit: words carry their leading space (" word"), digits come
in runs of at most three *without* a leading space (so a rating digit is its own token "4"),
punctuation runs are one token and newlines are separate. `"".join(tokenize(t)) == t` always.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from typing import Any

_TOKEN_RE = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)\b"  # English contractions
    r"|[^\r\n\w]?[^\W\d_]+"  # a word with at most one leading space or symbol
    r"|\d{1,3}"  # digits, never with a space
    r"| ?[^\s\w]+[\r\n]*"  # punctuation runs
    r"|\s*[\r\n]+"  # newlines
    r"|\s+(?!\S)|\s+"  # other whitespace
    r"|\S"  # anything left (e.g. "_")
)

# Alternatives offered in top_logprobs for ordinary tokens.
_FILLERS: tuple[str, ...] = (
    " the", " a", ",", ".", " and", " of", " to", " is", " in", " that",
    " it", " for", " this", " with", " as", " on", " be", " can", " or", " an", " more",
)  # fmt: skip

# Logprob given to padding alternatives of a decision token (they are "never" chosen).
_PAD_LOGPROB = -16.0


def tokenize(text: str) -> list[str]:
    """Split `text` into tokens that join back to exactly `text`."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """Number of tokens in `text`."""
    return len(_TOKEN_RE.findall(text)) if text else 0


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _ordinary(token: str, top_n: int, rng: random.Random) -> dict[str, Any]:
    """A confident token whose leftover mass is split geometrically over filler tokens."""
    p = 0.55 + 0.44 * rng.random()
    entry = _entry(token, math.log(p))
    alts = [_entry(token, entry["logprob"])]
    rest = 1.0 - p
    for filler in _FILLERS:
        if len(alts) >= top_n:
            break
        if filler == token:
            continue
        rest /= 2
        alts.append(_entry(filler, math.log(rest)))
    entry["top_logprobs"] = alts[:top_n]
    return entry


def _decision(token: str, dist: Mapping[str, float], top_n: int) -> dict[str, Any]:
    """A token drawn from a known distribution; all its alternatives are listed first."""
    ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))
    alts = [_entry(t, math.log(max(p, 1e-12))) for t, p in ranked[:top_n]]
    for i, filler in enumerate(f for f in _FILLERS if f not in dist):
        if len(alts) >= top_n:
            break
        alts.append(_entry(filler, _PAD_LOGPROB - i))
    entry = _entry(token, math.log(max(dist.get(token, 1e-12), 1e-12)))
    entry["top_logprobs"] = alts
    return entry


def build_logprobs(
    tokens: list[str],
    decisions: Mapping[int, Mapping[str, float]],
    top_n: int,
    rng: random.Random,
) -> dict[str, Any]:
    """The `choices[i].logprobs` object for `tokens`.

    `decisions` maps the character offset where a decision token starts to its probability
    distribution; those tokens report it, the others get confident pseudo-logprobs.
    """
    content: list[dict[str, Any]] = []
    offset = 0
    for token in tokens:
        dist = decisions.get(offset)
        if dist is not None and token in dist:
            content.append(_decision(token, dist, top_n))
        else:
            content.append(_ordinary(token, top_n, rng))
        offset += len(token)
    return {"content": content, "refusal": None}
