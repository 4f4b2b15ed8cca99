"""`vlpref run` with its output piped, as CI or `| tee` has it (docs/pipeline.md, "The
console"): no control characters, the log file's path said at the start and in the summary, the
readable per-stage lines in that file and not on the console, and Prefect's INFO lines on the
console only with `-v`. The CLI as a real subprocess, on the sim and the session's Prefect
server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import sim_config
from vlpref.sim.testing import SimServer

SIM = {
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    }
}
BRANCH = "Malicious Use/Security threats"
STAGE_LINE = re.compile(
    r"(questions|responses|judge)/[a-z0-9-]+: \d+ [a-z ]+ in, \d+ out, \d+ failed; "
    r"\d+ sent, \d+ from the journal; \d+\.\d s"
)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def vlpref_run(
    tmp_path: Path, sim: SimServer, prefect_server: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    config = sim_config(tmp_path, sim.base_url)
    proc = subprocess.run(
        [sys.executable, "-m", "vlpref.cli", "run", str(config), "--only", BRANCH, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PREFECT_API_URL": prefect_server, "COLUMNS": "80"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_piped_run_is_plain_text_with_its_log_in_a_file(
    tmp_path: Path, sim: SimServer, prefect_server: str
) -> None:
    proc = vlpref_run(tmp_path, sim, prefect_server)
    console = proc.stderr + proc.stdout
    assert "\x1b[" not in console and "\r" not in console  # no live display, no colours
    logs = list((tmp_path / "ws" / "logs").glob("run-*.log"))
    assert len(logs) == 1
    said = [line for line in console.splitlines() if line.startswith("log: ")]
    assert said == [f"log: {logs[0]}"] * 2  # at the start (stderr) and in the summary (stdout)
    assert proc.stderr.splitlines()[0] == said[0]
    text = logs[0].read_text()
    assert len(STAGE_LINE.findall(text)) == 3 * 2  # 2 branches under the prefix
    assert "{'unit'" not in text  # the counts are text, not a dict
    assert "Finished in state Completed()" in text  # Prefect's own lines are in the file ...
    assert "| INFO " not in console and "Finished in state" not in console  # ... not here
    assert not STAGE_LINE.search(console)  # the summary is the one place for counts
    # A line per stage once every branch has it (no live board when piped), in stage order.
    finished = [line.split(":")[0] for line in proc.stderr.splitlines() if "branches done" in line]
    assert finished == ["images", "questions", "responses", "judge", "pairs"]
    assert "rows in / out / failed per stage" in proc.stdout


def test_verbose_shows_prefects_lines_on_the_console_too(
    tmp_path: Path, sim: SimServer, prefect_server: str
) -> None:
    proc = vlpref_run(tmp_path, sim, prefect_server, "-v")
    assert "\x1b[" not in proc.stderr
    assert "Finished in state Completed()" in proc.stderr
    assert STAGE_LINE.search(proc.stderr)
    (log,) = (tmp_path / "ws" / "logs").glob("run-*.log")
    assert STAGE_LINE.search(log.read_text())
