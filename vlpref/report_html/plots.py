"""Matplotlib figures rendered to SVG text that a page can inline.

Why matplotlib: it renders to SVG offline, so the report needs nothing fetched or shipped at view
time (a Vega-Lite chart needs its JavaScript runtime inlined, about 1 MB per page). Figures are
made with `matplotlib.figure.Figure`, never `pyplot`: no global figure registry, no GUI backend,
safe in a worker thread of a flow run.

Every SVG is made to sit inside one HTML page with others: the XML prologue and metadata are
dropped, every `id` (and every reference to one) gets the figure's own prefix so that two figures'
`figure_1` or clip paths never collide, and the figure keeps its natural size but shrinks (its
view box scaled) where the page is narrower. Text stays text (`svg.fonttype: none`): smaller than
glyph outlines, and searchable. The hash salt is the figure's prefix, fixed, so that the same data
gives the same bytes.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, cast

import matplotlib
from matplotlib.colors import Colormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vlpref.report_html.data import Matrix

__all__ = ["HEAT_CELL", "grouped_bars", "heatmap", "histogram", "svg_text"]

HEAT_CELL: Final = "heatcell"  # gid of one heatmap cell: <prefix>-heatcell-<row>-<column>
_RC: Final[dict[str, Any]] = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _style(hashsalt: str | None = None) -> AbstractContextManager[None]:
    """Our rcParams for the duration of a figure (matplotlib's global ones stay untouched)."""
    params = {**_RC, "svg.hashsalt": hashsalt} if hashsalt is not None else _RC
    # cast: matplotlib types the keys as a Literal of every rcParam name.
    return matplotlib.rc_context(cast(Any, params))


_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_SIZE = re.compile(r"<svg ")
_ID_REF = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def svg_text(fig: Figure, prefix: str) -> str:
    """`fig` as an `<svg>` element to inline (see the module docstring); ids begin `prefix-`."""
    with _style(prefix):
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = _METADATA.sub("", _PROLOGUE.sub("", buffer.getvalue(), count=1), count=1)
    # Its natural size, narrower (and as much lower) where the page is narrower.
    text = _SIZE.sub('<svg role="img" style="max-width:100%;height:auto" ', text, count=1)
    return _ID_REF.sub(lambda m: f"{m[1]}{prefix}-{m[2]}", text)


def _figure(width: float, height: float) -> Figure:
    with _style():
        return Figure(figsize=(width, height), layout="constrained")


def _luminance(colour: Any) -> float:
    """Relative luminance of a colour (0 black, 1 white): dark cells get white labels."""
    r, g, b = to_rgb(colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def heatmap(
    matrix: Matrix,
    *,
    prefix: str,
    title: str,
    colorbar: str,
    cmap: str = "Reds",
    value_format: str = "{:.0%}",
    vmin: float = 0.0,
    vmax: float = 1.0,
    diagonal: str | None = None,
) -> str:
    """One rectangle per cell (gid `<prefix>-heatcell-<row>-<column>`, so a page or a test can
    count and find them), coloured by value and labelled with it; a cell without data is grey
    and labelled "n/a" (`diagonal`, where given, labels the diagonal's cells instead)."""
    n_rows, n_cols = len(matrix.rows), len(matrix.columns)
    with _style():
        fig = _figure(min(16.0, 2.5 + 0.75 * n_cols), 1.6 + 0.38 * n_rows)
        ax = fig.add_subplot()
        colours: Colormap = matplotlib.colormaps[cmap]
        for i, row in enumerate(matrix.values):
            for j, value in enumerate(row):
                missing = value is None or not math.isfinite(value)
                share = 0.0 if missing else (float(value) - vmin) / ((vmax - vmin) or 1.0)  # type: ignore[arg-type]
                colour = "#e5e5e5" if missing else colours(min(1.0, max(0.0, share)))
                cell = Rectangle((j, i), 1, 1, facecolor=colour, edgecolor="white", linewidth=1)
                cell.set_gid(f"{HEAT_CELL}-{i}-{j}")
                ax.add_patch(cell)
                if i == j and diagonal is not None:
                    label = diagonal
                else:
                    label = "n/a" if missing else value_format.format(value)
                dark = not missing and _luminance(colour) < 0.45
                ax.text(
                    j + 0.5,
                    i + 0.5,
                    label,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "#222222",
                )
        ax.set_xlim(0, max(1, n_cols))
        ax.set_ylim(max(1, n_rows), 0)
        ax.set_xticks([j + 0.5 for j in range(n_cols)], list(matrix.columns))
        ax.set_yticks([i + 0.5 for i in range(n_rows)], list(matrix.rows))
        ax.tick_params(axis="x", labelrotation=35)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.tick_params(length=0)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(title)
        scale = matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(vmin, vmax), cmap=colours
        )
        fig.colorbar(scale, ax=ax, label=colorbar, shrink=0.8)
        return svg_text(fig, prefix)


def histogram(
    values: Sequence[float],
    *,
    prefix: str,
    title: str,
    xlabel: str,
    bins: int = 30,
    value_range: tuple[float, float] | None = None,
) -> str:
    """A histogram of `values` (finite numbers; the caller says elsewhere how many were missing)."""
    with _style():
        fig = _figure(5.0, 2.6)
        ax = fig.add_subplot()
        ax.hist(list(values), bins=bins, range=value_range, color="#4c72b0", edgecolor="white")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pairs")
        return svg_text(fig, prefix)


def grouped_bars(
    counts: Mapping[str, Mapping[str, int]],
    *,
    prefix: str,
    title: str,
    categories: Sequence[str],
    ylabel: str,
) -> str:
    """Bars of `counts[group][category]`, one group per key, side by side per category."""
    groups = list(counts)
    with _style():
        fig = _figure(6.0, 2.8)
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(groups))
        for g, group in enumerate(groups):
            xs = [c + (g - (len(groups) - 1) / 2) * width for c in range(len(categories))]
            heights = [counts[group].get(category, 0) for category in categories]
            ax.bar(xs, heights, width=width, label=group)
        ax.set_xticks(range(len(categories)), list(categories))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8)
        return svg_text(fig, prefix)
