"""Sliding-window occlusion (Zeiler & Fergus 2014), batched.

A ``window x window`` square (all channels) is replaced by ``baseline`` (in normalised pixel
space: 0 is the image processor's mean colour) at every ``stride`` step; a pixel's attribution is
the mean drop of the image-prompt score over the windows covering it, as in captum's
``Occlusion`` (windows start at multiples of ``stride``; the last one may overhang the border).
An image paired with several prompts is occluded and embedded once for all of them.
The pixel map is averaged over each patch to give the ``[B, gh, gw]`` map.

Why not captum: it explains one (input, target) at a time, so an image asked about several
prompts is occluded and re-encoded for each of them, and with its default settings each forward
carries one window per image. Here the occluded copies of each distinct image are embedded once,
64 of them per forward, and scored against all of that image's prompts (whose embeddings are
computed once), with fused attention (the copies need scores, not attention probabilities).
``benchmarks/grounding.py`` measures both with one and with four prompts per image, captum with
eager and with fused attention, and checks that both give the same map. With one prompt per image
and captum batched as well, both run one forward pass per copy; ours scores through the adapter's
``occluded_embeds_for_scoring`` (CLIP: the last layer for the CLS token only, the layers below with
stacked projections and a folded activation; see ``adapters/clip_fast.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from workers.probes.errors import ProbeInputError
from workers.probes.registry import register
from workers.probes.relevance import chunks

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


def window_rows(size: int, window: int, stride: int) -> torch.Tensor:
    """``[N, size]`` indicators of the 1-D window positions; the 2-D windows are their outer
    products (row position ``i``, column position ``j``), which keeps memory at ``O(N * size)``
    instead of one full-size mask per window."""
    if not 1 <= window <= size:
        raise ProbeInputError(f"occlusion window must be in 1..{size}, got {window}")
    if not 1 <= stride <= window:
        raise ProbeInputError(f"occlusion stride must be in 1..window ({window}), got {stride}")
    starts = [k * stride for k in range(math.ceil((size - window) / stride) + 1)]
    rows = torch.zeros(len(starts), size)
    for k, start in enumerate(starts):
        rows[k, start:start + window] = 1.0
    return rows


@torch.no_grad()
def occlusion_pixels(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *,
                     window: int | None = None,
                     stride: int | None = None, baseline: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """Pixel-resolution occlusion attribution ``[B, S, S]`` (what captum's ``Occlusion`` returns
    for each channel with a window spanning all channels)."""
    prompts = adapter.pair_prompts(pixel_values, prompts)
    window = adapter.patch_size if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    pixel_values = pixel_values.to(adapter.device)
    rows = window_rows(adapter.image_size, window, stride).to(adapter.device)  # [N, S]
    n_pos = rows.shape[0]
    starts = rows.argmax(1)  # [N]: each 1-D window position's first pixel ...
    ends = starts + rows.sum(1).long()  # ... and one past its last (the last window may be cut by the border)
    n_images, n_windows = pixel_values.shape[0], n_pos * n_pos

    # An image explained for several prompts is occluded once: its occluded copies are embedded
    # once and scored against each of its prompts (the text tower never runs on the copies).
    unique, owner = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
    unique = unique.view(-1, *pixel_values.shape[1:])
    n_unique = unique.shape[0]
    text = adapter.text_embeds(prompts)  # [B, E], each prompt encoded once
    base = adapter.pair_score(adapter.image_embeds(pixel_values), text)  # [B]
    drops = torch.empty(n_images, n_windows, device=adapter.device)
    with adapter.fused_attention():  # scores only: no attention probabilities needed
        for s in chunks(n_unique * n_windows, batch_size):
            rows_of_chunk = torch.arange(s.start, s.stop, device=adapter.device)
            img, win = rows_of_chunk // n_windows, rows_of_chunk % n_windows
            i_row, i_col = win // n_pos, win % n_pos
            boxes = torch.stack([starts[i_row], ends[i_row], starts[i_col], ends[i_col]], dim=1)  # [n, 4]
            embeds = adapter.occluded_embeds_for_scoring(unique, img, boxes, baseline)
            scores = adapter.similarity(embeds, text)  # [n, B]: every prompt
            i, b = torch.nonzero(owner[None, :] == img[:, None], as_tuple=True)  # copy i belongs to pair b
            drops[b, win[i]] = base[b] - scores[i, b]
    drops = drops.view(n_images, n_pos, n_pos)

    # sum over windows of drop * mask, then divide by how many windows cover each pixel
    total = rows.T @ drops @ rows  # [B, S, S]
    coverage = rows.sum(0)[:, None] * rows.sum(0)[None, :]
    return torch.where(coverage > 0, total / coverage.clamp(min=1), torch.zeros_like(total))


@register("occlusion")
def occlusion(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str], *,
              window: int | None = None, stride: int | None = None, baseline: float = 0.0,
              batch_size: int = 64) -> torch.Tensor:
    """Occlusion map ``[B, gh, gw]``: score drop when a region is hidden (positive = region supports
    the match). ``window`` defaults to the patch size, ``stride`` to half of it; ``batch_size``
    occluded copies (of any of the images) go through the image tower at once."""
    # 64 copies per forward by default: the activations then stay in a CPU's cache (larger batches
    # only pay off on a GPU; see benchmarks/results/).
    pixel_map = occlusion_pixels(adapter, pixel_values, prompts, window=window, stride=stride, baseline=baseline,
                                 batch_size=batch_size)
    patch = adapter.patch_size
    gh, gw = adapter.grid
    n = pixel_map.shape[0]
    grid = pixel_map[:, :gh * patch, :gw * patch].reshape(n, gh, patch, gw, patch).mean(dim=(2, 4))
    return grid.float().cpu()
