"""Shared matplotlib figures for probes: heatmap overlays, grids of them, and perturbation curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no ``pyplot``), so
workers never touch a GUI backend or pyplot's global figure list. Callers own the figures:
``save(fig, path)`` writes one; the Celery side stores ``ProbeResult.figures``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from workers.probes.captions import describe as describe  # probes describe their figures through this module
from workers.probes.captions import png_metadata
from workers.probes.palette import colour

Box = Sequence[float]


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _dense(heatmap: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    """A map of any resolution -> ``[height, width]`` in [0, 1] (bilinear, min-max)."""
    tensor = torch.as_tensor(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap),
                             dtype=torch.float32)
    if tensor.shape != (height, width):
        tensor = torch.nn.functional.interpolate(tensor[None, None], size=(height, width), mode="bilinear",
                                                 align_corners=False)[0, 0]
    array = tensor.numpy()
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


#: Perceptually uniform, dark where relevance is low; its colours are drawn with an opacity that
#: grows with relevance, so they rarely compete with the image's own.
HEATMAP_CMAP = "inferno"


def draw_image(ax: Axes, image: Image.Image, *, boxes: Sequence[Box] = (), title: str | None = None,
               fontsize: float = 9) -> None:
    """The image itself, in colour, with ground-truth ``boxes`` in green (beside overlays, which
    show it in grey)."""
    ax.imshow(np.asarray(image.convert("RGB")))
    _draw_boxes(ax, boxes)
    if title:
        ax.set_title(title, fontsize=fontsize)
    ax.set_axis_off()


def _draw_boxes(ax: Axes, boxes: Sequence[Box]) -> None:
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))


def draw_overlay(ax: Axes, image: Image.Image, heatmap: torch.Tensor | np.ndarray, *, boxes: Sequence[Box] = (),
                 alpha: float = 0.85, cmap: str = HEATMAP_CMAP, title: str | None = None,
                 point: tuple[float, float] | None = None) -> None:
    """Draw ``heatmap`` (any resolution, rescaled to [0, 1]) over ``image`` on ``ax``, with
    ground-truth ``boxes`` in green and the map's maximum ``point`` as a white cross.

    The image is shown in grey, and the heatmap's opacity grows with relevance, from 0 where it is
    lowest to ``alpha`` where it is highest. A uniformly tinted overlay (jet at one opacity) hides
    the image where nothing is relevant, and a blue object under jet's blue reads as "not
    relevant"; here the shapes stay visible and no object's own colour can be mistaken for the
    scale (figures that need the colours show the image beside the overlays).
    """
    grey = np.asarray(image.convert("L"))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    dense = _dense(heatmap, grey.shape[0], grey.shape[1])
    ax.imshow(dense, cmap=cmap, alpha=alpha * dense, vmin=0.0, vmax=1.0)
    _draw_boxes(ax, boxes)
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="+", color="white", markersize=12, markeredgewidth=2)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def relevance_colourbar(figure: Figure, axes: Axes | Sequence[Axes], *, cmap: str = HEATMAP_CMAP,
                        label: str = "relevance (min-max scaled per map)", **kwargs: Any) -> None:
    """One colour bar for overlays drawn by :func:`draw_overlay`: their scale is the colour map over
    [0, 1] (the per-pixel opacity is no scale of its own)."""
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
    figure.colorbar(scale, ax=axes, label=label, **kwargs)


def box_legend(figure: Figure, label: str = "annotated object (ground truth)", *, colour: str = "lime",
               extra: Sequence[tuple[str, str]] = ()) -> None:
    """The legend of the boxes drawn on a figure (``extra``: more ``(label, colour)`` outlines), below
    the panels, where it covers none of them."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2, label=text) for text, c in ((label, colour), *extra)]
    figure.legend(handles=handles, loc="outside lower center", frameon=False, fontsize=9, ncol=len(handles))


