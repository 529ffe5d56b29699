"""Heatmap overlays a reviewer can read.

Actor: a reviewer looking at an explanation figure. Where the map says "not relevant" they must
still see the image, and no object's own colour may pass for the heat scale.
"""

from __future__ import annotations

import math
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from workers.probes import captions, figures


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


# --- figures a reviewer can read in a report ------------------------------------------------------

def _colourbars(figure) -> list:
    return [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]


def _image_axes(figure) -> list:
    return [ax for ax in figure.axes if ax.get_images() and ax.get_label() != "<colorbar>"]


def _scene(seed: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (230, 230, 230))
    image.paste((200, 30, 30), (8 + seed, 8, 30 + seed, 30))
    return image


def test_a_large_grid_is_split_into_pages_that_each_show_every_example_with_a_colour_bar_and_box_legend():
    images = [_scene(k) for k in range(6)]
    methods = ("chefer", "gradcam", "rollout", "flow", "occlusion", "random")
    maps = {m: [np.random.default_rng(k).random((8, 8)) for k in range(6)] for m in methods}
    titles = [f'"a red square {k}" (score 0.{k}0)' for k in range(6)]
    pages = figures.heatmap_grid_pages(images, maps, boxes=[[(8, 8, 30, 30)]] * 6, row_titles=titles)
    assert len(pages) == math.ceil(6 / figures.ROWS_PER_PAGE) * math.ceil(6 / figures.MAPS_PER_PAGE) > 1
    shown: set[tuple[str, str]] = set()
    for page in pages:
        assert len(_colourbars(page)) == 1
        width, height = page.get_size_inches()
        assert width <= figures.PAGE_WIDTH + 1e-6 and height < width  # prints at the column's width
        panels = _image_axes(page)
        columns = [ax.get_title() for ax in panels if ax.get_title()]
        assert columns[0] == "image" and 1 < len(columns) <= figures.MAPS_PER_PAGE + 1
        assert len(panels) // len(columns) <= figures.ROWS_PER_PAGE
        legend_texts = [t.get_text() for legend in page.legends for t in legend.get_texts()]
        assert legend_texts == ["annotated object (ground truth)"]
        row_heads = [ax.get_title(loc="left").strip() for ax in panels if ax.get_title(loc="left")]
        shown |= {(head, column) for head in row_heads for column in columns[1:]}
        text = captions.description(page)
        assert text is not None and "Rows: one example each" in text and "Columns: the image" in text
        assert all(name in text for name in columns[1:])
    assert shown == {(t, m) for t in titles for m in methods}


def test_a_grid_that_fits_a_page_stays_one_figure_under_its_own_name():
    grid = figures.heatmap_grid_pages([_scene(0)], {"chefer": [np.ones((4, 4))]})
    assert list(figures.paged("examples", grid)) == ["examples"]
    assert list(figures.paged("examples", grid * 3)) == ["examples_1", "examples_2", "examples_3"]


def test_every_overlay_figure_a_probe_draws_has_a_colour_bar():
    import torch

    from workers.probes import tcav

    overlay = figures.heatmap_overlay(_scene(0), np.eye(4), boxes=[(8, 8, 30, 30)], title="chefer")
    localisation = tcav.figure_localisation([_scene(0), _scene(5)], torch.rand(2, 4, 4), "where 'stripes' sits")
    for figure in (overlay, localisation):
        assert len(_colourbars(figure)) == 1
        assert "Colour:" in (captions.description(figure) or "")


def test_the_caption_figure_shows_each_word_with_its_position_a_colour_bar_and_every_method():
    from workers.probes import token_attribution as ta

    tokens = ["▁a", "▁red", "▁square", "▁and", "▁a", "▁blue", "▁circle", "▁on", "▁grey"]
    methods = ("chefer", "chefer_full", "raw", "occlusion", "input_x_gradient", "integrated_gradients")
    rng = np.random.default_rng(0)
    att = ta.TokenAttribution(prompt="describe the image", generated_ids=list(range(9)), generated_tokens=tokens,
                              text_tokens=["describe", "the", "image"], text_positions=[0, 1, 2],
                              prediction_positions=list(range(2, 11)),
                              image={m: rng.random((9, 4, 4)) for m in methods},
                              text={m: rng.random((9, 3)) for m in methods},
                              caption="a red square and a blue circle on grey", n_prompt_text=3)
    pages = ta.caption_figures(_scene(0), att, boxes=[(8, 8, 30, 30)])
    headed: set[str] = set()
    rows: set[str] = set()
    for page in pages:
        assert len(_colourbars(page)) == 1
        words = [ax.get_title() for ax in _image_axes(page) if ax.get_title() not in ("", "image")]
        assert 0 < len(words) <= 4
        headed |= {w.split("\n")[0] for w in words}
        assert all(re.fullmatch(r"token \d of 9", w.split("\n")[1]) for w in words)
        text = captions.description(page) or ""
        assert "Rows: one attribution method each" in text and "Columns: the image" in text
        rows |= {ta.METHOD_LABELS[m] for m in methods if ta.METHOD_LABELS[m] in text}
        labels = [t.get_text() for legend in page.legends for t in legend.get_texts()]
        assert labels == ["annotated objects (ground truth)"]
    # the caption's words, not its stop words, each on a page, under every method
    assert headed == {"“red”", "“square”", "“blue”", "“circle”", "“grey”"}
    assert rows == {ta.METHOD_LABELS[m] for m in methods}


def test_a_figures_description_travels_inside_its_stored_png():
    from governance.evidence import figure_png

    figure = figures.heatmap_grid([_scene(0)], {"chefer": [np.ones((4, 4))]}, row_titles=["a red square"])
    stored = captions.png_description(figure_png(figure))
    assert stored is not None and stored.startswith("Example explanations. Rows: one example each")
    assert captions.png_description(b"not a png") is None
