"""Faithfulness metrics for grounding maps: is the explanation right, and does the model agree?

Two families:

*Localisation* against ground-truth boxes (the map is upsampled bilinearly to the stored image):

- **Pointing game** (Zhang et al., ECCV 2016): a hit when the map's maximum lies within a
  ground-truth box, with a tolerance of 15 px at 224 px, scaled to the image by
  ``sqrt(width * height) / 224`` (the side of the square of the same area, so a 448x448 image gets
  30 px). The chance level is exact, not sampled: the share of pixels within tolerance of a box.
- **Energy-based pointing game** (Wang et al., Score-CAM, 2020): the share of the map's mass
  inside the boxes, after shifting the map so its minimum is 0. A map without information
  (constant) scores the boxes' area share, which is also the chance level.

*Perturbation* through the model (Petsiuk et al., RISE, 2018), at patch granularity:

- **Deletion**: replace patches with a baseline in order of decreasing relevance; **insertion**:
  reveal them on the baseline in the same order. The AUC is the area under the score curve over
  the share of patches changed (0..1). Faithful maps give a *low* deletion AUC and a *high*
  insertion AUC compared to a random order of the same patches (the baseline reported beside them).

  The score on the curve is normalised to [0, 1] in one of two ways:

  - ``probability`` (used whenever the dataset has 2 or more distinct prompts): the zero-shot
    probability of the example's prompt among the dataset's distinct prompts (softmax over the
    model's logit-scaled scores), the dual-encoder analogue of RISE's class probability.
  - ``normalised_score`` (a single-prompt dataset, where a softmax is always 1): the raw score
    rescaled per example so the all-baseline image scores 0 and the original 1, clipped to [0, 1].
    Where the original does not score above the baseline the curve carries no signal and the
    example is left out of the means (``n_curves`` counts those kept).

  Raw logit-scaled similarities are not used directly: their offsets and scales differ between
  models, and dividing by a small original-vs-baseline gap lets a few examples dominate the mean.

All functions are plain tensor code; only ``perturbation_scores`` calls the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


POINTING_TOLERANCE_PX = 15.0
REFERENCE_SIZE_PX = 224.0
# Localisation is scored at the stored image's resolution, but never above this side: a 6000 px
# photo gives the same hit/miss at 1024 px (boxes and tolerance are scaled with it) for 1/30 of the memory.
MAX_SCORING_SIDE = 1024
BASELINES = ("mean", "blur")
# Above this many distinct prompts the softmax over all of them stops being a meaningful zero-shot
# probability (and costs a text embedding per prompt): such datasets use ``normalised_score``.
MAX_CANDIDATE_PROMPTS = 1024

Box = Sequence[float]


# --------------------------------------------------------------------------- localisation


def scaled_tolerance(width: int, height: int, tolerance_px: float = POINTING_TOLERANCE_PX,
                     reference_px: float = REFERENCE_SIZE_PX) -> float:
    """The pointing-game tolerance for a ``width x height`` image: ``tolerance_px`` at ``reference_px``,
    scaled by the side of the square with the image's area."""
    return tolerance_px * math.sqrt(width * height) / reference_px


