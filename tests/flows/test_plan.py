"""`vlpref plan` against what a run then sends (the simulated server's counters), through real
flow runs (the session's Prefect server) on the demo taxonomy:
- a fresh build: the exact counts are sent and the bounds hold;
- a rerun with nothing changed, and a branch rerun whose stage outputs were deleted (the journal
  kept): the plan says nothing to send, exactly, and nothing is sent;
- an added response model: its requests are exact, and what follows stays within the bound.
The plan itself sends nothing and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flows.build import build_dataset
from flows.plan import Plan, plan_run
from vlpref.config import load_config
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.taxonomy import load_taxonomy

SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-new": {"persona": "safe-helpful"},
        "sim-judge": {"persona": "judge"},
    }
}


def _config(tmp: Path, base_url: str, models: list[str | dict[str, Any]]) -> Path:
    data = sim_run_config(
        base_url,
        name="plan",
        taxonomy="builtin:demo",
        workspace=str(tmp / "ws"),
        store=str(tmp / "store"),
        models=models,
        per_branch=1,
    )
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _sent(sim: SimServer) -> dict[str, int]:
    return {m: sum(by.values()) for m, by in sim.counters()["by_model"].items()}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {m: n - before.get(m, 0) for m, n in after.items() if n - before.get(m, 0)}


def _totals(plan: Plan) -> dict[str, Any]:
    totals: dict[str, Any] = plan.to_json()["requests"]
    return totals


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_the_plan_matches_what_runs_send(tmp_path: Path, prefect_server: str) -> None:
    with SimServer(SIM) as sim:
        config = _config(tmp_path, sim.base_url, ["refuser", "jailbroken"])

        # Fresh: captions are exact; what follows them is a bound that holds.
        fresh = plan_run(load_config(config))
        assert not (tmp_path / "ws").exists()  # a plan writes nothing
        assert sim.counters()["total"] == 0  # ... and sends nothing
        planned = _totals(fresh)
        assert planned["from_journal"] == 0 and planned["to_send"] > 0
        build_dataset(str(config))
        sent = sum(_sent(sim).values())
        assert planned["to_send"] <= sent <= planned["to_send"] + planned["bound"]
        # One caption per image (one image in each of the 4 branches): the only exact requests.
        assert planned["to_send"] == 4

        # Nothing changed: nothing to send, exactly.
        again = plan_run(load_config(config))
        assert _totals(again) == {"from_journal": 0, "to_send": 0, "bound": 0}
        assert all(line.reused for line in again.lines)
        before = _sent(sim)
        build_dataset(str(config))
        assert _delta(_sent(sim), before) == {}

        # One branch's stage outputs lost, its journals kept: a branch rerun pays nothing.
        leaf = load_taxonomy("builtin:demo").leaves()[0]
        for stage in ("questions", "responses", "judge", "pairs"):
            shutil.rmtree(tmp_path / "ws" / "stages" / stage / leaf.branch_id)
        files = _files(tmp_path / "ws")
        branch = plan_run(load_config(config), only=[leaf.path])
        assert _files(tmp_path / "ws") == files
        totals = _totals(branch)
        assert totals["to_send"] == totals["bound"] == 0 and totals["from_journal"] > 0
        before = _sent(sim)
        build_dataset(str(config), only=[leaf.path])
        assert _delta(_sent(sim), before) == {}

        # A response model added: its requests are exact; the judge's follow within the bound.
        config = _config(tmp_path, sim.base_url, ["refuser", "jailbroken", "new"])
        added = plan_run(load_config(config))
        new_line = [ln for ln in added.totals() if ln.model == "new"]
        assert len(new_line) == 1 and new_line[0].bound == 0
        questions = sum(
            json.loads((p / "counts.json").read_text())["counts"]["out"]
            for p in (tmp_path / "ws" / "stages" / "questions").glob("*/*")
            if (p / "counts.json").exists()
        )
        assert new_line[0].to_send == questions  # one request per question
        totals = _totals(added)
        before = _sent(sim)
        build_dataset(str(config))
        delta = _delta(_sent(sim), before)
        assert delta["sim-new"] == new_line[0].to_send
        assert totals["to_send"] <= sum(delta.values()) <= totals["to_send"] + totals["bound"]


def test_the_plan_command_prints_and_writes_json(tmp_path: Path) -> None:
    """As a user runs it: a table, the totals line, the JSON file; the price gives a cost."""
    data = sim_run_config(
        "http://127.0.0.1:9/v1",  # never contacted
        name="plan",
        taxonomy="builtin:demo",
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser", "jailbroken"],
        per_branch=1,
    )
    data["judges"][0]["price"] = {"input_per_mtok": 2.5, "output_per_mtok": 10.0}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "vlpref.cli", "plan", "run.yaml", "--json", "plan.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "to send" in proc.stdout and "answered by the journal" in proc.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    judge = [r for r in plan["lines"] if r["stage"] == "judge"]
    assert judge and all(r["cost"] is not None for r in judge)
    expected = sum(r["prompt_tokens"] * 2.5 + r["completion_tokens"] * 10.0 for r in judge) / 1e6
    assert abs(plan["cost"] - expected) < 1e-9
    assert plan["priced_models"] == ["judge"]
    assert not (tmp_path / "ws").exists()


def test_a_planned_run_keeps_planned_and_sent_in_its_manifest(
    tmp_path: Path, prefect_server: str
) -> None:
    from vlpref.plan_report import planned_vs_sent
    from vlpref.store import Store

    with SimServer(SIM) as sim:
        config = _config(tmp_path, sim.base_url, ["refuser", "jailbroken"])
        version = Store(str(tmp_path / "store")).open(build_dataset(str(config), plan=True))
        total = sim.counters()["total"]
    rows = planned_vs_sent(version.manifest)
    assert [stage for stage, *_ in rows] == ["questions", "responses", "judge"]
    for stage, exact, bound, sent in rows:
        assert exact <= sent <= exact + bound, (stage, exact, bound, sent)
    assert sum(sent for *_, sent in rows) == total
