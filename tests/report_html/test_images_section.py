"""The report's images section: counts summed from the manifest, cross-branch matches from the
images table's hashes (typographic images exempt, path order decides who keeps)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from vlpref.report_html.images import CrossRow, cross_branch_matches, image_counts


def branch(path: str, counts: dict[str, Any] | None) -> dict[str, Any]:
    stages = {"images": {"counts": counts}} if counts is not None else {}
    return {"path": path, "stages": stages}


def test_counts_are_summed_over_branches() -> None:
    manifest = {
        "branches": {
            "b1": branch(
                "A/x/1",
                {
                    "by_source": {"folder": {"in": 5, "out": 3, "failed": 2}},
                    "filtered": {"min_size": 1},
                    "duplicates": 1,
                    "near_duplicates": 0,
                    "failed_by_kind": {"filter_min_size": 1, "duplicate": 1},
                },
            ),
            "b2": branch(
                "A/x/2",
                {
                    "by_source": {
                        "folder": {"in": 2, "out": 1, "failed": 1},
                        "url": {"in": 4, "out": 4, "failed": 0},
                    },
                    "filtered": {},
                    "duplicates": 0,
                    "near_duplicates": 1,
                    "failed_by_kind": {"near_duplicate": 1, "filter_error": 2},
                },
            ),
            "b3": branch("A/x/3", {"in": 4, "out": 4, "failed": 0}),  # before these counts
            "b4": branch("A/x/4", None),
        }
    }
    counts = image_counts(manifest)
    assert counts.by_source == {
        "folder": {"in": 7, "out": 4, "failed": 3},
        "url": {"in": 4, "out": 4, "failed": 0},
    }
    assert counts.filtered == {"min_size": 1}
    assert (counts.duplicates, counts.near_duplicates, counts.filter_errors) == (1, 1, 2)
    assert (counts.branches, counts.without_counts) == (3, 1)


def test_cross_branch_matches_follow_path_order_and_skip_typographic() -> None:
    manifest = {"branches": {"z": {"path": "B/later"}, "a": {"path": "A/first"}}}
    hashes = pa.table(
        {
            "image_id": ["later1", "first1", "typo1", "typo2", "later2"],
            "branch_id": ["z", "a", "a", "z", "z"],
            "source": ["folder", "url", "typographic", "typographic", "folder"],
            "phash": ["000000000000000f", "0000000000000003", "f" * 16, "f" * 16, "f0" * 8],
        }
    )
    assert cross_branch_matches(manifest, hashes, 4) == [
        CrossRow("B/later", "later1", "A/first", "first1", 2)
    ]
    assert cross_branch_matches(manifest, hashes, 1) == []
