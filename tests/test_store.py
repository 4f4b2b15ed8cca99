"""The dataset store: publish parts, read back with real readers, shared files, immutability,
visibility, the lock."""

from __future__ import annotations

import os

# `datasets` reads these when imported: set them first, so nothing here can reach the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import io
import json
import math
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vlpref.store as store_module
from tests.tasks.test_publish import BRANCHES, make_tables, of_branch
from vlpref.config import PublishStage
from vlpref.errors import StoreError
from vlpref.publish import branch_parts, dataset_card
from vlpref.publish.rows import IMAGE_TYPE, unsafe_rates
from vlpref.store import (
    TABLES,
    DamagedVersion,
    Part,
    SharedFile,
    Store,
    Version,
    VersionInfo,
    find_secret,
    parse_part,
)

STAGE = PublishStage(splits={"train": 0.6, "validation": 0.2, "test": 0.2}, seed=0)
MANIFEST: dict[str, Any] = {
    "name": "vlpref-test",
    "taxonomy": {"file": "taxonomy/demo.yaml", "hash": "abc"},
    "prompts": {"easy": "p1"},
    "models": [
        {
            "name": "safe-model",
            "endpoint": "sim",
            "api_key_env": "SIM_KEY",  # the name of a variable is fine
            "sampling": {"temperature": 0.7, "max_tokens": 64},
        }
    ],
    "judges": [{"name": "judge", "model": "j"}],
    "code_version": "test",
    "counts": {"pairs": {"in": 30, "out": 30, "failed": 0}},
}


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return make_tables()


