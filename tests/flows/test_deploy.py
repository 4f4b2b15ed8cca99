"""`prefect deploy --all` with the repository's prefect.yaml, against the session's real Prefect
server, in a subprocess as a team runs it (docs/cluster.md, "Deployments"):

- an unset, empty or unreadable VLPREF_CONFIG fails the deploy (exit 1, an `error:` line) and
  registers nothing;
- a good one registers both deployments with the config, the runner parameters, and a pull step
  that clones this repository at the deployed commit;
- a process worker started in another folder (as on another host: nothing of this checkout in
  its working folder) clones that commit and runs the branch-rerun deployment's quick run (no
  parameters), which fails at once with a one-line message saying what to pass.

The deployments and the work pool get names of their own (a copy of prefect.yaml), so nothing
here touches what other tests of the session deploy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flows.test_serve import write_config

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def named_copy(tmp: Path, suffix: str, pool: str) -> Path:
    """prefect.yaml with deployment and work pool names of this test's own."""
    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for entry in data["deployments"]:
        entry["name"] = f"{entry['name']}-{suffix}"
        entry["work_pool"]["name"] = pool
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deploy(
    prefect_yaml: Path, api_url: str, config: str | None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLPREF_CONFIG", "VLPREF_GIT_REF")}
    env["PREFECT_API_URL"] = api_url
    # Workers clone this checkout itself, whatever its `origin` is (CI's may not be reachable).
    env["VLPREF_GIT_REPOSITORY"] = str(REPO)
    if config is not None:
        env["VLPREF_CONFIG"] = config
    return subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_yaml)],
        cwd=REPO,  # entrypoints and the git checkout are the repository's
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


async def create_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


async def read_deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployment_by_name(name)


async def read_flow_run(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def read_logs(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        found = await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in found]


def absent(name: str) -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        asyncio.run(read_deployment(name))
    except ObjectNotFound:
        return True
    return False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "error: VLPREF_CONFIG is not set"),
        ("", "error: VLPREF_CONFIG is not set"),
        ("runs/no-such-config.yaml", "error: VLPREF_CONFIG=runs/no-such-config.yaml: "),
    ],
)
def test_deploy_fails_without_a_config_and_registers_nothing(
    tmp_path: Path, prefect_server: str, value: str | None, expected: str
) -> None:
    suffix, pool = uuid.uuid4().hex[:8], f"pool-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_pool(pool))
    done = deploy(named_copy(tmp_path, suffix, pool), prefect_server, value)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert expected in output
    assert absent(f"build-dataset/nightly-{suffix}")
    assert absent(f"build-dataset/branch-rerun-{suffix}")


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_deployments_run_the_deployed_commit_on_a_worker_elsewhere(
    tmp_path: Path, prefect_server: str
) -> None:
    suffix, pool = uuid.uuid4().hex[:8], f"pool-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_pool(pool))
    config = str(write_config(tmp_path, "http://127.0.0.1:9/v1"))
    try:
        _deployed_commit_runs_elsewhere(tmp_path, prefect_server, suffix, pool, config)
    finally:
        # The nightly schedule's runs must not outlive the test in the session's server: later
        # tests read "the most recent flow run".
        asyncio.run(remove_deployments(suffix))


async def remove_deployments(suffix: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        for name in (f"build-dataset/nightly-{suffix}", f"build-dataset/branch-rerun-{suffix}"):
            try:
                deployment = await client.read_deployment_by_name(name)
            except Exception:  # never created: nothing to remove
                continue
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
            for run in runs:
                if run.state is not None and run.state.is_scheduled():
                    await client.delete_flow_run(run.id)
            await client.delete_deployment(deployment.id)


def _deployed_commit_runs_elsewhere(
    tmp_path: Path, prefect_server: str, suffix: str, pool: str, config: str
) -> None:
    from prefect.deployments import run_deployment

    done = deploy(named_copy(tmp_path, suffix, pool), prefect_server, config)
    assert done.returncode == 0, done.stdout + done.stderr

    nightly = asyncio.run(read_deployment(f"build-dataset/nightly-{suffix}"))
    assert nightly.parameters == {"config": config, "runner": "threads"}
    [pull] = nightly.pull_steps
    clone = pull["prefect.deployments.steps.git_clone"]
    assert clone["commit_sha"] == git("rev-parse", "HEAD")
    assert clone["repository"] == str(REPO)
    runner = nightly.parameter_openapi_schema["properties"]["runner"]
    assert runner["enum"] == ["threads", "dask", "ray"]

    # The UI's quick run of branch-rerun: the deployment's own parameters, `only: []`.
    flow_run: Any = run_deployment(f"build-dataset/branch-rerun-{suffix}", timeout=0)
    elsewhere = tmp_path / "worker-host"
    elsewhere.mkdir()
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env.pop("VLPREF_CONFIG", None)
    worker = subprocess.run(
        [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--run-once"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    finished = asyncio.run(read_flow_run(flow_run.id))
    state = finished.state
    assert state is not None and state.is_failed(), (state, worker.stdout[-3000:])
    assert "none is given" in state.message and "\n" not in state.message.strip(), state.message
    assert "top-level branches: " in state.message and "Malicious Use" in state.message
    # It ran from the clone of the deployed commit, not from this checkout.
    logs = " ".join(asyncio.run(read_logs(flow_run.id)))
    assert "git_clone" in logs, logs[-2000:]
