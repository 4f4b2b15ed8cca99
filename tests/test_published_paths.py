"""What a version publishes names no local folder: the manifest's image source folders relative
to the config file's folder, the failures table's item ids and reasons too (and redacted)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from tests.test_config import GOOD, write
from vlpref.config import load_config
from vlpref.publish.version import LocalRoots, published_failures, published_stages
from vlpref.records import FAILURES, table


def test_local_folders_are_named_relative_to_the_config(tmp_path: Path) -> None:
    text = GOOD.replace("workspace: work", f"workspace: work\nstore: {tmp_path.parent}/store")
    text += (
        "stages:\n  images:\n"
        f"    source: {{kind: folder, path: {tmp_path}/images}}\n"
        "    overrides:\n"
        "      'Malicious Use': {kind: manifest, path: rows.csv}\n"
        f"      'Privacy': {{kind: manifest, path: /elsewhere/rows.csv}}\n"
    )
    config = load_config(write(tmp_path, text))
    stages = published_stages(config)["images"]
    assert stages["source"]["path"] == "images"
    assert stages["overrides"]["Malicious Use"]["path"] == "rows.csv"  # as written
    assert stages["overrides"]["Privacy"]["path"].endswith("/elsewhere/rows.csv")
    assert not stages["overrides"]["Privacy"]["path"].startswith("/")

    roots = LocalRoots(config)
    assert roots.text(f"{tmp_path}/images/a.png: cannot read") == "images/a.png: cannot read"
    assert roots.text(f"wrote {tmp_path}/work/stages/x") == "wrote work/stages/x"
    assert roots.text(f"in {tmp_path.parent}/store/versions") == "in ../store/versions"
    assert roots.text(f"the folder {tmp_path}.") == "the folder .."
    # Another folder that begins alike is not the config's.
    assert roots.text(f"{tmp_path}2/x") == f"{tmp_path}2/x"

    failures = table(
        [
            {
                "stage": "responses",
                "branch_id": "b",
                "item_id": f"{tmp_path}/images/a.png:easy",
                "kind": "auth",
                "reason": "HTTP 401: key sk-proj-AbCdEfGhIjKlMnOpQrSt refused",
                "attempts": 1,
            }
        ],
        FAILURES,
    )
    (row,) = published_failures(failures, roots).to_pylist()
    assert row["item_id"] == "images/a.png:easy"
    assert row["reason"] == "HTTP 401: key [REDACTED] refused"
    assert published_failures(failures, roots).schema == failures.schema
    empty = published_failures(failures.slice(0, 0), roots)
    assert isinstance(empty, pa.Table) and empty.num_rows == 0
