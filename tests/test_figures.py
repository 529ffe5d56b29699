"""Heatmap overlays a reviewer can read.

Actor: a reviewer looking at an explanation figure. Where the map says "not relevant" they must
still see the image, and no object's own colour may pass for the heat scale.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from workers.probes import figures


def rendered(figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)


def test_it_leaves_the_image_visible_where_relevance_is_lowest_and_heats_only_the_rest():
    blue = Image.new("RGB", (64, 64), (40, 80, 230))
    heat = np.zeros((8, 8))
    heat[:, 4:] = 1.0  # the right half is relevant
    figure = Figure(figsize=(2, 2))
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    figures.draw_overlay(ax, blue, heat)
    pixels = rendered(figure)
    h, w, _ = pixels.shape
    left, right = pixels[h // 4: 3 * h // 4, w // 8: w // 4], pixels[h // 4: 3 * h // 4, 3 * w // 4: 7 * w // 8]
    grey = np.asarray(blue.convert("L"))[0, 0]
    # nothing relevant: the image itself, in grey (its blue is not on the heat scale)
    assert np.abs(left - grey).max() <= 2
    # relevant: the heat colour (inferno's bright end), clearly apart from the grey image
    assert np.abs(right.mean(axis=(0, 1)) - grey).max() > 80
    assert right[..., 0].mean() > right[..., 2].mean()  # warm, not blue


def test_it_shows_the_image_in_colour_beside_a_single_overlay():
    red = Image.new("RGB", (32, 32), (220, 30, 30))
    figure = figures.heatmap_overlay(red, np.ones((4, 4)), title="chefer: a red square")
    assert len(figure.axes) == 3  # the image, the overlay, the colour bar
    assert figure.axes[0].get_title() == "image"
    pixels = rendered(figure)
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).sum() > 100  # the red image
