"""Request keys: what makes two requests "the same" for the journal.

A sample's key is the sha256 of (provider identity, model id, sampling params except `n`, the
messages with every image replaced by its content hash, prompt version, the output constraint when
there is one, sample index). Anything
that can change the answer is in it; nothing that cannot (the caller's request id, the endpoint's
URL or port, the API key) is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from collections.abc import Callable
from typing import Any

from vlpref.chat import ChatRequest, ImagePart, Message


def _canonical_message(message: Message) -> dict[str, Any]:
    parts: list[dict[str, str]] = []
    for part in message.content:
        if isinstance(part, ImagePart):
            parts.append({"type": "image", "sha256": part.sha256})
        else:
            parts.append({"type": "text", "text": part.text})
    return {"role": message.role, "content": parts}


def canonical_json(value: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_fingerprint(provider_id: str, request: ChatRequest) -> str:
    """Hash of everything about a request that changes its answers, except the sample index."""
    payload = {
        "provider": provider_id,
        "model": request.model,
        "params": request.params.keyed(),
        "messages": [_canonical_message(m) for m in request.messages],
        "prompt_version": request.prompt_version,
    }
    if request.constraint is not None:  # absent when unset: keys from before it stay valid
        payload["constraint"] = request.constraint.keyed()
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def sample_key(fingerprint: str, sample_index: int) -> str:
    """The journal key of one sample of a request."""
    return hashlib.sha256(f"{fingerprint}:{sample_index}".encode()).hexdigest()[:40]


def sample_keys(provider_id: str, request: ChatRequest) -> list[str]:
    """The keys of samples 0..n-1 of a request."""
    fp = request_fingerprint(provider_id, request)
    return [sample_key(fp, i) for i in range(request.params.n)]


def unique_ids(prefix: str = "") -> Callable[[], str]:
    """A maker of ids unique across processes and runs (call ids, idempotency keys): a random tag
    drawn once, then a counter. Not a request key: nothing about a request goes in. Cheaper than a
    uuid4 per id, which is an urandom syscall each; safe to call from several threads."""
    tag = f"{prefix}{secrets.token_hex(8)}-"
    numbers = itertools.count()
    return lambda: f"{tag}{next(numbers):x}"
