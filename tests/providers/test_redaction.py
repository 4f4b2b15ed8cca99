"""An endpoint that repeats the key it received (tests/echo_server.py, real HTTP on loopback):
no failure the providers build quotes it, whichever the status, and whatever the provider (the
runner redacts a plug-in's failures too)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any, Self

import pytest
from pydantic import ValidationError

from tests.echo_server import MODELS, EchoServer
from vlpref.chat import ChatRequest, ChatResult, Failure, Message
from vlpref.providers import complete_all, create_provider
from vlpref.providers.base import Provider
from vlpref.providers.openai_compat import OpenAICompatOptions
from vlpref.providers.vllm_offline import _engine_failure
from vlpref.redact import REDACTED, forget_secrets
from vlpref.runner import run_all


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


def request(model: str) -> ChatRequest:
    return ChatRequest(id=model, model=model, messages=(Message.user("hello"),))


@pytest.mark.parametrize("shape", ["registered only", "sk-proj shape"])
async def test_an_echoed_key_reaches_no_failure(
    echo: EchoServer, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """401, 400, 500 (retried), a message cut at 300 characters, an HTML page: every failure
    names what happened, and the key is nowhere in it, not even its first 12 characters. A key
    of no known shape is caught by the registry alone (the provider registered it)."""
    token = secrets.token_hex(16)
    key = f"vlpref-echo-{token}" if shape == "registered only" else f"sk-proj-{token}"
    monkeypatch.setenv("VLPREF_ECHO_KEY", key)
    provider = create_provider(
        "openai",
        {
            "base_url": echo.base_url,
            "api_key_env": "VLPREF_ECHO_KEY",
            "max_attempts": 2,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.02,
        },
    )
    async with provider:
        results = await complete_all(provider, [request(m) for m in MODELS])
    assert key in echo.keys  # the endpoint did receive it, and did echo it
    kinds = {}
    for result in results:
        assert result.failure is not None, result.request.model
        message = result.failure.message
        assert key not in message and key[:12] not in message, message
        kinds[result.request.model] = (result.failure.kind, result.failure.status)
        assert REDACTED in message, message  # redacted before the cut (echo-cut)
    assert kinds == {
        "echo-401": ("auth", 401),
        "echo-400": ("bad_request", 400),
        "echo-500": ("server_error", 500),
        "echo-cut": ("bad_request", 400),
        "echo-html": ("malformed", 200),
    }


class _Parrot(Provider):
    """A plug-in whose failures quote a key: the runner redacts them on their way in."""

    kind = "parrot"

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        return cls()

    async def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        for r in requests:
            message = (
                "upstream said: Authorization: Bearer zzzzzzzzzzzz "
                "(key sk-ant-abcdefghijklmnopqrst)"
            )
            yield ChatResult(r, failure=Failure("auth", message, 401))


async def test_a_plug_ins_failures_are_redacted_by_the_runner() -> None:
    (result,) = await run_all(_Parrot(), [request("m")])
    assert result.failure is not None
    assert result.failure.message == (
        f"upstream said: Authorization: Bearer {REDACTED} (key {REDACTED})"
    )


def test_the_vllm_engine_failures_are_redacted() -> None:
    error = OSError("401 fetching https://hf.co/x with token hf_abcdefghijklmnopqrstuvwxyzABCDEF12")
    result = _engine_failure(request("m"), error, 0.0)
    assert result.failure is not None
    assert "hf_abc" not in result.failure.message and REDACTED in result.failure.message


@pytest.mark.parametrize(
    "options",
    [
        {"api_key_env": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234"},
        {"api_key_secret": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234"},
        {"headers": {"X-Auth-Token": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234"}},
        {"extra_body": {"vendor": {"access_token": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234"}}},
    ],
)
def test_options_built_in_code_refuse_secrets_without_quoting_them(
    options: dict[str, Any],
) -> None:
    """Options built without a config file (a deployment's code, the model service) are checked
    alike, and pydantic's error, which a Prefect task would store, does not quote the input."""
    with pytest.raises(ValidationError) as info:
        OpenAICompatOptions.model_validate(options)
    assert "AbCdEf" not in str(info.value) and "AbCdEf" not in repr(info.value)


def test_sampling_fields_in_extra_body_pass() -> None:
    options = OpenAICompatOptions.model_validate(
        {"extra_body": {"max_completion_tokens": 5, "stop_token_ids": [2], "top_logprobs": 3}}
    )
    assert options.extra_body["stop_token_ids"] == [2]
