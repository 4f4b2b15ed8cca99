"""The images stage's library: normalisation, typographic rendering, folder/manifest/URL sources,
and the guards around them (local files inside a root, outbound requests to allowed addresses
only, published URLs without credentials, a process-wide decode budget).

The stage function itself is `tasks.images.collect_images`.
"""

from vlpref.images.netguard import HostGuard, HostRefused, address_kind
from vlpref.images.normalize import (
    ImageRejected,
    NormalizedImage,
    NormalizeOptions,
    PixelBudget,
    decode_budget,
    normalize_bytes,
    normalize_image,
)
from vlpref.images.sources import (
    LocalRoot,
    SourceItem,
    SourceListing,
    fetch_url,
    list_folder,
    list_manifest,
    make_client,
    read_local,
    read_manifest,
)
from vlpref.images.typographic import TypographicVariant, render, variants
from vlpref.images.urls import safe_url

__all__ = [
    "HostGuard",
    "HostRefused",
    "ImageRejected",
    "LocalRoot",
    "NormalizeOptions",
    "NormalizedImage",
    "PixelBudget",
    "SourceItem",
    "SourceListing",
    "TypographicVariant",
    "address_kind",
    "decode_budget",
    "fetch_url",
    "list_folder",
    "list_manifest",
    "make_client",
    "normalize_bytes",
    "normalize_image",
    "read_local",
    "read_manifest",
    "render",
    "safe_url",
    "variants",
]
