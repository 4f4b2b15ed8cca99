"""Near-duplicate images: a perceptual hash per image and a search by Hamming distance.

`phash` is imagehash's DCT hash (64 bits, as 16 hex digits in the images table's `phash`
column): the signs of the 8x8 lowest frequencies of a 32x32 grey thumbnail. It survives what
makes a copy of a picture a different file — resizing, re-encoding, a few percent of cropping, a
colour or brightness shift — and differs in about half its bits between unrelated pictures.
tests/images/test_dedupe.py measures both distributions; docs/images.md has the figures and why
`stages.images.near_duplicate_distance` defaults to what it does.

`HashIndex` answers "is there a kept image within `distance` bits of this one?" exactly (no
approximate bucketing): hashes live in a numpy uint64 array and a query is one vectorised XOR
and popcount over it. A branch holds thousands of images (n² / 2 comparisons of a nanosecond
each); the version report's cross-branch check over SPA-VL's ~100k images is seconds.

The functions here do no I/O: the images stage and the report pass images and hashes in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_DISTANCE",
    "HASH_BITS",
    "CrossMatch",
    "HashIndex",
    "Match",
    "cross_branch",
    "distance",
    "phash",
]

HASH_BITS = 64
# Measured (tests/images/test_dedupe.py, docs/images.md): copies of drawn scenes that were
# resized, re-encoded, cropped 5% or colour-shifted are at most 6 bits apart, distinct scenes at
# least 18; 10 sits in that gap with room on both sides.
DEFAULT_DISTANCE = 10


def phash(image: Image.Image) -> str:
    """The 64-bit perceptual hash of an image, as 16 lowercase hex digits."""
    return str(imagehash.phash(image.convert("RGB"), hash_size=8))


def distance(a: str, b: str) -> int:
    """Hamming distance between two hashes written by `phash`."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


@dataclass(frozen=True)
class Match:
    """The kept image a query is closest to, and how many bits apart they are."""

    key: str
    distance: int


class HashIndex:
    """Kept hashes with a key each (an item or image id); first added, first reported."""

    def __init__(self) -> None:
        self._hashes = np.empty(64, dtype=np.uint64)
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, hash_hex: str, key: str) -> None:
        n = len(self._keys)
        if n == len(self._hashes):  # grow by doubling: amortised O(1) a hash
            grown = np.empty(2 * n, dtype=np.uint64)
            grown[:n] = self._hashes
            self._hashes = grown
        self._hashes[n] = np.uint64(int(hash_hex, 16))
        self._keys.append(key)

    def nearest(self, hash_hex: str, within: int) -> Match | None:
        """The closest kept hash at most `within` bits away (ties: the one added first)."""
        n = len(self._keys)
        if n == 0 or within < 0:
            return None
        bits = np.bitwise_count(self._hashes[:n] ^ np.uint64(int(hash_hex, 16)))
        best = int(np.argmin(bits))  # argmin returns the first of equal minima
        found = int(bits[best])
        return Match(self._keys[best], found) if found <= within else None


@dataclass(frozen=True)
class CrossMatch:
    """An image of a later branch within the distance of one kept by an earlier branch."""

    branch: str
    image_id: str
    matches_branch: str
    matches_image_id: str
    distance: int


def cross_branch(
    branches: Sequence[tuple[str, Iterable[tuple[str, str]]]], within: int
) -> list[CrossMatch]:
    """Near-duplicates across branches, given in the order that decides who keeps an image.

    `branches`: (branch name, its (image_id, phash) pairs). Each image is compared with the
    images of the branches before it only (never its own: the images stage already deduplicated
    within a branch), and every image joins the index, matched or not, since its branch
    publishes it either way (see docs/images.md on why this check reports and does not drop).
    `within` < 1 reports nothing.
    """
    if within < 1:
        return []
    index = HashIndex()
    where: dict[str, str] = {}  # image_id -> the first branch that has it
    found: list[CrossMatch] = []
    for name, images in branches:
        mine = [(image_id, h) for image_id, h in images if h]
        for image_id, h in mine:
            match = index.nearest(h, within)
            if match is not None:
                found.append(
                    CrossMatch(name, image_id, where[match.key], match.key, match.distance)
                )
        for image_id, h in mine:
            if image_id not in where:
                where[image_id] = name
                index.add(h, image_id)
    return found
