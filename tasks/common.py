"""What the model-calling stages share: providers for config entries, images as message parts,
and seeds that re-ask an unparseable generation as a *new* request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlpref.chat import ImagePart, SamplingParams
from vlpref.config import ModelEntry, RunConfig
from vlpref.providers.base import Provider
from vlpref.service import ModelService


def provider_for(
    config: RunConfig, entry: ModelEntry, service: ModelService | None = None
) -> Provider:
    """The provider that asks `entry`'s endpoint; under the run's `budget:` (vlpref/budget.py)
    when it has limits."""
    from vlpref.budget import guard_for

    service = service or ModelService.shared()
    provider = service.provider(
        config.endpoints[entry.endpoint], early_stop_after=config.early_stop_after
    )
    guard = guard_for(config) if service.applies_budget else None
    if guard is None:
        return provider
    wrapped = guard.wrap(provider, entry.name)
    service.alias(wrapped, provider)
    return wrapped


def image_part(row: Mapping[str, Any]) -> ImagePart:
    """An images-table row as a message part (its id is already the bytes' sha256)."""
    mime = "image/jpeg" if row["format"] == "jpeg" else "image/png"
    return ImagePart(data=row["bytes"], mime=mime, sha256=row["image_id"])


def retry_params(params: SamplingParams, attempt: int) -> SamplingParams:
    """Sampling params for re-asking after an unparseable answer. Attempt 0 is the configured
    request; later attempts change the seed, so the journal sees a different request and a
    deterministic endpoint gives a different answer."""
    if attempt == 0:
        return params
    base = params.seed if params.seed is not None else 0
    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=base + 1_000_003 * attempt,
        n=params.n,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        stop=params.stop,
    )
