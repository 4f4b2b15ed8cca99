"""`vlpref vllm-serve` and `vlpref.vllm_serve` without vLLM: planning from a config, and the
process lifecycle against a stand-in `vllm.entrypoints.openai.api_server` module (written here,
put on the server's PYTHONPATH) that answers /health. The real server is started by the vLLM
tier (`make test-vllm`, tests_vllm/)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlpref.config import RunConfig, load_config, parse_config
from vlpref.errors import ConfigError
from vlpref.vllm_serve import VllmServeError, VllmServers, plan_servers, start_waves

REPO = Path(__file__).resolve().parents[1]

FAKE_SERVER = """
import argparse, http.server, json, os, signal, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--served-model-name", nargs="+")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args, rest = parser.parse_known_args()
record = os.environ.get("FAKE_RECORD")
if record:
    with open(record, "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv[1:],
                   "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "key": os.environ.get("VLLM_API_KEY")}, f)
mode = os.environ.get("FAKE_MODE", "")
print("fake vllm starting", flush=True)
if mode == "fail":
    print("ValueError: no such model directory", flush=True)
    sys.exit(3)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
if mode == "hang":
    time.sleep(3600)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"{}" if self.path == "/health" else json.dumps(
            {"data": [{"id": n} for n in args.served_model_name]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

http.server.HTTPServer((args.host, args.port), Handler).serve_forever()
"""


@pytest.fixture
def fake_vllm(tmp_path: Path) -> Path:
    """A directory holding a stand-in `vllm` package (only the server module)."""
    root = tmp_path / "fake"
    module = root / "vllm" / "entrypoints" / "openai"
    module.mkdir(parents=True)
    for folder in (root / "vllm", root / "vllm" / "entrypoints", module):
        (folder / "__init__.py").write_text("")
    (module / "api_server.py").write_text(textwrap.dedent(FAKE_SERVER))
    return root


def config_data(tmp_path: Path, endpoints: dict[str, Any], models: list[Any]) -> dict[str, Any]:
    return {
        "name": "t",
        "taxonomy": str(REPO / "taxonomy" / "demo.yaml"),
        "workspace": str(tmp_path / "ws"),
        "store": str(tmp_path / "store"),
        "endpoints": {"hosted": {"kind": "openai"}, **endpoints},
        "models": models,
        "generator": {"name": "g", "endpoint": "hosted", "model": "gpt"},
        "judges": [{"name": "j", "endpoint": "hosted", "model": "gpt"}],
    }


def served(fake: Path, tmp_path: Path, mode: str = "", **serve: Any) -> RunConfig:
    serve_block = {
        "env": {"PYTHONPATH": str(fake), "FAKE_MODE": mode, "FAKE_RECORD": str(tmp_path / "rec")},
        "startup_timeout_s": 20,
        "stop_grace_s": 5,
        **serve,
    }
    return parse_config(
        config_data(
            tmp_path,
            {"open": {"kind": "openai", "base_url": "http://127.0.0.1/v1", "serve": serve_block}},
            [{"name": "tiny", "endpoint": "open", "model": "org/tiny"}],
        )
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_plan_ports_names_gpus_and_commands(tmp_path: Path) -> None:
    endpoints = {
        "a": {
            "kind": "openai",
            "base_url": "http://127.0.0.1:8101/v1",
            "api_key_env": "LOCAL_KEY",
            "serve": {"model": "/models/a", "gpus": [0], "gpu_memory_utilization": 0.45},
        },
        "b": {
            "kind": "openai",
            "base_url": "http://127.0.0.1:8102/v1",
            "serve": {"gpus": [0], "gpu_memory_utilization": 0.5, "max_model_len": 4096},
        },
        "c": {
            "kind": "openai",
            "base_url": "http://127.0.0.1/v1",
            "serve": {
                "gpus": [1, 2],
                "limit_mm_per_prompt": {"image": 1},
                "extra_args": ["--max-num-seqs", "64"],
            },
        },
    }
    models = [
        {"name": "a", "endpoint": "a", "model": "alias-a"},
        {"name": "b", "endpoint": "b", "model": "org/b"},
        {"name": "c", "endpoint": "c", "model": "org/c"},
    ]
    specs = {
        s.endpoint: s for s in plan_servers(parse_config(config_data(tmp_path, endpoints, models)))
    }
    assert sorted(specs) == ["a", "b", "c"]  # `hosted` has no serve block
    a, b, c = specs["a"], specs["b"], specs["c"]
    assert (a.port, b.port) == (8101, 8102) and 1024 < c.port < 65536
    assert a.command()[1:] == [
        "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/a",
        "--served-model-name", "alias-a", "--host", "127.0.0.1", "--port", "8101",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.45",
    ]  # fmt: skip
    assert b.model == "org/b" and "--max-model-len" in b.command()
    cmd = c.command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--limit-mm-per-prompt") + 1] == '{"image": 1}'
    assert cmd[-2:] == ["--max-num-seqs", "64"]
    env = a.environment({"LOCAL_KEY": "s3cret", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["VLLM_API_KEY"] == "s3cret"
    assert "s3cret" not in a.command()
    assert c.environment({})["CUDA_VISIBLE_DEVICES"] == "1,2"
    # a and b share GPU 0: one after the other; c has its own GPUs and starts with a.
    waves = [[s.endpoint for s in wave] for wave in start_waves(list(specs.values()))]
    assert waves == [["a", "c"], ["b"]]


def models_on(first: str, second: str) -> list[dict[str, str]]:
    """Two response models with different ids, on the endpoints named."""
    return [
        {"name": "x", "endpoint": first, "model": "m"},
        {"name": "y", "endpoint": second, "model": "n"},
    ]


@pytest.mark.parametrize(
    ("endpoints", "models", "message"),
    [
        (
            {
                "x": {"kind": "openai", "serve": {"gpus": [0]}},
                "y": {"kind": "openai", "serve": {"gpus": [0], "gpu_memory_utilization": 0.5}},
            },
            models_on("x", "y"),
            "GPU 0 is shared by x: 0.9, y: 0.5",
        ),
        (
            {"x": {"kind": "openai", "serve": {}}},
            models_on("x", "x"),
            "one server serves one model",
        ),
        (
            {
                "x": {"kind": "openai", "serve": {"port": 8200}},
                "y": {"kind": "openai", "serve": {"port": 8200}},
            },
            models_on("x", "y"),
            "port 8200 is used by another served endpoint",
        ),
    ],
)  # fmt: skip
def test_plans_that_cannot_work_are_refused(
    tmp_path: Path, endpoints: dict[str, Any], models: list[Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_servers(parse_config(config_data(tmp_path, endpoints, models)))


def test_a_typo_in_a_serve_block_names_its_line(tmp_path: Path) -> None:
    data = config_data(
        tmp_path,
        {"open": {"kind": "openai", "serve": {"gpu": [0]}}},
        [{"name": "m", "endpoint": "open", "model": "m"}],
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"endpoints\.open\.serve\.gpu: line \d+: unknown field"):
        load_config(path)


def test_servers_start_serve_and_stop(fake_vllm: Path, tmp_path: Path) -> None:
    config = served(fake_vllm, tmp_path, gpus=[3])
    lines: list[str] = []
    with VllmServers(config, log_dir=tmp_path / "logs", log=lines.append) as servers:
        endpoint = servers.config.endpoints["open"]
        assert "serve" not in endpoint
        assert endpoint["base_url"] == servers.specs[0].base_url
        record = json.loads((tmp_path / "rec").read_text())
        assert record["cuda"] == "3" and "org/tiny" in record["argv"]
        written = load_config(servers.write_config(tmp_path / "served.yaml"))
        assert written.endpoints["open"]["base_url"] == endpoint["base_url"]
        assert written.models == config.models
        # The same file (the checkout's taxonomy/ is a symlink into the package's resources).
        assert Path(written.taxonomy).resolve() == Path(config.taxonomy).resolve()
        pid = record["pid"]
        assert alive(pid)
    assert not alive(pid)
    assert any("ready at" in line for line in lines)


def test_a_server_that_exits_is_reported_with_its_log(fake_vllm: Path, tmp_path: Path) -> None:
    with (
        pytest.raises(VllmServeError, match=r"exited with 3(.|\n)*no such model directory"),
        VllmServers(served(fake_vllm, tmp_path, mode="fail"), log_dir=tmp_path / "logs"),
    ):
        pass


def test_a_server_that_never_answers_times_out_and_is_killed(
    fake_vllm: Path, tmp_path: Path
) -> None:
    config = served(fake_vllm, tmp_path, mode="hang", startup_timeout_s=2)
    with pytest.raises(VllmServeError, match=r"did not answer /health within 2s"):  # noqa: SIM117
        with VllmServers(config, log_dir=tmp_path / "logs"):
            pass
    assert not alive(json.loads((tmp_path / "rec").read_text())["pid"])


def test_sigterm_ignored_means_sigkill_after_the_grace(fake_vllm: Path, tmp_path: Path) -> None:
    config = served(fake_vllm, tmp_path, mode="ignore-term", stop_grace_s=0.5)
    with VllmServers(config, log_dir=tmp_path / "logs"):
        pid = json.loads((tmp_path / "rec").read_text())["pid"]
        started = time.monotonic()
    assert not alive(pid) and time.monotonic() - started < 5


def test_cli_writes_the_served_config_and_stops_on_sigterm(fake_vllm: Path, tmp_path: Path) -> None:
    config = served(fake_vllm, tmp_path)
    path = tmp_path / "run.yaml"
    data = config.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlpref.cli", "vllm-serve", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    target = tmp_path / "run.served.yaml"
    try:
        deadline = time.monotonic() + 60
        while not target.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no served config was written"
            time.sleep(0.1)
        served_config = load_config(target)
        assert served_config.endpoints["open"]["base_url"].startswith("http://127.0.0.1:")
        pid = json.loads((tmp_path / "rec").read_text())["pid"]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "vllm servers stopped" in output
    assert not alive(pid)


SIM_AS_VLLM = """
import argparse, asyncio
from vlpref.sim.__main__ import serve
from vlpref.sim.config import load_config

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--served-model-name", nargs="+")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
# The served id's last part names the persona: org/refuser -> refuser.
personas = {name: {"persona": name.rsplit("/", 1)[-1]} for name in args.served_model_name}
config = load_config({"models": personas})
asyncio.run(serve(config, args.host, args.port))
"""


def test_cli_run_builds_a_version_through_the_served_endpoint(
    fake_vllm: Path, tmp_path: Path, prefect_server: str
) -> None:
    """`vlpref vllm-serve --run`: start the server (here vlpref's simulator standing in for
    vLLM), build a version through it with the Prefect flow, stop the server."""
    (fake_vllm / "vllm" / "entrypoints" / "openai" / "api_server.py").write_text(SIM_AS_VLLM)

    def endpoint(model: str) -> dict[str, Any]:
        return {
            "kind": "openai",
            "base_url": "http://127.0.0.1/v1",
            "serve": {"model": f"/models/{model}", "stop_grace_s": 5},
        }

    data = config_data(
        tmp_path,
        {"a": endpoint("refuser"), "b": endpoint("jailbroken"), "j": endpoint("judge")},
        [
            {"name": "refuser", "endpoint": "a", "model": "org/refuser"},
            {"name": "jailbroken", "endpoint": "b", "model": "org/jailbroken"},
        ],
    )
    data["generator"] = {"name": "gen", "endpoint": "j", "model": "org/judge"}
    data["judges"] = [{"name": "judge", "endpoint": "j", "model": "org/judge"}]
    data["stages"] = {"images": {"source": {"kind": "typographic", "per_branch": 1}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_vllm), str(REPO)])}
    command = [sys.executable, "-m", "vlpref.cli", "vllm-serve", str(path), "--run"]
    command += ["--only", "Malicious Use/Security threats", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset version" in proc.stdout and "vllm servers stopped" in proc.stderr
    assert proc.stderr.count("ready at") == 3
    from vlpref.store import Store

    store = Store(str(tmp_path / "store"))
    (version,) = store.list_versions()
    manifest = store.open(version.version_id).manifest
    assert manifest["rebuilt"] and all(p.startswith("Malicious Use/") for p in manifest["rebuilt"])
    assert manifest["model_safety"]["refuser"]["unsafe_rate"] == 0.0
    assert manifest["model_safety"]["jailbroken"]["unsafe_rate"] == 1.0
    assert manifest["counts"]["pairs"] > 0
