"""Model providers: every way vlpref can get a chat completion, behind one seam."""

from vlpref.providers.base import Provider, complete_all
from vlpref.providers.registry import available_kinds, create_provider, provider_class

__all__ = ["Provider", "available_kinds", "complete_all", "create_provider", "provider_class"]
