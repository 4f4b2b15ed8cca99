"""`mode: batch`, killed with SIGKILL while its batch is in progress: the rerun polls the batch
the killed run submitted (its id recorded beside the journal) and submits nothing new. The worker
is a real subprocess; the server is the sim over loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vlpref.batching import BatchRecord, is_open_record
from vlpref.journal import Journal
from vlpref.sim.testing import SimServer

COUNT = 40
WORKER = Path(__file__).with_name("batch_kill_worker.py")


def run_worker(sim: SimServer, root: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), sim.base_url, str(root), str(COUNT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def open_records(root: Path) -> list[BatchRecord]:
    folder = root / "batches"
    if not folder.exists():
        return []
    return [
        BatchRecord.from_json(p.read_bytes()) for p in folder.iterdir() if is_open_record(p.name)
    ]


def sim_batches(sim: SimServer) -> list[dict[str, object]]:
    with urllib.request.urlopen(sim.base_url + "/batches", timeout=5) as resp:
        data: list[dict[str, object]] = json.loads(resp.read())["data"]
    return data


def test_a_run_killed_while_its_batch_runs_resumes_polling_that_batch(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    config = {"models": {"slow": {"persona": "echo"}}, "batch": {"completion_delay_s": 4.0}}
    with SimServer(config) as sim:
        worker = run_worker(sim, root)
        deadline = time.monotonic() + 60
        while not open_records(root):
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker submitted no batch"
            time.sleep(0.02)
        [record] = open_records(root)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert worker.returncode == -signal.SIGKILL
        [batch] = sim_batches(sim)
        assert batch["id"] == record.batch_id and batch["status"] == "in_progress"
        assert len(Journal(str(root))) == 0  # killed before any answer
        before = sim.counters()["batch"]

        rerun = run_worker(sim, root)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        assert f"done {COUNT} failed 0" in out
        after = sim.counters()["batch"]
        assert after["batches"] == before["batches"] == 1  # nothing submitted again
        assert after["files"] == before["files"] == 1  # nor uploaded
        assert after["retrieves"] > before["retrieves"]  # the same batch, polled
        assert after["lines"] == COUNT and sim.counters()["total"] == 0
        assert [b["id"] for b in sim_batches(sim)] == [record.batch_id]

    assert len(Journal(str(root))) == COUNT
    assert open_records(root) == []
    done = [p.name for p in (root / "batches").iterdir()]
    assert done == [f"{record.batch_id}.done.json"]
