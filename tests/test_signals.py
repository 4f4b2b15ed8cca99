"""SIGTERM and Ctrl-C stop `vlpref run` within seconds: one `error: interrupted` line, exit code
130, the answers that arrived in the journal, and no Prefect server left running; a rerun then
completes. Real subprocesses: the sim with latency over loopback, and no PREFECT_API_URL, so the
run starts (and must stop) a temporary Prefect server of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_cli import VLPREF, sim_config
from tests.test_kill_rerun import journal_lines
from vlpref.sim.testing import SimServer

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

BRANCH = "Malicious Use/Security threats/cyber"
SIM = {
    "latency": {"kind": "constant", "ms": 300},
    "models": {
        "sim-refuser": {"persona": "refuser"},
        "sim-jailbroken": {"persona": "jailbroken"},
        "sim-judge": {"persona": "judge"},
    },
}


def children() -> dict[int, list[int]]:
    """pid -> its children, from /proc."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` with its command line."""
    tree, found, todo = children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes()
            except OSError:
                continue
            todo.append(child)
    return {p: cmd.replace(b"\0", b" ").decode(errors="replace") for p, cmd in found.items()}


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def is_prefect_server(cmdline: str) -> bool:
    return "prefect" in cmdline and ("server" in cmdline or "uvicorn" in cmdline)


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


def start_run(tmp_path: Path, config: Path, *, session: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return subprocess.Popen(
        [*VLPREF, "run", str(config), "--only", BRANCH],
        stdout=(tmp_path / "out.txt").open("w"),
        stderr=(tmp_path / "err.txt").open("w"),
        text=True,
        env=env,
        start_new_session=session,  # a group of its own, as a terminal's foreground job has
    )


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[str], tmp_path: Path, what: str
) -> None:
    deadline = time.monotonic() + 180
    while not condition():
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what}: {(tmp_path / 'err.txt').read_text()[-3000:]}"
        time.sleep(0.05)


def interrupt_and_check(
    proc: subprocess.Popen[str], tmp_path: Path, send: Callable[[], None]
) -> tuple[str, dict[int, str]]:
    """Send the signal; check the exit, the error line and that no descendant survives."""
    family = descendants(proc.pid)
    assert any(is_prefect_server(cmd) for cmd in family.values()), family
    started = time.monotonic()
    send()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running 30 s after the signal: {(tmp_path / 'err.txt').read_text()}")
    took = time.monotonic() - started
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert took < 10, f"took {took:.1f} s to stop"
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: interrupted"), lines[-5:]
    assert sum(line.startswith("error:") for line in lines) == 1
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: cmd for pid, cmd in family.items() if alive(pid)}
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left running: {left}"
    return err, family


def responses_journaled(tmp_path: Path) -> int:
    return len(journal_lines_under(tmp_path / "ws" / "journal" / "responses"))


def journal_lines_under(root: Path) -> list[str]:
    return [line for folder in root.glob("*") for line in journal_lines(folder)]


def test_sigterm_stops_a_run_within_seconds_and_a_rerun_completes(
    tmp_path: Path, sim: SimServer
) -> None:
    config = sim_config(tmp_path, sim.base_url, endpoint={"concurrency": 1}, per_branch=2)
    proc = start_run(tmp_path, config)
    # Mid-stage: some responses journaled, the rest still being asked one at a time.
    wait_for(lambda: responses_journaled(tmp_path) >= 2, proc, tmp_path, "no responses")
    interrupt_and_check(proc, tmp_path, lambda: proc.send_signal(signal.SIGTERM))
    journaled = responses_journaled(tmp_path)
    assert 2 <= journaled < 12  # 6 questions x 2 models: what arrived, not the whole stage

    rerun = start_run(tmp_path, config)
    assert rerun.wait(timeout=240) == 0, (tmp_path / "err.txt").read_text()[-3000:]
    assert "dataset version" in (tmp_path / "out.txt").read_text()
    assert responses_journaled(tmp_path) == 12
    assert not list((tmp_path / "store" / ".staging").iterdir())
    # The rerun asked only for the rest: answered in all = 12, plus at most the one request in
    # flight (concurrency 1) when the run stopped, which reached the sim but not the journal.
    by_model = sim.counters()["by_model"]
    answered = sum(by_model[m].get("200", 0) for m in ("sim-refuser", "sim-jailbroken"))
    assert 12 <= answered <= 12 + 1, by_model


def test_ctrl_c_in_a_terminal_stops_the_run_and_its_server(tmp_path: Path, sim: SimServer) -> None:
    """Ctrl-C signals the terminal's whole foreground group: the run, and any child that shares
    its group. The temporary server has a session of its own, so it outlives the signal until
    the run has reported the interruption, and is then stopped."""
    config = sim_config(tmp_path, sim.base_url, endpoint={"concurrency": 1}, per_branch=2)
    proc = start_run(tmp_path, config, session=True)
    wait_for(lambda: responses_journaled(tmp_path) >= 2, proc, tmp_path, "no responses")
    interrupt_and_check(proc, tmp_path, lambda: os.killpg(proc.pid, signal.SIGINT))
    # Prefect reported the run as crashed, in the run's log file (its lines are not on the
    # console without -v: docs/pipeline.md, "The console").
    (log,) = (tmp_path / "ws" / "logs").glob("run-*.log")
    assert "aborted by an interrupt signal" in log.read_text()
    assert responses_journaled(tmp_path) >= 2


def test_sigterm_while_the_prefect_server_starts_leaves_no_server(
    tmp_path: Path, sim: SimServer
) -> None:
    config = sim_config(tmp_path, sim.base_url)
    proc = start_run(tmp_path, config)
    wait_for(
        lambda: any(is_prefect_server(c) for c in descendants(proc.pid).values()),
        proc,
        tmp_path,
        "no server started",
    )
    interrupt_and_check(proc, tmp_path, lambda: proc.send_signal(signal.SIGTERM))
    assert not (tmp_path / "ws" / "journal").exists()  # stopped before the flow began


def test_sigterm_during_the_images_stage_stops_between_two_images(
    tmp_path: Path, sim: SimServer
) -> None:
    """A branch of 10,000 typographic images is minutes of CPU in a worker thread that no signal
    reaches; Prefect's teardown used to wait for all of it (and SIGTERM looked ignored). The
    interrupted run now stops its images stage between two images (vlpref/stopping.py)."""
    config = sim_config(tmp_path, sim.base_url, per_branch=10_000)
    proc = start_run(tmp_path, config)
    wait_for(  # Prefect's lines are in the run's log file (docs/pipeline.md, "The console")
        lambda: any(
            "Beginning flow run" in log.read_text()
            for log in (tmp_path / "ws" / "logs").glob("run-*.log")
        ),
        proc,
        tmp_path,
        "the flow did not begin",
    )
    time.sleep(3)  # the images stage is rendering
    interrupt_and_check(proc, tmp_path, lambda: proc.send_signal(signal.SIGTERM))
    assert not list((tmp_path / "ws" / "stages" / "images").rglob("counts.json"))  # not finished