def heatmap_overlay(image: Image.Image, heatmap: torch.Tensor | np.ndarray, *, boxes: Sequence[Box] = (),
                    title: str | None = None, alpha: float = 0.85, cmap: str = HEATMAP_CMAP,
                    point: tuple[float, float] | None = None) -> Figure:
    """The image as it is, and beside it the heatmap overlaid (with a colour bar)."""
    figure = new_figure(8.5, 4.4)
    original, ax = figure.subplots(1, 2)
    draw_image(original, image, boxes=boxes, title="image")
    draw_overlay(ax, image, heatmap, boxes=boxes, alpha=alpha, cmap=cmap, title=title, point=point)
    relevance_colourbar(figure, ax, cmap=cmap, label="relevance (min-max scaled)", fraction=0.046, pad=0.02)
    marks = []
    if boxes:
        box_legend(figure)
        marks.append("green boxes are the annotated objects")
    if point is not None:
        marks.append("the white cross is the map's maximum")
    return describe(figure, "One explanation heatmap", columns=f"the image as it is, then {title or 'the heatmap'} "
                    "over the image in grey", colour="relevance, min-max scaled (colour bar on the right)",
                    marks="; ".join(marks) or None)


#: Width at which page-sized figures are drawn: about the report's text column (A4 less margins), so
#: that their 9 pt labels print at about that size.
PAGE_WIDTH = 7.4
#: A grid page holds at most this many examples (rows) and this many maps (columns besides the image):
#: every panel prints large enough to see where the heat lies, and a page is wider than tall, so that
#: a report prints it at the text column's width in at most half of a page.
ROWS_PER_PAGE = 2
MAPS_PER_PAGE = 4


def heatmap_grid(images: Sequence[Image.Image], maps: Mapping[str, Sequence[torch.Tensor | np.ndarray]], *,
                 row_titles: Sequence[str] | None = None, boxes: Sequence[Sequence[Box]] | None = None,
                 alpha: float = 0.85, cmap: str = HEATMAP_CMAP, what: str = "Example explanations",
                 rows: str | None = None, page: str = "") -> Figure:
    """Rows = images, columns = the image itself then one overlay per entry of ``maps``
    (``{column title: [map per image]}``), with one colour bar for every overlay and a legend for
    the annotated-object boxes. ``row_titles`` (e.g. the prompt and the model's score) head each row.

    Drawn at the width of a report page; :func:`heatmap_grid_pages` splits a grid too large for one.
    ``what``/``rows``/``page`` word the figure's description (what it is, what a row is, which part
    of a larger grid it is)."""
    import textwrap

    columns = ["image", *maps]
    # One panel size for every page of a split grid, so that all its pages print at the same scale.
    cell = (PAGE_WIDTH - 0.9) / (max(MAPS_PER_PAGE, len(maps)) + 1)
    title_lines = max((min(3, len(textwrap.wrap(str(t), 60))) for t in row_titles or ()), default=0)
    figure = new_figure(cell * len(columns) + 0.9, len(images) * (cell + 0.17 * title_lines + 0.05) + 0.75)
    axes = figure.subplots(len(images), len(columns), squeeze=False)
    for row, image in enumerate(images):
        row_boxes = boxes[row] if boxes is not None else ()
        draw_image(axes[row][0], image, boxes=row_boxes)
        for column, name in enumerate(maps, start=1):
            draw_overlay(axes[row][column], image, maps[name][row], boxes=row_boxes, alpha=alpha, cmap=cmap)
        title = row_titles[row] if row_titles is not None else None
        heads = columns if row == 0 else []
        if title:
            # The row's title starts over its image and runs over the row's other panels, which carry
            # no title of their own below the first row.
            text = "\n".join(textwrap.wrap(str(title), 60)[:3])
            axes[row][0].set_title(text + ("\n\n" if heads else ""), loc="left", fontsize=9)
        for column, head in enumerate(heads):
            axes[row][column].set_title(head, fontsize=9.5, fontweight="bold")
    if maps:
        relevance_colourbar(figure, axes[:, 1:].ravel().tolist(), cmap=cmap, fraction=0.04, pad=0.01)
    has_boxes = boxes is not None and any(len(b) for b in boxes)
    if has_boxes:
        box_legend(figure)
    return describe(
        figure, what + (f" ({page})" if page else ""),
        rows=rows or ("one example each, headed by its prompt" if row_titles else "one example each"),
        columns="the image in colour" + (" with the annotated object boxed in green" if has_boxes else "")
                + ", then " + ", ".join(maps) + " over the image in grey (one explanation method or model each)",
        colour="relevance, min-max scaled per map; warmer and more opaque = more relevant (colour bar on the right)")


