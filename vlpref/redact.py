"""Keys never leave memory: the run's resolved keys and anything shaped like a key are redacted
from every message vlpref keeps, prints, logs or publishes.

Pure and dependency-free (the standard library only), so that any layer may use it:

- `register_secret(value)`: a process-wide registry of the secret values of this run. The
  OpenAI-compatible provider and preflight register each key the moment they resolve it (from
  `api_key_env` or an `api_key_secret` block); nothing logs it. Values shorter than
  `MIN_SECRET_CHARS` are not registered (they would redact ordinary words; a real key is longer,
  and a local server's placeholder such as `EMPTY` is no secret).
- `redact(text)`: `text` with every registered value, the token of `Bearer <token>`, the value of
  a credential field (`Authorization: …`, `x-api-key: …`, `"api_key": "…"`, `?access_token=…`,
  by `is_credential_name`), the password of a URL (`https://user:pw@host`) and common key shapes
  (`KEY_SHAPES`: OpenAI `sk-…`/`sk-proj-…`, Anthropic `sk-ant-…`, Google `AIza…`, AWS `AKIA…`,
  Hugging Face `hf_…`, GitHub `ghp_…`/`github_pat_…`, Slack `xox…-`, Stripe `sk_live_…`, Groq
  `gsk_…`, JWTs `eyJ….eyJ….…`) replaced by `[REDACTED]`. Idempotent: a redacted text redacts to
  itself.
- `is_credential_name(name)`: the rule that says which header, body and config field names carry
  credentials (below); `is_env_var_name`, `is_block_name`, `looks_like_key` check the fields that
  hold the *name* of a secret.
- `install_log_redaction()`: every log record of the process (vlpref's, Prefect's, any library's)
  is redacted as it is created, message and traceback, before any handler (console, Prefect's
  API log handler, a file) sees it.

Where it is applied (docs/security.md): the provider failure messages as they are built
(`OpenAICompatProvider._failed`, the vLLM engine's failures) and once more for every provider,
plug-ins included, where results enter vlpref (`vlpref.runner.run_requests`); the failures
table as it is published; the CLI's `error:` and `warning:` lines; log records.

The credential rule. A header, an `extra_body` field (at any depth) or any other field name of a
config is a credential when its name, lower-cased and split into words at `-`, `_`, `.`, spaces
and camelCase humps,

1. has a word in `CREDENTIAL_WORDS` (`auth`, `bearer`, `jwt`, `session`, `pwd`, ...), or
2. contains, once its separators are removed, one of `CREDENTIAL_PARTS` (`authoriz`, `authentic`,
   `password`, `passwd`, `secret`, `credential`, `cookie`, `signature`, `apikey`, `accesskey`,
   `privatekey`, ...), or
3. ends with the word `token` or `key`, singular: `access_token`, `X-Auth-Token`,
   `x-goog-api-key`, `Ocp-Apim-Subscription-Key` are credentials; `max_tokens`,
   `max_completion_tokens`, `stop_token_ids`, `top_logprobs` are sampling fields and pass;

except the names in `NOT_CREDENTIALS` (`prompt_cache_key`, `Idempotency-Key`: named like keys,
holding none). The tests hold a table of both directions (tests/test_redact.py).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from typing import Any, Final

__all__ = [
    "CREDENTIAL_PARTS",
    "CREDENTIAL_WORDS",
    "KEY_SHAPES",
    "MIN_SECRET_CHARS",
    "NAME_OF_SECRET_FIELDS",
    "NOT_CREDENTIALS",
    "REDACTED",
    "contains_secret",
    "forget_secrets",
    "install_log_redaction",
    "is_block_name",
    "is_credential_name",
    "is_env_var_name",
    "looks_like_key",
    "redact",
    "register_secret",
]

REDACTED: Final = "[REDACTED]"
MIN_SECRET_CHARS: Final = 8

# --- the credential rule ------------------------------------------------------------------------

CREDENTIAL_WORDS: Final = frozenset(
    {"auth", "bearer", "jwt", "session", "sessionid", "pwd", "oauth", "oauth2", "csrf", "xsrf"}
)
CREDENTIAL_PARTS: Final = (
    "authoriz",  # authorization, proxy-authorization, authorize
    "authentic",  # authentication, www-authenticate
    "password",
    "passwd",
    "passphrase",
    "secret",
    "credential",
    "cookie",
    "signature",
    "apikey",
    "accesskey",
    "privatekey",
    "accesstoken",
    "authtoken",
    "refreshtoken",
    "sessiontoken",
)
_LAST_WORDS: Final = frozenset({"token", "key"})
NOT_CREDENTIALS: Final = frozenset({"promptcachekey", "idempotencykey"})
# Fields that hold the *name* of a secret (an environment variable, a Prefect block), checked by
# `is_env_var_name` / `is_block_name` instead.
NAME_OF_SECRET_FIELDS: Final = frozenset({"api_key_env", "api_key_secret"})

_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")


def _words(name: str) -> list[str]:
    return [w for w in _SEPARATORS.split(_HUMP.sub(" ", name).lower()) if w]


def is_credential_name(name: str) -> bool:
    """Whether a header, body or config field called `name` carries a credential (module
    docstring: the rule)."""
    if name in NAME_OF_SECRET_FIELDS:
        return False
    words = _words(name)
    joined = "".join(words)
    if not words or joined in NOT_CREDENTIALS:
        return False
    if any(w in CREDENTIAL_WORDS for w in words):
        return True
    if any(part in joined for part in CREDENTIAL_PARTS):
        return True
    return words[-1] in _LAST_WORDS


# --- key shapes ---------------------------------------------------------------------------------

KEY_SHAPES: Final = (
    r"sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{16,}",  # OpenAI, Anthropic
    r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"AIza[0-9A-Za-z_-]{30,}",  # Google API keys
    r"ya29\.[0-9A-Za-z_-]{20,}",  # Google OAuth access tokens
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key ids
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{40,}",  # GitHub fine-grained tokens
    r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab
    r"xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"gsk_[A-Za-z0-9]{20,}",  # Groq
    r"r8_[A-Za-z0-9]{20,}",  # Replicate
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",  # JWTs
)
_SHAPES = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(KEY_SHAPES) + r")")
# `Bearer <token>` anywhere (an echoed header, a curl line); RFC 6750's token68 characters.
_BEARER = re.compile(r"\b(Bearer|bearer|BEARER)(\s+)[A-Za-z0-9._~+/-]{8,}=*")
# `name: value`, `name=value`, `"name": "value"`, `'name': 'value'` (also JSON inside a string,
# with escaped quotes): the value of a credential field (`is_credential_name`), with an optional
# auth scheme before it. The name and separator are matched first and the value only after a
# credential name, so the value of another field (a URL after `url:`) hides no field inside it.
_FIELD = re.compile(
    r"(?P<name>[A-Za-z][A-Za-z0-9_.-]{0,63})(?P<sep>(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?)"
)
_VALUE = re.compile(
    r"(?P<scheme>(?:Bearer|Basic|Token|Digest|ApiKey|Key)\s+)?(?P<value>[^\s\"'\\,;&{}\[\]()<>]+)"
)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]+:)[^\s/@]+(?=@)")
_WORD = re.compile(r"[a-z]+")  # a lowercase word after `token:` is prose, not a token


def _redact_fields(text: str) -> str:
    out: list[str] = []
    done = 0  # text[:done] is in `out`
    for match in _FIELD.finditer(text):
        if match.start() < done or not is_credential_name(match["name"]):
            continue
        value = _VALUE.match(text, match.end())
        if value is None:
            continue
        secret = value["value"]
        if not value["scheme"] and (len(secret) < MIN_SECRET_CHARS or _WORD.fullmatch(secret)):
            continue
        out += [text[done : match.end()], value["scheme"] or "", REDACTED]
        done = value.end()
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


# --- the registry -------------------------------------------------------------------------------

_lock = threading.Lock()
_secrets: set[str] = set()
_registered: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Redact `value` from now on, in this process (see `MIN_SECRET_CHARS`)."""
    global _registered
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        ordered = sorted(_secrets, key=len, reverse=True)  # the longest first: no partial match
        _registered = re.compile("|".join(re.escape(s) for s in ordered))
    install_log_redaction()