def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[gh, gw]`` or ``[B, gh, gw]`` -> ``[height, width]`` or ``[B, height, width]`` (bilinear)."""
    squeeze = maps.dim() == 2
    batch = maps[None] if squeeze else maps
    out = F.interpolate(batch[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return out[0] if squeeze else out


def box_distance(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """``[height, width]``: Euclidean distance from each pixel centre to the nearest box (0 inside)."""
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    best = np.full((height, width), np.inf)
    for x0, y0, x1, y1 in boxes:
        dx = np.maximum(np.maximum(x0 - xs, 0.0), xs - x1)
        dy = np.maximum(np.maximum(y0 - ys, 0.0), ys - y1)
        best = np.minimum(best, np.sqrt(dx * dx + dy * dy))
    return best


def box_mask(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """``bool[height, width]``: pixel centres inside any box."""
    return box_distance(boxes, height, width) <= 0.0


@dataclass(frozen=True)
class Localisation:
    hit: bool  # pointing game
    energy: float  # energy-based pointing game
    chance_hit: float  # probability a uniformly random maximum is a hit
    chance_energy: float  # the boxes' share of the image
    peak_xy: tuple[float, float]  # the map's maximum, in stored-image pixels


def _scoring_scale(width: int, height: int, max_side: int) -> float:
    return min(1.0, max_side / max(width, height))


def localisation(grid_map: torch.Tensor, boxes: Sequence[Box], width: int, height: int, *,
                 tolerance_px: float = POINTING_TOLERANCE_PX, max_side: int = MAX_SCORING_SIDE) -> Localisation:
    """Score one ``[gh, gw]`` map against ``boxes`` of a ``width x height`` image.

    Ties for the maximum go to the first pixel in row-major order, so a constant (uninformative)
    map points at the top-left corner instead of earning hits.
    """
    scale = _scoring_scale(width, height, max_side)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    scaled_boxes = [[c * scale for c in box] for box in boxes]
    tolerance = scaled_tolerance(width, height, tolerance_px) * scale
    dense = upsample(grid_map.detach().float().cpu(), h, w).numpy().astype(np.float64)
    if not np.isfinite(dense).all():
        raise ValueError("grounding map contains NaN or infinite values")
    distance = box_distance(scaled_boxes, h, w)
    row, col = np.unravel_index(int(np.argmax(dense)), dense.shape)
    hit = bool(distance[row, col] <= tolerance)
    inside = distance <= 0.0
    mass = dense - dense.min()
    total = mass.sum()
    energy = float(mass[inside].sum() / total) if total > 0 else float(inside.mean())
    return Localisation(hit=hit, energy=energy, chance_hit=float((distance <= tolerance).mean()),
                        chance_energy=float(inside.mean()), peak_xy=((col + 0.5) / scale, (row + 0.5) / scale))


def pointing_hit(grid_map: torch.Tensor, boxes: Sequence[Box], width: int, height: int, *,
                 tolerance_px: float = POINTING_TOLERANCE_PX) -> bool:
    """Pointing game for one map: does its (upsampled) maximum fall within a box, with tolerance?"""
    return localisation(grid_map, boxes, width, height, tolerance_px=tolerance_px).hit


def energy_pointing(grid_map: torch.Tensor, boxes: Sequence[Box], width: int, height: int) -> float:
    """Energy-based pointing game for one map: its share of (min-shifted) mass inside the boxes."""
    return localisation(grid_map, boxes, width, height).energy


# --------------------------------------------------------------------------- perturbation


def patch_order(maps: torch.Tensor) -> torch.Tensor:
    """``[B, gh, gw]`` -> ``[B, gh*gw]`` patch indices, most relevant first (stable for ties)."""
    flat = maps.reshape(maps.shape[0], -1).float()
    return torch.argsort(-flat, dim=1, stable=True)


def random_order(n_images: int, n_patches: int, seeds: Sequence[int]) -> torch.Tensor:
    """``[B, N]`` random patch orders, one seeded permutation per image (stable under batching)."""
    return torch.stack([torch.randperm(n_patches, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds[:n_images]])


def step_counts(n_patches: int, steps: int) -> torch.Tensor:
    """``[steps + 1]``: how many patches are changed at each point of the curve (0 .. n_patches)."""
    steps = max(1, min(steps, n_patches))
    return torch.round(torch.linspace(0, n_patches, steps + 1)).long()


def keep_masks(order: torch.Tensor, counts: torch.Tensor, mode: str) -> torch.Tensor:
    """``order [B, N]``, ``counts [K]`` -> ``float[B, K, N]``: 1 where the original patch is shown.

    ``deletion`` hides the first ``counts[k]`` patches of the order; ``insertion`` shows only them.
    """
    batch, n = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(batch, n))  # rank[b, patch] = position in the order
    changed = rank[:, None, :] < counts[None, :, None]  # [B, K, N]
    if mode == "deletion":
        return (~changed).float()
    if mode == "insertion":
        return changed.float()
    raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")


def baseline_image(pixel_values: torch.Tensor, kind: str = "mean", patch_size: int = 16) -> torch.Tensor:
    """What replaces a hidden patch. ``mean``: zeros in normalised pixel space, i.e. the
    processor's mean colour; ``blur``: a Gaussian blur with sigma of one patch (RISE's insertion baseline)."""
    if kind == "mean":
        return torch.zeros_like(pixel_values)
    if kind == "blur":
        sigma = float(patch_size)
        radius = int(3 * sigma)
        x = torch.arange(-radius, radius + 1, dtype=pixel_values.dtype, device=pixel_values.device)
        kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()
        channels = pixel_values.shape[1]
        padded = F.pad(pixel_values, (radius, radius, 0, 0), mode="replicate")
        out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        padded = F.pad(out, (0, 0, radius, radius), mode="replicate")
        return F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")


def candidate_prompts(prompts: Sequence[str]) -> list[str] | None:
    """The label set for ``probability`` curves: the distinct prompts, or ``None`` when there are
    fewer than 2 or more than ``MAX_CANDIDATE_PROMPTS``."""
    distinct = list(dict.fromkeys(prompts))
    return distinct if 2 <= len(distinct) <= MAX_CANDIDATE_PROMPTS else None


@torch.no_grad()
def perturbation_scores(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str],
                        masks: torch.Tensor, *,
                        baseline: torch.Tensor, batch_size: int = 64,
                        candidates: Sequence[str] | None = None) -> torch.Tensor:
    """Score masked copies through the model, many copies per forward pass.

    ``pixel_values [B, 3, S, S]``, ``masks [B, K, gh, gw]`` (1 = original patch, 0 = baseline),
    ``baseline [B, 3, S, S]`` -> ``[B, K]``: the score of image b's copy k with prompt b, or with
    ``candidates`` the softmax probability of prompt b among them (every prompt must be one).
    """
    batch, copies = masks.shape[:2]
    size = pixel_values.shape[-2:]
    device = pixel_values.device
    scores = torch.empty(batch * copies)
    flat_masks = masks.reshape(batch * copies, 1, *masks.shape[2:])
    owner = torch.arange(batch).repeat_interleave(copies)
    if candidates is not None:
        column = {prompt: i for i, prompt in enumerate(candidates)}
        target = torch.tensor([column[p] for p in prompts])
    for start in range(0, batch * copies, batch_size):
        idx = owner[start:start + batch_size]
        mask = F.interpolate(flat_masks[start:start + batch_size].to(device), size=size, mode="nearest")
        images = pixel_values[idx.to(device)] * mask + baseline[idx.to(device)] * (1 - mask)
        if candidates is None:
            chunk = adapter.score(images, [prompts[i] for i in idx.tolist()]).float().cpu()
        else:
            probabilities = adapter.score_matrix(images, list(candidates)).float().softmax(dim=1).cpu()
            chunk = probabilities.gather(1, target[idx][:, None])[:, 0]
        scores[start:start + len(idx)] = chunk
    return scores.view(batch, copies)


def endpoint_normalise(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B, K]`` raw scores -> curves rescaled so the all-baseline image is 0 and the original 1,
    clipped to [0, 1]; rows where the original does not beat the baseline become NaN."""
    if mode == "deletion":
        full, empty = scores[:, 0], scores[:, -1]
    elif mode == "insertion":
        full, empty = scores[:, -1], scores[:, 0]
    else:
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    gap = full - empty
    valid = gap > 1e-6 * torch.clamp(full.abs(), min=1.0)
    curve = ((scores - empty[:, None]) / torch.where(valid, gap, torch.ones_like(gap))[:, None]).clamp(0.0, 1.0)
    return torch.where(valid[:, None], curve, torch.full_like(curve, float("nan")))


