"""Scheduled runs: `vlpref serve` serves the deployments of prefect.yaml against a real local
Prefect server; runs triggered through the API build new versions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlpref.serve import read_deployments
from vlpref.sim.testing import SimServer
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
CYBER = "Malicious Use/Security threats/cyber"


def test_prefect_yaml_declares_the_nightly_and_branch_deployments() -> None:
    entries = {d["name"]: d for d in read_deployments(REPO / "prefect.yaml", config="x.yaml")}
    assert entries["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert entries["nightly"]["parameters"]["config"] == str(Path("x.yaml").resolve())
    assert entries["branch-rerun"]["parameters"]["only"] == []
    assert entries["nightly"]["parameters"]["runner"] == "threads"
    # A URI stays a URI (a config on shared storage); an empty variable is refused.
    uri = read_deployments(REPO / "prefect.yaml", config="s3://team/vlpref/nightly.yaml")
    assert uri[0]["parameters"]["config"] == "s3://team/vlpref/nightly.yaml"


def test_serve_refuses_an_empty_config_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlpref.errors import ConfigError

    monkeypatch.setenv("VLPREF_CONFIG", "")
    with pytest.raises(ConfigError, match="VLPREF_CONFIG is not set"):
        read_deployments(REPO / "prefect.yaml")


def write_config(tmp: Path, base_url: str) -> Path:
    data = {
        "name": "served",
        "taxonomy": str(REPO / "taxonomy" / "demo.yaml"),
        "workspace": str(tmp / "ws"),
        "store": str(tmp / "store"),
        "endpoints": {"sim": {"kind": "openai", "base_url": base_url}},
        "models": [
            {"name": "refuser", "endpoint": "sim", "model": "sim-refuser"},
            {"name": "jailbroken", "endpoint": "sim", "model": "sim-jailbroken"},
        ],
        "generator": {"name": "gen", "endpoint": "sim", "model": "sim-judge"},
        "judges": [
            {
                "name": "judge",
                "endpoint": "sim",
                "model": "sim-judge",
                "sampling": {"temperature": 0},
            }
        ],
        "stages": {"images": {"source": {"kind": "typographic", "per_branch": 2}}},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def wait_for_deployments(names: list[str], timeout_s: float) -> dict[str, object]:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    async with get_client() as client:
        while True:
            try:
                return {n: await client.read_deployment_by_name(n) for n in names}
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


def test_served_deployments_build_versions(tmp_path: Path, prefect_server: str) -> None:
    from prefect.deployments import run_deployment

    with SimServer(
        {
            "models": {
                m: {"persona": p}
                for m, p in [
                    ("sim-refuser", "refuser"),
                    ("sim-jailbroken", "jailbroken"),
                    ("sim-judge", "judge"),
                ]
            }
        }
    ) as sim:
        config = write_config(tmp_path, sim.base_url)
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect_server,
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PYTHONPATH": str(REPO),
        }
        served = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vlpref.cli",
                "serve",
                "--config",
                str(config),
                "--prefect-yaml",
                str(REPO / "prefect.yaml"),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deployments = asyncio.run(
                wait_for_deployments(["build-dataset/nightly", "build-dataset/branch-rerun"], 90)
            )
            nightly = deployments["build-dataset/nightly"]
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[attr-defined]

            full: Any = run_deployment("build-dataset/nightly", timeout=240, poll_interval=1)
            assert full.state is not None and full.state.is_completed(), full.state
            # The deployment's task runner is a parameter: this run's tasks go to Dask workers.
            rerun: Any = run_deployment(
                "build-dataset/branch-rerun",
                parameters={"only": [CYBER], "runner": "dask", "workers": 2},
                timeout=240,
                poll_interval=1,
            )
            assert rerun.state is not None and rerun.state.is_completed(), rerun.state
            # The UI's quick run: the deployment's own `only: []`, refused in one line.
            quick: Any = run_deployment("build-dataset/branch-rerun", timeout=120, poll_interval=1)
            assert quick.state is not None and quick.state.is_failed(), quick.state
            message = quick.state.message
            assert "none is given" in message and "\n" not in message.strip(), message
        finally:
            served.terminate()
            try:
                served.wait(timeout=20)
            except subprocess.TimeoutExpired:
                served.kill()
    store = Store(str(tmp_path / "store"))
    versions = store.list_versions()
    assert len(versions) == 2
    second = store.open(versions[1].version_id)
    assert second.manifest["only"] == [CYBER]
    assert second.manifest["parent"] == versions[0].version_id
    assert len(second.manifest["branches"]) == 4


@pytest.mark.parametrize("only", [[]])
def test_an_empty_branch_list_is_refused(
    tmp_path: Path, only: list[str], prefect_server: str
) -> None:
    from flows.build import build_dataset
    from vlpref.errors import ConfigError

    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="only"):
        build_dataset(str(config), only)
