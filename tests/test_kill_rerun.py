"""SIGKILL in the middle of a batch loses at most the requests in flight, and the rerun sends
exactly the missing keys. The worker is a real subprocess; the server is the sim over loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlpref.journal import Journal
from vlpref.sim.testing import SimServer

COUNT, CONCURRENCY = 200, 8
WORKER = Path(__file__).with_name("kill_worker.py")


def journal_lines(root: Path) -> list[str]:
    lines: list[str] = []
    for segment in sorted(root.glob("*.jsonl")):
        lines.extend(segment.read_text().splitlines())
    return lines


def complete_keys(root: Path) -> list[str]:
    keys = []
    for line in journal_lines(root):
        with contextlib.suppress(ValueError):  # the torn last line of the killed segment
            keys.append(json.loads(line)["k"])
    return keys


def run_worker(sim: SimServer, root: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            sim.base_url,
            str(root),
            str(COUNT),
            str(CONCURRENCY),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_then_rerun_sends_only_the_missing_keys(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    config = {"latency": {"kind": "constant", "ms": 40}, "models": {"slow": {"persona": "echo"}}}
    with SimServer(config) as sim:
        worker = run_worker(sim, root)
        deadline = time.monotonic() + 60
        while len(journal_lines(root)) < 60:
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker journaled too slowly"
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert worker.returncode == -signal.SIGKILL

        arrived_first = sim.counters()["by_model"]["slow"]["200"]
        journaled = set(complete_keys(root))
        assert 60 <= len(journaled) < COUNT
        # What reached the server but not the journal was in flight: at most one per worker.
        assert arrived_first - len(journaled) <= CONCURRENCY

        rerun = run_worker(sim, root)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        assert f"done {COUNT} failed 0" in out
        arrived_second = sim.counters()["by_model"]["slow"]["200"] - arrived_first
        assert arrived_second == COUNT - len(journaled)

    keys = complete_keys(root)
    assert len(keys) == COUNT == len(set(keys))  # the union holds each key exactly once
    assert len(Journal(str(root))) == COUNT


def test_a_batch_resumed_after_sigkill_equals_a_clean_one(tmp_path: Path) -> None:
    """n=2: what the rerun hands back (texts, each sample's token share, its call id) is what a
    clean run hands back; only `cached` tells them apart. And the clean run's shares add up to
    what the server billed it."""
    config = {"latency": {"kind": "constant", "ms": 40}, "models": {"slow": {"persona": "mixed"}}}
    root = tmp_path / "journal"
    with SimServer(config) as sim:
        worker = run_worker(sim, root, "2")
        deadline = time.monotonic() + 60
        while len(journal_lines(root)) < 60:
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker journaled too slowly"
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert 60 <= len(set(complete_keys(root))) < 2 * COUNT

        resumed = run_worker(sim, root, "2", str(tmp_path / "resumed.json"))
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read() if resumed.stderr else ""
        before = sim.counters()["usage"]["slow"]
        clean = run_worker(sim, tmp_path / "clean", "2", str(tmp_path / "clean.json"))
        assert clean.wait(timeout=120) == 0, clean.stderr.read() if clean.stderr else ""
        after = sim.counters()["usage"]["slow"]

    def load(name: str) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = json.loads((tmp_path / name).read_text())
        return rows

    resumed_rows, clean_rows = load("resumed.json"), load("clean.json")
    assert any(r["cached"] for r in resumed_rows) and not any(r["cached"] for r in clean_rows)
    assert [r["samples"] for r in resumed_rows] == [r["samples"] for r in clean_rows]
    shares = [s for r in clean_rows for s in r["samples"]]  # type: ignore[attr-defined]
    assert sum(s[3] for s in shares) == after["prompt_tokens"] - before["prompt_tokens"]
    assert sum(s[4] for s in shares) == after["completion_tokens"] - before["completion_tokens"]
