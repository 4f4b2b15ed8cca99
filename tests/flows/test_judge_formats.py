"""Issue 13's bar, on the demo taxonomy through the real flow (the session's Prefect server, the
simulated server on loopback): a judge drifting across every real-model style, without
constraints, still yields >= 98 % of its judgments and never a verdict that differs from the
canonical run's; with logprobs the published pairs equal the canonical run's, without them the
pair count is within 5 %; under structured outputs every call yields its judgments.
`python -m bench.judge_formats` runs the same at the demo's size and writes the report."""

from __future__ import annotations

from pathlib import Path

from bench.judge_formats import differing_verdicts, measure


def test_judges_in_real_model_styles_hold_up(tmp_path: Path, prefect_server: str) -> None:
    canonical, drift, no_logprobs, constrained = measure(tmp_path, per_branch=1)
    assert canonical.yield_rate == 1.0 and canonical.pairs
    assert drift.yield_rate >= 0.98 and no_logprobs.yield_rate >= 0.98
    assert differing_verdicts(canonical, drift) == differing_verdicts(canonical, no_logprobs) == 0
    assert drift.pairs == canonical.pairs
    assert abs(len(no_logprobs.pairs) - len(canonical.pairs)) <= 0.05 * len(canonical.pairs)
    assert constrained.yield_rate == 1.0 and constrained.requests == constrained.calls
    assert differing_verdicts(canonical, constrained) == 0