def forget_secrets() -> None:
    """Empty the registry (tests)."""
    global _registered
    with _lock:
        _secrets.clear()
        _registered = None


def redact(text: str) -> str:
    """`text` with every secret in it replaced by `[REDACTED]` (module docstring)."""
    if not text:
        return text
    registered = _registered
    if registered is not None:
        text = registered.sub(REDACTED, text)
    text = _BEARER.sub(rf"\1\2{REDACTED}", text)
    text = _redact_fields(text)
    text = _URL_PASSWORD.sub(rf"\g<head>{REDACTED}", text)
    return _SHAPES.sub(REDACTED, text)


def contains_secret(text: str) -> bool:
    """Whether `redact` would change `text`."""
    return redact(text) != text


# --- fields that name a secret ------------------------------------------------------------------

_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLOCK_NAME = re.compile(r"(?:secret/)?[a-z0-9][a-z0-9-]*")


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _random_looking(part: str) -> bool:
    """A run of 20+ characters a person would not type as a name: digits among letters, or 24+
    letters of high entropy, about half of them upper case."""
    if len(part) < 20:
        return False
    digits = sum(c.isdigit() for c in part)
    letters = sum(c.isalpha() for c in part)
    if digits >= 2 and letters >= 2:
        return True
    # Random letters are about half upper case; a CamelCase name (`ThisIsALongName`) far less.
    upper = sum(c.isupper() for c in part) / max(letters, 1)
    return len(part) >= 24 and 0.3 <= upper <= 0.7 and _entropy(part) >= 4.0


def looks_like_key(value: str) -> bool:
    """Whether `value` looks like a key rather than a name: a known key shape, or a long
    random-looking run between `_`, `-`, `.` or `/`."""
    if contains_secret(value):
        return True
    return any(_random_looking(part) for part in re.split(r"[_\-./]", value))


def is_env_var_name(value: str) -> bool:
    """An environment variable's name (`OPENAI_API_KEY`), and not a key pasted in its place."""
    return len(value) <= 256 and bool(_ENV_VAR.fullmatch(value)) and not looks_like_key(value)


def is_block_name(value: str) -> bool:
    """A Prefect block document's name (lowercase letters, digits and dashes; optionally
    `secret/<name>`), and not a key pasted in its place."""
    return len(value) <= 200 and bool(_BLOCK_NAME.fullmatch(value)) and not looks_like_key(value)


# --- logging ------------------------------------------------------------------------------------

_installed = False
_format_exception = logging.Formatter().formatException


def _redacted_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a record whose arguments do not format: the handler reports it
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        # Handlers format the traceback from `exc_text` when it is set (logging.Formatter).
        record.exc_text = redact(_format_exception(record.exc_info))


def install_log_redaction() -> None:
    """Redact every log record of this process as it is created (idempotent). A record factory
    rather than a filter: filters on a logger do not see its children's records, and handlers
    are replaced whenever Prefect configures logging."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _redacted_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
