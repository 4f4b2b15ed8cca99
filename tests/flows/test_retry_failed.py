"""Reruns heal: failures of a finished stage output are asked for again on the next run.

Real Prefect flow runs against the session's Prefect server and real HTTP to two simulated
servers: one that answers one response model with 500s half of the time (the endpoint is allowed
a single attempt, so they become failures), one that is healthy. The journal's request keys do
not depend on the endpoint's URL, so the healthy server answers what the faulty one did not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
import yaml

from flows.build import build_dataset
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store, Version

REPO = Path(__file__).resolve().parents[2]
MODELS = ["refuser", "helpful", "jailbroken"]
SERVED = {
    "sim-refuser": {"persona": "refuser"},
    "sim-helpful": {"persona": "safe-helpful"},
    "sim-judge": {"persona": "judge"},
}
HEALTHY = {"models": {**SERVED, "sim-jailbroken": {"persona": "jailbroken"}}}
FAULTY = {
    "models": {
        **SERVED,
        "sim-jailbroken": {"persona": "jailbroken", "faults": {"server_error": {"rate": 0.5}}},
    }
}
# Pointwise judging only: which judge calls a response gets does not depend on the others, so
# the requests of a healed build are exactly those of a clean one.
STAGES = {"judge": {"pairwise": False}, "pairs": {"policy": "max-margin", "min_margin": 0.1}}


def write_config(tmp: Path, sim: SimServer, workspace: str, **extra: Any) -> str:
    data = sim_run_config(
        sim.base_url,
        name="retry",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp / workspace),
        store=str(tmp / f"{workspace}-store"),
        models=list(MODELS),
        endpoint={"max_attempts": 1},
        stages=STAGES,
        **extra,
    )
    path = tmp / f"{workspace}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def build(sim: SimServer, config: str, retry_failed: str | None = None) -> tuple[Version, int, int]:
    """-> (the version, requests that reached the server, of them answered with 200)."""
    before = sim.counters()
    version_id = build_dataset(config, None, retry_failed)
    after = sim.counters()
    ok = after["by_status"].get("200", 0) - before["by_status"].get("200", 0)
    store = Store(yaml.safe_load(Path(config).read_text())["store"])
    return store.open(version_id), after["total"] - before["total"], ok


def rows(version: Version, name: str, drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    tbl = version.table(name)
    keep = [c for c in tbl.column_names if c not in drop]
    return sorted(tbl.select(keep).to_pylist(), key=repr)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SimServer, SimServer]]:
    with SimServer(HEALTHY) as healthy, SimServer(FAULTY) as faulty:
        yield healthy, faulty


@pytest.fixture(scope="module")
def clean(
    servers: tuple[SimServer, SimServer],
    tmp_path_factory: pytest.TempPathFactory,
    prefect_server: str,
) -> tuple[Version, int]:
    healthy, _ = servers
    tmp = tmp_path_factory.mktemp("clean")
    version, sent, _ = build(healthy, write_config(tmp, healthy, "ws"))
    assert version.table("failures").num_rows == 0
    return version, sent


def test_a_rerun_asks_exactly_for_what_failed_and_the_version_has_no_gaps(
    servers: tuple[SimServer, SimServer], clean: tuple[Version, int], tmp_path: Path
) -> None:
    healthy, faulty = servers
    clean_version, clean_sent = clean

    broken, _, ok = build(faulty, write_config(tmp_path, faulty, "ws"))
    failures = broken.table("failures")
    lost = failures.filter(pc.equal(failures["stage"], "responses"))
    assert lost.num_rows > 0
    assert set(lost["kind"].to_pylist()) == {"server_error"}

    # `none`: the finished outputs are final; nothing is sent and the gaps stay.
    config = write_config(tmp_path, healthy, "ws")
    same, sent, _ = build(healthy, config, retry_failed="none")
    assert sent == 0
    assert same.table("failures").num_rows == failures.num_rows

    # The default, `transient`: exactly the failed requests, and the judge calls of the answers
    # they bring, are sent: every request of a clean build that the faulty run did not answer.
    healed, sent, _ = build(healthy, config)
    assert sent == clean_sent - ok
    assert healed.table("failures").num_rows == 0
    volatile = ("latency_s", "cached")
    for name in ("questions", "responses", "judgments", "pairs", "rankings"):
        assert rows(healed, name, volatile) == rows(clean_version, name, volatile), name
    assert any(
        info["stages"]["responses"]["generation"] > 0
        for info in healed.manifest["branches"].values()
    )

    # Healed is final: another rerun sends nothing.
    _, sent, _ = build(healthy, config)
    assert sent == 0


def test_a_stage_file_lost_from_the_workspace_is_computed_again(
    servers: tuple[SimServer, SimServer], clean: tuple[Version, int], tmp_path: Path
) -> None:
    """A deleted `responses.parquet` whose `counts.json` remains: the stage is computed again
    (from the journal: no request is sent) instead of failing every later run."""
    healthy, _ = servers
    config = write_config(tmp_path, healthy, "ws")
    first, _, _ = build(healthy, config)
    lost = next((tmp_path / "ws" / "stages" / "responses").rglob("responses.parquet"))
    lost.unlink()
    again, sent, _ = build(healthy, config)
    assert sent == 0
    assert rows(again, "pairs") == rows(first, "pairs")
    assert (lost.parent.parent / f"{lost.parent.name}.r1" / "responses.parquet").exists()
