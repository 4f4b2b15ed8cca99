"""The images stage's library: normalisation, typographic rendering, folder/manifest/URL sources.

The stage function itself is `tasks.images.collect_images`.
"""

from vlpref.images.normalize import (
    ImageRejected,
    NormalizedImage,
    NormalizeOptions,
    normalize_bytes,
    normalize_image,
)
from vlpref.images.sources import (
    SourceItem,
    SourceListing,
    fetch_url,
    list_folder,
    list_manifest,
    read_manifest,
)
from vlpref.images.typographic import TypographicVariant, render, variants

__all__ = [
    "ImageRejected",
    "NormalizeOptions",
    "NormalizedImage",
    "SourceItem",
    "SourceListing",
    "TypographicVariant",
    "fetch_url",
    "list_folder",
    "list_manifest",
    "normalize_bytes",
    "normalize_image",
    "read_manifest",
    "render",
    "variants",
]
