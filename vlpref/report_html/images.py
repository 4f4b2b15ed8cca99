"""The report's images section: where the images came from, what the filters refused, and which
images of one branch look like an image of another.

Counts come from the manifest (each branch's images-stage counts: `by_source`, `filtered`,
`duplicates`, `near_duplicates`, written by tasks/images.py). The cross-branch check reads the
images table's `image_id`, `branch_id`, `source` and `phash` columns (16 bytes of hash an image,
never the bytes) and runs `vlpref.images.dedupe.cross_branch` with the version's
`near_duplicate_distance`, branches in taxonomy-path order: the first branch keeps an image, a
later one is listed. It is reported, not enforced (docs/images.md says why): every listed image is
still in the version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa

from vlpref.images.dedupe import CrossMatch, cross_branch

if TYPE_CHECKING:
    from vlpref.store import Version

__all__ = ["ImageCounts", "cross_branch_matches", "image_counts", "read_hashes", "section"]

HASH_COLUMNS: Final = ["image_id", "branch_id", "source", "phash"]
# Sources exempt from near-duplicate checks (tasks/images.py: NEAR_DUPLICATE_EXEMPT).
EXEMPT: Final = frozenset({"typographic"})
SHOWN: Final = 200  # rows of the cross-branch table; the count says how many there are


@dataclass(frozen=True)
class ImageCounts:
    """The version's images-stage counts summed over its branches."""

    by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> in/out/failed
    filtered: dict[str, int] = field(default_factory=dict)  # filter -> images it rejected
    duplicates: int = 0
    near_duplicates: int = 0
    filter_errors: int = 0
    branches: int = 0
    without_counts: int = 0  # branches built before these counts existed


def image_counts(manifest: Mapping[str, Any]) -> ImageCounts:
    by_source: dict[str, Counter[str]] = {}
    filtered: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    branches = without = 0
    for branch in (manifest.get("branches") or {}).values():
        counts = ((branch.get("stages") or {}).get("images") or {}).get("counts")
        if not isinstance(counts, Mapping):
            continue
        branches += 1
        if not isinstance(counts.get("by_source"), Mapping):
            without += 1
            continue
        for source, c in counts["by_source"].items():
            by_source.setdefault(source, Counter()).update(c)
        filtered.update(counts.get("filtered") or {})
        totals["duplicates"] += int(counts.get("duplicates") or 0)
        totals["near_duplicates"] += int(counts.get("near_duplicates") or 0)
        totals["filter_errors"] += int((counts.get("failed_by_kind") or {}).get("filter_error", 0))
    return ImageCounts(
        {s: {k: int(c[k]) for k in ("in", "out", "failed")} for s, c in sorted(by_source.items())},
        dict(sorted(filtered.items())),
        totals["duplicates"],
        totals["near_duplicates"],
        totals["filter_errors"],
        branches,
        without,
    )


def read_hashes(version: Version) -> pa.Table | None:
    """The columns the cross-branch check needs; None when a part has no `phash` (published
    before the column existed)."""
    from vlpref.errors import StoreError

    try:
        return version.table("images", HASH_COLUMNS)
    except (StoreError, pa.ArrowException, KeyError):
        return None


@dataclass(frozen=True)
class CrossRow:
    path: str  # the later branch's taxonomy path
    image_id: str
    matches_path: str
    matches_image_id: str
    distance: int


def cross_branch_matches(
    manifest: Mapping[str, Any], hashes: pa.Table, within: int
) -> list[CrossRow]:
    """Images of a branch within `within` bits of an image of a branch earlier in path order."""
    paths = {
        branch_id: str(info.get("path", branch_id))
        for branch_id, info in (manifest.get("branches") or {}).items()
    }
    grouped: dict[str, list[tuple[str, str]]] = {}
    for image_id, branch_id, source, phash in zip(
        *(hashes[c].to_pylist() for c in HASH_COLUMNS), strict=True
    ):
        if phash and source not in EXEMPT:
            grouped.setdefault(branch_id, []).append((image_id, phash))
    order = sorted(grouped, key=lambda b: (paths.get(b, b), b))
    found: list[CrossMatch] = cross_branch([(b, grouped[b]) for b in order], within)
    return [
        CrossRow(
            paths.get(m.branch, m.branch),
            m.image_id,
            paths.get(m.matches_branch, m.matches_branch),
            m.matches_image_id,
            m.distance,
        )
        for m in found
    ]


def section(version: Version, manifest: Mapping[str, Any]) -> list[str]:
    """The section's HTML blocks (for `Page.add`)."""
    from vlpref.report_html.page import none, note, table

    counts = image_counts(manifest)
    out: list[str] = []
    if not counts.by_source:
        out.append(none("The manifest has no per-source image counts (built before they existed)."))
    else:
        out.append(note("Source items per source: in = out + failed, summed over the branches."))
        out.append(
            table(
                ["source", "in", "out", "failed"],
                ((s, c["in"], c["out"], c["failed"]) for s, c in counts.by_source.items()),
                numeric=[False, True, True, True],
            )
        )
        rows: list[tuple[str, int]] = [(f"filter {n}", k) for n, k in counts.filtered.items()]
        rows += [
            ("exact duplicate", counts.duplicates),
            ("near-duplicate in the branch", counts.near_duplicates),
        ]
        if counts.filter_errors:
            rows.append(("filter error", counts.filter_errors))
        out.append(table(["refused as", "images"], rows, numeric=[False, True]))
        if counts.without_counts:
            out.append(
                note(f"{counts.without_counts} of {counts.branches} branches predate these counts.")
            )
    within = int(
        ((manifest.get("stages") or {}).get("images") or {}).get("near_duplicate_distance") or 0
    )
    if within < 1:
        out.append(none("Near-duplicate checks are off (near_duplicate_distance 0)."))
        return out
    hashes = read_hashes(version)
    if hashes is None:
        out.append(none("Cross-branch near-duplicates: the images table has no perceptual hashes."))
        return out
    matches = cross_branch_matches(manifest, hashes, within)
    out.append(
        note(
            f"Across branches: {len(matches):,} images are within {within} bits of an image of a "
            "branch earlier in path order. Listed, not removed: both stay in the version "
            "(docs/images.md, near-duplicates)."
        )
    )
    if matches:
        out.append(
            table(
                ["branch", "image", "looks like (branch)", "image", "bits apart"],
                (
                    (r.path, r.image_id[:16], r.matches_path, r.matches_image_id[:16], r.distance)
                    for r in matches[:SHOWN]
                ),
                numeric=[False, False, False, False, True],
            )
        )
    return out
