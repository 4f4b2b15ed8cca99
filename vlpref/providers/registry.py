"""Where provider kinds come from: the built-ins and the `vlpref.providers` entry-point group.

A team adds a provider kind without editing vlpref by publishing, in its own package,

    [project.entry-points."vlpref.providers"]
    my-kind = "my_package.module:MyProvider"

where `MyProvider` subclasses `vlpref.providers.Provider`. A config then says `kind: my-kind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from vlpref.errors import ProviderError, ProviderNotFound
from vlpref.providers.base import Provider

ENTRY_POINT_GROUP = "vlpref.providers"


def _builtin_kinds() -> dict[str, str]:
    # Imported lazily so that `import vlpref` stays cheap and optional engines (vLLM) are only
    # imported when a config asks for them.
    return {
        "openai": "vlpref.providers.openai_compat:OpenAICompatProvider",
        "vllm": "vlpref.providers.vllm_offline:VllmProvider",
    }


def available_kinds() -> list[str]:
    kinds = set(_builtin_kinds())
    kinds.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(kinds)


def provider_class(kind: str) -> type[Provider]:
    """The class registered for `kind`: a built-in first, then an entry point."""
    target = _builtin_kinds().get(kind)
    if target is None:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
        if not matches:
            raise ProviderNotFound(
                f"no provider of kind {kind!r}; known kinds: {', '.join(available_kinds())}. "
                f"Plug-ins register under the entry-point group {ENTRY_POINT_GROUP!r}."
            )
        target = matches[0].value
    module_name, _, attr = target.partition(":")
    try:
        module = __import__(module_name, fromlist=[attr])
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ProviderError(f"provider kind {kind!r} ({target}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ProviderError(f"provider kind {kind!r} ({target}) is not a vlpref Provider subclass")
    return cls


def create_provider(kind: str, options: Mapping[str, Any]) -> Provider:
    return provider_class(kind).from_config(options)
