"""Exports of a version to the trainers' formats (`vlpref export`, `write_exports`).

Formats: `trl` (TRL's conversational vision preference dataset), `llamafactory` (sharegpt JSON
with image files and a `dataset_info.json` entry), `swift` (ms-swift's RLHF JSON Lines),
`listwise` (every ranked response per question). Each takes the same `Filters`, writes an
`export.json` (format, version, filters, counts, files, the command that trains on it) and
returns an `ExportResult`. docs/export.md says which trainer reads which, and how.
"""

from __future__ import annotations

from vlpref.export.core import (
    EXPORT_JSON,
    FORMATS,
    ExportResult,
    ExportSpec,
    export_version,
    write_exports,
)
from vlpref.export.filters import Filters

__all__ = [
    "EXPORT_JSON",
    "FORMATS",
    "ExportResult",
    "ExportSpec",
    "Filters",
    "export_version",
    "write_exports",
]
