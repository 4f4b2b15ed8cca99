"""Running an export: the output folder, the accounting and `export.json`.

Every format writes into a staging folder beside the target (`.<name>.partial-<pid>`), which is
renamed onto the target when the export is complete, `export.json` included. So a folder with an
`export.json` is always a whole export, and an export that failed leaves no half-written folder
where a trainer would look (the staging folder is removed).

The target must not exist or be an empty folder: an export never mixes its files with others.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from vlpref.errors import DataError
from vlpref.export.filters import Filters, Tally
from vlpref.export.source import category_paths, open_version
from vlpref.store import Version

__all__ = [
    "EXPORT_JSON",
    "FORMATS",
    "Context",
    "ExportResult",
    "ExportSpec",
    "Written",
    "export_version",
    "write_exports",
]

EXPORT_JSON: Final = "export.json"


@dataclass(frozen=True)
class ExportSpec:
    """One export: its format, filters, and the folder name under an export root (default: the
    format's name)."""

    format: str
    filters: Filters = field(default_factory=Filters)
    name: str | None = None

    @property
    def folder(self) -> str:
        return self.name or self.format


@dataclass
class Context:
    """What a format writer gets: the version, the filters, where to write (`out`, the staging
    folder) and where the files will finally lie (`final`, for absolute paths), and the tally."""

    version: Version
    filters: Filters
    out: Path
    final: Path
    tally: Tally = field(default_factory=Tally)


@dataclass
class Written:
    """What a format writer reports: files (relative to the export folder), rows per split, the
    unit counted, the command that trains on it, and notes for its consumer."""

    files: list[str]
    splits: dict[str, int]
    unit: str
    command: str
    notes: list[str] = field(default_factory=list)


Writer = Callable[[Context], Written]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote, as `export.json` records it."""

    format: str
    version_id: str
    out: Path
    filters: Filters
    unit: str
    rows_in: int
    rows_written: int
    rows_filtered: dict[str, int]
    splits: dict[str, int]
    files: list[str]
    command: str
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version_id": self.version_id,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "filters": self.filters.to_json(),
            "unit": self.unit,
            "rows_in": self.rows_in,
            "rows_written": self.rows_written,
            "rows_filtered": self.rows_filtered,
            "splits": self.splits,
            "files": self.files,
            "command": self.command,
            "notes": self.notes,
        }

    def summary(self) -> str:
        """One line for a terminal: counts, reasons, where, and how to train on it."""
        reasons = ", ".join(f"{k} {v}" for k, v in self.rows_filtered.items())
        filtered = sum(self.rows_filtered.values())
        return (
            f"{self.format}: {self.rows_in} {self.unit} in, {self.rows_written} written"
            f"{f' ({filtered} filtered: {reasons})' if filtered else ''}; "
            f"{len(self.files)} file(s) in {self.out}"
        )


def _writers() -> dict[str, Writer]:
    # Imported here: each format module imports this one for Context and Written.
    from vlpref.export import listwise, llamafactory, swift, trl

    return {
        "trl": trl.write,
        "llamafactory": llamafactory.write,
        "swift": swift.write,
        "listwise": listwise.write,
    }


FORMATS: Final = ("trl", "llamafactory", "swift", "listwise")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: the output folder exists and is not empty")


def export_version(
    version: Version | str | Path, spec: ExportSpec, out: str | Path
) -> ExportResult:
    """Write one export of `version` (a Version or its folder) into the folder `out`.

    A DataError, before anything is written, for an unknown format, split or category, or an
    `out` that is a file or a folder with files in it.
    """
    if spec.format not in FORMATS:
        raise DataError(f"unknown format {spec.format!r} (formats: {', '.join(FORMATS)})")
    target = Path(out).absolute()
    _check_out(target)
    v = open_version(version)
    spec.filters.check(v.splits, category_paths(v))
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        ctx = Context(version=v, filters=spec.filters, out=staging, final=target)
        written = _writers()[spec.format](ctx)
        result = ExportResult(
            format=spec.format,
            version_id=v.version_id,
            out=target,
            filters=spec.filters,
            unit=written.unit,
            rows_in=ctx.tally.rows_in,
            rows_written=ctx.tally.written,
            rows_filtered=ctx.tally.by_reason(),
            splits=written.splits,
            files=sorted([*written.files, EXPORT_JSON]),
            command=written.command,
            notes=written.notes,
        )
        text = json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n"
        (staging / EXPORT_JSON).write_text(text, encoding="utf-8")
        _check_out(target)  # again: something may have appeared there meanwhile
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def write_exports(
    version: Version | str | Path, exports: Sequence[ExportSpec], out_root: str | Path
) -> list[ExportResult]:
    """Every export of `exports` into `out_root/<spec.folder>` (e.g. after a publish, for a
    `publish.exports:` list). Folder names must differ; each export is checked and written in
    turn, so one with a bad filter fails before the exports after it, not after them."""
    folders = [spec.folder for spec in exports]
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise DataError(f"exports share output folders {repeated}: give each a distinct name")
    v = open_version(version)
    root = Path(out_root)
    return [export_version(v, spec, root / spec.folder) for spec in exports]


def require_datasets() -> Any:
    """The `datasets` module, which the trl and listwise formats write with; a DataError saying
    how to install it where it is missing, rather than a traceback."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "this export format needs the `datasets` package: pip install datasets"
        ) from None
    return datasets


def relative_files(root: Path) -> list[str]:
    """Every file under `root`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))
