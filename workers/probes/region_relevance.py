"""How much of an explanation lands on one region of the image (an adversarial patch, injected text).

An attack that works by capturing the model's attention shows it in the explanation: the share of
relevance on the attacker's region far above the region's share of the image. Both attack probes
(``patch_attack``, ``prompt_injection``) and the typographic attack measure it the same way here:

- maps come from the grounding method validated for dual encoders (``chefer`` by default, through
  ``explanations.explain``) or, for generative models, from token attribution of the generated
  words (``token_attribution``: gradient-weighted attention through the decoder);
- a region is a box in the *model input's* pixels (``S x S``); each grid cell counts with the
  fraction of it the box covers, so a box that cuts a cell in half gets half its relevance;
- the share is the map's (non-negative) mass on the region over its total mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter, FusionAdapter


Box = tuple[float, float, float, float]


def cell_coverage(grid: tuple[int, int], image_size: int, box: Box) -> np.ndarray:
    """``[gh, gw]``: the fraction of each grid cell of an ``image_size`` square input inside ``box``
    (``x0, y0, x1, y1`` in input pixels)."""
    gh, gw = grid
    x0, y0, x1, y1 = box
    xs = np.linspace(0, image_size, gw + 1)
    ys = np.linspace(0, image_size, gh + 1)
    cover_x = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None) / np.diff(xs)
    cover_y = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None) / np.diff(ys)
    return cover_y[:, None] * cover_x[None, :]


def share_on_region(grid_map: torch.Tensor | np.ndarray, coverage: np.ndarray) -> float:
    """Share of the map's non-negative mass inside the region (the region's area share when the map
    is empty: an explanation that says nothing says nothing about the region either)."""
    m = np.clip(np.asarray(grid_map.detach().cpu() if isinstance(grid_map, torch.Tensor) else grid_map,
                           dtype=np.float64), 0, None)
    total = m.sum()
    if not np.isfinite(total) or total <= 0:
        return float(coverage.mean())
    return float((m * coverage).sum() / total)


def scale_box(box: Box, size: tuple[int, int], image_size: int) -> Box:
    """A box in a stored ``(width, height)`` image -> input pixels after squashing to ``image_size``."""
    w, h = size
    sx, sy = image_size / w, image_size / h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def dual_maps(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str],
              method: str = "chefer") -> torch.Tensor:
    """``[B, gh, gw]`` maps of ``method`` for image b explained with prompt b."""
    from workers.probes.explanations import explain

    return explain(adapter, method, pixel_values, list(prompts))


def fusion_caption_map(adapter: FusionAdapter, pixel_values: torch.Tensor, prompt: str, *, words: Sequence[str] = (),
                       max_new_tokens: int = 24) -> tuple[str, np.ndarray | None]:
    """Greedy caption of one image (``pixel_values`` ``[1, 3, S, S]``) and the mean token-attribution
    image map of its generated tokens that are among ``words`` (all generated tokens if none is, or
    ``words`` is empty); ``None`` when nothing was generated."""
    from workers.probes.errors import ProbeInputError
    from workers.probes.token_attribution import generate_and_attribute, to_attribution

    enc = adapter.encode(prompt)
    try:
        generated, rows = generate_and_attribute(adapter, enc, None, max_new_tokens, pixel_values=pixel_values)
    except ProbeInputError:  # the model ended the text at once
        return "", None
    att = to_attribution(adapter, enc, generated, rows, prompt)
    maps = att.image.get("chefer")
    if maps is None or len(maps) == 0:
        return att.caption, None
    wanted = {w.lower() for w in words}
    picked = [t for t, tok in enumerate(att.generated_tokens) if tok.strip("▁Ġ ").lower() in wanted]
    return att.caption, maps[picked or list(range(len(maps)))].mean(axis=0)
