"""The shared filters (counts that add up, each reason counted), `write_exports`, the staging of
an export, and `vlpref export` on the command line (registered as vlpref.cli will register it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import error_line
from vlpref.errors import DataError
from vlpref.export import EXPORT_JSON, ExportSpec, Filters, export_version, write_exports
from vlpref.export.filters import Tally, components
from vlpref.store import Version


def all_pairs(version: Version) -> list[dict[str, Any]]:
    rows = []
    for split in version.splits:
        for row in version.split(split).drop(["image"]).to_pylist():
            rows.append({**row, "split": split})
    return rows


def written_pair_ids(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {
        pid
        for path in (out / "parquet").glob("*.parquet")
        for pid in pq.read_table(path)["pair_id"].to_pylist()
    }


def test_every_filter_keeps_exactly_the_rows_it_should(version: Version, out: Path) -> None:
    pairs = all_pairs(version)
    assert any(not p["consistent"] for p in pairs), "the fixture needs inconsistent pairs"
    category = "Malicious Use"
    filters = Filters.of(
        splits=["train", "validation"],
        categories=[category],
        consistent_only=True,
        min_margin=0.1,
        min_confidence=0.05,
    )
    result = export_version(version, ExportSpec("trl", filters), out)
    want: dict[str, int] = {}
    kept = set()
    for p in pairs:
        reason = (
            "split"
            if p["split"] not in ("train", "validation")
            else "category"
            if p["class1"] != category
            else "inconsistent"
            if p["consistent"] is not True
            else "margin"
            if p["margin"] is None or p["margin"] < 0.1
            else "confidence"
            if p["confidence"] is None or p["confidence"] < 0.05
            else None
        )
        if reason is None:
            kept.add(p["pair_id"])
        else:
            want[reason] = want.get(reason, 0) + 1
    assert result.rows_filtered == want
    assert result.rows_in == len(pairs) and result.rows_written == len(kept)
    assert written_pair_ids(out) == kept
    assert json.loads((out / EXPORT_JSON).read_text())["filters"] == filters.to_json()


def test_listwise_keeps_a_question_when_all_its_pairs_pass(version: Version, out: Path) -> None:
    pairs = version.table("pairs").to_pylist()
    result = export_version(version, ExportSpec("listwise", Filters.of(consistent_only=True)), out)
    questions = version.table("questions")["question_id"].to_pylist()
    with_pairs = {p["question_id"] for p in pairs}
    inconsistent = {p["question_id"] for p in pairs if not p["consistent"]}
    assert result.rows_filtered.get("no_pair", 0) == len(set(questions) - with_pairs)
    assert result.rows_filtered.get("inconsistent", 0) == len(inconsistent)
    assert result.rows_in == len(questions)


def test_a_category_prefix_matches_at_component_boundaries() -> None:
    filters = Filters.of(categories=["Malicious Use / Security threats"])
    assert filters.keeps_category("Malicious Use/Security threats/malware")
    assert not filters.keeps_category("Malicious Use/Security/x")
    assert not filters.keeps_category("Malicious Use Extra/Security threats/x")
    assert components(" a / b/ c ") == ["a", "b", "c"]
    tally = Tally()
    tally.drop("margin", 2)
    tally.drop("split", 1)
    assert tally.by_reason() == {"split": 1, "margin": 2}  # in REASONS order


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ExportSpec("csv"), "unknown format 'csv'"),
        (ExportSpec("trl", Filters.of(splits=["dev"])), "unknown split 'dev'"),
        (ExportSpec("trl", Filters.of(categories=["Malicious"])), "unknown category 'Malicious'"),
        (ExportSpec("trl", Filters.of(min_margin=float("nan"))), "not a finite number"),
    ],
)
def test_bad_input_is_a_data_error_before_anything_is_written(
    version: Version, out: Path, spec: ExportSpec, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        export_version(version, spec, out)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_an_export_that_fails_midway_leaves_nothing(
    version: Version, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlpref.export.source import ImageFiles

    def broken(*args: Any, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ImageFiles, "add", broken)
    with pytest.raises(OSError, match="No space"):
        export_version(version, ExportSpec("swift"), out)
    assert not out.exists()
    assert not list(out.parent.iterdir())


def test_an_empty_out_folder_is_used_and_a_full_one_refused(version: Version, out: Path) -> None:
    out.mkdir()
    export_version(version, ExportSpec("listwise"), out)
    assert (out / EXPORT_JSON).exists()
    with pytest.raises(DataError, match="exists and is not empty"):
        export_version(version, ExportSpec("listwise"), out)


def test_write_exports_from_the_version_folder(version: Version, tmp_path: Path) -> None:
    folder = version.path("")
    specs = [ExportSpec("trl"), ExportSpec("trl", Filters.of(splits=["test"]), name="trl-test")]
    results = write_exports(folder, specs, tmp_path / "exports")
    assert [r.out for r in results] == [
        tmp_path / "exports" / "trl",
        tmp_path / "exports" / "trl-test",
    ]
    assert set(results[1].splits) == {"test"}
    assert results[0].rows_written > results[1].rows_written > 0
    with pytest.raises(DataError, match="share output folders"):
        write_exports(folder, [ExportSpec("trl"), ExportSpec("trl")], tmp_path / "again")
    with pytest.raises(Exception, match="not a version folder"):
        write_exports(str(tmp_path), specs, tmp_path / "again")


# --- the command line ---------------------------------------------------------------------------

# vlpref.cli registers the command with `app.command("export")(export)`; until then, and in any
# case, the test registers it the same way on the real app and runs the real `main`.
ENTRY = (
    "from vlpref.cli import app, main\n"
    "from vlpref.export_cli import export\n"
    "if not any(c.name == 'export' for c in app.registered_commands):\n"
    "    app.command('export')(export)\n"
    "main()\n"
)


def vlpref_export(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VLPREF_CONFIG"}
    return subprocess.run(
        [sys.executable, "-c", ENTRY, "export", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )


def test_the_command_writes_an_export_and_says_how_to_train(version: Version, out: Path) -> None:
    store = str(Path(version.path("")).parents[1])
    proc = vlpref_export(
        "latest",
        "--store",
        store,
        "--format",
        "swift",
        "--out",
        str(out),
        "--split",
        "train",
        "--consistent-only",
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / EXPORT_JSON).read_text())
    assert info["version_id"] == version.version_id
    assert info["filters"]["splits"] == ["train"] and info["filters"]["consistent_only"]
    assert f"swift: {info['rows_in']} pairs in, {info['rows_written']} written" in proc.stderr
    assert "train with: swift rlhf --rlhf_type dpo" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "axolotl"], "error: unknown format 'axolotl'"),
        (["--format", "trl", "--split", "dev"], "error: unknown split 'dev'"),
        (["--format", "trl", "--category", "Nope/Thing"], "error: unknown category 'Nope/Thing'"),
    ],
)
def test_bad_input_is_one_error_line(
    version: Version, out: Path, args: list[str], message: str
) -> None:
    store = str(Path(version.path("")).parents[1])
    proc = vlpref_export(version.version_id, "--store", store, "--out", str(out), *args)
    assert error_line(proc).startswith(message)
    assert not out.exists()


def test_a_full_out_folder_is_one_error_line(version: Version, out: Path) -> None:
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    store = str(Path(version.path("")).parents[1])
    proc = vlpref_export("latest", "-s", store, "-f", "trl", "-o", str(out))
    assert error_line(proc) == f"error: {out}: the output folder exists and is not empty"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_no_store_is_one_error_line(out: Path) -> None:
    """No --store, no --config, and no config to find (vlpref/config_lookup.py) where it runs."""
    proc = vlpref_export("latest", "-f", "trl", "-o", str(out), cwd=out.parent)
    assert error_line(proc).startswith("error: no run config: give --config FILE")
