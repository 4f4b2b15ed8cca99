"""Preflight: find what would fail every request of a run before any stage runs and pays.

A missing API key variable, an unreachable endpoint or a model id the endpoint does not serve
would otherwise surface in the questions or responses stage, after images, captions and
questions were paid for. For each endpoint the config uses (through `models`, `generator` or
`judges`):

- `kind: openai`: the key is there (`api_key_env` names a set, non-empty variable, or the
  `api_key_secret` block loads); `GET {base_url}/models` answers within a few seconds; it does
  not refuse the key (401/403); and it lists every model id the config asks of the endpoint. An
  endpoint without `GET /models` (404/405) is accepted with a warning: no chat request, which
  would be paid, is ever sent.
- `kind: vllm` (the offline engine): vLLM must be importable in this process, which it cannot be
  next to Prefect (see `VLLM_REFUSAL`); server mode is the way.
- any other kind: its provider class's `preflight(options, model_ids)` hook.

Every problem is collected, and `PreflightError` (a `ConfigError`) lists them all, one line each,
naming the endpoint and the field, variable or model. Key values are never printed.

`vlpref run` runs it before Prefect starts (`--no-preflight` skips it for one run), the flow
`build_dataset` at its start (so scheduled runs get it too; `preflight: false` in the config
skips it), and `vlpref check --preflight` on its own. The vLLM check needs no network and always
runs, also in plain `vlpref check`: without vLLM such a run cannot succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from vlpref.config import RunConfig
from vlpref.errors import ConfigError, VlprefError

logger = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # for GET /models: an endpoint slower than this to list its models is down
_LISTED = 10  # model ids quoted when one is missing

VLLM_REFUSAL = (
    "kind: vllm needs vLLM in this Python environment, and vLLM and Prefect cannot be installed "
    "together (vllm 0.32 requires fastapi<0.137, Prefect 3.8.8 requires fastapi>=0.139); serve "
    "the model with `vlpref vllm-serve` instead: make this endpoint `kind: openai` with a "
    "`serve:` block (`serve.python`: an interpreter that has vLLM) and build with "
    "`vlpref vllm-serve CONFIG --run`, or point the pipeline at the running server "
    "(README, section vLLM)"
)

Warn = Callable[[str], None]


class PreflightError(ConfigError):
    """What preflight found: `problems`, one per line of the message (the CLI prints each line
    as an `error:` line)."""

    def __init__(self, problems: Sequence[str], file: str | None = None) -> None:
        self.problems = list(problems)
        lines = [f"{file}: {p}" if file else p for p in self.problems]
        super().__init__("\nerror: ".join(lines))
        self.file = file


# -- what the config uses --------------------------------------------------------------------


def endpoint_models(config: RunConfig) -> dict[str, dict[str, list[str]]]:
    """endpoint -> model id -> the config fields that ask for it (`models[1].model`, ...), for
    the endpoints the config uses, in config order."""
    used: dict[str, dict[str, list[str]]] = {}
    entries = [
        *((f"models[{i}].model", m) for i, m in enumerate(config.models)),
        ("generator.model", config.generator),
        *((f"judges[{i}].model", j) for i, j in enumerate(config.judges)),
    ]
    for field, entry in entries:
        used.setdefault(entry.endpoint, {}).setdefault(entry.model, []).append(field)
    return used


# -- the checks --------------------------------------------------------------------------------


def vllm_importable() -> bool:
    """Whether `import vllm` could work here, without importing it (it takes seconds and pulls
    in torch)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def static_problems(config: RunConfig) -> list[str]:
    """What needs neither network nor secrets: engines this process cannot load."""
    problems = []
    for name in endpoint_models(config):
        if config.endpoint_kind(name) == "vllm" and not vllm_importable():
            problems.append(f"endpoints.{name}: {VLLM_REFUSAL}")
    return problems


def _resolve_key(name: str, options: Any) -> tuple[str | None, list[str]]:
    """The endpoint's key (None: none configured, or not found) and the problems finding it."""
    if options.api_key_env:
        key = os.environ.get(options.api_key_env)
        if not key:
            return None, [
                f"endpoints.{name}.api_key_env: the environment variable "
                f"{options.api_key_env} is not set (or empty)"
            ]
        return key, []
    if options.api_key_secret:
        try:
            from prefect.blocks.system import Secret

            # On a pool thread of `find_problems`: no event loop runs there.
            secret: Secret[str] = asyncio.run(Secret.aload(options.api_key_secret))
            return str(secret.get()), []
        except Exception as exc:  # the message names the block, never a value
            return None, [
                f"endpoints.{name}.api_key_secret: the Prefect Secret block "
                f"{options.api_key_secret!r} cannot be loaded ({type(exc).__name__})"
            ]
    return None, []


