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

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

_RC = {
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
PALETTE = ["#1f4e79", "#c0504d", "#9bbb59", "#8064a2", "#f79646", "#4bacc6", "#7f7f7f", "#2c7f6f"]


@contextmanager
def _figure(width: float = 6.4, height: float = 2.8) -> Iterator[tuple]:
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(width, height))
        try:
            yield fig, ax
        finally:
            plt.close(fig)


def _png(fig, *, bottom: float = 0.2, left: float = 0.11) -> bytes:
    # Fixed margins instead of tight_layout(): tight_layout draws the figure an extra time, which
    # made each summary figure ~50% slower; our labels are short and truncated, so fixed room suffices.
    fig.subplots_adjust(left=left, right=0.97, top=0.88, bottom=bottom)
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
            labels, numbers = zip(*items)
            ax.bar(range(len(numbers)), numbers, color=[PALETTE[i % len(PALETTE)] for i in range(len(numbers))])
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
            if reference is not None:
                ax.axhline(reference, color="black", linestyle="--", linewidth=0.8, label=reference_label or None)
                if reference_label:
                    ax.legend(loc="best", frameon=False)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        return _png(fig, bottom=0.32 if len(items) > 4 else 0.14)


def curves(title: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
           xlabel: str, ylabel: str) -> bytes:
    """Line plot of several ``name -> (x, y)`` series (deletion/insertion, robustness curves)."""
    with _figure() as (fig, ax):
        drawn = 0
        for index, (name, (xs, ys)) in enumerate(series.items()):
            points = [(x, y) for x, y in zip(xs, ys) if _finite(x) is not None and _finite(y) is not None]
            if not points:
                continue
            px, py = zip(*points)
            ax.plot(px, py, marker="o", markersize=2.5, linewidth=1.3, color=PALETTE[index % len(PALETTE)], label=name)
            drawn += 1
        if drawn:
            ax.legend(loc="best", frameon=False, fontsize=7, ncol=2 if drawn > 4 else 1)
        else:
            ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        return _png(fig, bottom=0.16)


def tcav_bars(title: str, rows: Sequence[Mapping[str, object]], *, alpha: float = 0.05) -> bytes:
    """TCAV scores per concept; bars whose corrected p-value is not below ``alpha`` are hatched.

    ``rows``: dicts with ``concept``, ``score`` (0..1), optional ``score_std`` and ``p_corrected``.
    """
    with _figure(6.4, 2.8) as (fig, ax):
        usable = [r for r in rows if _finite(r.get("score")) is not None]
        for index, row in enumerate(usable):
            p = _finite(row.get("p_corrected"))
            significant = p is not None and p < alpha
            ax.bar(index, _finite(row["score"]), yerr=_finite(row.get("score_std")) or 0,
                   color=PALETTE[0] if significant else "#d9d9d9", edgecolor="black", linewidth=0.5,
                   hatch=None if significant else "//", capsize=2)
            ax.text(index, 1.02, "p=n/a" if p is None else f"p={p:.3g}", ha="center", fontsize=6.5)
        ax.set_xticks(range(len(usable)), [str(r.get("concept", "?"))[:24] for r in usable],
                      rotation=30 if len(usable) > 4 else 0, ha="right" if len(usable) > 4 else "center")
        ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("TCAV score")
        ax.set_title(f"{title} (solid: corrected p < {alpha:g}; hatched: not significant)")
        if not usable:
            ax.text(0.5, 0.5, "no TCAV scores recorded", ha="center", va="center", transform=ax.transAxes)
        return _png(fig, bottom=0.32 if len(usable) > 4 else 0.14)


def heatmap(title: str, matrix: Sequence[Sequence[float]], *, row_labels: Sequence[str] = (),
            col_labels: Sequence[str] = (), cmap: str = "viridis", value_format: str = "{:.2f}") -> bytes:
    """Annotated matrix (method agreement, attention summaries)."""
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    with _figure(5.2, 0.6 + 0.42 * max(data.shape[0], 3)) as (fig, ax):
        ax.grid(False)
        image = ax.imshow(data, cmap=cmap, aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.04)
        if row_labels:
            ax.set_yticks(range(len(row_labels)), [str(r)[:24] for r in row_labels])
        if col_labels:
            ax.set_xticks(range(len(col_labels)), [str(c)[:24] for c in col_labels], rotation=30, ha="right")
        if data.size <= 100:
            for (i, j), value in np.ndenumerate(data):
                if math.isfinite(value):
                    ax.text(j, i, value_format.format(value), ha="center", va="center", fontsize=6.5, color="white")
        ax.set_title(title)
        return _png(fig, bottom=0.25, left=0.2)
