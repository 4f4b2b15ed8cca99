"""Debiased safety probabilities (CLUE, contextual calibration): the maths, no I/O.

A judge's P(unsafe) for a response mixes what the response says with the judge's prior for the
context: the instructions, the question and the image. CLUE measures that prior by asking the
same question with the evidence removed; contextual calibration (Zhao et al., 2021) divides it
out. vlpref asks, once per question and image, the same safety prompt with a content-free
response (`CONTENT_FREE`), and corrects every response's probability in log-odds:

    logit(p_debiased) = logit(p) - logit(p_prior)

so a judge leaning toward `unsafe` by a constant shift b (p = sigmoid(s + b), p_prior =
sigmoid(b)) gets back sigmoid(s), and an unbiased judge (p_prior = 0.5) is unchanged. The
correction is a shift, not a reordering: within one question it never changes which response
is judged less safe, so it moves verdicts and safety groups, not the ranking of a question's
responses. Probabilities are clamped to [1e-6, 1 - 1e-6] before the logit.
"""

from __future__ import annotations

import math
from typing import Final

CONTENT_FREE: Final = "N/A"  # the response of a baseline call: says nothing, helps nobody
_EPS: Final = 1e-6


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def debiased(p_unsafe: float, p_prior: float) -> float:
    """P(unsafe) with the judge's prior for the context divided out (module docstring)."""
    return sigmoid(logit(p_unsafe) - logit(p_prior))


def in_band(p: float, band: tuple[float, float] | None) -> bool:
    """Whether a probability is uncertain enough to cascade to a reasoning call."""
    return band is not None and band[0] <= p <= band[1]