def curve_auc(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` curves over ``fractions [K]`` (0..1) -> ``[B]`` trapezoidal area (NaN rows stay NaN)."""
    return torch.trapezoid(curves, fractions.to(curves.dtype), dim=1)


@dataclass
class PerturbationResult:
    deletion_auc: torch.Tensor  # [B], NaN where the curve carries no signal
    insertion_auc: torch.Tensor  # [B]
    deletion_curve: torch.Tensor  # [B, K] the curve integrated (probabilities or normalised scores)
    insertion_curve: torch.Tensor  # [B, K]
    fractions: torch.Tensor  # [K] share of patches changed
    score: str  # "probability" or "normalised_score"


def deletion_insertion(adapter: DualEncoderAdapter, pixel_values: torch.Tensor, prompts: Sequence[str],
                       order: torch.Tensor, *,
                       grid: tuple[int, int], steps: int = 32, baseline: str = "mean", patch_size: int = 16,
                       batch_size: int = 64, candidates: Sequence[str] | None = None) -> PerturbationResult:
    """Deletion and insertion AUCs for patch ``order [B, gh*gw]`` (most relevant first).

    With ``candidates`` (see ``candidate_prompts``) the curves are zero-shot probabilities,
    otherwise endpoint-normalised scores (see the module docstring)."""
    n_patches = grid[0] * grid[1]
    if order.shape[1] != n_patches:
        raise ValueError(f"order covers {order.shape[1]} patches, the grid has {n_patches}")
    counts = step_counts(n_patches, steps)
    fractions = counts.float() / n_patches
    base = baseline_image(pixel_values, baseline, patch_size)
    masks = torch.cat([keep_masks(order, counts, "deletion"), keep_masks(order, counts, "insertion")], dim=1)
    scores = perturbation_scores(adapter, pixel_values, prompts, masks.view(*masks.shape[:2], *grid),
                                 baseline=base, batch_size=batch_size, candidates=candidates)
    k = len(counts)
    deletion, insertion = scores[:, :k], scores[:, k:]
    if candidates is None:
        deletion, insertion = endpoint_normalise(deletion, "deletion"), endpoint_normalise(insertion, "insertion")
    return PerturbationResult(curve_auc(deletion, fractions), curve_auc(insertion, fractions), deletion, insertion,
                              fractions, "normalised_score" if candidates is None else "probability")


def nanmean(values: Sequence[float] | torch.Tensor) -> float | None:
    """Mean ignoring NaN; ``None`` when nothing is left (JSON ``null``, never NaN)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else None
