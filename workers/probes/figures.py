"""Shared matplotlib figures for probes: heatmap overlays, grids of them, and perturbation curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no ``pyplot``), so
workers never touch a GUI backend or pyplot's global figure list. Callers own the figures:
``save(fig, path)`` writes one; the Celery side stores ``ProbeResult.figures``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

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


def heatmap_overlay(image: Image.Image, heatmap: torch.Tensor | np.ndarray, *, boxes: Sequence[Box] = (),
                    title: str | None = None, alpha: float = 0.85, cmap: str = HEATMAP_CMAP,
                    point: tuple[float, float] | None = None) -> Figure:
    """The image as it is, and beside it the heatmap overlaid (with a colour bar)."""
    figure = new_figure(8.5, 4.4)
    original, ax = figure.subplots(1, 2)
    draw_image(original, image, boxes=boxes, title="image")
    draw_overlay(ax, image, heatmap, boxes=boxes, alpha=alpha, cmap=cmap, title=title, point=point)
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)  # the overlay's per-pixel opacity is no scale
    figure.colorbar(scale, ax=ax, fraction=0.046, pad=0.02, label="relevance (min-max scaled)")
    return figure


def heatmap_grid(images: Sequence[Image.Image], maps: Mapping[str, Sequence[torch.Tensor | np.ndarray]], *,
                 row_titles: Sequence[str] | None = None, boxes: Sequence[Sequence[Box]] | None = None,
                 alpha: float = 0.85, cmap: str = HEATMAP_CMAP, cell: float = 2.4) -> Figure:
    """Rows = images, columns = the image itself then one overlay per entry of ``maps``
    (``{column title: [map per image]}``), with one colour bar for every overlay and a legend for
    the annotated-object boxes. ``row_titles`` (e.g. the prompt and the model's score) are wrapped
    above each row's image so that they stay legible when the figure is scaled to a page."""
    import textwrap

    from matplotlib.lines import Line2D

    columns = ["image", *maps]
    figure = new_figure(cell * len(columns) + 0.9, cell * len(images) + 0.9)
    axes = figure.subplots(len(images), len(columns), squeeze=False)
    for row, image in enumerate(images):
        row_boxes = boxes[row] if boxes is not None else ()
        title = row_titles[row] if row_titles is not None else None
        draw_image(axes[row][0], image, boxes=row_boxes,
                   title="\n".join(textwrap.wrap(str(title), 28)[:3]) if title else None, fontsize=9)
        for column, name in enumerate(maps, start=1):
            draw_overlay(axes[row][column], image, maps[name][row], boxes=row_boxes, alpha=alpha, cmap=cmap,
                         title=name if row == 0 else None)
            if row == 0:
                axes[row][column].set_title(name, fontsize=11, fontweight="bold")
    if maps:
        scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        figure.colorbar(scale, ax=axes[:, 1:].ravel().tolist(), fraction=0.03, pad=0.01,
                        label="relevance (min-max scaled per map)")
    figure.legend(handles=[Line2D([], [], color="lime", linewidth=2, label="annotated object (ground truth)")],
                  loc="outside lower center", frameon=False, fontsize=9)
    return figure


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
    return figure


def save(figure: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``figure`` (format from the suffix, e.g. ``.png``) and return the path."""
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path