def _served_ids(body: Any) -> list[str] | None:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]


def check_openai(
    name: str, options: Mapping[str, Any], models: Mapping[str, list[str]], warn: Warn
) -> list[str]:
    """The checks of one `kind: openai` endpoint (module docstring)."""
    from vlpref.providers.openai_compat import OpenAICompatOptions

    opts = OpenAICompatOptions.model_validate(dict(options))
    key, problems = _resolve_key(name, opts)
    where = f"endpoints.{name}"
    url = f"{opts.base_url}/models"
    headers = dict(opts.headers)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = httpx.Timeout(TIMEOUT_S, connect=min(TIMEOUT_S, opts.connect_timeout_s))
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        hint = (
            " (a `serve:` endpoint: start its server with `vlpref vllm-serve`)"
            if opts.serve
            else ""
        )
        detail = str(exc) or type(exc).__name__
        return [*problems, f"{where}.base_url: cannot reach {url}: {detail}{hint}"]
    status = response.status_code
    if status in (401, 403):
        if problems:  # the key is missing, and that was said
            return problems
        if opts.api_key_env:
            source = f"the key in {opts.api_key_env} (api_key_env)"
        elif opts.api_key_secret:
            source = f"the key in Prefect Secret {opts.api_key_secret!r} (api_key_secret)"
        else:
            source = "a request without a key (set api_key_env)"
        return [f"{where}: {opts.base_url} refused {source}: HTTP {status}"]
    if status in (404, 405):
        warn(
            f"{where}: {opts.base_url} does not serve GET /models (HTTP {status}); "
            "its model ids were not checked"
        )
        return problems
    if status != 200:
        warn(f"{where}: GET {url} answered HTTP {status}; its model ids were not checked")
        return problems
    try:
        served = _served_ids(response.json())
    except ValueError:
        served = None
    if served is None:
        warn(f"{where}: GET {url} did not answer a model list; its model ids were not checked")
        return problems
    known = set(served)
    listed = ", ".join(sorted(served)[:_LISTED]) or "none"
    if len(served) > _LISTED:
        listed += f", ... ({len(served) - _LISTED} more)"
    for model, fields in models.items():
        if model not in known:
            problems.append(
                f"{where}: model {model!r} ({', '.join(fields)}) is not served by "
                f"{opts.base_url} (it serves: {listed})"
            )
    return problems


def _check_endpoint(
    config: RunConfig, name: str, models: Mapping[str, list[str]], warn: Warn
) -> list[str]:
    options = config.endpoints[name]
    kind = config.endpoint_kind(name)
    if kind == "openai":
        return check_openai(name, options, models, warn)
    if kind == "vllm":
        return []  # static_problems has it
    from vlpref.providers.registry import provider_class

    try:
        found = provider_class(kind).preflight(options, list(models))
    except VlprefError as exc:
        found = [str(exc)]
    return [f"endpoints.{name}: {p}" for p in found]


def find_problems(
    config: RunConfig, *, network: bool = True, warn: Warn | None = None
) -> list[str]:
    """Every problem preflight finds, in endpoint order; warnings go to `warn` (default: this
    module's logger). `network=False`: the static checks only."""
    warn = warn or logger.warning
    problems = static_problems(config)
    if not network:
        return problems
    used = endpoint_models(config)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(used)))) as pool:
        found = pool.map(lambda item: _check_endpoint(config, item[0], item[1], warn), used.items())
        for endpoint_problems in found:
            problems.extend(endpoint_problems)
    return problems


def check(config: RunConfig, *, network: bool = True, warn: Warn | None = None) -> None:
    """Raise `PreflightError` listing every problem found; return quietly otherwise."""
    problems = find_problems(config, network=network, warn=warn)
    if problems:
        raise PreflightError(problems, config.source_file)


# -- the flow's call ---------------------------------------------------------------------------

_skipped = 0
_skipped_lock = threading.Lock()


@contextlib.contextmanager
def skipped() -> Iterator[None]:
    """Within it, `before_build` runs only the static checks: for `vlpref run`, which has run
    the network checks itself before starting Prefect (or was told `--no-preflight`)."""
    global _skipped
    with _skipped_lock:
        _skipped += 1
    try:
        yield
    finally:
        with _skipped_lock:
            _skipped -= 1


def before_build(config: RunConfig) -> None:
    """The start of `build_dataset`: the whole preflight unless the config says `preflight:
    false` or the caller ran it already (`skipped`); the static checks always."""
    network = config.preflight and not _skipped
    warn: Warn = logger.warning
    with contextlib.suppress(Exception):
        from prefect import get_run_logger

        warn = get_run_logger().warning
    check(config, network=network, warn=warn)
