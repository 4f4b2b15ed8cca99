"""`vlpref serve`: serve the deployments of `prefect.yaml` against a Prefect server.

Reads the `deployments:` of a prefect.yaml (name, entrypoint, parameters, schedules), builds each
with `flow.to_deployment` and serves them all from this process with `prefect.serve`: scheduled
runs and runs triggered through the API (`prefect deployment run`, the UI, `run_deployment`)
execute here. Schedules need a real Prefect server (`prefect server start`); the ephemeral one
refuses them, so PREFECT_API_URL must be set.

The yaml's `build:` and `pull:` steps are for `prefect deploy` and a work pool's workers on other
hosts (vlpref/deploy_steps.py, docs/cluster.md); serving runs this checkout's code in this
process, so neither applies here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlpref.errors import ConfigError
from vlpref.yamlfile import load_yaml

_ENV = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _expand(value: Any, overrides: Mapping[str, str]) -> Any:
    """Prefect's `{{ $NAME }}` templating, from `overrides` first, then the environment."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            found = overrides.get(name, os.environ.get(name))
            if not found:  # an empty value would deploy `config: ''` and fail at 02:00
                raise ConfigError(f"{{{{ ${name} }}}} is used but {name} is not set (or empty)")
            return found

        return _ENV.sub(replace, value)
    if isinstance(value, list):
        return [_expand(v, overrides) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, overrides) for k, v in value.items()}
    return value


def _location(config: str) -> str:
    """A URI as given (the config on shared storage); a path made absolute, so that a run does not
    depend on the folder the server runs it in."""
    return config if "://" in config else str(Path(config).resolve())


def read_deployments(
    prefect_yaml: str | Path, *, config: str | None = None
) -> list[dict[str, Any]]:
    """The deployment entries of a prefect.yaml, templated; `config` sets VLPREF_CONFIG."""
    path = Path(prefect_yaml)
    data = load_yaml(path)[0] or {}  # duplicate keys and alias bombs are refused
    entries = data.get("deployments")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("no deployments", file=str(path), field="deployments")
    overrides = {"VLPREF_CONFIG": _location(config)} if config else {}
    out = []
    for index, entry in enumerate(entries):
        for required in ("name", "entrypoint"):
            if not entry.get(required):
                raise ConfigError(
                    "missing", file=str(path), field=f"deployments[{index}].{required}"
                )
        out.append(_expand(entry, overrides))
    return out


def build_deployments(prefect_yaml: str | Path, *, config: str | None = None) -> list[Any]:
    """RunnerDeployments for `prefect.serve`, entrypoints resolved against the yaml's folder."""
    from prefect.flows import load_flow_from_entrypoint

    root = Path(prefect_yaml).resolve().parent
    deployments = []
    for entry in read_deployments(prefect_yaml, config=config):
        file, _, func = str(entry["entrypoint"]).partition(":")
        flow: Any = load_flow_from_entrypoint(f"{root / file}:{func}")
        crons = [s["cron"] for s in entry.get("schedules") or [] if "cron" in s]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                parameters=entry.get("parameters") or {},
                cron=crons or None,
            )
        )
    return deployments


def serve(prefect_yaml: str | Path, *, config: str | None = None, limit: int | None = None) -> None:
    """Serve every deployment of `prefect_yaml` until interrupted."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "scheduled runs need a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect_serve(*build_deployments(prefect_yaml, config=config), limit=limit)
