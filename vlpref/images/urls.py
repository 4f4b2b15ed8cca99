"""URLs as the images stage publishes them: without the credentials they may carry.

`safe_url` removes the userinfo (`user:pass@`), the fragment, and every query parameter whose
name is credential-like; the other parameters keep their text and order. The full URL is used
for the download and kept nowhere: source_meta, failure reasons and logs get `safe_url`.

A parameter name (compared case-insensitively, after percent-decoding) is credential-like when:

- it is one of `CREDENTIAL_PARAMS`: `token`, `access_token`, `api_key`, `key`, `sig`,
  `signature`, `password`, `code`, the AWS and Google legacy signing names (`AWSAccessKeyId`,
  `GoogleAccessId`, `Signature`, `Expires`), Azure SAS fields (`sv`, `ss`, `srt`, `sp`, `se`,
  `st`, `spr`, `sig`, `sr`, `si`, `skoid`, …), …;
- it starts with one of `CREDENTIAL_PREFIXES`: `x-amz-` (S3 presigned URLs), `x-goog-` (GCS
  signed URLs), `x-ms-`, `x-oss-`;
- it contains one of `CREDENTIAL_WORDS`: `token`, `secret`, `passw`, `signature`, `apikey`,
  `api_key`, `api-key`, `credential`, `session`.

Path segments are kept as they are: a credential written into the path itself (not a
parameter) is not recognised.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

__all__ = [
    "CREDENTIAL_PARAMS",
    "CREDENTIAL_PREFIXES",
    "CREDENTIAL_WORDS",
    "is_credential_param",
    "safe_url",
]

CREDENTIAL_PARAMS = frozenset(
    {
        # generic
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "key",
        "apikey",
        "api_key",
        "sig",
        "signature",
        "secret",
        "password",
        "passwd",
        "pwd",
        "pass",
        "code",
        "jwt",
        "auth",
        "authorization",
        "client_secret",
        "sessionid",
        "sid",
        # AWS (legacy query auth) and Google Cloud Storage (legacy signed URLs)
        "awsaccesskeyid",
        "googleaccessid",
        "expires",
        "policy",
        # Azure shared access signatures (the secret is `sig`; the rest describe it)
        "sv",
        "ss",
        "srt",
        "sp",
        "se",
        "st",
        "spr",
        "sr",
        "si",
        "sdd",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
        "saoid",
        "suoid",
        "scid",
    }
)
CREDENTIAL_PREFIXES = ("x-amz-", "x-goog-", "x-ms-", "x-oss-")
CREDENTIAL_WORDS = (
    "token",
    "secret",
    "passw",
    "signature",
    "apikey",
    "api_key",
    "api-key",
    "credential",
    "session",
)
_USERINFO = re.compile(r"(?<=//)[^/?#]*@")


def is_credential_param(name: str) -> bool:
    """Whether a query parameter of this name may carry a credential (see the module doc)."""
    lowered = unquote_plus(name).strip().lower()
    return (
        lowered in CREDENTIAL_PARAMS
        or lowered.startswith(CREDENTIAL_PREFIXES)
        or any(word in lowered for word in CREDENTIAL_WORDS)
    )


def safe_url(url: str) -> str:
    """`url` without userinfo, fragment and credential-like query parameters."""
    try:
        parts = urlsplit(url.strip())
        netloc = parts.netloc.rpartition("@")[2]
        kept = [
            piece
            for piece in parts.query.split("&")
            if piece and not is_credential_param(piece.split("=", 1)[0])
        ]
        return urlunsplit((parts.scheme, netloc, parts.path, "&".join(kept), ""))
    except ValueError:  # not even splittable (a bad IPv6 literal): keep what surely is safe
        head = _USERINFO.sub("", url.strip(), count=1)
        return re.split(r"[?#]", head, maxsplit=1)[0]
