"""Budgets (vlpref/budget.py) through real flow runs (the session's Prefect server) against the
simulated server: a run that reaches its budget sends no more than it allows (overshoot at most
the requests in flight), publishes nothing and says what it spent; a rerun with a larger budget
pays only for what is missing, and its version equals a build that never had a budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from flows.build import build_dataset
from vlpref.budget import BudgetReached
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
}


def _config(tmp: Path, base_url: str, **extra: Any) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    data = sim_run_config(
        base_url,
        name="budget",
        taxonomy="builtin:demo",
        workspace=str(tmp / "ws"),
        store=str(tmp / "store"),
        models=["refuser", "jailbroken"],
        per_branch=1,
        **extra,
    )
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _content(table: pa.Table) -> pa.Table:
    keep = [c for c in table.column_names if c not in ("latency_s", "cached")]
    return table.select(keep).sort_by([(keep[0], "ascending")])


def test_a_request_budget_stops_the_run_and_a_rerun_pays_only_for_the_rest(
    tmp_path: Path, prefect_server: str
) -> None:
    with SimServer(SIM) as sim:
        clean_config = _config(tmp_path / "clean", sim.base_url)
        clean = Store(str(tmp_path / "clean" / "store")).open(build_dataset(str(clean_config)))
        full = sim.counters()["total"]
        sim.reset()

        limited = _config(tmp_path / "b", sim.base_url, budget={"requests": 30})
        with pytest.raises(BudgetReached) as info:
            build_dataset(str(limited))
        assert sim.counters()["total"] == 30  # admitted before sending: exactly the limit
        message = str(info.value)
        assert "budget reached (requests 30)" in message and "spent 30 request(s)" in message
        assert "nothing published" in message and "not sent" in message
        assert Store(str(tmp_path / "b" / "store")).list_versions() == []

        sim.reset()
        larger = _config(tmp_path / "b", sim.base_url, budget={"requests": 10_000})
        version = Store(str(tmp_path / "b" / "store")).open(build_dataset(str(larger)))
        assert sim.counters()["total"] == full - 30  # only what the first run did not pay for
        for name in ("responses", "judgments", "pairs"):
            assert _content(version.table(name)).equals(_content(clean.table(name))), name


def test_a_token_budget_overshoots_by_at_most_the_requests_in_flight(
    tmp_path: Path, prefect_server: str
) -> None:
    concurrency = 2
    limit = 3_000
    with SimServer(SIM) as sim:
        config = _config(
            tmp_path,
            sim.base_url,
            endpoint={"concurrency": concurrency},
            budget={"tokens": limit, "per_model": {"judge": {"cost": 1.0}}},
        )
        with pytest.raises(BudgetReached, match=r"budget reached \(tokens 3,000\)"):
            build_dataset(str(config))
        billed = sim.counters()["usage"]
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in billed.values())
    assert tokens >= limit
    # The largest single call, from the journal (each line holds its call's whole usage).
    calls = [
        json.loads(line)["u"]
        for path in (tmp_path / "ws" / "journal").rglob("*.jsonl")
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    most = max(prompt + completion for prompt, completion in calls)
    # Admitted while under the limit: the requests in flight (one per slot), plus one answer
    # the provider had finished but the budget had not yet billed.
    assert tokens - limit <= (concurrency + 1) * most, (tokens, limit, most)


def test_a_budget_holds_in_batch_mode_and_the_rerun_completes_it(
    tmp_path: Path, prefect_server: str
) -> None:
    """Batch mode under a budget: requests are admitted as they go into a batch file, so the
    batches hold exactly the budget; the rerun with a larger one submits only the rest."""
    batch = {"mode": "batch", "batch_poll_s": 0.05, "batch_poll_max_s": 0.2}
    with SimServer(SIM) as sim:
        build_dataset(str(_config(tmp_path / "clean", sim.base_url, endpoint=batch)))
        clean = sim.counters()["batch"]["lines"]
        sim.reset()
        limited = _config(tmp_path / "b", sim.base_url, endpoint=batch, budget={"requests": 20})
        with pytest.raises(BudgetReached, match=r"budget reached \(requests 20\)"):
            build_dataset(str(limited))
        assert sim.counters()["batch"]["lines"] == 20
        sim.reset()
        build_dataset(str(_config(tmp_path / "b", sim.base_url, endpoint=batch)))
        assert sim.counters()["batch"]["lines"] == clean - 20
        assert sim.counters()["total"] == 0  # nothing went online
