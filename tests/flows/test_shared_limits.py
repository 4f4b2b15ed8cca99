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
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

# Whole runs on worker clusters (~4 minutes on 2 cores): `make test-cluster`, not `make test`.
pytestmark = pytest.mark.cluster

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


def vlpref_run(args: list[str], env: dict[str, str], timeout: int = 300) -> Any:
    """`vlpref run ARGS` in a child process, its output captured."""
    return subprocess.run(
        [*VLPREF_RUN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def the_error_line(done: Any) -> str:
    """The one `error:` line of a refused command (exit code 2, no traceback)."""
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return str(errors[0])


def test_cli_refuses_a_cluster_by_address_without_a_prefect_server(
    tmp_path: Path, sim: SimServer
) -> None:
    path = write_config(tmp_path, sim)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = vlpref_run([str(path), "--runner", "dask", "--address", "tcp://127.0.0.1:9"], env)
    error = the_error_line(done)
    assert "prefect server start" in done.stderr, done.stderr[-2000:]
    assert "export PREFECT_API_URL=" in done.stderr, error
    assert not (tmp_path / "prefect-home" / "server.log").exists()  # no server was started


def latest_flow_run_state() -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    return run.state


@dataclass
class RayHead:
    address: str
    token_path: Path


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A Ray cluster started apart from this process (`ray start --head`), as on a real head
    node, with token authentication on (Ray's default since 2.59) and its token in a file of its
    own (not ~/.ray). Its workers inherit nothing from the test, neither PREFECT_API_URL nor the
    run's limits scope: what they know comes through the runner."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # socket paths must fit 107 bytes
    token_path = temp / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VLPREF_", "RAY_"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = "6389"
    start = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp / 'session'}",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield RayHead(f"127.0.0.1:{port}", token_path)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_ray_cluster_by_address_with_token_authentication(
    tmp_path: Path, sim: SimServer, prefect_server: str, ray_head: RayHead
) -> None:
    """`vlpref run --runner ray --address` against a cluster started elsewhere: without
    RAY_AUTH_MODE=token one `error:` line saying what to set (not Ray's bare "Failed to connect")
    and a flow run failed with it (not left "Running"); with the token, the build runs on the
    cluster's workers, which get the run's limits scope only through the tasks' runtime_env:
    peak in flight <= 2."""
    path = write_config(tmp_path, sim, concurrency=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLPREF_", "RAY_"))}
    env["PREFECT_API_URL"] = prefect_server
    args = [str(path), "--runner", "ray", "--address", ray_head.address]
    refused = vlpref_run(args, env)
    error = the_error_line(refused)
    assert "RAY_AUTH_MODE=token" in error and ray_head.address in error
    assert ray_head.token_path.read_text() not in refused.stderr + refused.stdout
    state = latest_flow_run_state()  # failed with the reason, not left "Running"
    assert state.is_failed() and "RAY_AUTH_MODE=token" in str(state.message), state

    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_head.token_path)}
    sim.reset()
    done = vlpref_run([*args, "--no-preflight"], env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = sim.requests_log()
    assert len(log) > 50 and all(e["status"] == 200 for e in log)
    assert peak_in_flight(log, LATENCY_S) <= 2


def test_an_unreachable_dask_scheduler_fails_the_flow_run_with_its_reason(
    tmp_path: Path, sim: SimServer, prefect_server: str
) -> None:
    path = write_config(tmp_path, sim)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPREF_")}
    env["PREFECT_API_URL"] = prefect_server
    env["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"] = "3s"  # Dask's default waits 30 s
    done = vlpref_run([str(path), "--runner", "dask", "--address", "tcp://127.0.0.1:9"], env)
    assert "Dask scheduler at tcp://127.0.0.1:9" in the_error_line(done)
    state = latest_flow_run_state()
    assert state.is_failed() and "tcp://127.0.0.1:9" in str(state.message), state


@pytest.fixture
def dask_cluster(prefect_server: str) -> Iterator[str]:
    """A Dask scheduler and two worker processes started apart from this process, as on other
    hosts: they know the Prefect server (PREFECT_API_URL, which the docs ask every worker to
    have) but not the run's limits scope, which only the runner's worker plugin gives them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPREF_")}
    env["PREFECT_API_URL"] = prefect_server
    dask_cli = str(Path(sys.executable).with_name("dask"))
    address = "tcp://127.0.0.1:8799"
    quiet = subprocess.DEVNULL
    scheduler = subprocess.Popen(
        [dask_cli, "scheduler", "--port", "8799", "--no-dashboard"],
        cwd=REPO,
        env=env,
        stdout=quiet,
        stderr=quiet,
    )
    workers = subprocess.Popen(
        [dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "4", "--no-dashboard"],
        cwd=REPO,
        env=env,
        stdout=quiet,
        stderr=quiet,
    )
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:  # type: ignore[no-untyped-call]
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in (workers, scheduler):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_dask_cluster_by_address_gets_the_scope_through_the_worker_plugin(
    tmp_path: Path, sim: SimServer, dask_cluster: str
) -> None:
    path = write_config(tmp_path, sim, concurrency=2)
    sim.reset()
    build_dataset.with_options(task_runner=task_runner("dask", address=dask_cluster))(str(path))
    log = sim.requests_log()
    assert len(log) > 50 and all(e["status"] == 200 for e in log)
    assert peak_in_flight(log, LATENCY_S) <= 2  # two workers, one limit of 2 for both
