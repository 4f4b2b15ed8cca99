"""Where provider kinds come from: the built-ins and the `vlpref.providers` entry-point group.

A team adds a provider kind without editing vlpref by publishing, in its own package,

    [project.entry-points."vlpref.providers"]
    my-kind = "my_package.module:MyProvider"

where `MyProvider` subclasses `vlpref.providers.Provider`. A config then says `kind: my-kind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlpref.errors import ProviderError, ProviderNotFound
from vlpref.plugins import available, load_class
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
    return available(_builtin_kinds(), ENTRY_POINT_GROUP)


def provider_class(kind: str) -> type[Provider]:
    """The class registered for `kind`: a built-in first, then an entry point."""
    return load_class(
        kind,
        _builtin_kinds(),
        ENTRY_POINT_GROUP,
        Provider,
        what="provider of kind",
        label="provider kind",
        unknown=ProviderNotFound,
        broken=ProviderError,
    )


def create_provider(kind: str, options: Mapping[str, Any]) -> Provider:
    return provider_class(kind).from_config(options)
