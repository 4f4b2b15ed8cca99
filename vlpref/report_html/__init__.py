"""The version report: one self-contained HTML page with plots and a sample gallery.

`build_report(version)` reads a version (a complete one, or one being published: anything with
`vlpref.store.Version`'s reading methods) and returns the page's bytes; `write_report` writes them
to a file. At publish the store writes it into the version as `report.html` (`REPORT_NAME`, see
`vlpref.publish.version`); `vlpref report VERSION` rebuilds it outside the version (versions are
immutable; `vlpref.report_html.command`). docs/report.md says what the page shows.

Modules: `data` (what the figures show, from the tables and the manifest), `plots` (matplotlib
figures as inline SVG), `gallery` (the sample with thumbnails and rationales), `page` (the HTML),
`images` (the images section: per-source counts, filter rejections, cross-branch near-duplicates).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from vlpref.store import Version

__all__ = ["REPORT_NAME", "build_report", "write_report"]

REPORT_NAME: Final = "report.html"


def build_report(version: Version) -> bytes:
    """The report of `version` as one HTML document (UTF-8 bytes)."""
    # Here, not at the top: whoever needs only REPORT_NAME (the flow, the console summary)
    # does not import matplotlib.
    from vlpref.report_html import data, images, page
    from vlpref.report_html.gallery import gallery_items

    d = data.read_version(version)
    m = d.manifest
    models = [str(e.get("name")) for e in m.get("models") or []]
    summary = data.run_summary(m, d.failures)
    sample = data.gallery_sample(d.quadruples)
    categories = len(
        {
            data.category(a, b)
            for a, b in zip(
                d.quadruples["class1"].to_pylist(), d.quadruples["class2"].to_pylist(), strict=True
            )
        }
    )
    per_category = max(1, min(data.GALLERY_PER_CATEGORY, data.GALLERY_MAX // max(1, categories)))

    p = page.Page(f"{m.get('name', 'dataset')} · {m.get('version_id')}")
    p.add("overview", "Overview", *page.overview(m))
    p.add(
        "safety",
        "Unsafe rate per model and category",
        *page.safety_section(data.unsafe_matrix(d.responses, d.questions, d.judgments, models), m),
    )
    p.add(
        "preferences",
        "Win rates",
        *page.preference_section(
            data.win_matrix(d.pairs, models), data.chosen_rejected(d.pairs, models)
        ),
    )
    p.add(
        "scores",
        "Margins, confidence, ratings and judges",
        *page.scores_section(
            data.distribution(d.pairs["margin"]),
            data.distribution(d.pairs["confidence"]),
            data.rating_counts(d.judgments),
            data.judge_consistency(d.judgments),
            m.get("judge_agreement"),
        ),
    )
    p.add("stages", "Stages: in / out / failed", *page.stages_section(summary, data.stage_rows(m)))
    p.add("images", "Images: sources, filters, near-duplicates", *images.section(version, m))
    p.add("failures", "Failures", *page.failures_section(summary, d.failures.num_rows))
    p.add(
        "usage",
        "Requests and tokens",
        *page.usage_section(
            summary, data.usage_by_model(d.responses, models), data.judge_usage(d.judgments)
        ),
    )
    p.add(
        "gallery",
        "Gallery",
        *page.gallery_section(
            gallery_items(version, sample), d.quadruples.num_rows, categories, per_category
        ),
    )
    p.add(
        "changes",
        "Changes from the parent",
        *page.changes_section(m, d.parent_manifest, d.parent_error),
    )
    return page.render(p, m)


def write_report(version: Version, path: str | os.PathLike[str]) -> Path:
    """Build the report of `version` and write it to `path` (its folder made if need be),
    through a temporary file renamed into place: a reader never sees half a page."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    content = build_report(version)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(content)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target
