"""vlpref.redact: the credential rule (both directions), key shapes, the registry of the run's
keys, the names of secrets, and log records."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from vlpref.redact import (
    REDACTED,
    contains_secret,
    forget_secrets,
    install_log_redaction,
    is_block_name,
    is_credential_name,
    is_env_var_name,
    redact,
    register_secret,
)


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


CREDENTIALS = [
    "Authorization",
    "Proxy-Authorization",
    "X-Auth-Token",
    "x-goog-api-key",
    "X-API-Key",
    "api-key",
    "apikey",
    "apiKey",
    "api_key",
    "access_token",
    "accessToken",
    "refresh_token",
    "id_token",
    "token",
    "HF_TOKEN",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
    "Ocp-Apim-Subscription-Key",
    "x-functions-key",
    "x-csrf-token",
    "Cookie",
    "Set-Cookie",
    "session_id",
    "X-Session",
    "password",
    "passwd",
    "db_pwd",
    "client_secret",
    "secret",
    "private_key",
    "aws_access_key_id",
    "credentials",
    "basic_auth",
    "auth",
    "jwt",
    "bearer",
]
NOT_CREDENTIALS = [
    # OpenAI and vLLM sampling / request fields
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "top_logprobs",
    "logprobs",
    "logit_bias",
    "stop_token_ids",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "add_special_tokens",
    "return_tokens_as_token_ids",
    "truncate_prompt_tokens",
    "prompt_cache_key",
    "cache_salt",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "structured_outputs",
    "response_format",
    "repetition_penalty",
    "top_k",
    "min_p",
    "seed",
    "user",
    "safety_identifier",
    "service_tier",
    "reasoning_effort",
    "metadata",
    "priority",
    # headers
    "Idempotency-Key",
    "OpenAI-Organization",
    "OpenAI-Project",
    "X-Request-ID",
    "User-Agent",
    "HTTP-Referer",
    "X-Title",
    "Accept",
    "Content-Type",
    "api-version",
    # vlpref's own fields
    "api_key_env",
    "api_key_secret",
    "max_tokens_field",
    "cache_namespace",
    "max_retry_after_s",
    # words that only look alike
    "author",
    "authority",
    "monkey",
    "keywords",
    "tokenizer",
]


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credential_names_are_recognised(name: str) -> None:
    assert is_credential_name(name)


@pytest.mark.parametrize("name", NOT_CREDENTIALS)
def test_ordinary_fields_are_not_credentials(name: str) -> None:
    assert not is_credential_name(name)


SHAPES = [
    "sk-abcdefghijklmnop1234567890",
    "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234",
    "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AIzaSyA1234567890abcdefghijklmnopqrstu",
    "AKIAIOSFODNN7EXAMPLE",
    "hf_abcdefghijklmnopqrstuvwxyzABCDEF12",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "github_pat_11ABCDEFG0abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH",
    "xoxb-1234567890-abcdefghij",
    "gsk_abcdefghijklmnopqrstuvwxyz012345",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
]


@pytest.mark.parametrize("key", SHAPES)
def test_key_shapes_are_redacted_wherever_they_are(key: str) -> None:
    text = f"HTTP 401: Incorrect API key provided: {key}. See https://x/docs"
    out = redact(text)
    assert key not in out and REDACTED in out
    assert out.startswith("HTTP 401: Incorrect API key provided: ") and out.endswith("x/docs")
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi_jkl", f"Authorization: Bearer {REDACTED}"),
        ("proxy said: Bearer zzzzzzzzzz", f"proxy said: Bearer {REDACTED}"),
        ("Proxy-Authorization: Basic dXNlcjpwYXNz", f"Proxy-Authorization: Basic {REDACTED}"),
        ("x-api-key: 0123456789abcdef", f"x-api-key: {REDACTED}"),
        ('{"api_key": "k3y-v4lue-here", "n": 1}', f'{{"api_key": "{REDACTED}", "n": 1}}'),
        ("{'X-Auth-Token': 'k3y-v4lue-here'}", f"{{'X-Auth-Token': '{REDACTED}'}}"),
        ('"{\\"access_token\\": \\"k3yv4lue99\\"}"', f'"{{\\"access_token\\": \\"{REDACTED}\\"}}"'),
        ("GET /v1?x=1&access_token=k3yv4lue99&y=2", f"GET /v1?x=1&access_token={REDACTED}&y=2"),
        ("url: https://h/v1?api_key=k3yv4lue99", f"url: https://h/v1?api_key={REDACTED}"),
        ("https://bob:hunter2@proxy:8080/v1", f"https://bob:{REDACTED}@proxy:8080/v1"),
    ],
)
def test_credential_fields_lose_their_values(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens: 512, top_logprobs=5, stop_token_ids: [1, 2]",
        "Invalid token: expected a string",
        "token: null",
        "Bearer EMPTY",
        "image 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 failed",
        "https://api.openai.com/v1/chat/completions",
        "the model refused; finish_reason: content_filter",
        "skate-park sk-8 task-sk",
        "",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text
    assert not contains_secret(text)


def test_registered_keys_are_redacted_whatever_their_shape() -> None:
    key = "plain-looking-key-0042"  # no known shape: only the registry knows it
    assert redact(f"got {key}") == f"got {key}"
    register_secret(key)
    register_secret("short")  # too short to register: it would redact ordinary words
    register_secret(None)
    assert redact(f"got {key}, then short") == f"got {REDACTED}, then short"
    forget_secrets()
    assert redact(f"got {key}") == f"got {key}"


def test_a_longer_registered_key_wins_over_its_prefix() -> None:
    register_secret("abcdefgh")
    register_secret("abcdefgh-and-more")
    assert redact("abcdefgh-and-more!") == f"{REDACTED}!"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("OPENAI_API_KEY", True),
        ("VLPREF_E2E_KEY", True),
        ("_private", True),
        ("AZURE_OPENAI_API_KEY_2024", True),
        ("MY_VERY_LONG_COMPANY_OPENAI_PRODUCTION_KEY", True),
        ("ThisIsAVeryLongVariableNameForTheKey", True),
        ("sk-proj-AbCdEfGhIjKlMnOpQrSt", False),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", False),
        ("hf_abcdefghijklmnopqrstuvwxyzABCDEF12", False),
        ("gsk_abcdefghijklmnopqrstuvwxyz012345", False),
        ("AKIAIOSFODNN7EXAMPLE", False),
        ("a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6", False),  # 32 hex digits: a key, not a name
        ("xKfLqPzRtWvYbNmHjGdSaQeUiOpA", False),  # random letters
        ("1PASSWORD", False),
        ("MY-KEY", False),
        ("", False),
    ],
)
def test_env_var_names(value: str, ok: bool) -> None:
    assert is_env_var_name(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("openai-key", True),
        ("secret/openai-key-2024", True),
        ("prod-gateway", True),
        ("OpenAI", False),
        ("sk-proj-abcdefghijklmnopqrst", False),
        ("a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6", False),
        ("has space", False),
    ],
)
def test_block_names(value: str, ok: bool) -> None:
    assert is_block_name(value) is ok


def test_log_records_are_redacted_message_arguments_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_log_redaction()
    key = "registered-0042-key"
    register_secret(key)
    log = logging.getLogger("vlpref.test_redact")
    with caplog.at_level(logging.INFO, logger="vlpref.test_redact"):
        log.info("endpoint said %s", f"bad key {key}")
        log.warning("header Authorization: Bearer %s", "zzzzzzzzzzzz")
        try:
            raise RuntimeError(f"echo {key} sk-proj-AbCdEfGhIjKlMnOpQrSt")
        except RuntimeError:
            log.exception("failed")
    text = caplog.text
    assert key not in text and "zzzzzzzzzzzz" not in text and "sk-proj-AbCd" not in text
    assert text.count(REDACTED) >= 4
    assert "RuntimeError: echo [REDACTED] [REDACTED]" in text  # the traceback, redacted
