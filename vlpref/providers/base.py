"""The model seam: one async method, a batch of chat requests in, one result per request out.

Like httpx's transport interface, it is deliberately tiny so that an OpenAI-compatible endpoint,
vLLM's offline engine and a team's plug-in are interchangeable:

    class MyProvider(Provider):
        kind = "my-kind"

        @classmethod
        def from_config(cls, options): ...

        async def complete(self, requests):
            for request in requests:
                yield ChatResult(request, samples=(...,))

Contract of `complete`:
- it yields exactly one `ChatResult` per request, in any order (as they finish), whose `request`
  is the very object it was given;
- a request that fails is yielded with a `Failure`; nothing is raised out of the batch for a
  request-level problem, and nothing is dropped;
- retries, rate limits and concurrency are the provider's business, not the caller's.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self

from vlpref.chat import ChatRequest, ChatResult


class Provider(abc.ABC):
    """Base class of every model provider."""

    kind: ClassVar[str]
    """The `kind` under which configs name this provider (and its entry-point name)."""

    @property
    def identity(self) -> str:
        """What enters request keys for this provider: by default its kind. Two endpoints that
        serve the same model id under the same kind share journal entries unless a config sets a
        `cache_namespace`."""
        return self.kind

    @classmethod  # noqa: B027 - an optional hook, a no-op by default
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        """Check an endpoint entry when the config is loaded, long before a request is sent.
        Raise pydantic's ValidationError (its locations become config field paths) or
        ProviderError. The default accepts anything."""

    @classmethod
    def preflight(cls, options: Mapping[str, Any], model_ids: Sequence[str]) -> list[str]:
        """Before a run's first stage (`vlpref.preflight`): what would make every request to
        this endpoint fail (credentials, reachability, models it does not serve), one message
        per problem; an empty list when all looks well. It must be quick and must not send a
        paid request. `model_ids` are the ids the config asks this endpoint for. The default
        finds nothing; the built-in kinds are checked by `vlpref.preflight` itself."""
        return []

    @classmethod
    @abc.abstractmethod
    def from_config(cls, options: Mapping[str, Any]) -> Self:
        """Build the provider from its endpoint entry of a run config (already validated)."""

    @abc.abstractmethod
    def complete(self, requests: Iterable[ChatRequest]) -> AsyncIterator[ChatResult]:
        """Answer every request; yield one result per request as each finishes."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections, engines, GPU memory."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def complete_all(provider: Provider, requests: Iterable[ChatRequest]) -> list[ChatResult]:
    """Run a batch and return the results in request order (convenience for small batches)."""
    batch = list(requests)
    position = {id(r): i for i, r in enumerate(batch)}
    out: list[ChatResult | None] = [None] * len(batch)
    async for result in provider.complete(batch):
        out[position[id(result.request)]] = result
    missing = [batch[i].id for i, r in enumerate(out) if r is None]
    if missing:
        raise RuntimeError(
            f"provider {provider.kind!r} broke the contract: no result for {missing[:5]}"
        )
    return [r for r in out if r is not None]
