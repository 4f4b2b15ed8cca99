"""Secrets in a run config are refused and never repeated (docs/security.md, "Keys
and secrets"): a key pasted where the *name* of a variable or block belongs, a field named like a
credential (headers, extra_body, anywhere), a value shaped like a key wherever it is written; and
no error message quotes them, `vlpref check` included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_config import GOOD, write
from tests.test_redact import CREDENTIALS, NOT_CREDENTIALS
from vlpref.config import _describe, load_config
from vlpref.errors import ConfigError

KEYS = [
    "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234",
    "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "hf_abcdefghijklmnopqrstuvwxyzABCDEF12",
    "gsk_abcdefghijklmnopqrstuvwxyz012345",
    "AKIAIOSFODNN7EXAMPLE",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
    "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6",  # 32 hex digits, no known prefix
]
KEY_LINE = 12  # the line of `api_key_env` in GOOD


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("key", KEYS)
def test_a_key_in_api_key_env_is_refused_without_echoing_it(tmp_path: Path, key: str) -> None:
    path = tmp_path / "run.yaml"
    message = refused(tmp_path, GOOD.replace("EXAMPLE_API_KEY", key))
    assert message.startswith(f"{path}: endpoints.hosted.api_key_env: line {KEY_LINE}: ")
    assert "NAME of an environment variable" in message
    assert key not in message and key[:10] not in message


@pytest.mark.parametrize("key", KEYS)
def test_a_key_in_api_key_secret_is_refused_without_echoing_it(tmp_path: Path, key: str) -> None:
    text = GOOD.replace("api_key_env: EXAMPLE_API_KEY", f"api_key_secret: {key}")
    message = refused(tmp_path, text)
    assert f"endpoints.hosted.api_key_secret: line {KEY_LINE}: " in message
    assert "name of a Prefect Secret block" in message
    assert key not in message and key[:10] not in message


def test_names_of_variables_and_blocks_are_accepted(tmp_path: Path) -> None:
    load_config(write(tmp_path, GOOD.replace("EXAMPLE_API_KEY", "AZURE_OPENAI_API_KEY_2024")))
    text = GOOD.replace("api_key_env: EXAMPLE_API_KEY", "api_key_secret: openai-key")
    assert load_config(write(tmp_path, text)).endpoints["hosted"]["api_key_secret"] == "openai-key"


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("base_url: https://api.example.com/v1", "base_url: https://u:{key}@h/v1", "base_url"),
        ("base_url: https://api.example.com/v1", "base_url: https://h/v1?k={key}", "base_url"),
        ("rpm: 500", "rpm: 500\n    headers: {{X-Custom: {key}}}", "headers.X-Custom"),
        ("rpm: 500", "rpm: 500\n    cache_namespace: {key}", "cache_namespace"),
    ],
)
def test_a_key_shaped_value_is_refused_wherever_it_is_written(
    tmp_path: Path, old: str, new: str, field: str
) -> None:
    key = KEYS[0]
    message = refused(tmp_path, GOOD.replace(old, new.format(key=key)))
    assert f"endpoints.hosted.{field}: line " in message
    assert "looks like an API key or token (not shown)" in message and "api_key_env" in message
    assert key not in message and "AbCdEf" not in message


@pytest.mark.parametrize("name", CREDENTIALS)
@pytest.mark.parametrize("where", ["headers", "extra_body", "nested extra_body"])
def test_credential_fields_are_refused_in_headers_and_extra_body(
    tmp_path: Path, name: str, where: str
) -> None:
    value = "placeholder-value"
    entry = {
        "headers": f"headers: {{'{name}': {value}}}",
        "extra_body": f"extra_body: {{'{name}': {value}}}",
        "nested extra_body": f"extra_body: {{vendor: {{options: [{{'{name}': {value}}}]}}}}",
    }[where]
    message = refused(tmp_path, GOOD.replace("rpm: 500", f"rpm: 500\n    {entry}"))
    assert "endpoints.hosted." in message and "line 14:" in message
    assert "api_key_env" in message and value not in message


@pytest.mark.parametrize("name", NOT_CREDENTIALS)
def test_ordinary_header_and_body_fields_pass(tmp_path: Path, name: str) -> None:
    text = GOOD.replace(
        "rpm: 500", f"rpm: 500\n    headers: {{'{name}': v}}\n    extra_body: {{'{name}': 1}}"
    )
    config = load_config(write(tmp_path, text))
    assert config.endpoints["hosted"]["headers"] == {name: "v"}


def test_names_the_user_chooses_are_not_field_names(tmp_path: Path) -> None:
    """An endpoint called `auth-gateway`, a split called `session`: names, not credentials."""
    text = GOOD.replace("  hosted:", "  auth-gateway:").replace(
        "endpoint: hosted", "endpoint: auth-gateway"
    )
    text += "stages:\n  publish: {splits: {train: 0.9, session: 0.1}}\n"
    config = load_config(write(tmp_path, text))
    assert "auth-gateway" in config.endpoints


def test_errors_of_secret_name_fields_never_quote_the_input(tmp_path: Path) -> None:
    message = refused(tmp_path, GOOD.replace("api_key_env: EXAMPLE_API_KEY", "api_key_env: 4242"))
    assert "endpoints.hosted.api_key_env" in message and "4242" not in message
    # Other fields still say what they got.
    message = refused(tmp_path, GOOD.replace("concurrency: 8", "concurrency: lots"))
    assert "(got 'lots')" in message


def test_a_quoted_input_is_redacted() -> None:
    """A plug-in's validation message, or an input quoted by pydantic, loses its key shapes."""
    error: dict[str, Any] = {
        "type": "value_error",
        "loc": ("token_budget",),
        "msg": "Value error, the server refused sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234",
        "input": "Bearer abcdefghijklmnop",
    }
    described = _describe(error)
    assert "AbCdEf" not in described and "abcdefghijklmnop" not in described
    assert described.count("[REDACTED]") == 2


# --- the command line -------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlpref.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_refuses_a_key_in_api_key_env_and_never_prints_it(tmp_path: Path) -> None:
    key = KEYS[0]
    path = write(tmp_path, GOOD.replace("EXAMPLE_API_KEY", key))
    proc = cli("check", str(path))
    assert proc.returncode == 2, proc.stderr
    assert key not in proc.stdout + proc.stderr and "AbCdEf" not in proc.stdout + proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert f"endpoints.hosted.api_key_env: line {KEY_LINE}:" in line
    assert "Traceback" not in proc.stderr


def test_the_error_line_is_redacted(tmp_path: Path) -> None:
    """Whatever an error quotes (here a store location someone named after a key), the CLI's
    `error:` line shows no key shape."""
    key = KEYS[0]
    proc = cli("versions", "show", "latest", "--store", str(tmp_path / key))
    assert proc.returncode == 2, proc.stderr
    assert key not in proc.stderr and "AbCdEf" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "[REDACTED]" in proc.stderr
