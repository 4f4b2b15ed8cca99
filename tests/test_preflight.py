"""Preflight (vlpref/preflight.py) against the simulated server: a missing key variable, a refused
key, an unreachable endpoint and a model the endpoint does not serve are each found, all of them
together, without a single chat request; `kind: vllm` is refused where vLLM cannot be imported."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from vlpref import preflight
from vlpref.config import RunConfig, parse_config
from vlpref.errors import ConfigError
from vlpref.providers import registry
from vlpref.providers.base import Provider
from vlpref.sim.testing import SimServer, sim_run_config

REPO = Path(__file__).resolve().parents[1]
KEY = "preflight-key"
SIM = {
    "require_api_key": KEY,
    "models": {"sim-refuser": {"persona": "refuser"}, "sim-judge": {"persona": "judge"}},
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SIM) as server:
        yield server


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, sim: SimServer) -> None:
    monkeypatch.setenv("PREFLIGHT_KEY", KEY)
    monkeypatch.setenv("PREFLIGHT_WRONG", "nope")
    monkeypatch.delenv("PREFLIGHT_UNSET", raising=False)
    sim.reset()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


def config(sim: SimServer, tmp_path: Path, **endpoint: Any) -> dict[str, Any]:
    return sim_run_config_copy(
        sim.base_url,
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser"],
        endpoint={"api_key_env": "PREFLIGHT_KEY", **endpoint},
    )


def sim_run_config_copy(base_url: str, **kwargs: Any) -> dict[str, Any]:
    """`sim_run_config`, free to mutate (it shares its generator and judge entries)."""
    return copy.deepcopy(sim_run_config(base_url, **kwargs))


def parsed(data: dict[str, Any]) -> RunConfig:
    return parse_config(data)


def chat_requests(sim: SimServer) -> int:
    return int(sim.counters()["total"])


def test_a_healthy_config_passes_without_a_chat_request(sim: SimServer, tmp_path: Path) -> None:
    warnings: list[str] = []
    preflight.check(parsed(config(sim, tmp_path)), warn=warnings.append)
    assert warnings == [] and chat_requests(sim) == 0


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        (
            {"api_key_env": "PREFLIGHT_UNSET"},
            "endpoints.sim.api_key_env: the environment variable PREFLIGHT_UNSET is not set "
            "(or empty)",
        ),
        (
            {"api_key_env": "PREFLIGHT_WRONG"},
            "endpoints.sim: {base} refused the key in PREFLIGHT_WRONG (api_key_env): HTTP 401",
        ),
        (
            {"api_key_env": None},
            "endpoints.sim: {base} refused a request without a key (set api_key_env): HTTP 401",
        ),
    ],
)
def test_key_problems_name_the_variable_never_the_value(
    sim: SimServer, tmp_path: Path, endpoint: dict[str, Any], problem: str
) -> None:
    data = config(sim, tmp_path, **endpoint)
    if endpoint.get("api_key_env") is None:
        data["endpoints"]["sim"].pop("api_key_env")
    problems = preflight.find_problems(parsed(data))
    assert problems == [problem.format(base=sim.base_url)]
    assert "nope" not in problem and KEY not in problem
    assert chat_requests(sim) == 0


def test_an_unreachable_endpoint(sim: SimServer, tmp_path: Path) -> None:
    data = config(sim, tmp_path)
    data["endpoints"]["sim"]["base_url"] = f"http://127.0.0.1:{closed_port()}/v1"
    (problem,) = preflight.find_problems(parsed(data))
    assert problem.startswith(
        f"endpoints.sim.base_url: cannot reach {data['endpoints']['sim']['base_url']}/models: "
    )


def test_a_model_the_endpoint_does_not_serve(sim: SimServer, tmp_path: Path) -> None:
    data = config(sim, tmp_path)
    data["models"].append({"name": "ghost", "endpoint": "sim", "model": "no-such-model"})
    data["judges"].append({"name": "ghost-judge", "endpoint": "sim", "model": "no-such-model"})
    assert preflight.find_problems(parsed(data)) == [
        f"endpoints.sim: model 'no-such-model' (models[1].model, judges[1].model) is not served "
        f"by {sim.base_url} (it serves: sim-judge, sim-refuser)"
    ]
    assert chat_requests(sim) == 0


def test_every_problem_is_reported_at_once(sim: SimServer, tmp_path: Path) -> None:
    data = config(sim, tmp_path)
    down = f"http://127.0.0.1:{closed_port()}/v1"
    data["endpoints"]["nokey"] = {**data["endpoints"]["sim"], "api_key_env": "PREFLIGHT_UNSET"}
    data["endpoints"]["down"] = {"kind": "openai", "base_url": down}
    data["endpoints"]["unused"] = {"kind": "openai", "base_url": down}  # used by nothing
    data["models"] += [
        {"name": "ghost", "endpoint": "sim", "model": "no-such-model"},
        {"name": "a", "endpoint": "nokey", "model": "sim-refuser"},
        {"name": "b", "endpoint": "down", "model": "m"},
    ]
    data["source_file"] = "run.yaml"
    cfg = parsed(data).model_copy(update={"source_file": "run.yaml"})
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cfg)
    error = caught.value
    assert isinstance(error, ConfigError)
    assert [p.split(":")[0] for p in error.problems] == [
        "endpoints.sim",
        "endpoints.nokey.api_key_env",
        "endpoints.down.base_url",
    ]
    lines = str(error).split("\n")
    assert len(lines) == 3 and lines[0].startswith("run.yaml: endpoints.sim: model")
    assert all(line.startswith("error: run.yaml: endpoints.") for line in lines[1:])
    assert chat_requests(sim) == 0


def test_an_endpoint_without_models_listing_passes_with_a_warning(
    sim: SimServer, tmp_path: Path
) -> None:
    data = config(sim, tmp_path)
    data["endpoints"]["sim"]["base_url"] = sim.root_url + "/no-listing"  # GET .../models: 404
    warnings: list[str] = []
    assert preflight.find_problems(parsed(data), warn=warnings.append) == []
    assert warnings == [
        f"endpoints.sim: {sim.root_url}/no-listing does not serve GET /models (HTTP 404); "
        "its model ids were not checked"
    ]


def vllm_config(tmp_path: Path) -> RunConfig:
    data = config_without_sim(tmp_path)
    data["endpoints"]["local"] = {"kind": "vllm", "model": "org/tiny-vlm"}
    data["models"] = [{"name": "tiny", "endpoint": "local", "model": "org/tiny-vlm"}]
    return parse_config(data)


def config_without_sim(tmp_path: Path) -> dict[str, Any]:
    return sim_run_config_copy(
        "http://127.0.0.1:9/v1",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=str(tmp_path / "ws"),
        store=str(tmp_path / "store"),
        models=["refuser"],
    )


def test_offline_vllm_is_refused_where_vllm_cannot_be_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = vllm_config(tmp_path)
    monkeypatch.setattr(preflight, "vllm_importable", lambda: False)
    (problem,) = preflight.find_problems(cfg, network=False)  # no network: `vlpref check`
    assert problem.startswith("endpoints.local: kind: vllm needs vLLM in this Python environment")
    assert "vlpref vllm-serve" in problem and "serve:" in problem and "fastapi" in problem
    monkeypatch.setattr(preflight, "vllm_importable", lambda: True)
    assert preflight.find_problems(cfg, network=False) == []


def test_vllm_importable_does_not_import_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    assert "vllm" not in sys.modules
    assert preflight.vllm_importable() is False  # not installed in vlpref's environment
    assert "vllm" not in sys.modules
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    assert preflight.vllm_importable() is False


class CheckedProvider(Provider):
    """A plug-in kind with its own preflight hook."""

    kind = "checked"
    seen: list[tuple[dict[str, Any], list[str]]] = []  # noqa: RUF012 - test bookkeeping

    @classmethod
    def preflight(cls, options: Mapping[str, Any], model_ids: Sequence[str]) -> list[str]:
        cls.seen.append((dict(options), list(model_ids)))
        return [f"no licence for {m}" for m in model_ids if m.startswith("paid-")]

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> CheckedProvider:
        return cls()

    async def complete(self, requests: Any) -> Any:  # pragma: no cover - never asked
        raise AssertionError("preflight must not send")
        yield


def test_a_plugin_kind_is_checked_through_its_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builtins = registry._builtin_kinds()
    monkeypatch.setattr(
        registry,
        "_builtin_kinds",
        lambda: {**builtins, "checked": "tests.test_preflight:CheckedProvider"},
    )
    data = config_without_sim(tmp_path)
    data["endpoints"] = {"mine": {"kind": "checked"}}
    for entry in (*data["models"], data["generator"], *data["judges"]):
        entry["endpoint"] = "mine"
    data["models"][0]["model"] = "paid-model"
    assert preflight.find_problems(parse_config(data)) == [
        "endpoints.mine: no licence for paid-model"
    ]
    assert CheckedProvider.seen == [({"kind": "checked"}, ["paid-model", "sim-judge"])]


def test_before_build_skips_the_network_when_told_but_never_the_vllm_check(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config(sim, tmp_path, api_key_env="PREFLIGHT_UNSET")
    with pytest.raises(preflight.PreflightError, match="PREFLIGHT_UNSET"):
        preflight.before_build(parsed(data))
    with preflight.skipped():  # `vlpref run` checked already (or was told --no-preflight)
        preflight.before_build(parsed(data))
    preflight.before_build(parsed({**data, "preflight": False}))  # the config's switch
    monkeypatch.setattr(preflight, "vllm_importable", lambda: False)
    with preflight.skipped(), pytest.raises(preflight.PreflightError, match="kind: vllm"):
        preflight.before_build(vllm_config(tmp_path))
