"""A client of clip-retrieval's KNN service (`clip-retrieval back`), the way LAION indices are
served.

Protocol (clip-retrieval's `clip_back.py` / `clip_client.py`): POST a JSON object to the
service's `/knn-service` URL:

    {"text": "a query", "image": null, "image_url": null, "embedding_input": null,
     "modality": "image", "indice_name": "laion5B-L-14", "num_images": 8,
     "num_result_ids": 8, "deduplicate": true, "use_safety_model": true,
     "use_violence_detector": false, "use_mclip": false,
     "aesthetic_score": "", "aesthetic_weight": ""}

`modality` picks the index searched (`image`: the pictures' embeddings). The service answers a
JSON list, best first, of objects with `url`, `caption`, `similarity` and `id` (and whatever
other metadata columns it was configured to return); an error is an object with `error` (not a
list). `aesthetic_score` / `aesthetic_weight` are sent as "" when unset, as the service parses
them (`int(x) if x != "" else None`).

Here: `knn_body` and `parse_hits` are pure; `query_knn` does the POST, with retries on
connection errors, 429 and 5xx, a total deadline per attempt, and a cap on the answer's size. The
service is trusted like a model endpoint (it is configured, not found in data); the URLs it
answers are not: the retrieval source downloads them with the URL source's guards.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from vlpref.config import KnnService
from vlpref.images.sources import USER_AGENT
from vlpref.images.urls import safe_url

__all__ = ["KnnError", "KnnHit", "knn_body", "make_knn_client", "parse_hits", "query_knn"]

# A LAION answer of 1,000 hits with captions is ~300 KB: 16 MB is room for any honest answer and
# bounds what a broken service can make us hold.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class KnnError(Exception):
    """A query the service did not answer usably. `kind` is a failure kind of vlpref/retry.py:
    `network`, `timeout`, `rate_limit`, `server_error` and `malformed` (a body that is not an
    answer) are transient there, asked again by a rerun; `http` (a refusal: an unknown index, an
    error answer, a 4xx) is permanent."""

    def __init__(self, kind: str, reason: str, attempts: int = 1) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.attempts = kind, reason, attempts


class _Retryable(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class KnnHit:
    """One result: `url` as the service gave it (for the download only; publish `safe_url`)."""

    url: str
    similarity: float
    caption: str | None
    id: int | str | None


def knn_body(service: KnnService, text: str, num_images: int) -> dict[str, Any]:
    """The `/knn-service` request for a text query."""
    return {
        "text": text,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "modality": service.modality,
        "indice_name": service.indice_name,
        "num_images": num_images,
        "num_result_ids": num_images,
        "deduplicate": service.deduplicate,
        "use_safety_model": service.use_safety_model,
        "use_violence_detector": service.use_violence_detector,
        "use_mclip": False,
        "aesthetic_score": "" if service.aesthetic_score is None else service.aesthetic_score,
        "aesthetic_weight": "" if service.aesthetic_weight is None else service.aesthetic_weight,
    }


def parse_hits(data: Any) -> list[KnnHit]:
    """The hits of an answer, in the service's order. Entries without an http(s) `url` or a
    finite `similarity` are left out (a text-modality index answers captions without URLs);
    anything that is not a list of objects is `KnnError('malformed')`."""
    if isinstance(data, dict) and "error" in data:
        raise KnnError("http", f"the service answered an error: {str(data['error'])[:200]!r}")
    if not isinstance(data, list):
        raise KnnError("malformed", f"expected a JSON list of results, got {type(data).__name__}")
    hits: list[KnnHit] = []
    for entry in data:
        if not isinstance(entry, dict):
            raise KnnError("malformed", "a result is not a JSON object")
        url, score = entry.get("url"), entry.get("similarity")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            continue
        if isinstance(score, bool) or not isinstance(score, int | float):
            continue
        if not math.isfinite(score):
            continue
        caption = entry.get("caption")
        ident = entry.get("id")
        hits.append(
            KnnHit(
                url=url,
                similarity=float(score),
                caption=caption if isinstance(caption, str) else None,
                id=ident if isinstance(ident, int | str) and not isinstance(ident, bool) else None,
            )
        )
    return hits


def make_knn_client(service: KnnService) -> httpx.AsyncClient:
    """A client for the service: its own timeout; proxies from the environment, as for model
    endpoints (the service is configured, so no address guard applies to it)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(service.timeout_s),
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        follow_redirects=False,
    )


async def query_knn(
    client: httpx.AsyncClient,
    service: KnnService,
    text: str,
    num_images: int,
    *,
    backoff_s: float = 0.5,
) -> list[KnnHit]:
    """The hits for one text query; `KnnError` once retrying gave up or cannot help."""
    body = json.dumps(knn_body(service, text, num_images)).encode()
    shown = safe_url(service.url)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(service.attempts),
        wait=wait_exponential(multiplier=backoff_s, max=30),
        retry=retry_if_exception_type(_Retryable),
        reraise=True,
    )
    tries = 0
    try:
        async for attempt in retrying:
            with attempt:
                tries = attempt.retry_state.attempt_number
                return await _post_once(client, service, body, shown)
    except _Retryable as exc:
        raise KnnError(exc.kind, f"{exc.reason} (after {tries} attempt(s))", tries) from None
    except KnnError as exc:
        exc.attempts = tries
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")


async def _post_once(
    client: httpx.AsyncClient, service: KnnService, body: bytes, shown: str
) -> list[KnnHit]:
    headers = {"Content-Type": "application/json"}
    try:
        # The whole answer within the timeout: a service that drips bytes cannot hold the stage.
        async with (
            asyncio.timeout(service.timeout_s),
            client.stream("POST", service.url, content=body, headers=headers) as response,
        ):
            status = response.status_code
            if status in _RETRY_STATUSES:
                kind = "rate_limit" if status == 429 else "server_error"
                raise _Retryable(kind, f"KNN service {shown}: HTTP {status}")
            if status >= 300:  # a redirect is not followed: the configured URL is the service
                raise KnnError("http", f"KNN service {shown}: HTTP {status}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise KnnError(
                        "malformed", f"KNN service {shown}: answer over {MAX_ANSWER_BYTES} bytes"
                    )
                chunks.append(chunk)
    except (TimeoutError, httpx.TimeoutException):
        raise _Retryable(
            "timeout", f"KNN service {shown}: no answer within {service.timeout_s} s"
        ) from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        # Our words, never the error's text (it may quote the server).
        raise _Retryable("network", f"KNN service {shown}: {type(exc).__name__}") from None
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        raise KnnError("malformed", f"KNN service {shown}: the answer is not JSON") from None
    return parse_hits(data)
