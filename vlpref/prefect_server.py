"""Start and stop a local Prefect server (`prefect server start`: SQLite, loopback) for a process.

Used by the test session, by `vlpref serve` and by the scheduled-run instructions: schedules and
deployments need a real server; Prefect's ephemeral one refuses them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from vlpref.errors import VlprefError
from vlpref.offline import OFFLINE_DEFAULTS

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrefectServer:
    """A `prefect server start` subprocess with its own PREFECT_HOME."""

    def __init__(
        self, home: str | Path, port: int | None = None, startup_timeout_s: float = 120
    ) -> None:
        self.home = Path(home)
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.home / "server.log"

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **OFFLINE_DEFAULTS, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_UI_ENABLED"] = "false"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise VlprefError(f"prefect server exited early:\n{self._log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                _OPENER.open(f"{self.api_url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(0.25)
        self.stop()
        raise VlprefError(f"prefect server did not answer within {self.startup_timeout_s:.0f} s")

    @contextlib.contextmanager
    def as_current(self) -> Iterator[None]:
        """Point this process's Prefect client at the server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            try:
                yield
            finally:
                # Deliver buffered flow-run logs while the server is still up.
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
