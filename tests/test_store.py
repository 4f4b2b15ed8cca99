"""The dataset store: publish, read back with real readers, immutability, visibility, the lock."""

from __future__ import annotations

import os

# `datasets` reads these when imported: set them first, so nothing here can reach the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import json
import math
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import vlpref.store as store_module
from tasks.publish import dataset_card, publish_version
from tests.tasks.test_publish import make_tables, quadruples_of
from vlpref.config import PublishStage
from vlpref.errors import StoreError
from vlpref.store import TABLES, Store, Version, VersionInfo, find_secret

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
def published(
    tmp_path_factory: pytest.TempPathFactory, tables: dict[str, pa.Table]
) -> tuple[Store, Version]:
    store = Store(str(tmp_path_factory.mktemp("store")))
    info = publish_version(store, tables, MANIFEST, STAGE)
    return store, store.open(info.version_id)


def small_publish(store: Store, tables: dict[str, pa.Table], **kwargs: Any) -> VersionInfo:
    quads = quadruples_of(tables)
    return store.publish(tables, quads, dict(MANIFEST), dataset_card, **kwargs)


def memory_location() -> str:
    return f"memory://vlpref-test-{uuid.uuid4().hex}/store"


# --- layout and manifest ------------------------------------------------------------------------


def test_layout(published: tuple[Store, Version]) -> None:
    store, version = published
    root = Path(version.info.location)
    assert root.parent == Path(store.root) / "versions"
    names = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert names == {
        *(f"tables/{name}.parquet" for name in TABLES),
        "data/train.parquet",
        "data/validation.parquet",
        "data/test.parquet",
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
    assert manifest["parent"] is None
    assert manifest["created_at"].endswith("Z")
    assert manifest["taxonomy"] == MANIFEST["taxonomy"]
    assert set(manifest["files"]) == {
        *(f"tables/{n}.parquet" for n in TABLES),
        *(f"data/{s}.parquet" for s in STAGE.splits),
        "README.md",
    }
    assert all(set(entry) == {"size", "sha256"} for entry in manifest["files"].values())
    splits = manifest["splits"]
    assert sum(s["rows"] for s in splits.values()) == tables["pairs"].num_rows
    assert sum(s["images"] for s in splits.values()) == tables["images"].num_rows
    assert sum(sum(s["categories"].values()) for s in splits.values()) == 30
    assert manifest["unsafe_rates"]["by_model"]["risky-model"]["rate"] == 1.0
    version.verify()


def test_side_tables_round_trip(
    published: tuple[Store, Version], tables: dict[str, pa.Table]
) -> None:
    _, version = published
    for name in TABLES:
        assert version.table(name).equals(tables[name]), name
    with pytest.raises(StoreError, match="unknown table"):
        version.table("nope")
    with pytest.raises(StoreError, match="no split"):
        version.split("nope")


def test_large_tables_get_several_row_groups(
    tmp_path: Path, tables: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_ROW_GROUP_BYTES", 4096)
    store = Store(str(tmp_path / "store"))
    version = store.open(small_publish(store, tables).version_id)
    images = pq.ParquetFile(version.path("tables/images.parquet"))
    assert images.num_row_groups > 1
    assert images.metadata.num_rows == tables["images"].num_rows


# --- real readers -------------------------------------------------------------------------------


def test_pyarrow_and_pandas_read_the_splits(published: tuple[Store, Version]) -> None:
    _, version = published
    total = 0
    for split in version.splits:
        frame = pd.read_parquet(version.path(f"data/{split}.parquet"))
        assert list(frame.columns[:5]) == ["image", "question", "chosen", "rejected", "image_name"]
        assert (
            len(frame) == version.split(split).num_rows == version.manifest["splits"][split]["rows"]
        )
        total += len(frame)
    assert total == 30


def test_duckdb_queries_the_splits(published: tuple[Store, Version]) -> None:
    _, version = published
    path = version.path("data/train.parquet")
    db = duckdb.connect()
    [(count, images, safer)] = db.execute(
        f"SELECT count(*), count(DISTINCT image_id), "
        f"count(*) FILTER (WHERE chosen_p_unsafe < rejected_p_unsafe) FROM '{path}'"
    ).fetchall()
    assert count == version.manifest["splits"]["train"]["rows"] == safer
    assert images == version.manifest["splits"]["train"]["images"]
    images_path = version.path("tables/images.parquet")
    [(width,)] = db.execute(f"SELECT max(width) FROM '{images_path}'").fetchall()
    assert width == 57


@pytest.fixture(scope="module")
def hf_loaded(
    published: tuple[Store, Version], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The version loaded once with `datasets`: by data files, and as a folder via its card."""
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    _, version = published
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        files = {s: version.path(f"data/{s}.parquet") for s in version.splits}
        by_files = datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
        by_card = datasets.load_dataset(version.info.location, cache_dir=cache)
    return {"files": by_files, "card": by_card, "module": datasets}


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


def test_card_front_matter(published: tuple[Store, Version]) -> None:
    import yaml

    _, version = published
    text = Path(version.path("README.md")).read_text()
    head = text.split("---\n")[1]
    meta = yaml.safe_load(head)
    assert meta["license"] == "cc-by-4.0"
    assert version.version_id in text


def test_splits_are_disjoint_and_deterministic(
    published: tuple[Store, Version], tmp_path: Path, tables: dict[str, pa.Table]
) -> None:
    _, version = published
    owner: dict[str, str] = {}
    for split in version.splits:
        for image_id in version.split(split)["image_id"].to_pylist():
            assert owner.setdefault(image_id, split) == split
    again = Store(str(tmp_path / "again"))
    other = again.open(publish_version(again, tables, MANIFEST, STAGE).version_id)
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


def test_publishing_twice_makes_two_versions(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    first = small_publish(store, tables)
    before = snapshot(first.location)
    second = small_publish(store, tables, parent=first.version_id)
    assert [v.version_id for v in store.list_versions()] == [first.version_id, second.version_id]
    assert store.latest() == second
    assert second.parent == first.version_id
    assert store.open(second.version_id).manifest["parent"] == first.version_id
    assert snapshot(first.location) == before
    store.open(first.version_id).verify()


def test_an_existing_version_is_never_overwritten(
    tmp_path: Path, tables: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = datetime.fromisoformat("2026-01-02T03:04:05.000006+00:00")

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:
            return frozen  # type: ignore[return-value]

    monkeypatch.setattr(store_module, "datetime", Clock)
    store = Store(str(tmp_path / "store"))
    first = small_publish(store, tables)
    before = snapshot(first.location)
    with pytest.raises(StoreError, match="already exists"):
        small_publish(store, tables)  # same content, same instant: the same id
    assert snapshot(first.location) == before
    assert store.list_versions() == [first]
    assert not list((tmp_path / "store" / ".staging").iterdir())


def test_incomplete_versions_are_invisible(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    done = small_publish(store, tables)
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
        small_publish(store, tables, parent=ghost)


def test_latest_never_moves_backwards(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    newer = small_publish(store, tables)
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
    tmp_path: Path, tables: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"), lock_timeout_s=0.3)
    with store.lock("a long maintenance job"), pytest.raises(StoreError) as caught:
        small_publish(store, tables)
    message = str(caught.value)
    assert "a long maintenance job" in message
    assert f"pid {os.getpid()}" in message
    assert store.list_versions() == []
    assert store.latest() is None
    assert not list((tmp_path / "store" / ".staging").iterdir())
    small_publish(store, tables)  # released: the next publish goes through


def test_a_publish_waits_for_the_lock(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
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
    info = small_publish(store, tables)
    thread.join()
    assert time.monotonic() - started >= 0.3
    assert store.latest() == info


def write_lock(root: Path, **record: Any) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / ".lock").write_text(json.dumps(record))


def test_a_stale_lock_is_broken(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    root = tmp_path / "store"
    write_lock(root, host="elsewhere", pid=1, purpose="old", acquired_ts=time.time() - 7200)
    store = Store(str(root), lock_timeout_s=0, stale_lock_s=3600)
    assert store.latest() is None
    small_publish(store, tables)
    assert not (root / ".lock").exists()


def test_a_lock_of_a_dead_local_process_is_broken(
    tmp_path: Path, tables: dict[str, pa.Table]
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
    small_publish(store, tables)
    # A live holder elsewhere is respected.
    write_lock(root, host="elsewhere", pid=1, purpose="remote run", acquired_ts=time.time())
    with pytest.raises(StoreError, match="remote run"):
        small_publish(store, tables)


def test_concurrent_publishes_do_not_corrupt_each_other(
    tmp_path: Path, tables: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"), lock_timeout_s=30)
    quads = quadruples_of(tables)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Store(store.location, lock_timeout_s=30).publish(tables, quads, MANIFEST, "card")
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


def test_a_memory_store(tables: dict[str, pa.Table]) -> None:
    location = memory_location()
    store = Store(location)
    first = small_publish(store, tables)
    second = small_publish(store, tables, parent=first.version_id)
    assert store.list_versions() == [first, second]
    assert store.latest() == second
    assert second.location.startswith("memory://")
    version = store.open(second.version_id)
    version.verify()
    assert version.table("pairs").equals(tables["pairs"])
    path = version.path("data/train.parquet")
    assert path.startswith("memory://")
    assert len(pd.read_parquet(path)) == version.manifest["splits"]["train"]["rows"]
    image = version.split("train")["image"][0].as_py()
    assert Image.open(io.BytesIO(image["bytes"])).format == "PNG"
    assert not store.fs.exists(f"{store.root}/.staging") or not store.fs.ls(
        f"{store.root}/.staging", detail=False
    )


def test_a_crash_while_copying_to_an_object_store_leaves_nothing_visible(
    tables: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(memory_location())
    done = small_publish(store, tables)
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
        small_publish(store, tables)
    partial = [
        p for p in store.fs.ls(f"{store.root}/versions", detail=False) if done.version_id not in p
    ]
    assert len(partial) == 1  # copied in part, no marker
    assert store.list_versions() == [done]
    assert store.latest() == done


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
    tmp_path: Path, tables: dict[str, pa.Table], extra: dict[str, Any], where: str
) -> None:
    store = Store(str(tmp_path / "store"))
    quads = quadruples_of(tables)
    with pytest.raises(StoreError, match="looks like a secret") as caught:
        store.publish(tables, quads, {**MANIFEST, **extra}, "card")
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
        ({"tables": {"extras": pa.table({"a": [1]})}}, "unknown tables"),
        ({"tables": {"pairs": pa.table({"a": [1]})}}, "does not match its schema"),
        ({"quadruples": {"../evil": pa.table({"a": [1]})}}, "split names"),
        ({"manifest": {**MANIFEST, "blob": b"bytes"}}, "not plain JSON"),
    ],
)
def test_bad_input_is_refused(
    tmp_path: Path, tables: dict[str, pa.Table], change: dict[str, Any], message: str
) -> None:
    store = Store(str(tmp_path / "store"))
    args: dict[str, Any] = {
        "tables": tables,
        "quadruples": quadruples_of(tables),
        "manifest": MANIFEST,
        "card": "card",
    }
    args.update(change)
    with pytest.raises(StoreError, match=message):
        store.publish(**args)
    assert store.list_versions() == []


def test_missing_tables_are_written_empty(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    partial = {k: v for k, v in tables.items() if k not in ("judgments", "failures")}
    info = store.publish(partial, quadruples_of(tables), MANIFEST, "card")
    version = store.open(info.version_id)
    assert version.table("judgments").num_rows == 0
    assert version.table("judgments").schema.names == tables["judgments"].schema.names


def test_splits_without_pairs_are_not_published(
    tmp_path: Path, tables: dict[str, pa.Table]
) -> None:
    store = Store(str(tmp_path / "store"))
    stage = PublishStage(splits={"train": 0.5, "tiny": 1e-9, "test": 0.5 - 1e-9})
    version = store.open(publish_version(store, tables, MANIFEST, stage).version_id)
    assert version.splits == ["test", "train"]
    assert version.manifest["split_fractions"]["tiny"] == 1e-9
    assert not Path(version.path("data/tiny.parquet")).exists()


def test_non_finite_numbers_become_null(tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    store = Store(str(tmp_path / "store"))
    manifest = {**MANIFEST, "model_safety": {"m": {"unsafe_rate": float("nan")}}, "x": [-math.inf]}
    info = store.publish(tables, quadruples_of(tables), manifest, "card")
    raw = Path(info.location, "manifest.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    saved = store.open(info.version_id).manifest
    assert saved["model_safety"]["m"]["unsafe_rate"] is None
    assert saved["x"] == [None]
