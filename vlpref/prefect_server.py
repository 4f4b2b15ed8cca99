"""Start and stop a local Prefect server (`prefect server start`: SQLite, loopback) for a process.

Used by the test session, by `vlpref serve` and by the scheduled-run instructions: schedules and
deployments need a real server; Prefect's ephemeral one refuses them.

Without PREFECT_API_URL, Prefect would run a flow against a *temporary* server it starts itself
(a `python -m uvicorn ... prefect.server.api.server:create_app` child, stopped by an `atexit`
hook). That child shares the terminal's process group, so Ctrl-C kills it together with the run,
and Prefect then spends minutes retrying to report the interrupted run to a server that is gone;
a SIGTERM to the run alone left it running. So `vlpref run` uses `prefect_api()` instead: with no
API configured, it starts a `PrefectServer` (API only, no background services, the same SQLite
database under PREFECT_HOME that Prefect's temporary server uses) in a session of its own, which
only vlpref stops, after the run's last report. `stop_temporary_server` stops Prefect's own
temporary server where one was started anyway.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from vlpref.errors import VlprefError
from vlpref.offline import OFFLINE_DEFAULTS

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stop_temporary_server() -> bool:
    """Stop the temporary Prefect server this process started (if any), after handing it the
    run logs it still buffers. Prefect would stop it at exit; stopping it first lets the command
    line print its `error:` line last, and stops it even if the exit is cut short. Returns
    whether one was running."""
    module = sys.modules.get("prefect.server.api.server")  # never import Prefect for this
    if module is None:
        return False
    instances = getattr(getattr(module, "SubprocessASGIServer", None), "_instances", {})
    running = [s for s in list(instances.values()) if getattr(s, "server_process", None)]
    if not running:
        return False
    with contextlib.suppress(Exception):  # best effort: the logs also sit in the task output
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    for server in running:
        server.stop()
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrefectServer:
    """A `prefect server start` subprocess with its own PREFECT_HOME, in a session of its own: a
    Ctrl-C in the terminal reaches its owner, which stops it (`stop`) once done with it.
    `services=False` runs the API only (no scheduler), as Prefect's temporary server does."""

    def __init__(
        self,
        home: str | Path,
        port: int | None = None,
        startup_timeout_s: float = 120,
        *,
        services: bool = True,
    ) -> None:
        self.home = Path(home)
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.services = services
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
                    *([] if self.services else ["--no-services"]),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C is for the owner, not for it
            )
        try:
            self._await_health()
        except BaseException:  # not answering, or the owner interrupted while waiting
            self.stop()
            raise
        return self

    def _await_health(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise VlprefError(f"prefect server exited early:\n{self._log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                _OPENER.open(f"{self.api_url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.25)
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
        """Terminate the server and wait for it (killed after 15 s)."""
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


@contextlib.contextmanager
def prefect_api(log: Callable[[str], None] | None = None) -> Iterator[str]:
    """The Prefect API for a flow run started from the command line: the configured one
    (PREFECT_API_URL, from the environment or a Prefect profile) if there is one, else a
    `PrefectServer` of this process (API only, the database under PREFECT_HOME) that is stopped
    when the block ends, however it ends. Yields the API URL."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        yield str(settings.api.url)
        return
    server = PrefectServer(settings.home, services=False)
    if log is not None:
        log(f"starting a temporary Prefect server on {server.api_url} (PREFECT_API_URL is not set)")
    with server, server.as_current(), api_url_in_environment(server.api_url):
        yield server.api_url


@contextlib.contextmanager
def api_url_in_environment(url: str) -> Iterator[None]:
    """PREFECT_API_URL set to `url` for as long as the block runs, for child processes too (Dask
    workers, served flow runs), then put back as it was."""
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def check_api_for_cluster(runner: str, address: str | None) -> None:
    """Refuse a run on a cluster started elsewhere (`--address`) when no Prefect server is
    configured: its workers cannot reach the temporary server `prefect_api` would start on this
    machine's loopback, and each would start one of its own (and take the run's limits with it).
    Local clusters need nothing: their workers inherit the run's server (flows/runners.py)."""
    if runner == "threads" or not address:
        return
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    raise VlprefError(
        f"--runner {runner} --address {address}: the cluster's workers need a Prefect server "
        "they can reach, and PREFECT_API_URL is not set. Start one on a host they reach and "
        "point this shell and every worker at it, e.g.\n"
        "  prefect server start --host 0.0.0.0 --port 4200\n"
        "  export PREFECT_API_URL=http://<that host>:4200/api"
    )
