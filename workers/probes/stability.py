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

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from scipy.stats import rankdata

from workers.probes import figures
from workers.probes.explanations import (
    RANDOM,
    DatasetParams,
    batches,
    dataset_for,
    example_generators,
    explain,
    load_dual_encoder,
    method_names,
    rounded,
)
from workers.probes.kinds import Flag, Limit, Metric, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

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
        noisy = pixel_values + noise.to(pixel_values.device, pixel_values.dtype)
        perturbed = explain(noisy, prompts).detach().float().cpu()
        worst_rho = np.minimum(worst_rho, rank_correlation(base, perturbed))
        change = ((perturbed.reshape(len(base), -1) - base_flat).norm(dim=1) / base_norm).numpy()
        worst_sensitivity = np.maximum(worst_sensitivity, change)
    return Sensitivity(rank_correlation=worst_rho, max_sensitivity=worst_sensitivity)


# --------------------------------------------------------------------------- the probe kind


class StabilityParams(DatasetParams):
    methods: Annotated[str | list[str], Flag(name="--method")] = Field(
        "all", description="'all', one method name or a list of them")
    # Every method is explained (1 + samples) times per example: a smaller default than grounding's.
    limit: Limit = 32
    epsilon: float = Field(0.03, gt=0, le=1, description="radius of the uniform input perturbation (normalised "
                                                         "pixel units; 0.03 is about 2 grey levels for CLIP)")
    samples: int = Field(3, ge=1, le=64, description="perturbed copies of each input")
    method_params: Annotated[dict[str, dict[str, Any]], Flag(hidden=True)] = Field(
        default_factory=dict, description="parameters per method, {method: {parameter: value}}")


@probe_kind(
    "stability", title="Explanation stability and method agreement", section="explain", params=StabilityParams,
    help="agreement between methods and their sensitivity to imperceptible input noise",
    glossary={
        "agreement": Metric("Method agreement", "mean Spearman correlation between the maps of two methods on the "
                                                "same inputs", limitation=True),
        "rank_correlation": Metric("Spearman under noise", "mean rank correlation between the maps of an input and "
                                   "of a copy perturbed by at most epsilon", limitation=True),
        "worst_rank_correlation": Metric("Worst Spearman under noise", "the lowest such correlation over the "
                                         "examples", limitation=True),
        "max_sensitivity": Metric("Max-sensitivity", "largest relative change of a map under the perturbations "
                                  "(Yeh et al. 2019; lower is more stable)", limitation=True),
    })
def stability_probe(model_dir: str, dataset_dir: str | None, params: StabilityParams, *, device: str = "cpu",
                    progress: Progress = no_progress) -> ProbeResult:
    """Agreement between methods (mean Spearman on the same inputs) and each method's sensitivity to
    ``samples`` uniform input perturbations of radius ``epsilon`` (normalised pixel units)."""
    methods = [m for m in method_names(params.methods) if m != RANDOM]
    batch_size, seed, epsilon, samples = params.batch_size, params.seed, params.epsilon, params.samples
    method_params = params.method_params
    dataset = dataset_for(dataset_dir, limit=params.limit, format=params.format,
                          prompt_template=params.prompt_template)
    adapter = load_dual_encoder(model_dir, device)
    started = time.perf_counter()
    maps: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    rho: dict[str, list[float]] = {m: [] for m in methods}
    sensitivity: dict[str, list[float]] = {m: [] for m in methods}
    n_batches = max(1, math.ceil(len(dataset) / batch_size))
    for b, batch in enumerate(batches(adapter, dataset, batch_size)):
        for m, name in enumerate(methods):
            progress((b + m / len(methods)) / n_batches, f"{name} {b * batch_size}/{len(dataset)}")
            def run(pixels: torch.Tensor, prompts: Sequence[str], name: str = name) -> torch.Tensor:
                return explain(adapter, name, pixels, prompts, params=method_params.get(name))
            reference = run(batch.pixel_values, batch.prompts)
            maps[name].append(reference)
            result = input_sensitivity(run, batch.pixel_values, batch.prompts, epsilon=epsilon,
                                                 samples=samples, seed=seed, reference=reference,
                                                 indices=batch.indices)
            rho[name] += result.rank_correlation.tolist()
            sensitivity[name] += result.max_sensitivity.tolist()
    progress(1.0, "done")
    names, matrix = method_agreement({m: torch.cat(v) for m, v in maps.items()})
    metrics: dict[str, Any] = {
        "n": len(dataset), "epsilon": epsilon, "samples": samples, "methods": names,
        "agreement": [[rounded(v) for v in row] for row in matrix],
        "perturbation": {m: {"rank_correlation": rounded(float(np.mean(rho[m]))),
                             "worst_rank_correlation": rounded(float(np.min(rho[m]))),
                             "max_sensitivity": rounded(float(np.mean(sensitivity[m])))} for m in methods},
        "seconds": round(time.perf_counter() - started, 3),
    }
    figure = figures.new_figure(1.2 * len(names) + 2, 1.0 * len(names) + 1.5)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=ax, label="mean Spearman")
    figures.describe(figure, "Agreement between explanation methods on the same inputs",
                     rows="methods", columns="methods",
                     colour="mean rank correlation (Spearman) of the two methods' heatmaps, printed in each cell: "
                            "1 = same ranking of regions, 0 = unrelated, negative = opposite")
    findings = [Finding("medium", f"{m} is unstable under imperceptible noise",
                        f"mean Spearman {metrics['perturbation'][m]['rank_correlation']} between maps of an input and "
                        f"a copy perturbed by at most {epsilon}")
                for m in methods if np.mean(rho[m]) < 0.5]
    summary = "; ".join(f"{m}: Spearman under noise {metrics['perturbation'][m]['rank_correlation']}, "
                        f"max-sensitivity {metrics['perturbation'][m]['max_sensitivity']}" for m in methods)
    return ProbeResult(kind="stability", metrics=metrics, summary=summary, figures={"agreement": figure},
                       findings=findings, seed=seed, dataset_hash=dataset.fingerprint())
