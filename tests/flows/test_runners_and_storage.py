"""The same flow on other task runners and filesystems produces the same rows.

- Dask: prefect-dask's DaskTaskRunner over a local cluster of two worker *processes*.
- memory://: the workspace (journal + stage outputs) and the store on fsspec's in-memory
  filesystem instead of local files.
- file://: the workspace and store given as fsspec URIs of the local filesystem.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from flows.build import build_dataset
from flows.runners import task_runner
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store, Version

REPO = Path(__file__).resolve().parents[2]
TABLE_KEYS = {
    "images": "image_id",
    "questions": "question_id",
    "responses": "response_id",
    "judgments": "judgment_id",
    "pairs": "pair_id",
    "rankings": "response_id",
}
SIM = {
    "models": {
        m: {"persona": p}
        for m, p in [
            ("sim-refuser", "refuser"),
            ("sim-mixed", "mixed"),
            ("sim-jailbroken", "jailbroken"),
            ("sim-judge", "judge"),
        ]
    }
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def config(tmp: Path, sim: SimServer, workspace: str, store: str) -> str:
    mixed = {
        "name": "mixed",
        "endpoint": "sim",
        "model": "sim-mixed",
        "sampling": {"temperature": 1.0, "n": 2},
    }
    data = sim_run_config(
        sim.base_url,
        name="runners",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=workspace,
        store=store,
        models=["refuser", mixed, "jailbroken"],
    )
    path = tmp / f"run-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def tables(version: Version) -> dict[str, pa.Table]:
    return {name: version.table(name).sort_by(key) for name, key in TABLE_KEYS.items()}


def assert_same_rows(a: Version, b: Version) -> None:
    ta, tb = tables(a), tables(b)
    for name in TABLE_KEYS:
        left, right = ta[name], tb[name]
        if name == "responses":  # cache and timing columns differ by nature
            left, right = left.drop(["latency_s", "cached"]), right.drop(["latency_s", "cached"])
        assert left.equals(right), name
    for split in a.splits:
        assert a.split(split).sort_by("pair_id").equals(b.split(split).sort_by("pair_id")), split


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, sim: SimServer, prefect_server: str
) -> Version:
    tmp = tmp_path_factory.mktemp("reference")
    version_id = build_dataset(config(tmp, sim, str(tmp / "ws"), str(tmp / "store")))
    return Store(str(tmp / "store")).open(version_id)


def test_dask_runner_matches_the_default_runner_row_for_row(
    tmp_path: Path, sim: SimServer, reference: Version
) -> None:
    path = config(tmp_path, sim, str(tmp_path / "ws"), str(tmp_path / "store"))
    before = sim.counters()["total"]
    flow = build_dataset.with_options(task_runner=task_runner("dask", workers=2))
    version_id = flow(path)
    assert sim.counters()["total"] > before  # a fresh workspace: the workers really asked
    assert_same_rows(reference, Store(str(tmp_path / "store")).open(version_id))


def test_memory_filesystem_workspace_and_store(
    tmp_path: Path, sim: SimServer, reference: Version
) -> None:
    root = f"memory://vlpref-{uuid.uuid4().hex[:8]}"
    version_id = build_dataset(config(tmp_path, sim, f"{root}/ws", f"{root}/store"))
    store = Store(f"{root}/store")
    version = store.open(version_id)
    assert version.path("").startswith("memory://")
    assert_same_rows(reference, version)
    version.verify()
    # And the rerun is free there too: the journal and stage outputs live in memory://.
    before = sim.counters()["total"]
    build_dataset(config(tmp_path, sim, f"{root}/ws", f"{root}/store"))
    assert sim.counters()["total"] == before
    assert len(store.list_versions()) == 2


def test_file_uri_workspace_and_store(tmp_path: Path, sim: SimServer, reference: Version) -> None:
    ws, st = f"file://{tmp_path}/ws", f"file://{tmp_path}/store"
    version_id = build_dataset(config(tmp_path, sim, ws, st))
    assert_same_rows(reference, Store(st).open(version_id))
    assert (tmp_path / "ws" / "journal").is_dir()


def test_concurrent_runs_on_one_store_both_publish(tmp_path: Path, sim: SimServer) -> None:
    import contextvars
    import threading

    path = config(tmp_path, sim, str(tmp_path / "ws"), str(tmp_path / "store"))
    build_dataset(path)  # warm the workspace so both runs race only on publishing
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(build_dataset(path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # Each thread runs in a copy of this context: Prefect's settings (the API URL) live there.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(run,)) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = Store(str(tmp_path / "store"))
    assert len(store.list_versions()) == 3 and len(set(results)) == 2
    assert store.latest().version_id == max(results)  # type: ignore[union-attr]
    for info in store.list_versions():
        store.open(info.version_id).verify()
