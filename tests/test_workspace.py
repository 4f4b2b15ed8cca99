"""Stage outputs in the workspace: generations of one key, output ids, lost files, and the retry
policy's table. Real files (a tmp folder) and fsspec's in-memory filesystem."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from vlpref.errors import ConfigError
from vlpref.retry import (
    PERMANENT_KINDS,
    TRANSIENT_KINDS,
    check_policy,
    retried,
    retryable_count,
)
from vlpref.stage import FailureRow, StageOutput
from vlpref.workspace import Workspace, output_id

ROWS = pa.table({"x": [1, 2]})


def output(*failures: FailureRow) -> StageOutput:
    return StageOutput("responses", "b1", "samples", 2 + len(failures), ROWS, failures)


@pytest.fixture(params=["local", "memory"])
def workspace(request: pytest.FixtureRequest, tmp_path: Path) -> Workspace:
    if request.param == "local":
        return Workspace(str(tmp_path / "ws"))
    return Workspace(f"memory://ws-{tmp_path.name}")


def test_an_output_without_failures_is_known_by_its_key(workspace: Workspace) -> None:
    ref = workspace.write(output(), "k1", {"responses": ROWS})
    assert ref.output_id == "k1" and ref.generation == 0 and ref.failed_by_kind == {}
    found = workspace.find("responses", "b1", "k1")
    assert found is not None and found.reused and found.output_id == "k1"
    assert workspace.read(found, "responses").equals(ROWS)


def test_a_later_generation_is_found_and_changes_the_output_id(workspace: Workspace) -> None:
    failed = FailureRow("r9", "server_error", "server_error: HTTP 500")
    first = workspace.write(output(failed), "k1", {"responses": ROWS})
    assert first.output_id == output_id("k1", ["r9"]) != "k1"
    assert first.failed_by_kind == {"server_error": 1}
    healed = workspace.write(output(), "k1", {"responses": ROWS})
    assert healed.generation == 1 and healed.output_id == "k1"
    found = workspace.find("responses", "b1", "k1")
    assert found is not None and found.generation == 1 and found.counts["failed"] == 0


def test_an_output_with_a_lost_file_is_not_reused(tmp_path: Path) -> None:
    workspace = Workspace(str(tmp_path / "ws"))
    workspace.write(output(), "k1", {"responses": ROWS})
    (tmp_path / "ws/stages/responses/b1/k1/responses.parquet").unlink()
    assert workspace.find("responses", "b1", "k1") is None
    again = workspace.write(output(), "k1", {"responses": ROWS})
    assert again.generation == 1
    found = workspace.find("responses", "b1", "k1")
    assert found is not None and (found.generation, found.output_id) == (1, again.output_id)


def test_an_output_written_before_output_ids_reads_them_from_its_failures(tmp_path: Path) -> None:
    workspace = Workspace(str(tmp_path / "ws"))
    failed = FailureRow("r9", "auth", "auth: HTTP 401")
    workspace.write(output(failed), "k1", {"responses": ROWS})
    counts = tmp_path / "ws/stages/responses/b1/k1/counts.json"
    meta = json.loads(counts.read_text())
    counts.write_text(json.dumps({"tables": meta["tables"], "counts": meta["counts"]}))
    found = workspace.find("responses", "b1", "k1")
    assert found is not None
    assert found.output_id == output_id("k1", ["r9"]) and found.failed_by_kind == {"auth": 1}


def test_the_retry_table_splits_kinds_into_transient_and_permanent() -> None:
    assert not TRANSIENT_KINDS & PERMANENT_KINDS
    assert retried("rate_limit", "transient") and retried("auth", "transient")
    assert not retried("bad_request", "transient") and retried("bad_request", "all")
    assert not retried("rate_limit", "none")
    assert not retried("a-kind-nobody-knows", "transient")  # unknown: not paid for twice
    by_kind = {"server_error": 3, "unparseable": 2, "stopped": 4}
    assert retryable_count(by_kind, "transient") == 7
    assert retryable_count(by_kind, "all") == 9 and retryable_count(by_kind, "none") == 0
    assert check_policy("all") == "all"
    with pytest.raises(ConfigError, match="transient, all, none"):
        check_policy("sometimes")