def split_even(count: int, size: int) -> list[range]:
    """``range(count)`` in nearly equal consecutive parts of at most ``size``."""
    parts = max(1, -(-count // size))
    bounds = [round(k * count / parts) for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def heatmap_grid_pages(images: Sequence[Image.Image], maps: Mapping[str, Sequence[torch.Tensor | np.ndarray]], *,
                       row_titles: Sequence[str] | None = None, boxes: Sequence[Sequence[Box]] | None = None,
                       rows_per_page: int = ROWS_PER_PAGE, maps_per_page: int = MAPS_PER_PAGE,
                       **kwargs: Any) -> list[Figure]:
    """:func:`heatmap_grid` split into pages of at most ``rows_per_page`` examples and
    ``maps_per_page`` maps (the image column repeats on every page), each readable on its own."""
    names = list(maps)
    row_parts = split_even(len(images), rows_per_page)
    map_parts = split_even(len(names), maps_per_page) if names else [range(0)]
    pages = []
    for rows in row_parts:
        for cols in map_parts:
            part = []
            if len(row_parts) > 1:
                part.append(f"examples {rows.start + 1}-{rows.stop} of {len(images)}")
            if len(map_parts) > 1:
                part.append(f"maps {cols.start + 1}-{cols.stop} of {len(names)}")
            pages.append(heatmap_grid(
                [images[r] for r in rows], {names[c]: [maps[names[c]][r] for r in rows] for c in cols},
                row_titles=[row_titles[r] for r in rows] if row_titles is not None else None,
                boxes=[boxes[r] for r in rows] if boxes is not None else None, page=", ".join(part), **kwargs))
    return pages


def paged(name: str, pages: Sequence[Figure]) -> dict[str, Figure]:
    """``{name: figure}`` for a one-page figure, ``{name_1: ..., name_2: ...}`` for several (names
    that sort in page order, for the ``ProbeResult.figures`` of a probe)."""
    if len(pages) == 1:
        return {name: pages[0]}
    width = len(str(len(pages)))
    return {f"{name}_{k:0{width}d}": page for k, page in enumerate(pages, start=1)}


def perturbation_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, title: str = "",
                        ylabel: str = "normalised score") -> Figure:
    """Deletion/insertion-style curves: ``{label: (x, y)}``, AUC in the legend. Labels containing
    "random" are drawn dashed, so baselines read as baselines."""
    figure = new_figure(6.2, 3.5)
    ax = figure.add_subplot()
    for label, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        auc = float(np.trapezoid(y, x)) if len(x) > 1 else float("nan")
        ax.plot(x, y, linestyle="--" if "random" in label else "-", color=colour(label),
                label=f"{label} (AUC {auc:.3f})")
    ax.set_xlabel("share of patches changed")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    figure.legend(fontsize=8, loc="outside right upper")  # outside the axes: never over a curve
    return describe(figure, f"{title or 'Perturbation curves'}: the model's score as patches are changed in the "
                            "order each explanation method ranks them",
                    axes=f"x, share of patches changed; y, {ylabel}",
                    marks="one colour per method, the same in every figure; dashed lines are random orders; the "
                          "legend gives each curve's area under it (AUC)")


def save(figure: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``figure`` (format from the suffix, e.g. ``.png``) and return the path."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        figure.savefig(path, dpi=dpi, metadata=png_metadata(figure))
    else:
        figure.savefig(path, dpi=dpi)
    return path
