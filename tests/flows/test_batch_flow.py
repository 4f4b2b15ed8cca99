"""The demo pipeline built with its endpoint in `mode: batch` equals the online build row for
row: the same requests went out (as batch lines, none online) and every table holds the same
rows, timings aside. Real Prefect flow runs against the session's Prefect server, the sim over
loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from flows.build import build_dataset
from vlpref.records import SCHEMAS
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store, Version

REPO = Path(__file__).resolve().parents[2]
SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-helpful": {"persona": "safe-helpful"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge", "position_bias": 0.1},
    },
    # Some lines fail and are sent again: the rows must not show it.
    "batch": {"fail_rate": 0.1},
}
BATCH = {"mode": "batch", "batch_poll_s": 0.05, "batch_poll_max_s": 0.2}
# How long a row took is the one thing a batch changes.
TIMINGS = {"latency_s"}


def build(tmp: Path, base_url: str, name: str, endpoint: dict[str, Any]) -> Version:
    folder = tmp / name
    data = sim_run_config(
        base_url,
        name=f"batch-flow-{name}",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(folder / "ws"),
        store=str(folder / "store"),
        models=["refuser", "helpful", "jailbroken"],
        endpoint=endpoint,
    )
    path = folder / "run.yaml"
    folder.mkdir()
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Store(str(folder / "store")).open(build_dataset(str(path)))


def rows(table: pa.Table) -> list[dict[str, Any]]:
    kept = [c for c in table.column_names if c not in TIMINGS]
    return sorted(table.select(kept).to_pylist(), key=repr)


def test_a_batch_build_equals_the_online_build_row_for_row(
    tmp_path: Path, prefect_server: str
) -> None:
    with SimServer(SIM) as sim:
        online = build(tmp_path, sim.base_url, "online", {})
        sent_online = sim.counters()["total"]
        batched = build(tmp_path, sim.base_url, "batch", BATCH)
        counters = sim.counters()
    assert sent_online > 0 and counters["total"] == sent_online  # nothing online in batch mode
    batch = counters["batch"]
    failed = sum(n for status, n in batch["lines_by_status"].items() if status != "200")
    assert failed > 0 and batch["lines"] == sent_online + failed
    compared = 0
    for name in SCHEMAS:
        a, b = online.table(name), batched.table(name)
        assert rows(a) == rows(b), name
        compared += a.num_rows
    assert compared > 0
