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
from pathlib import Path
from typing import Any

import httpx

from vlpref.config import RunConfig
from vlpref.errors import ConfigError, VlprefError
from vlpref.redact import redact, register_secret

logger = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # for GET /models: an endpoint slower than this to list its models is down
_LISTED = 10  # model ids quoted when one is missing

VLLM_REFUSAL = (
    "kind: vllm needs vLLM in this Python environment, and vLLM and Prefect cannot be installed "
    "together (vllm 0.32 requires fastapi<0.137, Prefect 3.8.8 requires fastapi>=0.139); serve "
    "the model with `vlpref vllm-serve` instead: make this endpoint `kind: openai` with a "
    "`serve:` block (`serve.python`: an interpreter that has vLLM) and build with "
    "`vlpref vllm-serve CONFIG --run`, or point the pipeline at the running server "
    "(docs/vllm.md)"
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


# -- what `run` needs besides the endpoints: checked here, with neither network nor a request ------

# The fields each stage fills into its template (`Prompt.render` refuses any other set).
TEMPLATE_FIELDS: Mapping[str, frozenset[str]] = {
    "caption": frozenset({"class_path", "keywords"}),
    "questions": frozenset({"caption", "class_path", "keywords"}),
    "response": frozenset({"question"}),
    "judge_safety": frozenset({"question", "response"}),
    "judge_rating": frozenset({"aspect_lines", "aspects", "caption", "question", "response"}),
    "judge_pairwise": frozenset({"question", "response_a", "response_b"}),
}
# Templates a run loads only when a judge option asks for them (a prompts_dir made before they
# existed keeps working without them).
REFINE_FIELDS: Mapping[str, frozenset[str]] = {
    "judge_safety_reasoning": frozenset({"question", "response"}),  # cascade_band
    "judge_rule": frozenset({"question", "response", "rule"}),  # rules
}
# A guard protocol's template: the conversation, and the policy where the template asks for it.
GUARD_FIELDS = frozenset({"question", "response"})
GUARD_OPTIONAL = frozenset({"policy"})


def templates_used(config: RunConfig) -> list[str]:
    """Every prompt template a run of `config` loads: the stages' and its judges' guard ones."""
    from vlpref.protocols import GUARDS

    specs = (GUARDS.get(j.protocol) for j in config.judges)
    guards = sorted({s.template for s in specs if s is not None and s.template})
    refine = [
        *(["judge_safety_reasoning"] if any(j.cascade_band for j in config.judges) else []),
        *(["judge_rule"] if any(j.rules != "off" for j in config.judges) else []),
    ]
    return [*TEMPLATE_FIELDS, *refine, *guards]


def prompt_problems(config: RunConfig) -> list[str]:
    """Each template the run uses reads, parses, and has the fields its stage fills in."""
    from vlpref.prompts import load_prompt

    field = "prompts_dir" if config.prompts_dir else "prompts"
    problems = []
    for name in templates_used(config):
        try:
            prompt = load_prompt(name, config.prompts_dir)
        except ConfigError as exc:
            problems.append(f"{field}: {exc}")
            continue
        required = TEMPLATE_FIELDS.get(name) or REFINE_FIELDS.get(name) or GUARD_FIELDS
        ours = name in TEMPLATE_FIELDS or name in REFINE_FIELDS
        optional = frozenset() if ours else GUARD_OPTIONAL
        missing = sorted(required - prompt.fields)
        unexpected = sorted(prompt.fields - required - optional)
        if missing or unexpected:
            said = [f"missing {', '.join(f'${f}' for f in missing)}"] if missing else []
            said += [f"unknown {', '.join(f'${f}' for f in unexpected)}"] if unexpected else []
            problems.append(
                f"{field}: {prompt.file}: the template's placeholders do not match what the stage "
                f"fills in ({'; '.join(said)}; expected {', '.join(sorted(required | optional))})"
            )
    return problems


def taxonomy_problems(config: RunConfig, only: Sequence[str] | None = None) -> list[str]:
    """The taxonomy reads, and `only` (the CLI's `--only`, else the config's) selects branches."""
    from vlpref.taxonomy import load_taxonomy

    try:
        taxonomy = load_taxonomy(config.taxonomy)
    except ConfigError as exc:
        return [f"taxonomy: {exc}"]
    selected = list(only) if only else list(config.only)
    try:
        leaves = taxonomy.select(selected or None)
    except ConfigError as exc:
        return [f"{'--only' if only else 'only'}: {exc}"]
    asking = [j.name for j in config.judges if j.rules != "off"]
    bare = [leaf.path for leaf in leaves if not leaf.rules]
    if asking and bare:
        shown = ", ".join(repr(p) for p in bare[:5]) + (
            f" and {len(bare) - 5} more" if len(bare) > 5 else ""
        )
        return [
            f"judges: {', '.join(asking)} ask(s) rules, but {len(bare)} branch(es) have none: "
            f"{shown}; add `rules:` to the taxonomy ({config.taxonomy}) or set `rules: off`"
        ]
    return []


def sample_problems(config: RunConfig) -> list[str]:
    """A pair needs two responses to one question: at least two samples per question."""
    samples = config.samples_per_question
    if samples >= 2:
        return []
    return [
        f"models: each question gets {samples} response sample (the sum of the models' "
        "sampling.n), and a preference pair needs two: add a response model or set "
        "sampling.n: 2"
    ]


def _local_path(location: str) -> str | None:
    """The local path of a location; None for a URI of another filesystem (s3://, memory://)."""
    if "://" not in location:
        return location
    scheme, _, rest = location.partition("://")
    return rest if scheme in ("file", "local") else None


def writable_problem(field: str, location: str) -> str | None:
    """A folder `run` writes to exists and is writable, or can be created (its nearest existing
    ancestor is a writable folder). Nothing is created."""
    path = Path(location)
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a folder" if probe == path else f"cannot be created: {probe} is not a folder"
        return f"{field}: {location} {what}"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        return f"{field}: {location} {what}"
    return None


def store_problems(store_path: str) -> list[str]:
    """`LATEST` (or, without it, the newest version) is complete: its marker and manifest read
    and the files the manifest lists are there. A publish shares from it."""
    from vlpref.errors import StoreError
    from vlpref.store import Store

    if not Path(store_path).is_dir():
        return []
    store = Store(store_path)
    try:
        latest = store.latest()
        if latest is None:
            return []
        version = store.open(latest.version_id)
        files = version.manifest["files"]
    except StoreError as exc:
        return [f"store: {exc}"]
    except OSError as exc:
        return [f"store: {exc.filename or store_path}: {exc.strerror or exc}"]
    missing = [rel for rel in files if not os.path.exists(version.path(rel))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return [
            f"store: {version.path(missing[0])}: missing{more}; version {latest.version_id}, "
            "which LATEST names, is damaged"
        ]
    return []


def location_problems(config: RunConfig, warn: Warn) -> list[str]:
    """The workspace and the store are writable folders (or can be made), and the store's
    `LATEST` names a complete version. A URI of another filesystem is left unchecked."""
    problems = []
    for field, location in (("workspace", config.workspace), ("store", config.store)):
        path = _local_path(location)
        if path is None:
            warn(f"{field}: {location} is not a local path; not checked before the run")
            continue
        problem = writable_problem(field, path)
        if problem is not None:
            problems.append(problem)
        elif field == "store":
            problems.extend(store_problems(path))
    return problems


def key_problems(config: RunConfig) -> list[str]:
    """The `api_key_env` variables of the endpoints the config uses are set (no request)."""
    problems = []
    for name in endpoint_models(config):
        variable = config.endpoints[name].get("api_key_env")
        if config.endpoint_kind(name) == "openai" and variable and not os.environ.get(variable):
            problems.append(
                f"endpoints.{name}.api_key_env: the environment variable {variable} is not set "
                "(or empty)"
            )
    return problems


def local_problems(
    config: RunConfig, *, only: Sequence[str] | None = None, warn: Warn | None = None
) -> list[str]:
    """What `vlpref check` and `vlpref run` refuse without any network: the taxonomy (and the
    `only` selection), every prompt template, two samples per question, the workspace and the
    store (and its `LATEST`), and the key variables."""
    warn = warn or logger.warning
    return [
        *taxonomy_problems(config, only),
        *prompt_problems(config),
        *sample_problems(config),
        *location_problems(config, warn),
        *key_problems(config),
    ]


def _resolve_key(name: str, options: Any) -> tuple[str | None, list[str]]:
    """The endpoint's key (None: none configured, or not found) and the problems finding it.
    A key found is registered for redaction (`vlpref.redact`) before it is sent anywhere."""
    if options.api_key_env:
        key = os.environ.get(options.api_key_env)
        if not key:
            return None, [
                f"endpoints.{name}.api_key_env: the environment variable "
                f"{options.api_key_env} is not set (or empty)"
            ]
        register_secret(key)
        return key, []
    if options.api_key_secret:
        try:
            from prefect.blocks.system import Secret

            # On a pool thread of `find_problems`: no event loop runs there.
            secret: Secret[str] = asyncio.run(Secret.aload(options.api_key_secret))
            value = str(secret.get())
            register_secret(value)
            return value, []
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
        detail = redact(str(exc)) or type(exc).__name__
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
    config: RunConfig,
    *,
    network: bool = True,
    warn: Warn | None = None,
    local: bool = False,
    only: Sequence[str] | None = None,
) -> list[str]:
    """Every problem preflight finds, in endpoint order; warnings go to `warn` (default: this
    module's logger). `network=False`: the static checks only. `local=True` (`vlpref check` and
    `vlpref run`): first `local_problems` (with `only`, the CLI's `--only`)."""
    warn = warn or logger.warning
    problems = local_problems(config, only=only, warn=warn) if local else []
    problems += static_problems(config)
    if not network:
        return problems
    used = endpoint_models(config)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(used)))) as pool:
        found = pool.map(lambda item: _check_endpoint(config, item[0], item[1], warn), used.items())
        for endpoint_problems in found:
            problems.extend(endpoint_problems)
    return list(dict.fromkeys(problems))  # a missing key variable is found by both


def check(
    config: RunConfig,
    *,
    network: bool = True,
    warn: Warn | None = None,
    local: bool = False,
    only: Sequence[str] | None = None,
) -> None:
    """Raise `PreflightError` listing every problem found; return quietly otherwise."""
    problems = find_problems(config, network=network, warn=warn, local=local, only=only)
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
