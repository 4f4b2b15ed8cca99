"""Preflight and early stop in a real flow run (the session's Prefect server, the sim over
loopback): a config whose key is missing fails at the start of `build_dataset`, before a stage
runs or a request is sent; with `preflight: false` the build proceeds, and a model the endpoint
does not serve costs the first N requests of its batch, not all of them."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.build import build_dataset
from vlpref.preflight import PreflightError
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
BRANCH = "Malicious Use/Security threats"
N = 8


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(
        {
            "models": {
                "sim-refuser": {"persona": "refuser"},
                "sim-jailbroken": {"persona": "jailbroken"},
                "sim-judge": {"persona": "judge"},
            }
        }
    ) as server:
        yield server


def write(tmp_path: Path, base_url: str, **extra: Any) -> Path:
    data = copy.deepcopy(
        sim_run_config(
            base_url,
            name="preflight-flow",
            taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
            workspace="ws",
            store="store",
            models=["refuser", "jailbroken"],
            per_branch=4,  # 12 questions: a batch larger than the probe
            endpoint={"max_attempts": 1},
            **extra,
        )
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_missing_key_stops_the_flow_before_any_stage(
    sim: SimServer, tmp_path: Path, prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFLIGHT_FLOW_KEY", raising=False)
    path = write(tmp_path, sim.base_url)
    data = yaml.safe_load(path.read_text())
    data["endpoints"]["sim"]["api_key_env"] = "PREFLIGHT_FLOW_KEY"
    path.write_text(yaml.safe_dump(data))
    sim.reset()
    with pytest.raises(PreflightError, match="PREFLIGHT_FLOW_KEY is not set"):
        build_dataset(str(path), [BRANCH])
    assert sim.counters()["total"] == 0
    assert not (tmp_path / "ws").exists() and not (tmp_path / "store").exists()


def test_skipped_preflight_lets_the_build_run_and_early_stop_caps_the_cost(
    sim: SimServer, tmp_path: Path, prefect_server: str
) -> None:
    path = write(tmp_path, sim.base_url, preflight=False)
    data = yaml.safe_load(path.read_text())
    data["models"].append({"name": "ghost", "endpoint": "sim", "model": "ghost-vlm"})
    path.write_text(yaml.safe_dump(data))
    sim.reset()
    version_id = build_dataset(str(path), [BRANCH])
    manifest = Store(str(tmp_path / "store")).open(version_id).manifest
    branches = list(manifest["branches"].values())
    assert len(branches) == 2  # the two subcategories of the prefix
    # Per branch, 12 questions ask the ghost model: its responses batch sent 8 and stopped.
    assert sim.counters()["by_model"]["ghost-vlm"] == {"404": N * len(branches)}
    for branch in branches:
        responses = branch["stages"]["responses"]["counts"]
        assert (responses["in"], responses["out"], responses["failed"]) == (36, 24, 12)
