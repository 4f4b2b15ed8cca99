"""The whole pipeline through a real Prefect flow run (ephemeral local server) against the
simulated server over loopback, and the published version read back by pyarrow, pandas, DuckDB
and Hugging Face `datasets`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.build import STAGES, build_dataset
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-test-secret-value-7f3a"

SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-helpful": {"persona": "safe-helpful"},
        "sim-compliant": {"persona": "over-compliant"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-filtered": {"persona": "filtered", "filter_rate": 0.5},
        "sim-judge": {"persona": "judge", "position_bias": 0.1},
    }
}


def write_config(tmp: Path, base_url: str, **stages: Any) -> Path:
    data = sim_run_config(
        base_url,
        name="e2e",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace="ws",
        store="store",
        endpoint={"api_key_env": "VLPREF_E2E_KEY"},
        models=[
            {
                "name": name,
                "endpoint": "sim",
                "model": f"sim-{name}",
                "sampling": {"temperature": 0.7, "max_tokens": 96},
            }
            for name in ("refuser", "helpful", "compliant", "jailbroken", "filtered")
        ],
        per_branch=3,
        stages={"publish": {"splits": {"train": 0.6, "validation": 0.2, "test": 0.2}}, **stages},
    )
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: str
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("e2e")
    os.environ["VLPREF_E2E_KEY"] = SECRET
    with SimServer(SIM) as sim:
        config = write_config(tmp, sim.base_url)
        version_id = build_dataset(str(config))
        first_requests = sim.counters()["total"]
        rerun_id = build_dataset(str(config))
        yield {
            "tmp": tmp,
            "config": config,
            "version_id": version_id,
            "rerun_id": rerun_id,
            "first_requests": first_requests,
            "rerun_requests": sim.counters()["total"] - first_requests,
            "store": Store(str(tmp / "store")),
        }
    del os.environ["VLPREF_E2E_KEY"]


def test_every_stage_of_every_branch_accounts_for_its_rows(built: dict[str, Any]) -> None:
    manifest = built["store"].open(built["version_id"]).manifest
    assert len(manifest["branches"]) == 4
    for branch in manifest["branches"].values():
        assert set(branch["stages"]) == {"images", "questions", "responses", "judge", "pairs"}
        for stage, info in branch["stages"].items():
            counts = info["counts"]
            assert counts["in"] == counts["out"] + counts["failed"], (branch["path"], stage, counts)
            assert counts["in"] > 0
    assert (
        manifest["counts"]["responses"] == 4 * 3 * 3 * 5
    )  # branches x images x questions x models


def test_quadruples_load_in_pyarrow_pandas_duckdb_and_datasets(built: dict[str, Any]) -> None:
    import duckdb
    from datasets import load_dataset
    from PIL import Image

    version = built["store"].open(built["version_id"])
    train_path = version.path("data/train")  # one Parquet part per branch
    table = pq.read_table(train_path)
    for column in (
        "image",
        "question",
        "chosen",
        "rejected",
        "image_name",
        "class1",
        "class2",
        "class3",
    ):
        assert column in table.column_names
    frame = table.to_pandas()
    assert len(frame) > 0 and (frame["chosen"] != frame["rejected"]).all()
    relation = duckdb.sql(f"SELECT count(*) FROM '{train_path}/*.parquet'")
    assert relation is not None and relation.fetchall() == [(len(frame),)]
    dataset = load_dataset(
        "parquet",
        data_files={"train": f"{train_path}/*.parquet"},
        cache_dir=str(built["tmp"] / "hf-cache"),
    )["train"]
    first = dataset[0]
    assert isinstance(first["image"], Image.Image)
    assert first["image"].size == (512, 512)
    assert first["question"] == frame["question"][0]
    assert len(dataset) == len(frame)


def test_splits_are_disjoint_by_image(built: dict[str, Any]) -> None:
    version = built["store"].open(built["version_id"])
    seen: dict[str, str] = {}
    for split in version.splits:
        for name in version.split(split).column("image_name").to_pylist():
            assert seen.setdefault(name, split) == split


def test_unsafe_models_are_rejected_more_often(built: dict[str, Any]) -> None:
    version = built["store"].open(built["version_id"])
    safety = version.manifest["model_safety"]
    assert safety["jailbroken"]["unsafe_rate"] > 0.9 and safety["refuser"]["unsafe_rate"] < 0.1
    pairs = version.table("pairs").to_pandas()
    assert (pairs["rejected_model"] == "jailbroken").sum() > (
        pairs["chosen_model"] == "jailbroken"
    ).sum()


def test_a_rerun_with_nothing_changed_sends_no_request(built: dict[str, Any]) -> None:
    assert built["first_requests"] > 0
    assert built["rerun_requests"] == 0
    assert built["rerun_id"] != built["version_id"]
    store = built["store"]
    assert store.latest().version_id == built["rerun_id"]
    first, second = store.open(built["version_id"]), store.open(built["rerun_id"])
    assert second.manifest["parent"] == built["version_id"]
    assert first.table("pairs").equals(second.table("pairs"))
    # Nothing changed: every branch's files are the parent's, hard-linked, not copied.
    assert {b["status"] for b in second.manifest["branches"].values()} == {"reused"}
    assert second.manifest["rebuilt"] == []
    for rel in first.manifest["files"]:
        if rel.endswith(".parquet"):
            assert Path(first.path(rel)).stat().st_ino == Path(second.path(rel)).stat().st_ino
    second.verify()


def test_the_api_key_is_nowhere_on_disk(built: dict[str, Any]) -> None:
    for path in built["tmp"].rglob("*"):
        if path.is_file() and "hf-cache" not in path.parts:
            assert SECRET.encode() not in path.read_bytes(), path
    manifest = built["store"].open(built["version_id"]).manifest
    assert "VLPREF_E2E_KEY" not in json.dumps(manifest)  # not even the variable's name


def test_answering_follows_the_response_budget_and_not_the_result(
    built: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget of one response sample, branches answer (responses, judge, pairs) one at a
    time while the next ones are prepared (images, questions) meanwhile; the version is the one
    the default schedule built."""
    from flows import progress

    events: list[tuple[str, str]] = []
    unsubscribe = progress.subscribe(lambda stage, branch, counts: events.append((stage, branch)))
    monkeypatch.setenv("VLPREF_E2E_KEY", SECRET)
    try:
        with SimServer(SIM) as sim:
            config = write_config(tmp_path, sim.base_url)
            data = yaml.safe_load(config.read_text())
            config.write_text(
                yaml.safe_dump({**data, "parallel_branches": 4, "responses_in_flight": 1})
            )
            version_id = build_dataset(str(config))
    finally:
        unsubscribe()

    answering = [(stage, branch) for stage, branch in events if stage not in STAGES[:2]]
    assert len(answering) == 4 * 3
    for start in range(0, len(answering), 3):  # each branch's three answer stages, unbroken
        chain = answering[start : start + 3]
        assert [stage for stage, _ in chain] == ["responses", "judge", "pairs"]
        assert len({branch for _, branch in chain}) == 1
    first_pairs = events.index(answering[2])
    prepared_early = {b for stage, b in events[:first_pairs] if stage == "questions"}
    assert len(prepared_early) > 1  # the next branches were prepared while the first answered

    ours = Store(str(tmp_path / "store")).open(version_id)
    theirs = built["store"].open(built["version_id"])
    for name in ("pairs", "judgments", "responses"):
        assert _content(ours.table(name)).equals(_content(theirs.table(name))), name


def _content(tbl: pa.Table) -> pa.Table:
    """A table without the columns that say how an answer arrived, not what it was."""
    return tbl.drop_columns([c for c in ("latency_s", "cached") if c in tbl.column_names])
