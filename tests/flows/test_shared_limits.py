"""Scale-out that holds and cleans up (issue 20 items 1 and 3).

- The Dask runner with two worker processes keeps the endpoint's `concurrency` for the whole run
  (read from the sim's request log: never more calls in flight than configured), deletes the
  run's global concurrency limits from the Prefect server at the end, and reports every finished
  stage to this process's progress listeners.
- The same under the Ray runner (two local Ray workers): Ray's `runtime_env` carries the scope.
- `vlpref run --runner dask|ray --workers 2` without PREFECT_API_URL starts one Prefect server
  for the run (no worker starts its own) and leaves no process behind (psutil, before and after;
  under Ray also its GCS, raylet and dashboard).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import yaml

from flows import progress
from flows.build import STAGES, build_dataset
from flows.runners import task_runner
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[2]
VLPREF_RUN = [sys.executable, "-m", "vlpref.cli", "run"]
LATENCY_S = 0.05
SIM = {
    "latency": {"kind": "constant", "ms": LATENCY_S * 1000},
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def write_config(tmp: Path, sim: SimServer, **endpoint: Any) -> Path:
    data = sim_run_config(
        sim.base_url,
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp / "ws"),
        store=str(tmp / "store"),
        models=["refuser", "jailbroken"],
        endpoint=endpoint,
    )
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def peak_in_flight(log: list[dict[str, Any]], latency_s: float) -> int:
    """Most calls the sim held at once: each arrival `t` is busy for `latency_s`."""
    edges = sorted(
        [(e["t"], 1) for e in log] + [(e["t"] + latency_s, -1) for e in log],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def gcl_names() -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [str(g.name) for g in client.read_global_concurrency_limits(limit=200)]


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_workers_share_the_endpoint_concurrency(
    runner: str, tmp_path: Path, sim: SimServer, prefect_server: str
) -> None:
    path = write_config(tmp_path, sim, concurrency=2)
    branches = len(load_taxonomy(REPO / "taxonomy" / "demo.yaml").select(None))
    heard: list[tuple[str, str]] = []
    unsubscribe = progress.subscribe(lambda stage, branch, counts: heard.append((stage, branch)))
    sim.reset()
    try:
        build_dataset.with_options(task_runner=task_runner(runner, workers=2))(str(path))
    finally:
        unsubscribe()
    log = sim.requests_log()
    assert len(log) > 50
    assert all(e["status"] == 200 for e in log)
    # Two workers with a semaphore of 2 each reach 3-4 here; shared, never more than 2.
    assert peak_in_flight(log, LATENCY_S) <= 2
    assert not [n for n in gcl_names() if n.startswith("vlpref-") and "-test" not in n]
    # Every stage of every branch reached this process's listeners (the console board).
    assert len(set(heard)) == len(STAGES) * branches, sorted(set(heard))


def is_prefect_server(cmdline: str) -> bool:
    return "prefect" in cmdline and ("server" in cmdline or "uvicorn" in cmdline)


def is_worker(runner: str, cmdline: str) -> bool:
    if runner == "dask":  # LocalCluster's worker processes
        return "multiprocessing" in cmdline and "spawn" in cmdline
    return "ray::" in cmdline or "default_worker.py" in cmdline  # Ray's, by their titles


def all_processes() -> dict[int, str]:
    """Every process of this user (Ray's GCS and raylet are not Python), by pid."""
    me = psutil.Process().username()
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["username", "cmdline", "name"]):
        if proc.info["username"] == me:
            found[proc.pid] = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
    return found


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_cli_run_on_workers_starts_one_server_and_leaves_no_process(
    runner: str, tmp_path: Path, sim: SimServer
) -> None:
    path = write_config(tmp_path, sim)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    before = all_processes()
    run = subprocess.Popen(
        [*VLPREF_RUN, str(path), "--runner", runner, "--workers", "2", "--no-preflight"],
        cwd=REPO,
        env=env,
        stdout=(tmp_path / "out.txt").open("w"),
        stderr=(tmp_path / "err.txt").open("w"),
    )
    family: dict[int, str] = {}
    while run.poll() is None:  # every process the run starts, while it runs
        try:
            for child in psutil.Process(run.pid).children(recursive=True):
                with_cmd = " ".join(child.cmdline()) if child.is_running() else ""
                family.setdefault(child.pid, with_cmd)
        except psutil.Error:
            pass
        time.sleep(0.1)
    err = (tmp_path / "err.txt").read_text()
    assert run.returncode == 0, err[-3000:]
    servers = [cmd for cmd in family.values() if is_prefect_server(cmd)]
    assert len(servers) == 1, servers  # the run's; none started by a worker
    workers = [cmd for cmd in family.values() if is_worker(runner, cmd)]
    assert len(workers) >= 2, family  # the workers really ran as processes
    deadline = time.monotonic() + 15
    while True:
        left = {p: c for p, c in all_processes().items() if p not in before}
        left = {p: c for p, c in left.items() if p in family or is_prefect_server(c)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in left:  # not to the next test either
        psutil.Process(pid).kill()
    assert not left, left
    assert "built in" in (tmp_path / "out.txt").read_text()


def test_cli_refuses_a_cluster_by_address_without_a_prefect_server(
    tmp_path: Path, sim: SimServer
) -> None:
    path = write_config(tmp_path, sim)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [*VLPREF_RUN, str(path), "--runner", "dask", "--address", "tcp://127.0.0.1:9"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "prefect server start" in done.stderr, done.stderr[-2000:]
    assert "export PREFECT_API_URL=" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "prefect-home" / "server.log").exists()  # no server was started
