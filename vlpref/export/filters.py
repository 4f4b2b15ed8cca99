"""The filters every exporter takes: splits, categories, minimum margin and confidence, consistency.

A row that fails is counted under the *first* filter it fails, in the order of `REASONS`, so the
counts of an export always add up: rows in = rows written + the sum of the rows filtered.

Categories are taxonomy path prefixes cut at a component boundary, as `vlpref run --only` takes
them: `"Malicious Use"`, `"Malicious Use/Security threats"` or a full leaf path match the rows whose
`class1/class2/class3` starts with those components.

Pair filters (margin, confidence, consistency) are properties of a preference pair. A pair format
applies them to each pair; the listwise format, whose unit is a question, keeps a question only
when every one of its pairs passes, and a question without a pair fails a pair filter that is set
(reason `no_pair`): nothing says its ranking is as sure as the filter asks.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from vlpref.errors import DataError

__all__ = ["REASONS", "Filters", "Tally", "category_path", "components"]

REASONS: Final = (
    "split",
    "category",
    "no_pair",
    "inconsistent",
    "margin",
    "confidence",
    "unranked",
)


def components(path: str) -> list[str]:
    """`"A / B/C"` -> `["A", "B", "C"]`, as the taxonomy splits a path."""
    return [part.strip() for part in path.strip().strip("/").split("/")]


def category_path(class1: str | None, class2: str | None, class3: str | None) -> str:
    return "/".join(c or "" for c in (class1, class2, class3))


@dataclass
class Tally:
    """Rows in, rows written and rows filtered by reason (one export's accounting)."""

    rows_in: int = 0
    written: int = 0
    filtered: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str, rows: int) -> None:
        if rows:
            self.filtered[reason] += rows

    def by_reason(self) -> dict[str, int]:
        return {reason: self.filtered[reason] for reason in REASONS if self.filtered[reason]}


@dataclass(frozen=True)
class Filters:
    """What an export keeps. Empty `splits` or `categories` keep all; `None` thresholds none."""

    splits: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    min_margin: float | None = None
    min_confidence: float | None = None
    consistent_only: bool = False

    @classmethod
    def of(
        cls,
        *,
        splits: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        min_margin: float | None = None,
        min_confidence: float | None = None,
        consistent_only: bool = False,
    ) -> Filters:
        """Filters from lists as a command line or a config gives them (None = empty)."""
        return cls(
            splits=tuple(splits or ()),
            categories=tuple(categories or ()),
            min_margin=min_margin,
            min_confidence=min_confidence,
            consistent_only=consistent_only,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "splits": list(self.splits) or None,
            "categories": list(self.categories) or None,
            "min_margin": self.min_margin,
            "min_confidence": self.min_confidence,
            "consistent_only": self.consistent_only,
        }

    @property
    def on_pairs(self) -> bool:
        """Whether any pair filter is set (the listwise format then needs a question's pairs)."""
        return (
            self.consistent_only or self.min_margin is not None or self.min_confidence is not None
        )

    # checking against a version

    def check(self, splits: Sequence[str], paths: Iterable[str]) -> None:
        """A DataError for a split the version lacks, a category that matches none of its
        taxonomy `paths`, or a threshold that is not a finite number."""
        for name, value in (
            ("min_margin", self.min_margin),
            ("min_confidence", self.min_confidence),
        ):
            if value is not None and not math.isfinite(value):
                raise DataError(f"--{name}: {value} is not a finite number")
        unknown = [s for s in self.splits if s not in splits]
        if unknown:
            raise DataError(
                f"unknown split {', '.join(repr(s) for s in unknown)} "
                f"(the version's splits: {', '.join(splits) or 'none'})"
            )
        known = sorted(set(paths))
        for prefix in self.categories:
            wanted = components(prefix)
            if not all(wanted):
                raise DataError(f"--category: empty path component in {prefix!r}")
            if not any(components(p)[: len(wanted)] == wanted for p in known):
                close = difflib.get_close_matches(prefix.strip().strip("/"), _nodes(known), n=3)
                hint = f"; close matches: {', '.join(map(repr, close))}" if close else ""
                raise DataError(
                    f"unknown category {prefix!r}: no path of the version starts so{hint}"
                )

    # applying

    def keeps_split(self, split: str) -> bool:
        return not self.splits or split in self.splits

    def keeps_category(self, path: str) -> bool:
        if not self.categories:
            return True
        parts = components(path)
        return any(parts[: len(w)] == w for w in (components(c) for c in self.categories))

    def pair_checks(self, tbl: pa.Table) -> list[tuple[str, pa.Array]]:
        """(reason, keep mask) for each pair filter that is set; a null value fails."""
        checks: list[tuple[str, pa.Array]] = []
        if self.consistent_only:
            checks.append(("inconsistent", pc.fill_null(pc.equal(tbl["consistent"], True), False)))
        for reason, column, minimum in (
            ("margin", "margin", self.min_margin),
            ("confidence", "confidence", self.min_confidence),
        ):
            if minimum is not None:
                checks.append((reason, pc.fill_null(pc.greater_equal(tbl[column], minimum), False)))
        return checks

    def apply_to_pairs(self, tbl: pa.Table, tally: Tally) -> pa.Table:
        """The rows of a quadruple (or pairs) table that pass the category and pair filters,
        the others counted in `tally` under their first failing reason."""
        if self.categories:
            keep = pa.array(
                [
                    self.keeps_category(category_path(a, b, c))
                    for a, b, c in zip(
                        *(tbl[k].to_pylist() for k in ("class1", "class2", "class3")), strict=True
                    )
                ],
                pa.bool_(),
            )
            tally.drop("category", tbl.num_rows - _count(keep))
            tbl = tbl.filter(keep)
        for reason in ("inconsistent", "margin", "confidence"):
            masks = dict(self.pair_checks(tbl))
            if reason in masks:
                tally.drop(reason, tbl.num_rows - _count(masks[reason]))
                tbl = tbl.filter(masks[reason])
        return tbl

    def first_pair_failure(self, pairs: Sequence[Mapping[str, Any]]) -> str | None:
        """For a question's pairs (dicts with margin, confidence, consistent): the first pair
        filter that one of them fails, `no_pair` when there are none, or None (all pass)."""
        if not self.on_pairs:
            return None
        if not pairs:
            return "no_pair"
        if self.consistent_only and not all(p.get("consistent") is True for p in pairs):
            return "inconsistent"
        for reason, minimum in (("margin", self.min_margin), ("confidence", self.min_confidence)):
            if minimum is not None and not all(
                p.get(reason) is not None and p[reason] >= minimum for p in pairs
            ):
                return reason
        return None


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _nodes(paths: Iterable[str]) -> list[str]:
    """Every prefix of every path: what a --category may name."""
    out: set[str] = set()
    for path in paths:
        parts = components(path)
        out.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
    return sorted(out)
