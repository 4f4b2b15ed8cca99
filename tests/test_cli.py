"""The `vlpref` command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.test_config import GOOD

VLPREF = [sys.executable, "-m", "vlpref.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VLPREF, *args], capture_output=True, text=True, timeout=60)


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(GOOD)
    proc = run("check", str(tmp_path / "run.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "2 response model(s)" in proc.stderr


def test_check_reports_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(GOOD.replace("concurrency: 8", "concurrency: -1"))
    proc = run("check", str(tmp_path / "run.yaml"))
    assert proc.returncode == 2
    assert "endpoints.sim.concurrency: line 8:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_providers_lists_the_builtin_kind() -> None:
    proc = run("providers")
    assert proc.returncode == 0 and "openai" in proc.stdout.split()


def test_sim_server_command_serves_health(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "sim.yaml"
    config.write_text("models:\n  sim-refuser: {persona: refuser}\n")
    server = subprocess.Popen([*VLPREF, "sim-server", "--port", str(port), "--config", str(config)])
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "sim-server did not come up"
                time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_versions_commands_list_show_and_diff(tmp_path: Path) -> None:
    """Two versions published straight to a store, then read back through the CLI."""
    from tasks.publish import branch_parts, dataset_card
    from tests.tasks.test_publish import make_tables
    from vlpref.config import PublishStage
    from vlpref.store import Store

    store = Store(str(tmp_path / "store"))
    stage = PublishStage()
    tables = make_tables()
    manifest = {
        "name": "cli",
        "models": [{"name": "a", "model": "m", "sampling": {}}],
        "branches": {
            "b1": {"path": "D/C/S", "status": "built", "rows": {"pairs": 3}, "stages": {}}
        },
        "stages": {"pairs": {"policy": "spa-vl"}},
        "prompts": {"judge": "v1"},
    }
    first = store.publish(branch_parts("b1", tables, stage), manifest, dataset_card)
    changed = {
        **manifest,
        "models": [*manifest["models"], {"name": "b", "model": "n", "sampling": {}}],
        "stages": {"pairs": {"policy": "max-margin"}},
        "prompts": {"judge": "v2"},
    }
    second = store.publish(
        branch_parts("b1", tables, stage), changed, dataset_card, parent=first.version_id
    )

    listed = run("versions", "list", "--store", store.location)
    assert listed.returncode == 0, listed.stderr
    assert "versions in" in listed.stdout
    shown = run("versions", "show", "latest", "--store", store.location)
    assert shown.returncode == 0 and second.version_id in shown.stdout
    diffed = run("versions", "diff", first.version_id, "latest", "--store", store.location)
    assert diffed.returncode == 0, diffed.stderr
    assert "added ['b']" in diffed.stdout
    assert "prompts changed: judge" in diffed.stdout
    assert "pairs.policy" in diffed.stdout
    missing = run("versions", "show", "20990101T000000.000000Z-00000000", "--store", store.location)
    assert missing.returncode == 2 and "no complete version" in missing.stderr


def test_run_builds_a_version_with_progress(tmp_path: Path, prefect_server: str) -> None:
    """`vlpref run` end to end in a subprocess (sim server, the session's Prefect server)."""
    import yaml

    from vlpref.sim.testing import SimServer

    repo = Path(__file__).resolve().parents[1]
    with SimServer(
        {
            "models": {
                "sim-refuser": {"persona": "refuser"},
                "sim-jailbroken": {"persona": "jailbroken"},
                "sim-judge": {"persona": "judge"},
            }
        }
    ) as sim:
        config = {
            "name": "cli-run",
            "taxonomy": str(repo / "taxonomy" / "demo.yaml"),
            "workspace": "ws",
            "store": "store",
            "endpoints": {"sim": {"kind": "openai", "base_url": sim.base_url}},
            "models": [
                {"name": "refuser", "endpoint": "sim", "model": "sim-refuser"},
                {"name": "jailbroken", "endpoint": "sim", "model": "sim-jailbroken"},
            ],
            "generator": {"name": "gen", "endpoint": "sim", "model": "sim-judge"},
            "judges": [{"name": "judge", "endpoint": "sim", "model": "sim-judge"}],
            "stages": {"images": {"source": {"kind": "typographic", "per_branch": 1}}},
        }
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run(
            [*VLPREF, "run", str(path), "--only", "Malicious Use"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset version" in proc.stdout
    assert "judge" in proc.stderr  # the progress bars, one per stage
    from vlpref.store import Store

    (version,) = Store(str(tmp_path / "store")).list_versions()
    manifest = Store(str(tmp_path / "store")).open(version.version_id).manifest
    assert {b["path"].split("/")[0] for b in manifest["branches"].values()} == {"Malicious Use"}
