"""Keys never leave memory, end to end: `vlpref run` in a subprocess (the session's Prefect
server, the sim and an endpoint that echoes the key it receives, both over loopback), then the
key is searched for byte by byte in everything the run left: the command's output, the workspace
(journal and stage outputs), the published version, and Prefect's database (logs, states,
events, the build artifact). The same run checks that the published version names no absolute
local path in any file (manifest, card, every table), its folders being given relative to the
config file's and image names relative to the image root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.echo_server import EchoServer
from vlpref.sim.testing import SIM_GENERATOR, SIM_JUDGE, SimServer
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
ONLY = "Malicious Use/Security threats"
FOLDER_BRANCH = "Malicious Use/Security threats/malware"
ECHO_MODELS = ("echo-401", "echo-400", "echo-500", "echo-html")


def root_field(folder: str) -> dict[str, str]:
    return {"root": folder}


# No known key shape: only the registry (the provider and preflight register it) can catch it.
KEY = f"vlpref-flow-key-{secrets.token_hex(12)}"


def _strings(table: pa.Table) -> Iterator[str]:
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            yield from (v for v in column.to_pylist() if v is not None)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("secrets-flow")
    # Absolute paths in the config, all under its folder: the taxonomy, the prompts, the store,
    # and a folder image source for one branch.
    (tmp / "taxonomy").mkdir()
    shutil.copy(REPO / "taxonomy" / "demo.yaml", tmp / "taxonomy" / "demo.yaml")
    shutil.copytree(REPO / "prompts", tmp / "prompts")
    (tmp / "images" / "malware").mkdir(parents=True)
    picture = Image.new("RGB", (96, 64), "navy")
    picture.paste((250, 200, 40), (10, 10, 60, 50))
    picture.save(tmp / "images" / "malware" / "a.png")
    env = {**os.environ, "VLPREF_FLOW_SECRET": KEY}
    with (
        SimServer(
            {
                "models": {
                    "sim-refuser": {"persona": "refuser"},
                    "sim-jailbroken": {"persona": "jailbroken"},
                    "sim-judge": {"persona": "judge"},
                }
            }
        ) as sim,
        EchoServer() as echo,
    ):
        config = {
            "name": "secrets-flow",
            "taxonomy": str(tmp / "taxonomy" / "demo.yaml"),
            "prompts_dir": str(tmp / "prompts"),
            "workspace": "ws",
            "store": str(tmp / "store"),
            "endpoints": {
                "sim": {"base_url": sim.base_url, "api_key_env": "VLPREF_FLOW_SECRET"},
                "echo": {
                    "base_url": echo.base_url,
                    "api_key_env": "VLPREF_FLOW_SECRET",
                    "max_attempts": 2,
                    "backoff_initial_s": 0.01,
                    "backoff_max_s": 0.02,
                },
            },
            "models": [
                {"name": "refuser", "endpoint": "sim", "model": "sim-refuser"},
                {"name": "jailbroken", "endpoint": "sim", "model": "sim-jailbroken"},
                *({"name": m, "endpoint": "echo", "model": m} for m in ECHO_MODELS),
            ],
            "generator": SIM_GENERATOR,
            "judges": [SIM_JUDGE],
            "stages": {
                "images": {
                    "source": {"kind": "typographic", "per_branch": 1},
                    "overrides": {
                        FOLDER_BRANCH: {
                            "kind": "folder",
                            "path": str(tmp / "images" / "malware"),
                            **root_field(str(tmp / "images")),
                        }
                    },
                }
            },
        }
        path = tmp / "run.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = subprocess.run(
            [sys.executable, "-m", "vlpref.cli", "run", str(path), "--only", ONLY],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        echoed = set(echo.keys)
    assert proc.returncode == 0, proc.stderr[-4000:]
    store = Store(str(tmp / "store"))
    (version,) = store.list_versions()
    yield {
        "tmp": tmp,
        "proc": proc,
        "echoed": echoed,
        "version": store.open(version.version_id),
        "prefect_homes": list(tmp_path_factory.getbasetemp().glob("prefect-home*")),
    }


def test_the_endpoint_received_and_echoed_the_key(run: dict[str, Any]) -> None:
    assert KEY in run["echoed"]  # else the checks below prove nothing


def test_the_command_never_prints_the_key(run: dict[str, Any]) -> None:
    proc = run["proc"]
    assert KEY not in proc.stdout and KEY not in proc.stderr


def test_no_file_of_the_run_holds_the_key(run: dict[str, Any]) -> None:
    """The workspace (journal, stage outputs), the published version, the config's folder."""
    files = [p for p in run["tmp"].rglob("*") if p.is_file()]
    assert any("journal" in p.parts for p in files) and any("versions" in p.parts for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_prefects_database_never_holds_the_key(run: dict[str, Any]) -> None:
    """Logs, task and flow states, events and the build artifact, as the server stored them
    (the SQLite database and its write-ahead log under the session's PREFECT_HOME)."""
    files = [p for home in run["prefect_homes"] for p in home.rglob("*") if p.is_file()]
    assert any(p.name.startswith("prefect.db") for p in files), files
    seen_redacted = False
    for path in files:
        data = path.read_bytes()
        assert KEY.encode() not in data, path
        seen_redacted = seen_redacted or b"[REDACTED]" in data
    # The run summary artifact quotes the failures' reasons: redacted, not dropped.
    assert seen_redacted


def test_the_published_failures_say_why_without_the_key(run: dict[str, Any]) -> None:
    failures = run["version"].table("failures")
    rows = [r for r in failures.to_pylist() if r["stage"] == "responses"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"auth", "bad_request", "server_error", "malformed"}, kinds
    for row in rows:
        assert KEY not in row["reason"] and "[REDACTED]" in row["reason"], row


def test_the_published_version_names_no_absolute_local_path(run: dict[str, Any]) -> None:
    tmp, version = str(run["tmp"]), run["version"]
    manifest_text = Path(version.path("manifest.json")).read_text()
    assert tmp not in manifest_text
    assert tmp not in Path(version.path("README.md")).read_text()
    overrides = json.loads(manifest_text)["stages"]["images"]["overrides"]
    # Relative to run.yaml's folder.
    assert overrides[FOLDER_BRANCH]["path"] == "images/malware"
    assert overrides[FOLDER_BRANCH]["root"] == "images"
    for rel in version.manifest["files"]:
        if rel.endswith(".parquet"):
            table = pq.read_table(version.path(rel))
            assert not any(tmp in s for s in _strings(table)), rel
