"""The whole pipeline with a guard model judging next to our own judge, for each guard protocol:
a real flow run (the session's Prefect server) against the simulated server's guard personas."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from flows.build import build_dataset
from vlpref.sim.testing import SIM_JUDGE, SimServer, sim_run_config
from vlpref.store import Store

GUARDS = ("llama-guard", "shieldgemma", "md-judge")
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-helpful": {"persona": "safe-helpful"},
        "sim-judge": {"persona": "judge"},
        **{f"sim-{g}": {"persona": g} for g in GUARDS},
    }
}


@pytest.mark.parametrize("guard", GUARDS)
def test_a_guard_judges_beside_our_judge_through_the_flow(
    tmp_path: Path, prefect_server: str, guard: str
) -> None:
    with SimServer(SIM) as sim:
        data = sim_run_config(
            sim.base_url,
            name="guards",
            taxonomy="builtin:demo",
            workspace=str(tmp_path / "ws"),
            store=str(tmp_path / "store"),
            models=["refuser", "jailbroken", "helpful"],
            per_branch=1,
            judges=[
                SIM_JUDGE,
                {
                    "name": "guard",
                    "endpoint": "sim",
                    "model": f"sim-{guard}",
                    "protocol": guard,
                    "sampling": {"temperature": 0, "logprobs": True, "top_logprobs": 5},
                },
            ],
        )
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        version = Store(str(tmp_path / "store")).open(build_dataset(str(path)))
    judgments = version.table("judgments")
    guard_rows = judgments.filter(pc.equal(judgments["judge"], "guard")).to_pylist()
    responses = version.table("responses").num_rows
    assert len(guard_rows) == responses  # one safety verdict per response, nothing else
    assert {r["kind"] for r in guard_rows} == {"safety"}
    assert all(r["from_logprobs"] for r in guard_rows)
    if guard != "shieldgemma":
        unsafe = [r for r in guard_rows if r["verdict"] == "unsafe"]
        assert unsafe and all(r["categories"] for r in unsafe)
    assert version.table("failures").num_rows == 0
    assert sum(version.split(s).num_rows for s in version.splits) > 0
