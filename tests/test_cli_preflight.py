"""`vlpref run` and `vlpref check` refuse, before anything is sent or written, a config whose
every request would fail: one `error:` line, exit code 2, no traceback (real subprocesses)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlpref.sim.testing import SimServer

VLPREF = [sys.executable, "-m", "vlpref.cli"]
REPO = Path(__file__).resolve().parents[1]
KEY = "cli-preflight-key"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(
        {
            "require_api_key": KEY,
            "models": {"sim-refuser": {"persona": "refuser"}, "sim-judge": {"persona": "judge"}},
        }
    ) as server:
        yield server


def vlpref(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CLI_PREFLIGHT_KEY": KEY, **(env or {})}
    return subprocess.run(
        [*VLPREF, *args], capture_output=True, text=True, timeout=120, env=environment
    )


def write(tmp_path: Path, base_url: str, **change: Any) -> Path:
    data: dict[str, Any] = {
        "name": "preflight",
        "taxonomy": str(REPO / "taxonomy" / "demo.yaml"),
        "workspace": "ws",
        "store": "store",
        "endpoints": {
            "sim": {"kind": "openai", "base_url": base_url, "api_key_env": "CLI_PREFLIGHT_KEY"}
        },
        # Two samples per question: a config that can make pairs (`check` refuses one that cannot).
        "models": [
            {"name": "refuser", "endpoint": "sim", "model": "sim-refuser", "sampling": {"n": 2}}
        ],
        "generator": {"name": "gen", "endpoint": "sim", "model": "sim-judge"},
        "judges": [{"name": "judge", "endpoint": "sim", "model": "sim-judge"}],
        "stages": {"images": {"source": {"kind": "typographic", "per_branch": 1}}},
    }
    data.update(change)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def refused(proc: subprocess.CompletedProcess[str], tmp_path: Path, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    for text in expected:
        assert text in line, line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ws").exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("problem", ["missing key", "unreachable", "model not served"])
def test_run_and_check_refuse_before_sending_anything(
    sim: SimServer, tmp_path: Path, problem: str
) -> None:
    base_url, models = sim.base_url, None
    env: dict[str, str] = {}
    expected: tuple[str, ...] = ()
    if problem == "missing key":
        env = {"CLI_PREFLIGHT_KEY": ""}
        expected = ("endpoints.sim.api_key_env", "CLI_PREFLIGHT_KEY is not set")
    elif problem == "unreachable":
        base_url = f"http://127.0.0.1:{closed_port()}/v1"
        expected = ("endpoints.sim.base_url", f"cannot reach {base_url}/models")
    else:
        models = [{"name": "ghost", "endpoint": "sim", "model": "ghost-vlm", "sampling": {"n": 2}}]
        expected = ("endpoints.sim: model 'ghost-vlm' (models[0].model) is not served",)
    path = write(tmp_path, base_url, **({"models": models} if models else {}))
    sim.reset()
    refused(vlpref("run", str(path), "--only", "Malicious Use", env=env), tmp_path, *expected)
    refused(vlpref("check", str(path), "--preflight", env=env), tmp_path, *expected)
    assert sim.counters()["total"] == 0  # not one chat request reached the endpoint
    plain = vlpref("check", str(path), env=env)  # no network without --preflight
    if problem == "missing key":  # a variable is checked without a request
        refused(plain, tmp_path, *expected)
    else:
        assert plain.returncode == 0, plain.stderr


def test_check_preflight_passes_a_healthy_config(sim: SimServer, tmp_path: Path) -> None:
    proc = vlpref("check", str(write(tmp_path, sim.base_url)), "--preflight")
    assert proc.returncode == 0, proc.stderr
    assert "preflight passed" in proc.stderr and sim.counters()["total"] == 0


def test_offline_vllm_is_refused_with_the_server_mode_alternative(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "http://127.0.0.1:9/v1",
        endpoints={"local": {"kind": "vllm", "model": "org/tiny-vlm"}},
        models=[
            {"name": "tiny", "endpoint": "local", "model": "org/tiny-vlm", "sampling": {"n": 2}}
        ],
        generator={"name": "gen", "endpoint": "local", "model": "org/tiny-vlm"},
        judges=[{"name": "judge", "endpoint": "local", "model": "org/tiny-vlm"}],
    )
    expected = (
        "endpoints.local: kind: vllm needs vLLM in this Python environment",
        "vLLM and Prefect cannot be installed together",
        "vlpref vllm-serve",
    )
    refused(vlpref("check", str(path)), tmp_path, *expected)
    refused(vlpref("run", str(path)), tmp_path, *expected)
    refused(vlpref("run", str(path), "--no-preflight"), tmp_path, *expected)
