"""`SimServer`: run the simulated server as a subprocess, for tests and benchmarks.

    with SimServer({"models": {"sim-refuser": {"persona": "refuser"}}}) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="sim")
        ...
        assert sim.counters()["by_status"]["200"] == 1

The config is written to a temporary YAML file and `python -m vlpref.sim` is started with
port 0; the handle waits for its `LISTENING` line and for GET /health.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from vlpref.errors import VlprefError
from vlpref.sim.config import SimConfig, load_config

_REPO_ROOT = Path(__file__).resolve().parents[2]
# Loopback only: never let an http_proxy environment variable route these calls.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SimServerError(VlprefError):
    """The simulated server did not start or stopped answering."""


class SimServer:
    """A handle on one `python -m vlpref.sim` subprocess."""

    def __init__(
        self,
        config: SimConfig | Mapping[str, Any],
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        self.config = load_config(config)  # fail fast, in this process, on a bad config
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.python = python
        self.root_url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._stderr_path: Path | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in /v1."""
        if not self.root_url:
            raise SimServerError("the sim server is not running")
        return self.root_url + "/v1"

    @property
    def pid(self) -> int | None:
        """The subprocess id while running."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> SimServer:
        """Start the subprocess and wait until it serves /health."""
        if self._proc is not None:
            return self
        self._tmpdir = tempfile.TemporaryDirectory(prefix="vlpref-sim-")
        cfg_path = Path(self._tmpdir.name) / "sim.yaml"
        data = self.config.model_dump(mode="json", exclude_none=True)
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        err_path = self._stderr_path = Path(self._tmpdir.name) / "stderr.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        with err_path.open("wb") as err:
            cmd = [self.python, "-m", "vlpref.sim", "--host", self.host, "--port", "0"]
            cmd += ["--config", str(cfg_path), "--watch-stdin"]
            # stdin stays open as a lifeline: if this process dies, the server sees EOF and exits.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env
            )
        try:
            self.root_url = self._await_listening(err_path)
            self._await_health()
        except BaseException:
            self.stop()
            raise
        return self

    def _await_listening(self, err_path: Path) -> str:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                line = proc.stdout.readline().decode(errors="replace").strip()
                if line.startswith("LISTENING "):
                    return line.split(" ", 1)[1]
            if proc.poll() is not None:
                err = err_path.read_text(errors="replace")[-4000:]
                raise SimServerError(f"sim server exited with {proc.returncode}:\n{err}")
        raise SimServerError(f"sim server did not listen within {self.startup_timeout_s}s")

    def _await_health(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                if self._get("/health").get("status") == "ok":
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the subprocess (SIGTERM, then SIGKILL after 5 s) and clean up."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self._stderr_path = None
        self.root_url = ""

    def stderr_text(self) -> str:
        """What the server wrote to stderr so far (tracebacks of sim bugs land here)."""
        path = self._stderr_path
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- introspection --------------------------------------------------------------------

    def _get(self, path: str, *, method: str = "GET") -> Any:
        req = urllib.request.Request(
            self.root_url + path, method=method, data=b"" if method == "POST" else None
        )
        with _OPENER.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def counters(self) -> dict[str, Any]:
        """GET /sim/counters: total, by_model, by_status, faults."""
        result: dict[str, Any] = self._get("/sim/counters")
        return result

    def requests_log(self) -> list[dict[str, Any]]:
        """GET /sim/requests: [{t, model, status, fault}] in completion order."""
        result: list[dict[str, Any]] = self._get("/sim/requests")
        return result

    def reset(self) -> None:
        """POST /sim/reset: zero counters and log, forget arrivals and rate windows."""
        self._get("/sim/reset", method="POST")


# The type of the `sim_server` pytest fixture: `sim_server(config_dict) -> SimServer`.
SimServerFactory = Callable[[Mapping[str, Any]], SimServer]


# The sim's judge persona also writes captions and questions: one model serves both roles.
SIM_GENERATOR: dict[str, Any] = {
    "name": "gen",
    "endpoint": "sim",
    "model": "sim-judge",
    "sampling": {"temperature": 0.8},
}
SIM_JUDGE: dict[str, Any] = {
    "name": "judge",
    "endpoint": "sim",
    "model": "sim-judge",
    "sampling": {"temperature": 0, "logprobs": True, "top_logprobs": 5},
}


def sim_run_config(
    base_url: str,
    *,
    taxonomy: str,
    workspace: str,
    store: str,
    models: list[str | dict[str, Any]],
    per_branch: int = 2,
    endpoint: dict[str, Any] | None = None,
    stages: dict[str, Any] | None = None,
    name: str = "sim-run",
    **extra: Any,
) -> dict[str, Any]:
    """A run config (as a dict) whose every model is on the simulated server at `base_url`.

    Response models are given by name (`"refuser"` is served as `sim-refuser`) or as full
    entries; the sim judge is the generator and the judge; images are typographic,
    `per_branch` per branch. `stages` entries are merged over that; `extra` sets top-level keys.
    """
    entries = [
        m if isinstance(m, dict) else {"name": m, "endpoint": "sim", "model": f"sim-{m}"}
        for m in models
    ]
    return {
        "name": name,
        "taxonomy": taxonomy,
        "workspace": workspace,
        "store": store,
        "endpoints": {"sim": {"kind": "openai", "base_url": base_url, **(endpoint or {})}},
        "models": entries,
        "generator": SIM_GENERATOR,
        "judges": [SIM_JUDGE],
        "stages": {
            "images": {"source": {"kind": "typographic", "per_branch": per_branch}},
            **(stages or {}),
        },
        **extra,
    }
