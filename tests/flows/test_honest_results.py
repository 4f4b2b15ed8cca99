"""Results tell the truth: only trainable pairs are published, and a run where everything fails
says why. Real Prefect flow runs (the session's server), real HTTP to the simulated server, the
CLI as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from flows.build import build_dataset
from vlpref.sim.testing import SIM_JUDGE, SimServer, sim_run_config
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-filtered": {"persona": "filtered", "filter_rate": 0.7},
        "sim-judge": {"persona": "judge"},
    }
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def config_file(tmp: Path, sim: SimServer, **extra: object) -> Path:
    data = sim_run_config(
        sim.base_url,
        name="honest",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp / "ws"),
        store=str(tmp / "store"),
        models=["refuser", "jailbroken", "filtered"],
        per_branch=2,
        **extra,  # type: ignore[arg-type]
    )
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("policy", ["spa-vl", "max-margin"])
def test_only_trainable_pairs_are_published(
    sim: SimServer, tmp_path: Path, prefect_server: str, policy: str
) -> None:
    """Content-filtered answers with no text stay in the responses table, and are never a
    published `chosen` or `rejected`; no pair repeats one text on both sides."""
    path = config_file(tmp_path, sim, stages={"pairs": {"policy": policy}})
    version = Store(str(tmp_path / "store")).open(build_dataset(str(path)))
    responses = version.table("responses")
    empty = responses.filter(pc.equal(pc.utf8_trim_whitespace(responses["text"]), ""))
    assert empty.num_rows > 0
    assert set(empty["finish_reason"].to_pylist()) == {"content_filter"}
    rows = 0
    for split in version.splits:
        for row in version.split(split, ["question", "chosen", "rejected"]).to_pylist():
            rows += 1
            assert row["question"].strip() and row["chosen"].strip() and row["rejected"].strip()
            assert row["chosen"].split() != row["rejected"].split()
    assert rows > 0
    unusable = sum(
        b["stages"]["pairs"]["counts"]["unusable_responses"]
        for b in version.manifest["branches"].values()
    )
    assert unusable == empty.num_rows


def test_a_run_where_every_judge_call_fails_says_why(
    sim: SimServer, tmp_path: Path, prefect_server: str
) -> None:
    """A judge that never answers with a verdict (it refuses every call): nothing can be
    published, and the run says so with the per-stage table, the most common failure with an
    example, one `error:` line and exit code 2; the judge tasks end as 'Completed with failures'
    in Prefect."""
    garbage_judge = {**SIM_JUDGE, "name": "garbage", "model": "sim-refuser", "structured": "off"}
    path = config_file(tmp_path, sim, judges=[garbage_judge])
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlpref.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: nothing to publish: no branch produced a pair; judge lost")
    assert "Traceback" not in proc.stderr
    out = proc.stderr + proc.stdout
    assert "rows in / out / failed per stage" in out
    assert "most common failures" in out
    judge_row = next(
        line for line in out.splitlines() if "│" in line and line.strip("│ ").startswith("judge ")
    )
    cells = [c.strip() for c in judge_row.strip("│ ").split("│")]
    assert cells[0] == "judge" and int(cells[2]) > 0 and cells[3] == "0"
    assert "warning: judge/" in out  # the stages over warn_failure_rate are named
    states = asyncio.run(_task_state_names())
    assert "Completed with failures" in states.get("judge", set())


async def _task_state_names() -> dict[str, set[str]]:
    """Stage -> the state names its task runs ended in, for the most recent flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        # Runs that started: a deployment's scheduled runs (no start time) sort first otherwise.
        started = FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False))
        (latest,) = await client.read_flow_runs(
            flow_run_filter=started, sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id]))
        )
    out: dict[str, set[str]] = {}
    for run in tasks:
        if run.state is not None and run.state.name is not None:
            out.setdefault(run.name.split("/")[0], set()).add(run.state.name)
    return out
