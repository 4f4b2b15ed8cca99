"""The report as one self-contained HTML document.

Everything is inline: the CSS, a small vanilla script (the gallery's filters), the figures (SVG)
and the thumbnails (data URLs). A Content-Security-Policy allows nothing else — no script, style,
image or connection from anywhere — so the page cannot load anything at view time, and a browser
reports any attempt as an error (the browser test checks there is none).

Every text that comes from the data (questions, responses, rationales, model and category names)
is HTML-escaped: a response is model output and may hold markup. The script reads the filters'
values from `data-` attributes, never from text put into code.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from vlpref.report_html import plots
from vlpref.report_html.data import (
    OTHER_RATING,
    RATING_LEVELS,
    STAGES,
    BranchStages,
    Distribution,
    JudgeConsistency,
    Matrix,
    ModelUsage,
)
from vlpref.report_html.gallery import GalleryItem, clip
from vlpref.run_summary import RunSummary

__all__ = ["Page", "render"]

CSP: Final = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
)

CSS: Final = """
:root { --fg:#1d232b; --muted:#5d6773; --line:#d9dee4; --bg:#fff; --soft:#f5f7f9;
  --chosen:#1b7f4a; --rejected:#b3261e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); margin: 0; }
header, main { max-width: 1200px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
nav { position: sticky; top: 0; background: var(--bg); border-bottom: 1px solid var(--line);
  padding: 6px 20px; z-index: 2; font-size: 13px; display: flex; flex-wrap: wrap;
  gap: 2px 14px; }
nav a { color: #0b5cad; text-decoration: none; white-space: nowrap; }
.meta { color: var(--muted); margin: 2px 0; }
.note { color: var(--muted); max-width: 80ch; }
.none { color: var(--muted); font-style: italic; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left;
  vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.n { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
figure { margin: 8px 0 14px; }
figure svg { display: block; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.row > figure { flex: 1 1 420px; max-width: 560px; }
details > summary { cursor: pointer; color: #0b5cad; margin: 6px 0; }
.filters { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 8px 0;
  padding: 8px; background: var(--soft); border-radius: 6px; }
.filters label { font-size: 13px; }
.filters select { margin-left: 4px; max-width: 320px; }
#gallery-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px; background: var(--bg); }
.card[hidden] { display: none; }
.card .top { display: flex; gap: 10px; }
.card img { width: 120px; height: auto; border: 1px solid var(--line); border-radius: 4px;
  flex: none; align-self: flex-start; }
.card .noimg { width: 120px; height: 90px; flex: none; background: var(--soft);
  color: var(--muted); font-size: 12px; display: flex; align-items: center;
  justify-content: center; text-align: center; border-radius: 4px; }
.card .tags { color: var(--muted); font-size: 12px; }
.card .q { font-weight: 600; margin: 4px 0; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; margin-top: 8px; }
.side { border-radius: 6px; padding: 6px 8px; font-size: 13px; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.side.chosen { background: #eef8f1; border-left: 3px solid var(--chosen); }
.side.rejected { background: #fbefee; border-left: 3px solid var(--rejected); }
.side .who { white-space: normal; font-size: 12px; color: var(--muted); margin-bottom: 3px; }
.side .who b { color: var(--fg); }
.rationales { margin-top: 6px; font-size: 12px; }
.rationales li { margin: 2px 0; }
"""

SCRIPT: Final = """
(function () {
  "use strict";
  var ids = ["f-category", "f-model", "f-split"];
  var selects = ids.map(function (id) { return document.getElementById(id); });
  var cards = Array.prototype.slice.call(document.querySelectorAll("#gallery-cards .card"));
  var shown = document.getElementById("gallery-shown");
  if (!shown || selects.indexOf(null) >= 0) { return; }
  function apply() {
    var category = selects[0].value, model = selects[1].value, split = selects[2].value;
    var n = 0;
    cards.forEach(function (card) {
      var d = card.dataset;
      var ok = (!category || d.category === category) &&
        (!model || d.chosen === model || d.rejected === model) &&
        (!split || d.split === split);
      card.hidden = !ok;
      if (ok) { n += 1; }
    });
    shown.textContent = n + " of " + cards.length + " shown";
  }
  selects.forEach(function (s) { s.addEventListener("change", apply); });
  apply();
})();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return esc(value)


def pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1%}"


class Markup(str):
    """HTML that `table` puts in as it is (already escaped by whoever made it)."""


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Sequence[bool] = ()
) -> str:
    """An HTML table; cells are escaped unless given as `Markup`."""
    flags = list(numeric) + [False] * (len(headers) - len(numeric))
    head = "".join(
        f"<th{' class=n' if f else ''}>{esc(h)}</th>" for h, f in zip(headers, flags, strict=True)
    )
    body = []
    for row in rows:
        cells = "".join(
            f"<td{' class=n' if f else ''}>{c if isinstance(c, Markup) else esc(c)}</td>"
            for c, f in zip(row, flags, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def none(sentence: str) -> str:
    return f'<p class="none">{esc(sentence)}</p>'


def note(sentence: str) -> str:
    return f'<p class="note">{esc(sentence)}</p>'


def figure(svg: str, figure_id: str, caption: str) -> str:
    return (
        f'<figure id="{esc(figure_id)}">{svg}'
        f'<figcaption class="note">{esc(caption)}</figcaption></figure>'
    )


class Page:
    """The report's sections, each added by a method; `html()` joins them into the document."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: list[tuple[str, str, str]] = []  # (id, heading, body)

    def add(self, section_id: str, heading: str, *body: str) -> None:
        self.sections.append((section_id, heading, "\n".join(body)))

    def html(self, header: str) -> bytes:
        nav = "".join(f'<a href="#{esc(i)}">{esc(h)}</a>' for i, h, _ in self.sections)
        sections = "\n".join(
            f'<section id="{esc(i)}"><h2>{esc(h)}</h2>\n{body}</section>'
            for i, h, body in self.sections
        )
        document = (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="generator" content="vlpref report">\n'
            '<link rel="icon" href="data:,">\n'
            f"<title>{esc(self.title)}</title>\n<style>{CSS}</style></head>\n"
            f"<body>\n<header>{header}</header>\n<nav>{nav}</nav>\n<main>\n{sections}\n</main>\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n"
        )
        return document.encode("utf-8")


# --- sections -----------------------------------------------------------------------------------


def header(manifest: Mapping[str, Any]) -> str:
    taxonomy = manifest.get("taxonomy")
    tax = (
        f"{taxonomy.get('name')} ({taxonomy.get('branches')} branches)"
        if isinstance(taxonomy, Mapping)
        else str(taxonomy)
    )
    lines = [
        f"<h1>{esc(manifest.get('name', 'dataset version'))}</h1>",
        f'<p class="meta">version <b id="version-id">{esc(manifest.get("version_id"))}</b> · '
        f"created {esc(manifest.get('created_at'))} · "
        f"parent {esc(manifest.get('parent') or 'none')}</p>",
        f'<p class="meta">taxonomy {esc(tax)} · code {esc(manifest.get("code_version"))} · '
        f"config {esc(str(manifest.get('config_hash', ''))[:12])}</p>",
    ]
    return "\n".join(lines)


def overview(manifest: Mapping[str, Any]) -> list[str]:
    out = []
    counts = manifest.get("counts") or {}
    if counts:
        out.append(table(["table", "rows"], sorted(counts.items()), numeric=[False, True]))
    splits = manifest.get("splits") or {}
    if splits:
        out.append("<h3>Splits</h3>")
        out.append(
            table(
                ["split", "quadruples", "images", "questions", "question types"],
                (
                    (
                        name,
                        s.get("rows"),
                        s.get("images"),
                        s.get("questions"),
                        ", ".join(f"{k} {v}" for k, v in (s.get("question_types") or {}).items()),
                    )
                    for name, s in splits.items()
                ),
                numeric=[False, True, True, True, False],
            )
        )
    else:
        out.append(none("This version has no splits."))
    roles = [
        ("response", manifest.get("models") or []),
        ("generator", [manifest["generator"]] if manifest.get("generator") else []),
        ("judge", manifest.get("judges") or []),
    ]
    rows = [
        (role, e.get("name"), e.get("model"), e.get("provider"))
        for role, entries in roles
        for e in entries
    ]
    if rows:
        out.append("<h3>Models</h3>")
        out.append(table(["role", "name", "model", "provider"], rows))
    return out


def safety_section(matrix: Matrix, manifest: Mapping[str, Any]) -> list[str]:
    if not matrix.rows or not matrix.columns or not any(any(c) for c in matrix.counts):
        return [none("This version has no safety judgments: no unsafe rates to show.")]
    svg = plots.heatmap(
        matrix,
        prefix="unsafe",
        title="Unsafe rate per response model and category",
        colorbar="unsafe rate",
    )
    out = [
        note(
            "Safety judgments with verdict unsafe over all safety judgments of the model's "
            "responses in the category (every judge counted), as SPA-VL's Table 1. Grey: no "
            "judgment."
        ),
        figure(
            svg, "unsafe-heatmap", "Unsafe rate per response model × category (class1 / class2)."
        ),
    ]
    overall = manifest.get("model_safety") or {}
    headers = ["model", *matrix.columns, "all: unsafe rate", "mean P(unsafe)"]
    rows = []
    for i, model in enumerate(matrix.rows):
        cells: list[Any] = [
            Markup(f"{pct(v)} <small>({c:,})</small>") if c else "n/a"
            for v, c in zip(matrix.values[i], matrix.counts[i], strict=True)
        ]
        stats = overall.get(model, {})
        rows.append([model, *cells, pct(stats.get("unsafe_rate")), num(stats.get("mean_p_unsafe"))])
    out.append('<div id="unsafe-table">')
    out.append(table(headers, rows, numeric=[False, *([True] * (len(headers) - 1))]))
    out.append("</div>")
    out.append(note("In brackets: the safety judgments each rate is computed from."))
    return out


def preference_section(wins: Matrix, chosen_rejected: Sequence[tuple[str, int, int]]) -> list[str]:
    if not chosen_rejected:
        return [none("This version has no pairs: no win rates to show.")]
    out = [
        note(
            "How often the row model's answer is chosen over the column model's: pairs with the "
            "row model chosen and the column model rejected over all pairs between the two. The "
            "diagonal (same-model pairs, two samples of one model) has no rate; its count is in "
            "the table."
        )
    ]
    if len(wins.rows) > 1:
        svg = plots.heatmap(
            wins,
            prefix="wins",
            title="Win rate (row chosen over column)",
            colorbar="win rate",
            cmap="RdYlGn",
            diagonal="same",
        )
        out.append(figure(svg, "win-matrix", "Win rate of each model over each other model."))
    headers = ["chosen \\ rejected", *wins.columns]
    rows = [
        [
            a,
            *(
                (
                    f"{wins.counts[i][j]:,} same-model"
                    if a == b
                    else (
                        Markup(
                            f"{pct(wins.values[i][j])} <small>(of {wins.counts[i][j]:,})</small>"
                        )
                        if wins.counts[i][j]
                        else "–"
                    )
                )
                for j, b in enumerate(wins.columns)
            ),
        ]
        for i, a in enumerate(wins.rows)
    ]
    out.append(table(headers, rows, numeric=[False, *([True] * len(wins.columns))]))
    out.append("<h3>Chosen and rejected per model</h3>")
    out.append(
        table(
            ["model", "chosen", "rejected", "chosen share"],
            ((m, c, r, pct(c / (c + r)) if c + r else "n/a") for m, c, r in chosen_rejected),
            numeric=[False, True, True, True],
        )
    )
    return out


def _distribution(dist: Distribution, prefix: str, title: str, xlabel: str, what: str) -> str:
    if not dist.values:
        return none(f"No pair has a {what} (missing in {dist.missing:,} pairs).")
    svg = plots.histogram(dist.values, prefix=prefix, title=title, xlabel=xlabel)
    caption = f"{len(dist.values):,} pairs; mean {num(dist.mean)}, median {num(dist.median)}" + (
        f"; {dist.missing:,} pairs without a {what}." if dist.missing else "."
    )
    return figure(svg, f"{prefix}-hist", caption)


def scores_section(
    margin: Distribution,
    confidence: Distribution,
    ratings: Mapping[str, Mapping[str, int]],
    consistency: Sequence[JudgeConsistency],
    agreement: Mapping[str, Any] | None,
) -> list[str]:
    out = [
        note(
            "Margin: overall score of the chosen response minus the rejected one's (may be "
            "negative when the pairwise verdict overrode the ratings). Confidence: how sure the "
            "judge was of the pair (|2p − 1| for a pairwise verdict, tanh(margin / 2) for a "
            "rating-selected pair)."
        ),
        '<div class="row">',
        _distribution(margin, "margin", "Margin", "overall(chosen) − overall(rejected)", "margin"),
        _distribution(confidence, "confidence", "Confidence", "confidence", "confidence"),
        "</div>",
        "<h3>Ratings (1–5) per aspect</h3>",
    ]
    if ratings:
        levels = [*RATING_LEVELS, OTHER_RATING]
        shown = (
            levels if any(r.get(OTHER_RATING) for r in ratings.values()) else list(RATING_LEVELS)
        )
        svg = plots.grouped_bars(
            ratings, prefix="ratings", title="Rating verdicts", categories=shown, ylabel="judgments"
        )
        out.append(figure(svg, "ratings-bars", "Rating judgments per aspect and verdict."))
        out.append(
            table(
                ["aspect", *shown],
                (
                    [aspect, *(counts.get(level, 0) for level in shown)]
                    for aspect, counts in ratings.items()
                ),
                numeric=[False, *([True] * len(shown))],
            )
        )
    else:
        out.append(none("This version has no rating judgments."))
    out.append("<h3>Pairwise consistency and position bias per judge</h3>")
    if consistency:
        out.append(
            note(
                "Consistency: of the pairs a judge compared in both orders, the share where both "
                "orders prefer the same response. Position bias: the share where both orders "
                "prefer the same slot (A both times or B both times). First slot: the share of "
                "single verdicts that prefer the response shown first (0.5 is unbiased)."
            )
        )
        out.append(
            table(
                [
                    "judge",
                    "verdicts",
                    "first-slot rate",
                    "pairs in both orders",
                    "consistent",
                    "consistency rate",
                    "position-bias rate",
                    "ties",
                ],
                (
                    (
                        c.judge,
                        c.verdicts,
                        pct(c.first_slot_rate),
                        c.both_orders,
                        c.consistent,
                        pct(c.consistency_rate),
                        pct(c.position_bias_rate),
                        c.ties,
                    )
                    for c in consistency
                ),
                numeric=[False, *([True] * 7)],
            )
        )
    else:
        out.append(none("This version has no pairwise judgments."))
    out.append("<h3>Agreement between judges</h3>")
    if not agreement:
        out.append(
            none("The manifest has no judge agreement (published before vlpref recorded it).")
        )
    elif agreement.get("metric") is None:
        out.append(none(f"No agreement to measure: {agreement.get('reason', 'one judge')}."))
    else:
        value = agreement.get("value")
        shown_value = num(value) if value is not None else f"n/a ({agreement.get('reason', '')})"
        out.append(
            table(
                ["metric", "judges", "value", "items", "branches without counts"],
                [
                    (
                        agreement.get("metric"),
                        agreement.get("judges"),
                        shown_value,
                        agreement.get("items", "–"),
                        agreement.get("branches_without_counts", 0),
                    )
                ],
                numeric=[False, True, True, True, True],
            )
        )
    return out


def stages_section(summary: RunSummary, branches: Sequence[BranchStages]) -> list[str]:
    if not summary.stages:
        return [none("The manifest has no stage counts.")]
    out = [
        table(
            ["stage", "unit", "in", "out", "failed", "failure rate"],
            (
                (s.stage, s.unit, s.n_in, s.n_out, s.n_failed, pct(s.failure_rate))
                for s in summary.stages
            ),
            numeric=[False, False, True, True, True, True],
        )
    ]
    stages = [s for s in STAGES if any(s in b.stages for b in branches)]
    rows = []
    for b in branches:
        cells: list[Any] = [b.path, b.status]
        for stage in stages:
            c = b.stages.get(stage)
            if c is None:
                cells.append("–")
                continue
            failed = int(c.get("failed") or 0)
            cell = f"{int(c.get('out') or 0):,} / {int(c.get('in') or 0):,}"
            cells.append(
                Markup(
                    esc(cell)
                    + (f' <b style="color:#b3261e">({failed:,} failed)</b>' if failed else "")
                )
            )
        rows.append(cells)
    out.append(
        f"<details><summary>Per branch: out / in per stage ({len(branches)} branches)</summary>"
        + table(
            ["branch", "status", *stages], rows, numeric=[False, False, *([True] * len(stages))]
        )
        + "</details>"
    )
    return out


def failures_section(summary: RunSummary, total: int) -> list[str]:
    if total == 0:
        return [none("No failures: every item of every stage succeeded.")]
    shown = sum(r.count for r in summary.reasons)
    out = [
        note(
            f"{total:,} failures, by stage and kind, with the most common reason and an item "
            "that failed for it (the failures table has them all)."
            + (
                f" The {len(summary.reasons)} largest groups are shown ({shown:,} failures)."
                if shown < total
                else ""
            )
        ),
        table(
            ["stage", "kind", "count", "example item", "most common reason"],
            ((r.stage, r.kind, r.count, r.example_item, r.example_reason) for r in summary.reasons),
            numeric=[False, False, True, False, False],
        ),
    ]
    return out


def usage_section(
    summary: RunSummary, models: Sequence[ModelUsage], judges: Mapping[str, Mapping[str, int]]
) -> list[str]:
    out = [
        note(
            "Requests sent to an endpoint and answered from the request journal (a rerun asks "
            "only for what the journal lacks), per stage from the manifest's counts."
        ),
        table(
            ["stage", "requests sent", "from journal"],
            ((s.stage, s.requests_sent, s.requests_cached) for s in summary.stages),
            numeric=[False, True, True],
        ),
        "<h3>Response models</h3>",
    ]
    if models:
        out.append(
            table(
                [
                    "model",
                    "samples",
                    "requests sent",
                    "from journal",
                    "prompt tokens sent",
                    "completion tokens sent",
                    "prompt tokens (journal)",
                    "completion tokens (journal)",
                ],
                (
                    (
                        m.model,
                        m.samples,
                        m.requests_sent,
                        m.requests_journal,
                        m.prompt_tokens_sent,
                        m.completion_tokens_sent,
                        m.prompt_tokens_journal,
                        m.completion_tokens_journal,
                    )
                    for m in models
                ),
                numeric=[False, *([True] * 7)],
            )
        )
        out.append(note("Requests are distinct calls: the n samples of one call share it."))
    else:
        out.append(none("This version has no responses."))
    out.append("<h3>Judges</h3>")
    if judges:
        kinds = sorted({k for per in judges.values() for k in per})
        out.append(
            table(
                ["judge", *kinds],
                ([judge, *(per.get(k, 0) for k in kinds)] for judge, per in judges.items()),
                numeric=[False, *([True] * len(kinds))],
            )
        )
        out.append(
            note(
                "Judgments per judge and kind. The judgments table records no token counts; the "
                "judge stage's requests are in the per-stage table above."
            )
        )
    else:
        out.append(none("This version has no judgments."))
    return out


def _options(select_id: str, label: str, values: Iterable[str]) -> str:
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
    return (
        f'<label>{esc(label)}<select id="{select_id}">'
        f'<option value="">all</option>{options}</select></label>'
    )


def _side(item: GalleryItem, side: str) -> str:
    row = item.row
    scores = [
        ("overall", row.get(f"{side}_overall")),
        ("P(unsafe)", row.get(f"{side}_p_unsafe")),
        ("harmless", row.get(f"{side}_harmlessness")),
        ("helpful", row.get(f"{side}_helpfulness")),
    ]
    shown = " · ".join(f"{name} {num(v)}" for name, v in scores if v is not None)
    return (
        f'<div class="side {side}"><div class="who">{side} · <b>{esc(row.get(f"{side}_model"))}</b>'
        f"{' · ' + esc(shown) if shown else ''}</div>{esc(clip(row.get(side)))}</div>"
    )


def gallery_section(
    items: Sequence[GalleryItem], total: int, categories: int, per_category: int
) -> list[str]:
    if not items:
        return [none("This version has no quadruples: nothing to show in the gallery.")]
    cats = sorted({i.row["category"] for i in items})
    models = sorted({m for i in items for m in (i.row["chosen_model"], i.row["rejected_model"])})
    splits = sorted({i.row["split"] for i in items})
    out = [
        note(
            f"A sample of {len(items):,} of the version's {total:,} quadruples: up to "
            f"{per_category} per category ({categories} categories), drawn by a hash of the pair "
            "id, so the same version always shows the same sample. Texts longer than 1,200 "
            "characters are cut."
        ),
        '<div class="filters">'
        + _options("f-category", "category", cats)
        + _options("f-model", "model", models)
        + _options("f-split", "split", splits)
        + '<span id="gallery-shown"></span></div>',
        '<div id="gallery-cards">',
    ]
    for item in items:
        row = item.row
        image = (
            f'<img src="{item.thumbnail}" alt="image {esc(row["image_id"][:12])}">'
            if item.thumbnail
            else '<div class="noimg">image not readable</div>'
        )
        rationales = "".join(
            f"<li><b>{esc(r.kind)}</b> ({esc(r.judge)}, {esc(r.about)}"
            f"{', ' + esc(r.verdict) if r.verdict else ''}): {esc(r.text)}</li>"
            for r in item.rationales
        )
        pair = f"margin {num(row.get('margin'))} · confidence {num(row.get('confidence'))}"
        if row.get("consistent") is not None:
            pair += f" · consistent {num(row.get('consistent'))}"
        out.append(
            f'<article class="card" data-category="{esc(row["category"])}" '
            f'data-chosen="{esc(row["chosen_model"])}" '
            f'data-rejected="{esc(row["rejected_model"])}" '
            f'data-split="{esc(row["split"])}" data-pair="{esc(row["pair_id"])}">'
            f'<div class="top">{image}<div><div class="tags">{esc(row["category"])} / '
            f"{esc(row.get('class3'))} · {esc(row.get('question_type'))} question · "
            f"{esc(row['split'])}</div>"
            f'<div class="q">{esc(row.get("question"))}</div>'
            f'<div class="tags">{esc(pair)}</div></div></div>'
            f'<div class="sides">{_side(item, "chosen")}{_side(item, "rejected")}</div>'
            + (
                '<details class="rationales"><summary>judges\' rationales '
                f"({len(item.rationales)})</summary><ul>{rationales}</ul></details>"
                if rationales
                else '<p class="none">No rationale recorded.</p>'
            )
            + "</article>"
        )
    out.append("</div>")
    return out


def changes_section(
    manifest: Mapping[str, Any],
    parent_manifest: Mapping[str, Any] | None,
    parent_error: str | None,
) -> list[str]:
    from vlpref.versions import diff

    parent = manifest.get("parent")
    if not parent:
        return [none("This version has no parent: it is the first of its store.")]
    if parent_manifest is None:
        return [none(f"The parent version {parent} could not be read: {parent_error}.")]
    d = diff(parent_manifest, manifest)
    statuses: dict[str, int] = {}
    for branch in (manifest.get("branches") or {}).values():
        status = str(branch.get("status", "built"))
        statuses[status] = statuses.get(status, 0) + 1
    out = [
        note(
            f"From {parent} to this version. Branches: "
            + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
            + " (built: written from this run; reused: computed again and unchanged; shared: "
            "not part of this run)."
        )
    ]
    if d["branches"]:
        keys = [k for k in d["branches"][0] if k not in ("branch", "change")]
        out.append("<h3>Branches changed</h3>")
        out.append(
            table(
                ["branch", "change", *(f"Δ {k}" for k in keys)],
                ([b["branch"], b["change"], *(b.get(k, "") for k in keys)] for b in d["branches"]),
                numeric=[False, False, *([True] * len(keys))],
            )
        )
    else:
        out.append(none("No branch changed: every branch's data is the parent's."))
    out.append(
        table(
            ["split", "parent", "this version", "Δ"],
            ((k, v["old"], v["new"], v["delta"]) for k, v in d["splits"].items()),
            numeric=[False, True, True, True],
        )
    )
    changes = []
    for role in ("models", "judges"):
        for what, names in d[role].items():
            if names:
                changes.append(f"{role} {what}: {', '.join(names)}")
    if d["generator_changed"]:
        changes.append("the question generator changed")
    if d["prompts_changed"]:
        changes.append(f"prompts changed: {', '.join(d['prompts_changed'])}")
    if d["taxonomy_changed"]:
        changes.append("the taxonomy changed")
    changes += [f"setting {k}: {v['old']!r} → {v['new']!r}" for k, v in d["settings"].items()]
    if not d["config_changed"]:
        changes.append("the run config is unchanged")
    out.append("<ul>" + "".join(f"<li>{esc(c)}</li>" for c in changes) + "</ul>")
    return out


def render(page: Page, manifest: Mapping[str, Any]) -> bytes:
    return page.html(header(manifest))
