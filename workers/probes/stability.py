"""Stability of explanations: do methods agree, and does a map survive an imperceptible change?

- ``rank_correlation``: Spearman's rho between two maps of the same input, row by row (ties get
  average ranks; a constant map has no rank structure and counts as 0, not NaN).
- ``method_agreement``: the mean rank correlation of every pair of methods on the same inputs.
- ``input_sensitivity``: explain ``x`` and ``x + delta`` for a few uniform ``delta`` in the
  L-infinity ball of radius ``epsilon`` (normalised pixel units). Reports the worst-case rank
  correlation and the max-sensitivity of Yeh et al. (NeurIPS 2019),
  ``max_delta ||phi(x + delta) - phi(x)|| / ||phi(x)||`` (relative, so methods with different
  scales compare).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

Explain = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]  # (pixel_values, prompts) -> [B, gh, gw]


def rank_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, ...]`` x ``[N, ...]`` -> ``[N]`` Spearman correlation of each pair of flattened maps."""
    x = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).reshape(len(a), -1)
    y = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).reshape(len(b), -1)
    if x.shape != y.shape:
        raise ValueError(f"maps differ in shape: {x.shape} vs {y.shape}")
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    numerator = (rx * ry).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
    return rho


def method_agreement(maps: Mapping[str, torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """``{method: [N, gh, gw]}`` -> (names, ``[M, M]`` mean rank correlation between methods)."""
    names = list(maps)
    matrix = np.eye(len(names))
    for i, first in enumerate(names):
        for j in range(i + 1, len(names)):
            value = float(rank_correlation(maps[first], maps[names[j]]).mean())
            matrix[i, j] = matrix[j, i] = value
    return names, matrix


@dataclass
class Sensitivity:
    rank_correlation: np.ndarray  # [B] worst (lowest) correlation over the perturbations
    max_sensitivity: np.ndarray  # [B] worst relative change over the perturbations


def example_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per dataset example (``indices``), so an example draws the same numbers in
    whatever batch it is processed."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def input_sensitivity(explain: Explain, pixel_values: torch.Tensor, prompts: Sequence[str], *,
                      epsilon: float = 0.05, samples: int = 4, seed: int = 0,
                      reference: torch.Tensor | None = None, indices: Sequence[int] = ()) -> Sensitivity:
    """Worst-case change of the explanation under ``samples`` uniform perturbations of size ``epsilon``.

    Each example's noise comes from a generator of its own, seeded by ``seed`` and its index in the
    dataset (``indices``; default: its place in the batch), so an example gets the same noise in
    whatever batch it is explained."""
    if epsilon <= 0 or samples < 1:
        raise ValueError("epsilon must be positive and samples at least 1")
    base = (reference if reference is not None else explain(pixel_values, prompts)).detach().float().cpu()
    base_flat = base.reshape(len(base), -1)
    base_norm = base_flat.norm(dim=1).clamp(min=1e-12)
    generators = example_generators(seed, indices or range(len(base)))
    worst_rho = np.full(len(base), np.inf)
    worst_sensitivity = np.zeros(len(base))
    for _ in range(samples):
        noise = (torch.stack([torch.rand(pixel_values.shape[1:], generator=g) for g in generators]) * 2 - 1) * epsilon
        perturbed = explain(pixel_values + noise.to(pixel_values.device, pixel_values.dtype), prompts).detach().float().cpu()
        worst_rho = np.minimum(worst_rho, rank_correlation(base, perturbed))
        change = ((perturbed.reshape(len(base), -1) - base_flat).norm(dim=1) / base_norm).numpy()
        worst_sensitivity = np.maximum(worst_sensitivity, change)
    return Sensitivity(rank_correlation=worst_rho, max_sensitivity=worst_sensitivity)
