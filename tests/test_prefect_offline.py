"""Prefect runs a flow with no server configured, no network and no telemetry.

A real subprocess with a fresh PREFECT_HOME and no PREFECT_API_URL: Prefect starts its temporary
local server (SQLite) and runs the flow; vlpref's offline defaults are in force inside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os
import vlpref  # applies the offline defaults before Prefect is imported
from prefect import flow, task

@task
def double(x: int) -> int:
    return 2 * x

@flow
def tiny() -> int:
    return sum(double.map([1, 2, 3]).result())

print("result", tiny())
print("DO_NOT_TRACK", os.environ["DO_NOT_TRACK"])
print("ANALYTICS", os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"])
from ray._common.usage.usage_lib import usage_stats_enabled  # what a local ray.init() asks
print("RAY_USAGE_STATS", usage_stats_enabled())
"""


def test_a_flow_runs_offline_without_a_server(tmp_path: Path) -> None:
    unset = ("PREFECT_", "DO_NOT_TRACK", "RAY_USAGE_STATS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "result 12" in proc.stdout
    assert "DO_NOT_TRACK 1" in proc.stdout
    assert "ANALYTICS false" in proc.stdout
    assert "RAY_USAGE_STATS False" in proc.stdout  # on by default for a local Ray otherwise
    assert (tmp_path / "prefect-home").exists()  # its state stayed where we put it
