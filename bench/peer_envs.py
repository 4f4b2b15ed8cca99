"""The peers (curator, distilabel): each in a virtual environment of its own under bench/.venvs/.

`ensure` creates a missing one with the interpreter that runs the benchmark and pip-installs the
peer from the package registry; `run_driver` runs the peer's driver script (bench/peers/) in it
against the sim server and returns what the driver measured. The drivers import the peers, so
they are type-checked only in their own environments, not by the main mypy run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"


@dataclass(frozen=True)
class Peer:
    name: str
    distribution: str  # whose version the report states
    packages: tuple[str, ...]  # what pip installs
    setup_note: str

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def driver(self) -> Path:
        return BENCH / "peers" / f"{self.name}_driver.py"


PEERS: dict[str, Peer] = {
    "curator": Peer(
        "curator",
        "bespokelabs-curator",
        ("bespokelabs-curator",),
        "newest that installs; `backend=openai`, `max_concurrent_requests` = concurrency, "
        "rpm/tpm limits far above the run's, cache and telemetry off, "
        "`TIKTOKEN_CACHE_DIR` = litellm's bundled cl100k_base; its probe request is in the time",
    ),
    "distilabel": Peer(
        "distilabel",
        "distilabel",
        ("distilabel[openai]==1.5.3", "requests"),
        "`OpenAILLM.generate_outputs` over batches of `concurrency` inputs (its AsyncLLM gathers "
        "one batch at a time: the batch size is its concurrency), no Pipeline, INFO logs off",
    ),
}


@dataclass(frozen=True)
class DriverRun:
    elapsed_s: float
    answered: int
    cpu_s: float


def installed_version(peer: Peer) -> str | None:
    """The peer's version in its venv, or None when the venv is missing or broken."""
    if not peer.python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({peer.distribution!r}))"
    done = subprocess.run(
        [str(peer.python), "-c", code], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else None


def ensure(peer: Peer, log: bool = True) -> str:
    """Create and fill the peer's venv when missing; returns the installed version."""
    found = installed_version(peer)
    if found is not None:
        return found
    if log:
        print(f"creating {peer.venv} ({' '.join(peer.packages)}) ...", flush=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(peer.venv)], check=True)
    pip = [str(peer.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *peer.packages], check=True)
    found = installed_version(peer)
    if found is None:
        raise RuntimeError(f"{peer.name}: installed, but {peer.distribution} does not import")
    return found


def run_driver(
    peer: Peer, base_url: str, model: str, requests: int, concurrency: int, timeout_s: float
) -> DriverRun:
    """Run the peer's driver once; it times its own call (interpreter start and imports are
    left out)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    cmd = [str(peer.python), str(peer.driver), "--base-url", base_url, "--model", model]
    cmd += ["--requests", str(requests), "--concurrency", str(concurrency)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{peer.name} driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
    data = json.loads(lines[-1])
    return DriverRun(float(data["elapsed_s"]), int(data["answered"]), float(data["cpu_s"]))
