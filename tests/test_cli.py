"""The `vlpref` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_config import GOOD, GOOD_ENV, write_good

VLPREF = [sys.executable, "-m", "vlpref.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VLPREF, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **GOOD_ENV, **(env or {})},
    )


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    proc = run("check", str(write_good(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "2 response model(s) (3 samples per question)" in proc.stderr
    assert "branch(es)" in proc.stderr
    assert not (tmp_path / "work").exists()  # checked, not created


def test_check_reports_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    write_good(tmp_path, GOOD.replace("concurrency: 8", "concurrency: -1"))
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
    from tests.tasks.test_publish import make_tables
    from vlpref.config import PublishStage
    from vlpref.publish import branch_parts, dataset_card
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


def test_versions_tables_read_at_80_columns(tmp_path: Path) -> None:
    """`versions list` and `show` at 80 columns (output piped): no line wider, ids and branch
    names whole, settings as text rather than Python reprs."""
    from tests.tasks.test_publish import make_tables
    from vlpref.config import PublishStage
    from vlpref.publish import branch_parts, dataset_card
    from vlpref.store import Store

    store = Store(str(tmp_path / "store"))
    branches = {
        f"b{i}": {
            "path": f"Malicious Use/Security threats/{leaf}",
            "status": "built",
            "rows": {"images": 5, "questions": 15, "responses": 105, "judgments": 600, "pairs": 15},
            "stages": {},
        }
        for i, leaf in enumerate(("cyber", "malware"))
    }
    sampling: dict[str, object] = {
        "temperature": 0.9,
        "max_tokens": 160,
        "n": 2,
        "top_p": None,
        "stop": [],
    }
    manifest = {
        "name": "cli",
        "taxonomy": {"name": "spa-vl-demo", "hash": "236408a299d4", "branches": 2},
        "models": [{"name": "over-compliant", "model": "sim-over-compliant", "sampling": sampling}],
        "branches": branches,
    }
    first = store.publish(branch_parts("b0", make_tables(), PublishStage()), manifest, dataset_card)
    second = store.publish(
        branch_parts("b0", make_tables(), PublishStage()),
        manifest,
        dataset_card,
        parent=first.version_id,
    )
    env = {**os.environ, "COLUMNS": "80"}
    for args in (("versions", "list"), ("versions", "show", "latest")):
        done = subprocess.run(
            [*VLPREF, *args, "--store", store.location], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        lines = [ln for ln in done.stdout.splitlines() if not ln.startswith("location:")]
        assert max(len(ln) for ln in lines) <= 80, done.stdout
        assert second.version_id in done.stdout
    shown = done.stdout
    assert "Security threats/cyber" in shown and "Security threats/malware" in shown
    assert "temperature=0.9 max_tokens=160 n=2" in shown and "{" not in shown
    assert "taxonomy spa-vl-demo, 2 branches, 236408a2" in shown


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


# --- one `error:` line for every expected failure -------------------------------------------------


def error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The failure's last stderr line, after checking it is the only `error:` line, that the exit
    code is `code` and that no traceback was printed."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


def test_versions_list_lists_around_damaged_versions(tmp_path: Path) -> None:
    """A garbage `_COMPLETE` and a missing manifest (in LATEST's version): `list` still lists every
    version, marks the two DAMAGED with a warning naming the file, and succeeds; `show` of either
    is one error line naming the file."""
    from tests.tasks.test_publish import make_tables
    from vlpref.config import PublishStage
    from vlpref.publish import branch_parts, dataset_card
    from vlpref.store import Store

    store = Store(str(tmp_path / "store"))
    parts = branch_parts("b1", make_tables(), PublishStage())
    good, garbage, last = (store.publish(parts, {"name": "x"}, dataset_card) for _ in range(3))
    (Path(garbage.location) / "_COMPLETE").write_text("\x00\x01 torn")
    (Path(last.location) / "manifest.json").unlink()

    listed = subprocess.run(
        [*VLPREF, "versions", "list", "--store", store.location],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},  # whole ids in the table
    )
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    for info in (good, garbage, last):
        assert info.version_id in listed.stdout
    assert listed.stdout.count("DAMAGED") == 2
    warnings = [line for line in listed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, listed.stderr
    assert f"{garbage.version_id}/_COMPLETE: the marker is damaged" in warnings[0]
    assert f"{last.version_id}/manifest.json: the manifest is missing" in warnings[1]

    shown = run("versions", "show", garbage.version_id, "--store", store.location)
    assert f"{garbage.version_id}/_COMPLETE" in error_line(shown)
    latest = run("versions", "show", "latest", "--store", store.location)
    assert "manifest.json: the manifest is missing" in error_line(latest)


def sim_config(tmp_path: Path, base_url: str, *, per_branch: int = 1, **extra: Any) -> Path:
    """A run config on the sim (two response models), written to tmp_path/run.yaml."""
    import yaml

    from vlpref.sim.testing import sim_run_config

    repo = Path(__file__).resolve().parents[1]
    config = sim_run_config(
        base_url,
        taxonomy=str(repo / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser", "jailbroken"],
        per_branch=per_branch,
        **extra,
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


SIM_MODELS = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
}


def test_a_failed_branch_is_one_error_line(tmp_path: Path, prefect_server: str) -> None:
    """The flow's branch failure reaches the command line as a BuildError: the branch, its first
    cause, the workspace; the other branch was built, nothing was published."""
    from vlpref.sim.testing import SimServer

    missing = "Malicious Use/Security threats/malware"
    with SimServer(SIM_MODELS) as sim:
        path = sim_config(
            tmp_path,
            sim.base_url,
            stages={
                "images": {
                    "source": {"kind": "typographic", "per_branch": 1},
                    "overrides": {missing: {"kind": "folder", "path": "no-such-folder"}},
                }
            },
        )
        proc = subprocess.run(
            [*VLPREF, "run", str(path), "--only", "Malicious Use"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    line = error_line(proc)
    assert line.startswith(f"error: 1 branch(es) failed (workspace {tmp_path / 'ws'})"), line
    assert "malicious-use-security-threats-malware-581815fd: ConfigError:" in line, line
    assert "no-such-folder" in line and len(line) < 400
    assert not (tmp_path / "store" / "versions").exists()


def test_a_full_disk_under_the_store_is_one_error_line(tmp_path: Path, prefect_server: str) -> None:
    """ENOSPC for real: the store on a 64 KiB tmpfs (skipped where mounting is not allowed)."""
    from tests.test_store import tiny_disk
    from vlpref.sim.testing import SimServer

    with tiny_disk(tmp_path / "store"), SimServer(SIM_MODELS) as sim:
        path = sim_config(tmp_path, sim.base_url)
        proc = subprocess.run(
            [*VLPREF, "run", str(path), "--only", "Malicious Use/Security threats/cyber"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        line = error_line(proc)
        assert line.startswith(f"error: cannot write {tmp_path / 'store'}/.staging/"), line
        assert line.endswith(": No space left on device"), line
        assert not list((tmp_path / "store" / ".staging").iterdir())


def test_a_full_disk_under_the_workspace_is_one_error_line(
    tmp_path: Path, prefect_server: str
) -> None:
    """ENOSPC with no file in it (the journal's append): the error names the workspace."""
    from tests.test_store import tiny_disk
    from vlpref.sim.testing import SimServer

    with tiny_disk(tmp_path / "ws"), SimServer(SIM_MODELS) as sim:
        path = sim_config(tmp_path, sim.base_url)
        proc = subprocess.run(
            [*VLPREF, "run", str(path), "--only", "Malicious Use/Security threats/cyber"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    line = error_line(proc)
    assert line.startswith(f"error: 1 branch(es) failed (workspace {tmp_path / 'ws'})"), line
    assert line.endswith("No space left on device"), line


def test_an_os_error_without_a_file_is_still_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process: an ENOSPC that names no file (as a full disk raises it) from any command."""
    import errno

    from vlpref import cli

    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli, "app", full)
    monkeypatch.setattr(sys, "argv", ["vlpref", "versions", "list", "-s", "store"])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: vlpref versions: No space left on device (ENOSPC)"
    )
