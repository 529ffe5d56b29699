"""Summary figures a report draws from stored metrics (matplotlib, Agg, deterministic PNG).

Probe runs already store their own figures (heatmap grids, curves) as evidence artifacts; the
report embeds those as they are. The figures here summarise *metrics* where a picture reads faster
than a table: faithfulness per method, deletion/insertion curves, TCAV bars with corrected
p-values, robustness curves, attention summaries.

Determinism: the same numbers must give the same bytes, or the report's PDF would change between
two renders of the same case state. We pin the style and fonts, strip PNG metadata (matplotlib
writes its version as "Software") and fix ``svg.hashsalt`` in case anyone switches to SVG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from workers.probes.palette import REFERENCE, colour  # noqa: E402  (plain module: no torch, no Django)

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

_RC: dict[RcKeyType, Any] = {
    "svg.hashsalt": "loupe-report",
    "font.family": "DejaVu Sans",
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "path.simplify": True,
}
SIGNIFICANT = "#0072B2"
NOT_SIGNIFICANT = "#d9d9d9"


@contextmanager
def _figure(width: float = 6.4, height: float = 2.8) -> Iterator[tuple]:
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(width, height))
        try:
            yield fig, ax
        finally:
            plt.close(fig)


def _png(fig, *, bottom: float = 0.2, left: float = 0.11, right: float = 0.97) -> bytes:
    # Fixed margins instead of tight_layout(): tight_layout draws the figure an extra time; our
    # labels are short and truncated, so fixed room suffices. ``right`` < 1 leaves room for a legend
    # placed outside the axes, where it cannot cover data.
    fig.subplots_adjust(left=left, right=right, top=0.88, bottom=bottom)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def bar_chart(title: str, values: Mapping[str, float], *, ylabel: str = "",
              reference: float | None = None, reference_label: str = "") -> bytes:
    """Horizontal-label bar chart of ``label -> value`` (non-finite values are skipped)."""
    items = [(label, v) for label, raw in values.items() if (v := _finite(raw)) is not None]
    with _figure(6.4, 2.6 + 0.05 * len(items)) as (fig, ax):
        if not items:
            ax.text(0.5, 0.5, "no numeric values recorded", ha="center", va="center", transform=ax.transAxes)
        else:
            labels, numbers = zip(*items, strict=True)
            ax.bar(range(len(numbers)), numbers, color=[colour(label) for label in labels])
            tilted = len(labels) > 4
            ax.set_xticks(range(len(labels)), labels, rotation=30 if tilted else 0, ha="right" if tilted else "center")
            if reference is not None:
                ax.axhline(reference, color=REFERENCE, linestyle="--", linewidth=0.8, label=reference_label or None)
                if reference_label:
                    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        return _png(fig, bottom=0.32 if len(items) > 4 else 0.14, right=0.78 if reference_label else 0.97)


def bar_panels(panels: Sequence[tuple[str, Mapping[str, float], float | None]], *, reference_label: str = "") -> bytes:
    """Several small bar charts side by side (2 per row), one colour per bar label across all panels.

    ``panels``: ``(title, {label: value}, reference or None)``; the reference is a dashed line."""
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / columns))
    with matplotlib.rc_context(_RC):
        fig, axes = plt.subplots(rows, columns, figsize=(6.6, 2.1 * rows + 0.3), squeeze=False)
        try:
            drawn_reference = False
            # The grid can have one cell more than there are panels; that cell is hidden below.
            for ax, (title, values, reference) in zip(axes.flat, panels, strict=False):
                items = [(label, v) for label, raw in values.items() if (v := _finite(raw)) is not None]
                if items:
                    labels, numbers = zip(*items, strict=True)
                    ax.bar(range(len(numbers)), numbers, color=[colour(label) for label in labels])
                    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30 if len(labels) > 4 else 0,
                                  ha="right" if len(labels) > 4 else "center")
                if reference is not None:
                    ax.axhline(reference, color=REFERENCE, linestyle="--", linewidth=0.8)
                    drawn_reference = True
                ax.set_title(title, fontsize=8.5)
            for ax in list(axes.flat)[len(panels):]:
                ax.set_visible(False)
            if drawn_reference and reference_label:
                fig.legend(handles=[plt.Line2D([], [], color=REFERENCE, linestyle="--", label=reference_label)],
                           loc="lower center", ncol=1, frameon=False, fontsize=7)
            fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.16 if drawn_reference else 0.1,
                                hspace=0.75, wspace=0.25)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", metadata={"Software": None})
            return buffer.getvalue()
        finally:
            plt.close(fig)


def curves(title: str, series: Mapping[str, tuple[Sequence[object], Sequence[object]]], *,
           xlabel: str, ylabel: str) -> bytes:
    """Line plot of several ``name -> (x, y)`` series (deletion/insertion, robustness curves); points
    with a value that is not a finite number (missing in stored metrics) are skipped."""
    with _figure() as (fig, ax):
        drawn = 0
        for name, (xs, ys) in series.items():
            # A ragged series is drawn up to its shorter side rather than failing the whole report.
            points = [(fx, fy) for x, y in zip(xs, ys, strict=False)
                      if (fx := _finite(x)) is not None and (fy := _finite(y)) is not None]
            if not points:
                continue
            px, py = zip(*points, strict=True)
            ax.plot(px, py, marker="o", markersize=2.5, linewidth=1.3, color=colour(name), label=name)
            drawn += 1
        if drawn:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
        else:
            ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        return _png(fig, bottom=0.16, right=0.72 if drawn else 0.97)


def tcav_bars(title: str, rows: Sequence[Mapping[str, object]], *, alpha: float = 0.05) -> bytes:
    """TCAV scores per concept; bars whose corrected p-value is not below ``alpha`` are hatched.

    ``rows``: dicts with ``concept``, ``score`` (0..1), optional ``score_std`` and ``p_corrected``.
    """
    from matplotlib.patches import Patch

    with _figure(7.0, 3.0) as (fig, ax):
        usable = [r for r in rows if _finite(r.get("score")) is not None]
        for index, row in enumerate(usable):
            p = _finite(row.get("p_corrected"))
            significant = p is not None and p < alpha
            ax.bar(index, _finite(row["score"]), yerr=_finite(row.get("score_std")) or 0,
                   color=SIGNIFICANT if significant else NOT_SIGNIFICANT, edgecolor="black", linewidth=0.5,
                   hatch=None if significant else "//", capsize=2)
            # p-values sit above the plotting area (y > 1), where no bar or error bar reaches.
            ax.text(index, 1.04, ("p=n/a" if p is None else f"p={p:.2g}") + (" *" if significant else ""),
                    ha="center", fontsize=6, clip_on=False)
        labels = [str(r.get("concept", "?"))[:24] for r in usable]
        tilt = len(usable) > 4 or len(usable) * max((len(label) for label in labels), default=0) > 48
        ax.set_xticks(range(len(usable)), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.axhline(0.5, color=REFERENCE, linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("concept influence (TCAV score)")
        ax.set_title(title, pad=14)
        ax.legend(handles=[Patch(facecolor=SIGNIFICANT, edgecolor="black",
                                 label=f"significant (corrected p < {alpha:g})"),
                           Patch(facecolor=NOT_SIGNIFICANT, edgecolor="black", hatch="//", label="not significant"),
                           plt.Line2D([], [], color=REFERENCE, linestyle="--", label="no influence (0.5)")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
        if not usable:
            ax.text(0.5, 0.5, "no TCAV scores recorded", ha="center", va="center", transform=ax.transAxes)
        return _png(fig, bottom=0.32 if tilt else 0.14, right=0.64)


def heatmap(title: str, matrix: Sequence[Sequence[float]], *, row_labels: Sequence[str] = (),
            col_labels: Sequence[str] = (), cmap: str = "viridis", value_format: str = "{:.2f}",
            value_range: tuple[float, float] | None = None, colorbar_label: str = "") -> bytes:
    """Annotated matrix (method agreement, attention summaries) with a labelled colour bar."""
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    with _figure(5.2, 0.6 + 0.42 * max(data.shape[0], 3)) as (fig, ax):
        ax.grid(False)
        vmin, vmax = value_range if value_range else (None, None)
        image = ax.imshow(data, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.04, label=colorbar_label or None)
        if row_labels:
            ax.set_yticks(range(len(row_labels)), [str(r)[:24] for r in row_labels])
        if col_labels:
            ax.set_xticks(range(len(col_labels)), [str(c)[:24] for c in col_labels], rotation=30, ha="right")
        if data.size <= 100:
            for (i, j), value in np.ndenumerate(data):
                if math.isfinite(value):
                    shade = image.cmap(image.norm(value))
                    dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
                    ax.text(j, i, value_format.format(value), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        ax.set_title(title)
        return _png(fig, bottom=0.25, left=0.2)