@pytest.fixture(scope="module")
def parts(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Everything as one branch `b1`: every table, and all three splits."""
    return branch_parts("b1", tables, STAGE)


@pytest.fixture(scope="module")
def two_parts(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """The two branches of `make_tables` as the parts `b1` and `b2`."""
    return {
        **branch_parts("b1", of_branch(tables, 0), STAGE),
        **branch_parts("b2", of_branch(tables, 1), STAGE),
    }


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, parts: dict[str, pa.Table]
) -> tuple[Store, Version]:
    store = Store(str(tmp_path_factory.mktemp("store")))
    info = store.publish(parts, MANIFEST, dataset_card)
    return store, store.open(info.version_id)


@pytest.fixture(scope="module")
def two_branches(
    tmp_path_factory: pytest.TempPathFactory, two_parts: dict[str, pa.Table]
) -> tuple[Store, Version]:
    store = Store(str(tmp_path_factory.mktemp("store2")))
    info = store.publish(two_parts, MANIFEST, dataset_card)
    return store, store.open(info.version_id)


def small_publish(store: Store, parts: dict[str, pa.Table], **kwargs: Any) -> VersionInfo:
    return store.publish(parts, dict(MANIFEST), dataset_card, **kwargs)


def parquet_files(version: Version) -> list[str]:
    return [rel for rel in version.manifest["files"] if rel.endswith(".parquet")]


def memory_location() -> str:
    return f"memory://vlpref-test-{uuid.uuid4().hex}/store"


# --- layout and manifest ------------------------------------------------------------------------


def test_layout(published: tuple[Store, Version]) -> None:
    store, version = published
    root = Path(version.info.location)
    assert root.parent == Path(store.root) / "versions"
    names = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert names == {
        *(f"tables/{name}/b1.parquet" for name in TABLES),
        "data/train/b1.parquet",
        "data/validation/b1.parquet",
        "data/test/b1.parquet",
        "manifest.json",
        "README.md",
        "_COMPLETE",
    }
    assert (Path(store.root) / "LATEST").read_text().strip() == version.version_id
    assert not list((Path(store.root) / ".staging").iterdir())
    assert not (Path(store.root) / ".lock").exists()


def test_manifest(published: tuple[Store, Version], tables: dict[str, pa.Table]) -> None:
    _, version = published
    manifest = version.manifest
    assert manifest["version_id"] == version.version_id
    assert manifest["layout"] == store_module.LAYOUT == 2
    assert manifest["parent"] is None
    assert manifest["created_at"].endswith("Z")
    assert manifest["taxonomy"] == MANIFEST["taxonomy"]
    assert set(manifest["files"]) == {
        *(f"tables/{n}/b1.parquet" for n in TABLES),
        *(f"data/{s}/b1.parquet" for s in STAGE.splits),
        "README.md",
    }
    assert all(set(entry) == {"size", "sha256"} for entry in manifest["files"].values())
    assert version.parts("data/train") == ["data/train/b1.parquet"]
    assert version.parts("tables/pairs") == ["tables/pairs/b1.parquet"]
    splits = manifest["splits"]
    assert sum(s["rows"] for s in splits.values()) == tables["pairs"].num_rows
    assert sum(s["images"] for s in splits.values()) == tables["images"].num_rows
    assert sum(sum(s["categories"].values()) for s in splits.values()) == 30
    # The statistics the card shows, computed from what was read back.
    rates = unsafe_rates(version.table("rankings"), {s: version.split(s) for s in version.splits})
    assert rates["by_model"]["risky-model"]["rate"] == 1.0
    assert (rates["chosen"], rates["rejected"]) == (0.0, 1.0)
    version.verify()


def test_side_tables_round_trip(
    published: tuple[Store, Version], tables: dict[str, pa.Table]
) -> None:
    _, version = published
    for name in TABLES:
        assert version.table(name).equals(tables[name]), name
    assert version.table("pairs", columns=["pair_id"]).column_names == ["pair_id"]
    assert version.split("train", columns=["image_id"]).num_rows == version.split("train").num_rows
    with pytest.raises(StoreError, match="unknown table"):
        version.table("nope")
    with pytest.raises(StoreError, match="no split"):
        version.split("nope")


def test_large_tables_get_several_row_groups(
    tmp_path: Path,
    tables: dict[str, pa.Table],
    parts: dict[str, pa.Table],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "_ROW_GROUP_BYTES", 4096)
    store = Store(str(tmp_path / "store"))
    version = store.open(small_publish(store, parts).version_id)
    images = pq.ParquetFile(version.path("tables/images/b1.parquet"))
    assert images.num_row_groups > 1
    assert images.metadata.num_rows == tables["images"].num_rows


# --- real readers -------------------------------------------------------------------------------


@pytest.fixture(params=["published", "two_branches"])
def any_version(request: pytest.FixtureRequest) -> tuple[Store, Version]:
    """The one-part and the two-part version: readers see both the same way."""
    found: tuple[Store, Version] = request.getfixturevalue(request.param)
    return found


def test_pyarrow_and_pandas_read_the_splits(any_version: tuple[Store, Version]) -> None:
    _, version = any_version
    total = 0
    for split in version.splits:
        folder = version.path(f"data/{split}")
        frame = pd.read_parquet(folder)
        assert list(frame.columns[:5]) == ["image", "question", "chosen", "rejected", "image_name"]
        assert (
            len(frame) == version.split(split).num_rows == version.manifest["splits"][split]["rows"]
        )
        assert pq.read_table(folder).num_rows == len(frame)
        total += len(frame)
    assert total == 30
    for name in TABLES:
        folder = version.path(f"tables/{name}")
        assert pq.read_table(folder).num_rows == version.table(name).num_rows


def test_duckdb_queries_the_splits(any_version: tuple[Store, Version]) -> None:
    _, version = any_version
    path = version.path("data/train")
    db = duckdb.connect()
    [(count, images, safer)] = db.execute(
        f"SELECT count(*), count(DISTINCT image_id), "
        f"count(*) FILTER (WHERE chosen_p_unsafe < rejected_p_unsafe) FROM '{path}/*.parquet'"
    ).fetchall()
    assert count == version.manifest["splits"]["train"]["rows"] == safer
    assert images == version.manifest["splits"]["train"]["images"]
    images_path = version.path("tables/images")
    [(width,)] = db.execute(f"SELECT max(width) FROM '{images_path}/*.parquet'").fetchall()
    assert width == 57


@pytest.fixture(scope="module")
def hf_loaded(
    published: tuple[Store, Version],
    two_branches: tuple[Store, Version],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """The version loaded once with `datasets`: by data files, and as a folder via its card;
    the two-part version via its card."""
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    _, version = published
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        files = {s: version.path(f"data/{s}/*.parquet") for s in version.splits}
        by_files = datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
        by_card = datasets.load_dataset(version.info.location, cache_dir=cache)
        two = datasets.load_dataset(two_branches[1].info.location, cache_dir=cache)
    return {"files": by_files, "card": by_card, "two": two, "module": datasets}


def test_datasets_decodes_images(
    hf_loaded: dict[str, Any], published: tuple[Store, Version], tables: dict[str, pa.Table]
) -> None:
    _, version = published
    datasets = hf_loaded["module"]
    loaded = hf_loaded["files"]
    sizes = {r["image_name"]: (r["width"], r["height"]) for r in tables["images"].to_pylist()}
    assert set(loaded) == set(version.splits)
    for split in version.splits:
        ds = loaded[split]
        assert len(ds) == version.manifest["splits"][split]["rows"]
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["question"] == datasets.Value("string")
        row = ds[0]
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == sizes[row["image_name"]]
        assert isinstance(row["chosen"], str) and isinstance(row["margin"], float)


def test_datasets_finds_the_splits_through_the_card(
    hf_loaded: dict[str, Any], published: tuple[Store, Version]
) -> None:
    _, version = published
    by_card = hf_loaded["card"]
    assert {s: len(d) for s, d in by_card.items()} == {
        s: version.manifest["splits"][s]["rows"] for s in version.splits
    }
    assert isinstance(by_card["train"][0]["image"], Image.Image)


def test_datasets_reads_every_part_of_a_split(
    hf_loaded: dict[str, Any], two_branches: tuple[Store, Version]
) -> None:
    _, version = two_branches
    two = hf_loaded["two"]
    assert len(version.parts("data/train")) == 2
    assert {s: len(d) for s, d in two.items()} == {
        s: version.manifest["splits"][s]["rows"] for s in version.splits
    }
    assert set(two["train"]["branch_id"]) == {"/".join(b) for b in BRANCHES}
    assert sorted(two["train"]["pair_id"]) == sorted(version.split("train")["pair_id"].to_pylist())


def test_card_front_matter(published: tuple[Store, Version]) -> None:
    import yaml

    _, version = published
    text = Path(version.path("README.md")).read_text()
    head = text.split("---\n")[1]
    meta = yaml.safe_load(head)
    assert meta["license"] == "cc-by-4.0"
    (config,) = meta["configs"]
    assert {f["split"]: f["path"] for f in config["data_files"]} == {
        s: f"data/{s}/*.parquet" for s in version.splits
    }
    assert version.version_id in text


def test_splits_are_disjoint_and_deterministic(
    published: tuple[Store, Version], tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    _, version = published
    owner: dict[str, str] = {}
    for split in version.splits:
        for image_id in version.split(split)["image_id"].to_pylist():
            assert owner.setdefault(image_id, split) == split
    again = Store(str(tmp_path / "again"))
    other = again.open(again.publish(parts, MANIFEST, dataset_card).version_id)
    for split in version.splits:
        assert other.split(split).equals(version.split(split))
    # Same content, same content hash: the ids differ only in their timestamp.
    assert other.version_id != version.version_id
    assert other.version_id[-8:] == version.version_id[-8:]


# --- immutability and visibility ----------------------------------------------------------------


def snapshot(root: str) -> dict[str, tuple[int, float]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime) for p in Path(root).rglob("*") if p.is_file()
    }


def test_publishing_twice_makes_two_versions(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    first = small_publish(store, parts)
    before = snapshot(first.location)
    second = small_publish(store, parts, parent=first.version_id)
    assert [v.version_id for v in store.list_versions()] == [first.version_id, second.version_id]
    assert store.latest() == second
    assert second.parent == first.version_id
    assert store.open(second.version_id).manifest["parent"] == first.version_id
    assert snapshot(first.location) == before
    store.open(first.version_id).verify()


def test_an_existing_version_is_never_overwritten(
    tmp_path: Path, parts: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = datetime.fromisoformat("2026-01-02T03:04:05.000006+00:00")

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:
            return frozen  # type: ignore[return-value]

    monkeypatch.setattr(store_module, "datetime", Clock)
    store = Store(str(tmp_path / "store"))
    first = small_publish(store, parts)
    before = snapshot(first.location)
    with pytest.raises(StoreError, match="already exists"):
        small_publish(store, parts)  # same content, same instant: the same id
    assert snapshot(first.location) == before
    assert store.list_versions() == [first]
    assert not list((tmp_path / "store" / ".staging").iterdir())


def test_incomplete_versions_are_invisible(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    done = small_publish(store, parts)
    # A copy that died before its marker, and a staging folder of a run that died.
    ghost = "29990101T000000.000000Z-deadbeef"
    ghost_dir = tmp_path / "store" / "versions" / ghost
    (ghost_dir / "data").mkdir(parents=True)
    (ghost_dir / "data" / "train.parquet").write_bytes(b"partial")
    (ghost_dir / "manifest.json").write_text("{}")
    staged = tmp_path / "store" / ".staging" / f"{ghost}-0000"
    staged.mkdir(parents=True)
    (staged / "_COMPLETE").write_text("{}")
    assert store.list_versions() == [done]
    assert store.latest() == done
    with pytest.raises(StoreError, match="no complete version"):
        store.open(ghost)
    with pytest.raises(StoreError, match="not a complete version"):
        small_publish(store, parts, parent=ghost)


def test_latest_never_moves_backwards(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    newer = small_publish(store, parts)
    store._move_latest("20000101T000000.000000Z-00000000")
    assert store.latest() == newer


def test_an_empty_store(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "nothing"))
    assert store.list_versions() == []
    assert store.latest() is None
    with pytest.raises(StoreError, match="not a version id"):
        store.open("../../etc")


# --- the lock -----------------------------------------------------------------------------------


def test_a_held_lock_fails_a_publish_naming_the_holder(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"), lock_timeout_s=0.3)
    with store.lock("a long maintenance job"), pytest.raises(StoreError) as caught:
        small_publish(store, parts)
    message = str(caught.value)
    assert "a long maintenance job" in message
    assert f"pid {os.getpid()}" in message
    assert store.list_versions() == []
    assert store.latest() is None
    assert not list((tmp_path / "store" / ".staging").iterdir())
    small_publish(store, parts)  # released: the next publish goes through


def test_a_publish_waits_for_the_lock(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"), lock_timeout_s=20)
    held = threading.Event()

    def hold() -> None:
        with store.lock("brief holder"):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    started = time.monotonic()
    info = small_publish(store, parts)
    thread.join()
    assert time.monotonic() - started >= 0.3
    assert store.latest() == info


def write_lock(root: Path, **record: Any) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / ".lock").write_text(json.dumps(record))


def test_a_stale_lock_is_broken(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    root = tmp_path / "store"
    write_lock(root, host="elsewhere", pid=1, purpose="old", acquired_ts=time.time() - 7200)
    store = Store(str(root), lock_timeout_s=0, stale_lock_s=3600)
    assert store.latest() is None
    small_publish(store, parts)
    assert not (root / ".lock").exists()


def test_a_lock_of_a_dead_local_process_is_broken(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    import socket

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    root = tmp_path / "store"
    write_lock(root, host=socket.gethostname(), pid=int(child.stdout), acquired_ts=time.time())
    store = Store(str(root), lock_timeout_s=0)
    small_publish(store, parts)
    # A live holder elsewhere is respected.
    write_lock(root, host="elsewhere", pid=1, purpose="remote run", acquired_ts=time.time())
    with pytest.raises(StoreError, match="remote run"):
        small_publish(store, parts)


def test_concurrent_publishes_do_not_corrupt_each_other(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"), lock_timeout_s=30)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Store(store.location, lock_timeout_s=30).publish(parts, MANIFEST, "card")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    versions = store.list_versions()
    assert len(versions) == 4
    for info in versions:
        store.open(info.version_id).verify()
    assert store.latest() == versions[-1]


# --- other filesystems --------------------------------------------------------------------------


def test_a_memory_store(tables: dict[str, pa.Table], parts: dict[str, pa.Table]) -> None:
    location = memory_location()
    store = Store(location)
    first = small_publish(store, parts)
    second = small_publish(store, parts, parent=first.version_id)
    assert store.list_versions() == [first, second]
    assert store.latest() == second
    assert second.location.startswith("memory://")
    version = store.open(second.version_id)
    version.verify()
    assert version.table("pairs").equals(tables["pairs"])
    path = version.path("data/train")
    assert path.startswith("memory://")
    assert len(pd.read_parquet(path)) == version.manifest["splits"]["train"]["rows"]
    image = version.split("train")["image"][0].as_py()
    assert Image.open(io.BytesIO(image["bytes"])).format == "PNG"
    assert not store.fs.exists(f"{store.root}/.staging") or not store.fs.ls(
        f"{store.root}/.staging", detail=False
    )


def test_a_crash_while_copying_to_an_object_store_leaves_nothing_visible(
    parts: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(memory_location())
    done = small_publish(store, parts)
    copies = 0
    original = store.fs.copy

    def flaky_copy(*args: Any, **kwargs: Any) -> None:
        nonlocal copies
        copies += 1
        if copies == 3:
            raise OSError("connection reset")
        original(*args, **kwargs)

    monkeypatch.setattr(store.fs, "copy", flaky_copy)
    with pytest.raises(OSError, match="connection reset"):
        small_publish(store, parts)
    partial = [
        p for p in store.fs.ls(f"{store.root}/versions", detail=False) if done.version_id not in p
    ]
    assert len(partial) == 1  # copied in part, no marker
    assert store.list_versions() == [done]
    assert store.latest() == done


# --- parts -------------------------------------------------------------------------------------


def test_two_branches_read_back_as_one_table(
    two_branches: tuple[Store, Version],
    two_parts: dict[str, pa.Table],
    tables: dict[str, pa.Table],
) -> None:
    _, version = two_branches
    assert set(parquet_files(version)) == set(two_parts)
    for name in TABLES:
        assert version.parts(f"tables/{name}") == [
            f"tables/{name}/b1.parquet",
            f"tables/{name}/b2.parquet",
        ]
        read = version.table(name)
        assert read.num_rows == tables[name].num_rows, name
        expected = pa.concat_tables(
            [two_parts[f"tables/{name}/b1.parquet"], two_parts[f"tables/{name}/b2.parquet"]]
        )
        assert read.equals(expected), name
    assert (
        version.table("images", columns=["branch_id"])["branch_id"].to_pylist()
        == ["/".join(BRANCHES[0])] * 5 + ["/".join(BRANCHES[1])] * 5
    )
    total = 0
    for split in version.splits:
        rows = version.split(split)
        counts = version.manifest["splits"][split]
        assert (
            rows.num_rows
            == counts["rows"]
            == sum(two_parts[rel].num_rows for rel in version.parts(f"data/{split}"))
        )
        assert counts["images"] == len(set(rows["image_id"].to_pylist()))
        assert rows.schema.field("image").type == IMAGE_TYPE
        total += rows.num_rows
    assert total == tables["pairs"].num_rows
    assert sum(len(version.parts(f"data/{s}")) for s in version.splits) == 4
    version.verify()


def test_a_table_without_a_part_gets_one_empty_part(
    tmp_path: Path, tables: dict[str, pa.Table], parts: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"))
    partial = {
        rel: tbl
        for rel, tbl in parts.items()
        if rel not in ("tables/judgments/b1.parquet", "tables/failures/b1.parquet")
    }
    info = store.publish(partial, MANIFEST, "card")
    version = store.open(info.version_id)
    assert version.parts("tables/judgments") == ["tables/judgments/empty.parquet"]
    assert version.parts("tables/failures") == ["tables/failures/empty.parquet"]
    assert version.table("judgments").num_rows == 0
    assert version.table("judgments").schema.names == tables["judgments"].schema.names
    assert version.parts("tables/pairs") == ["tables/pairs/b1.parquet"]
    assert pq.read_table(version.path("tables/failures")).num_rows == 0


def test_a_publish_without_data_is_refused(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    side = {rel: tbl for rel, tbl in parts.items() if rel.startswith("tables/")}
    with pytest.raises(StoreError, match="at least one data part"):
        store.publish(side, MANIFEST, "card")
    with pytest.raises(StoreError, match="at least one data part"):
        store.publish({}, MANIFEST, "card")
    assert store.list_versions() == []


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("tables/pairs/b1.parquet", ("tables", "pairs", "b1")),
        ("tables/images/empty.parquet", ("tables", "images", "empty")),
        ("data/train/b1.parquet", ("data", "train", "b1")),
        ("data/my_split2/cyber-0a1b2c.v2.parquet", ("data", "my_split2", "cyber-0a1b2c.v2")),
    ],
)
def test_parse_part_accepts_part_paths(rel: str, expected: tuple[str, str, str]) -> None:
    assert parse_part(rel) == expected


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("tables/extras/b1.parquet", "unknown table 'extras'"),
        ("tables/Pairs/b1.parquet", "unknown table 'Pairs'"),
        ("data/train/b1.csv", "not a part path"),
        ("data/train/b1.parquet.tmp", "not a part path"),
        ("data/train/b1", "not a part path"),
        ("data/train.parquet", "not a part path"),  # the old layout
        ("tables/pairs.parquet", "not a part path"),
        ("data/../evil/b1.parquet", "not a part path"),
        ("data/train/../b1.parquet", "not a part path"),
        ("data/train/sub/b1.parquet", "not a part path"),
        ("/data/train/b1.parquet", "not a part path"),
        ("data/1train/b1.parquet", "not a part path"),
        ("data/tr ain/b1.parquet", "not a part path"),
        ("data/train/.hidden.parquet", "not a part path"),
        ("data/train/b 1.parquet", "not a part path"),
        ("data/train/.parquet", "not a part path"),
        ("splits/train/b1.parquet", "not a part path"),
        ("README.md", "not a part path"),
        ("", "not a part path"),
    ],
)
def test_parse_part_rejects_bad_paths(rel: str, message: str) -> None:
    with pytest.raises(StoreError, match=re.escape(message)) as caught:
        parse_part(rel)
    assert repr(rel) in str(caught.value)


def test_a_bad_part_path_refuses_the_publish(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    bad = {**parts, "data/../../escape/b1.parquet": parts["data/train/b1.parquet"]}
    with pytest.raises(StoreError, match="not a part path"):
        store.publish(bad, MANIFEST, "card")
    assert store.list_versions() == []
    assert not (tmp_path / "escape").exists()


# --- shared files -------------------------------------------------------------------------------


def shared_parts(version: Version, branch_id: str) -> dict[str, Part]:
    """What the flow does for a reused branch: every file of the branch, shared."""
    suffix = f"/{branch_id}.parquet"
    return {
        rel: SharedFile(version.version_id, rel)
        for rel in version.manifest["files"]
        if rel.endswith(suffix)
    }


def b1_only(two_parts: dict[str, pa.Table]) -> dict[str, Part]:
    return {rel: tbl for rel, tbl in two_parts.items() if rel.endswith("/b1.parquet")}


def test_a_shared_file_is_a_hard_link(tmp_path: Path, two_parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    first = store.open(small_publish(store, two_parts).version_id)
    before = snapshot(first.info.location)
    built = b1_only(two_parts)
    shared = shared_parts(first, "b2")
    assert shared and all(rel.endswith("/b2.parquet") for rel in shared)
    second = store.open(
        store.publish({**built, **shared}, MANIFEST, "card", parent=first.version_id).version_id
    )
    for rel in shared:
        old, new = Path(first.path(rel)).stat(), Path(second.path(rel)).stat()
        assert (new.st_ino, new.st_dev) == (old.st_ino, old.st_dev), rel
        assert new.st_nlink == 2
        entry = second.manifest["files"][rel]
        parent_entry = first.manifest["files"][rel]
        assert entry == {**parent_entry, "shared_from": first.version_id}
    for rel in built:  # written anew: own files, no shared_from
        assert Path(first.path(rel)).stat().st_ino != Path(second.path(rel)).stat().st_ino
        assert set(second.manifest["files"][rel]) == {"size", "sha256"}
    assert second.manifest["parent"] == first.version_id
    for name in TABLES:
        assert second.table(name).equals(first.table(name)), name
    for split in first.splits:
        assert second.split(split).equals(first.split(split))
    assert second.manifest["splits"] == first.manifest["splits"]
    second.verify()
    first.verify()
    assert snapshot(first.info.location) == before


def test_sharing_a_shared_file_keeps_where_it_came_from(
    tmp_path: Path, two_parts: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"))
    first = store.open(small_publish(store, two_parts).version_id)
    built = b1_only(two_parts)
    second = store.open(
        store.publish({**built, **shared_parts(first, "b2")}, MANIFEST, "c").version_id
    )
    # Everything shared from the second version: b1 first came from it, b2 from the first.
    third = store.open(
        store.publish(
            {**shared_parts(second, "b1"), **shared_parts(second, "b2")}, MANIFEST, "c"
        ).version_id
    )
    for rel in parquet_files(third):
        if rel.endswith("/b2.parquet"):
            assert third.manifest["files"][rel]["shared_from"] == first.version_id
            assert Path(third.path(rel)).stat().st_ino == Path(first.path(rel)).stat().st_ino
            assert Path(third.path(rel)).stat().st_nlink == 3
        elif rel.endswith("/b1.parquet"):
            assert third.manifest["files"][rel]["shared_from"] == second.version_id
        else:
            assert "shared_from" not in third.manifest["files"][rel]
    for name in TABLES:
        assert third.table(name).equals(first.table(name)), name
    third.verify()


def test_a_shared_file_is_copied_where_links_fail(
    tmp_path: Path, two_parts: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(str(tmp_path / "store"))
    first = store.open(small_publish(store, two_parts).version_id)

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError("Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    second = store.open(store.publish(shared_parts(first, "b1"), MANIFEST, "c").version_id)
    for rel in shared_parts(first, "b1"):
        assert Path(second.path(rel)).stat().st_ino != Path(first.path(rel)).stat().st_ino
        assert second.manifest["files"][rel]["shared_from"] == first.version_id
    second.verify()


def test_a_shared_file_on_a_memory_store_is_a_copy(two_parts: dict[str, pa.Table]) -> None:
    store = Store(memory_location())
    first = store.open(small_publish(store, two_parts).version_id)
    shared = shared_parts(first, "b2")
    second = store.open(
        store.publish({**b1_only(two_parts), **shared}, MANIFEST, "card").version_id
    )
    assert second.info.location.startswith("memory://")
    second.verify()
    for rel in shared:
        entry = second.manifest["files"][rel]
        assert entry == {**first.manifest["files"][rel], "shared_from": first.version_id}
        assert store.fs.cat_file(second.path(rel)) == store.fs.cat_file(first.path(rel))
    for name in TABLES:
        assert second.table(name).equals(first.table(name)), name
    assert len(pd.read_parquet(second.path("data/train"))) == second.split("train").num_rows
    first.verify()


FIRST = "{first}"  # stands for the id of the version published first


@pytest.mark.parametrize("location", ["local", "memory"])
@pytest.mark.parametrize(
    ("version_id", "rel", "target", "message"),
    [
        (FIRST, "tables/pairs/b3.parquet", None, "has no file 'tables/pairs/b3.parquet'"),
        (FIRST, "data/tiny/b1.parquet", None, "has no file 'data/tiny/b1.parquet'"),
        ("29990101T000000.000000Z-deadbeef", "tables/pairs/b1.parquet", None, "no complete"),
        ("../../etc", "tables/pairs/b1.parquet", None, "not a version id"),
        (FIRST, "README.md", "tables/pairs/b3.parquet", "cannot be shared as"),
        (FIRST, "data/train/b1.parquet", "tables/pairs/b3.parquet", "cannot be shared as"),
        (FIRST, "tables/pairs/b1.parquet", "tables/rankings/b3.parquet", "cannot be shared as"),
    ],
)
def test_sharing_what_does_not_exist_is_refused(
    tmp_path: Path,
    parts: dict[str, pa.Table],
    location: str,
    version_id: str,
    rel: str,
    target: str | None,
    message: str,
) -> None:
    store = Store(str(tmp_path / "store") if location == "local" else memory_location())
    first = small_publish(store, parts)
    shared = SharedFile(version_id.replace(FIRST, first.version_id), rel)
    with pytest.raises(StoreError, match=re.escape(message)):
        store.publish({**parts, target or rel: shared}, MANIFEST, "card")
    assert store.list_versions() == [first]
    assert store.latest() == first
    staging = f"{store.root}/.staging"
    assert not store.fs.exists(staging) or not store.fs.ls(staging, detail=False)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"judges": [{"name": "j", "api_key": "abc"}]}, "manifest.judges[0].api_key"),
        ({"endpoint": {"Token": "x"}}, "manifest.endpoint.Token"),
        ({"password": None}, "manifest.password"),
        ({"notes": ["fine", "sk-proj-123456"]}, "manifest.notes[1]"),
        ({"header": "Bearer abc.def"}, "manifest.header"),
    ],
)
def test_secrets_are_refused(
    tmp_path: Path, parts: dict[str, pa.Table], extra: dict[str, Any], where: str
) -> None:
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="looks like a secret") as caught:
        store.publish(parts, {**MANIFEST, **extra}, "card")
    assert where in str(caught.value)
    assert "abc" not in str(caught.value).replace(where, "")
    assert not (tmp_path / "store").exists()


def test_harmless_lookalikes_are_not_secrets() -> None:
    assert find_secret(MANIFEST) is None
    assert find_secret({"max_tokens": 5, "prompt_tokens": 3, "task": "skate", "x": "sk"}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"manifest": {**MANIFEST, "version_id": "mine"}}, "sets"),
        ({"parts": {"tables/extras/b1.parquet": pa.table({"a": [1]})}}, "unknown table"),
        ({"parts": {"tables/pairs/b1.parquet": pa.table({"a": [1]})}}, "does not match its schema"),
        ({"parts": {"tables/pairs/b2.parquet": pa.table({"pair_id": [1]})}}, "does not match"),
        ({"parts": {"data/../evil/b1.parquet": pa.table({"a": [1]})}}, "not a part path"),
        ({"parts": {"data/train/b1.txt": pa.table({"a": [1]})}}, "not a part path"),
        ({"manifest": {**MANIFEST, "blob": b"bytes"}}, "not plain JSON"),
    ],
)
def test_bad_input_is_refused(
    tmp_path: Path, parts: dict[str, pa.Table], change: dict[str, Any], message: str
) -> None:
    store = Store(str(tmp_path / "store"))
    args: dict[str, Any] = {"parts": dict(parts), "manifest": MANIFEST, "card": "card"}
    args["manifest"] = change.get("manifest", MANIFEST)
    args["parts"].update(change.get("parts", {}))
    with pytest.raises(StoreError, match=message):
        store.publish(**args)
    assert store.list_versions() == []


def test_splits_without_pairs_are_not_published(
    tmp_path: Path, tables: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"))
    stage = PublishStage(splits={"train": 0.5, "tiny": 1e-9, "test": 0.5 - 1e-9})
    info = store.publish(branch_parts("b1", tables, stage), MANIFEST, dataset_card)
    version = store.open(info.version_id)
    assert version.splits == ["test", "train"]
    assert version.parts("data/tiny") == []
    assert not Path(version.path("data/tiny")).exists()
    with pytest.raises(StoreError, match="no split 'tiny'"):
        version.split("tiny")
    card = Path(version.path("README.md")).read_text()
    assert "data/tiny" not in card


def test_non_finite_numbers_become_null(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    manifest = {**MANIFEST, "model_safety": {"m": {"unsafe_rate": float("nan")}}, "x": [-math.inf]}
    info = store.publish(parts, manifest, "card")
    raw = Path(info.location, "manifest.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    saved = store.open(info.version_id).manifest
    assert saved["model_safety"]["m"]["unsafe_rate"] is None
    assert saved["x"] == [None]


def test_parts_from_a_generator_are_written_as_they_come(
    tmp_path: Path, two_parts: dict[str, pa.Table]
) -> None:
    """A lazy publish (one branch at a time) writes each part before asking for the next, and
    builds the manifest only once every part is written."""
    store = Store(str(tmp_path / "store"))
    staging = tmp_path / "store" / ".staging"
    written_before: list[int] = []
    yielded: list[str] = []

    def lazily() -> Iterator[tuple[str, pa.Table]]:
        for rel, tbl in two_parts.items():
            written_before.append(len(list(staging.rglob("*.parquet"))))
            yielded.append(rel)
            yield rel, tbl

    def manifest() -> dict[str, Any]:
        assert len(yielded) == len(two_parts)  # called after the last part
        return {**MANIFEST, "built": len(yielded)}

    info = store.publish(lazily(), manifest, "card")
    assert written_before == list(range(len(two_parts)))
    version = store.open(info.version_id)
    assert version.manifest["built"] == len(two_parts)
    eager = store.open(store.publish(two_parts, MANIFEST, "card").version_id)
    assert sorted(version.manifest["files"]) == sorted(eager.manifest["files"])


def test_a_lazy_publish_that_fails_leaves_no_version(
    tmp_path: Path, two_parts: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"))

    def breaks_halfway() -> Iterator[tuple[str, pa.Table]]:
        items = list(two_parts.items())
        yield from items[: len(items) // 2]
        raise RuntimeError("branch tables unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        store.publish(breaks_halfway(), MANIFEST, "card")
    with pytest.raises(StoreError, match="looks like a secret"):
        store.publish(
            iter(two_parts.items()), lambda: {**MANIFEST, "key": "sk-" + "a" * 40}, "card"
        )
    with pytest.raises(StoreError, match="given twice"):
        store.publish(iter([*two_parts.items(), *two_parts.items()]), MANIFEST, "card")
    assert store.list_versions() == []
    assert not list((tmp_path / "store" / ".staging").rglob("*.parquet"))


# --- damage, leftovers, a full disk ---------------------------------------------------------------


def test_a_damaged_version_does_not_hide_the_others(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    """A marker that is garbage, an empty marker, and a missing manifest: the others still list,
    and each damaged one names its file when it is opened."""
    store = Store(str(tmp_path / "store"))
    good, garbage, empty, no_manifest = (small_publish(store, parts) for _ in range(4))
    (Path(garbage.location) / "_COMPLETE").write_text("{not json")
    (Path(empty.location) / "_COMPLETE").write_text("")
    (Path(no_manifest.location) / "manifest.json").unlink()

    scanned = store.scan()
    assert [e.version_id for e in scanned] == [
        v.version_id for v in (good, garbage, empty, no_manifest)
    ]
    damaged = {e.version_id: e.reason for e in scanned if isinstance(e, DamagedVersion)}
    assert set(damaged) == {garbage.version_id, empty.version_id}
    assert "_COMPLETE" in damaged[garbage.version_id] and "not JSON" in damaged[garbage.version_id]
    assert "(empty)" in damaged[empty.version_id]
    assert store.list_versions() == [good, no_manifest]  # its marker is fine
    with pytest.raises(StoreError, match=r"_COMPLETE: the marker is damaged"):
        store.open(garbage.version_id)
    with pytest.raises(StoreError, match=r"manifest\.json: the manifest is missing"):
        _ = store.open(no_manifest.version_id).manifest
    # LATEST names the newest, whose manifest is gone: it opens, its manifest is what fails.
    assert store.latest() == no_manifest
    small_publish(store, parts, parent=good.version_id)  # the store still takes new versions


def test_a_damaged_part_or_latest_is_named(tmp_path: Path, parts: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    version = store.open(small_publish(store, parts).version_id)
    (Path(version.info.location) / "tables" / "pairs" / "b1.parquet").write_bytes(b"PAR1 torn")
    with pytest.raises(StoreError, match=r"tables/pairs/b1\.parquet: not a readable Parquet"):
        version.table("pairs")
    (Path(store.root) / "LATEST").write_text("../../etc/passwd\n")
    with pytest.raises(StoreError, match=r"LATEST: names '\.\./\.\./etc/passwd', which is not"):
        store.latest()
    small_publish(store, parts)  # a LATEST that names no version never blocks moving it
    assert store.latest() == store.list_versions()[-1]


def staging_names(root: Path) -> set[str]:
    staging = root / ".staging"
    return {p.name for p in staging.iterdir()} if staging.exists() else set()


def test_staging_folders_of_writers_that_are_gone_are_removed(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    """Fabricated leftovers, judged by the writer their name carries (module docstring)."""
    import socket

    root = tmp_path / "store"
    store = Store(str(root), stale_staging_s=3600)
    here = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    old = "20000101T000000.000000Z"
    now = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    leftovers = {
        f"{now}_{int(dead.stdout)}_0a0a0a0a_{here}": "removed",  # dead pid of this host
        f"{old}_{os.getpid()}_0b0b0b0b_{here}": "kept",  # this very process: in use, however old
        f"{now}_1_0c0c0c0c_elsewhere.example": "kept",  # another host, young
        f"{old}_1_0d0d0d0d_elsewhere.example": "removed",  # another host, older than the limit
        f"{old}-0e0e0e0e": "removed",  # an older name without an owner, old
        f"{now}-0f0f0f0f": "kept",  # the same, young
    }
    for name in leftovers:
        (root / ".staging" / name / "tables").mkdir(parents=True)
        (root / ".staging" / name / "tables" / "part.parquet").write_bytes(b"partial")
    info = small_publish(store, parts)
    assert staging_names(root) == {n for n, fate in leftovers.items() if fate == "kept"}
    assert store.list_versions() == [info]


KILLED_PUBLISHER = """
import sys, time
from vlpref.publish import branch_parts
from tests.tasks.test_publish import make_tables
from vlpref.config import PublishStage
from vlpref.store import Store

def slowly():
    for item in branch_parts("b1", make_tables(), PublishStage()).items():
        yield item
        print("part written", flush=True)
        time.sleep(120)

Store(sys.argv[1]).publish(slowly(), {"name": "killed"}, "card")
"""


def test_a_killed_publish_leaves_staging_that_the_next_publish_removes(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    """A real publisher, mid-write: a publish meanwhile leaves its folder alone (in use); once it
    is killed (SIGKILL: no cleanup of its own), the next publish removes it."""
    root = tmp_path / "store"
    store = Store(str(root))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "part written\n", (
            writer.stderr.read() if writer.stderr else ""
        )
        (in_use,) = staging_names(root)
        assert f"_{writer.pid}_" in in_use
        first = small_publish(store, parts)
        assert staging_names(root) == {in_use}  # a live writer's folder is never removed
    finally:
        writer.kill()
        writer.wait()
    second = small_publish(store, parts)
    assert staging_names(root) == set()
    assert store.list_versions() == [first, second]


def test_an_empty_lock_is_stale_after_a_short_grace(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    """The writer of an empty lock died between creating and writing it: no live holder can be
    behind it, so it is broken after EMPTY_LOCK_GRACE_S, not after stale_lock_s."""
    root = tmp_path / "store"
    root.mkdir()
    lock = root / ".lock"
    lock.touch()
    store = Store(str(root), lock_timeout_s=0.3)
    assert store_module.EMPTY_LOCK_GRACE_S == 10.0
    with pytest.raises(StoreError, match="unknown holder"):  # fresh: it may be being written
        small_publish(store, parts)
    old = time.time() - store_module.EMPTY_LOCK_GRACE_S - 1
    os.utime(lock, (old, old))
    small_publish(store, parts)  # older than the grace: broken at once
    assert not lock.exists()
    # Where the file's time says nothing, the waiter's own watch decides.
    lock.touch()
    watcher = store_module.StoreLock(
        store.fs, str(lock), purpose="t", timeout_s=5, stale_after_s=1800, empty_grace_s=0.3
    )
    started = time.monotonic()
    with watcher:
        assert json.loads(lock.read_text())["token"] == watcher.token
    assert 0.3 <= time.monotonic() - started < 4


@contextlib.contextmanager
def tiny_disk(where: Path, size: str = "64k") -> Iterator[Path]:
    """A real full disk: a tmpfs of `size` mounted at `where` (needs root; skips otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_a_store_error_naming_the_file(
    tmp_path: Path, parts: dict[str, pa.Table]
) -> None:
    with tiny_disk(tmp_path / "disk") as disk:
        store = Store(str(disk / "store"))
        with pytest.raises(StoreError) as caught:
            small_publish(store, parts)
        message = str(caught.value)
        assert message.startswith(f"cannot write {disk}/store/.staging/") and message.endswith(
            "No space left on device"
        ), message
        assert staging_names(disk / "store") == set()  # nothing left behind
        assert store.list_versions() == []


def test_a_write_error_without_a_file_is_named_where_it_happened(
    tmp_path: Path, parts: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a tmpfs: ENOSPC raised by the write itself, as a full disk raises it (no file)."""
    import errno

    def full(self: Any, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module._HashingWriter, "write", full)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match=r"cannot write .*/\.staging/.*\.parquet: No space left"):
        small_publish(store, parts)
