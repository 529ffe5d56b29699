"""The ``grounding`` probe kind: how faithful and how well localised each grounding method is.

For every method (and the seeded ``random`` baseline) over a grounding dataset: pointing game,
energy pointing game, deletion and insertion AUC. The ``evaluate`` command and the Celery tasks
both go through :func:`grounding_probe`, so a report's evidence is exactly what the command line
prints. Inputs reach the methods as :mod:`workers.probes.explanations` describes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from workers.probes import faithfulness, figures, sanity, validation
from workers.probes.datasets import GroundingDataset
from workers.probes.errors import ProbeInputError
from workers.probes.explanations import (
    RANDOM,
    DatasetParams,
    batches,
    dataset_for,
    explain,
    explain_dataset,
    load_dual_encoder,
    method_names,
    model_inputs,
    rounded,
)
from workers.probes.kinds import Flag, Metric, ScoringBatchSize, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from workers.probes.adapters.base import DualEncoderAdapter


@dataclass
class _Tally:
    """Per-method running results over the dataset."""

    hits: list[bool]
    energy: list[float]
    deletion: list[float]
    insertion: list[float]
    deletion_curves: list[np.ndarray]  # normalised, valid rows only
    insertion_curves: list[np.ndarray]
    seconds: float = 0.0
    error: str | None = None

    @classmethod
    def empty(cls) -> _Tally:
        return cls([], [], [], [], [], [])


def _finite_rows(curve: torch.Tensor, auc: torch.Tensor) -> list[np.ndarray]:
    return [row for row, ok in zip(curve.numpy(), torch.isfinite(auc).tolist(), strict=True) if ok]


def evaluate_methods(adapter: Any, dataset: GroundingDataset, methods: Sequence[str], *, batch_size: int = 16,
                     steps: int = 32, baseline: str = "mean", seed: int = 0, tolerance_px: float = 15.0,
                     method_params: dict[str, dict[str, Any]] | None = None, score_batch_size: int = 128,
                     figure_examples: int = 4, strict: bool = True,
                     progress: Progress = no_progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``methods`` on ``dataset``; returns (one result dict per method, then ``random``;
    extras for figures). ``strict=False`` records a method's ``ProbeInputError`` (e.g. ``flow``
    refusing a large model) in its entry instead of aborting the others."""
    method_params = method_params or {}
    tallies = {name: _Tally.empty() for name in [*methods, RANDOM]}
    chance_hit: list[float] = []
    chance_energy: list[float] = []
    examples_for_figure: dict[str, Any] = {"images": [], "boxes": [], "prompts": [], "maps": {m: [] for m in methods}}
    fractions = None
    candidates = faithfulness.candidate_prompts([example.prompt for example in dataset])
    curve_score = "normalised_score" if candidates is None else "probability"
    n_batches = max(1, math.ceil(len(dataset) / batch_size))
    patch_size = getattr(adapter, "patch_size", 16)
    for b, batch in enumerate(batches(adapter, dataset, batch_size)):
        for example in batch.examples:
            loc = faithfulness.localisation(torch.zeros(adapter.grid), example.boxes, example.width, example.height,
                                            tolerance_px=tolerance_px)
            chance_hit.append(loc.chance_hit)
            chance_energy.append(loc.chance_energy)
        for m, name in enumerate([*methods, RANDOM]):
            tally = tallies[name]
            if tally.error:
                continue
            progress((b + m / (len(methods) + 1)) / n_batches, f"{name} {b * batch_size}/{len(dataset)}")
            started = time.perf_counter()
            try:
                maps = explain(adapter, name, batch.pixel_values, batch.prompts, params=method_params.get(name),
                               indices=batch.indices, seed=seed)
            except ProbeInputError as exc:
                if strict:
                    raise
                tally.error = str(exc)
                continue
            for example, grid_map in zip(batch.examples, maps, strict=True):
                loc = faithfulness.localisation(grid_map, example.boxes, example.width, example.height,
                                                tolerance_px=tolerance_px)
                tally.hits.append(loc.hit)
                tally.energy.append(loc.energy)
            curves = faithfulness.deletion_insertion(adapter, batch.pixel_values, batch.prompts,
                                                     faithfulness.patch_order(maps), grid=adapter.grid, steps=steps,
                                                     baseline=baseline, patch_size=patch_size,
                                                     batch_size=score_batch_size, candidates=candidates)
            fractions = curves.fractions
            tally.deletion += curves.deletion_auc.tolist()
            tally.insertion += curves.insertion_auc.tolist()
            tally.deletion_curves += _finite_rows(curves.deletion_curve, curves.deletion_auc)
            tally.insertion_curves += _finite_rows(curves.insertion_curve, curves.insertion_auc)
            tally.seconds += time.perf_counter() - started
            if name != RANDOM:
                keep = max(0, figure_examples - len(examples_for_figure["maps"][name]))
                examples_for_figure["maps"][name] += list(maps[:keep])
                if name == methods[0]:  # the unaltered image's score: the curve's first point
                    examples_for_figure.setdefault("scores", []).extend(
                        float(v) for v in np.asarray(curves.deletion_curve, dtype=float)[:keep, 0])
        keep = max(0, figure_examples - len(examples_for_figure["images"]))
        examples_for_figure["images"] += batch.images[:keep]
        examples_for_figure["boxes"] += [e.boxes for e in batch.examples[:keep]]
        examples_for_figure["prompts"] += batch.prompts[:keep]
    progress(1.0, "done")

    random_tally = tallies[RANDOM]
    baseline_keys = {
        "random_pointing_game": rounded(float(np.mean(chance_hit))),
        "random_energy_pointing_game": rounded(float(np.mean(chance_energy))),
        "random_deletion_auc": rounded(faithfulness.nanmean(random_tally.deletion)),
        "random_insertion_auc": rounded(faithfulness.nanmean(random_tally.insertion)),
    }
    results = []
    for name in [*methods, RANDOM]:
        tally = tallies[name]
        entry: dict[str, Any] = {"method": name, "n": len(tally.hits)}
        if tally.error:
            entry.update({"pointing_game": None, "energy_pointing_game": None, "deletion_auc": None,
                          "insertion_auc": None, "seconds": round(tally.seconds, 3), "error": tally.error})
        else:
            entry.update({
                "pointing_game": rounded(float(np.mean(tally.hits))),
                "energy_pointing_game": rounded(float(np.mean(tally.energy))),
                "deletion_auc": rounded(faithfulness.nanmean(tally.deletion)),
                "insertion_auc": rounded(faithfulness.nanmean(tally.insertion)),
                "seconds": round(tally.seconds, 3),
            })
        entry.update(baseline_keys)
        entry["n_curves"] = int(np.isfinite(np.asarray(tally.deletion, dtype=float)).sum())
        entry["curve_score"] = curve_score
        results.append(entry)
    extras = {"figure_examples": examples_for_figure, "fractions": fractions, "curve_score": curve_score,
              "per_example": {name: {"hits": t.hits, "deletion": t.deletion, "insertion": t.insertion}
                              for name, t in tallies.items() if not t.error},
              "mean_curves": {name: (np.mean(t.deletion_curves, axis=0) if t.deletion_curves else None,
                                     np.mean(t.insertion_curves, axis=0) if t.insertion_curves else None)
                              for name, t in tallies.items()}}
    return results, extras


def _curve_figures(extras: dict[str, Any]) -> dict[str, Any]:
    fractions = extras["fractions"]
    if fractions is None:
        return {}
    out = {}
    for index, mode in enumerate(("deletion", "insertion")):
        curves = {name: (fractions.numpy(), pair[index]) for name, pair in extras["mean_curves"].items()
                  if pair[index] is not None}
        if curves:
            out[f"{mode}_curves"] = figures.perturbation_curves(
                curves, title=f"{mode.capitalize()} (mean over examples)",
                ylabel="prompt probability" if extras["curve_score"] == "probability" else "normalised score")
    return out


def _grounding_findings(results: list[dict[str, Any]]) -> list[Finding]:
    findings = []
    for entry in results:
        name = entry["method"]
        if name == RANDOM:
            continue
        if entry.get("error"):
            findings.append(Finding("info", f"{name} did not run", entry["error"]))
            continue
        if entry["pointing_game"] - entry["random_pointing_game"] < 0.1:
            findings.append(Finding("medium", f"{name} localises no better than chance (within 0.1)",
                                    f"pointing game {entry['pointing_game']:.3f} vs chance "
                                    f"{entry['random_pointing_game']:.3f}"))
        deletion, random_deletion = entry["deletion_auc"], entry["random_deletion_auc"]
        if deletion is not None and random_deletion is not None and deletion >= random_deletion:
            findings.append(Finding("medium", f"{name}'s relevance order is not faithful to the model",
                                    f"deletion AUC {deletion:.3f} is not below the random-order {random_deletion:.3f}"))
    return findings




class GroundingParams(DatasetParams):
    methods: Annotated[str | list[str], Flag(name="--method")] = Field(
        "all", description="'all', one method name or a list of them")
    # Masked copies per scoring forward: sizes memory, not results.
    score_batch_size: ScoringBatchSize = 128
    steps: int = Field(32, ge=2, le=1024, description="points on the deletion/insertion curves")
    baseline: Literal["mean", "blur"] = Field("mean", description="what hidden patches become: the mean colour "
                                                                  "or a blur")
    tolerance_px: float = Field(faithfulness.POINTING_TOLERANCE_PX, ge=0, le=1000,
                                description="pixels around a box that still count as a hit")
    figure_examples: int = Field(4, ge=0, le=32, description="examples shown in the heatmap figure")
    validate_methods: bool = Field(True, description="validate every method on this model: deletion/insertion "
                                             "against a random order, randomisation sanity, agreement, stability")
    validation_examples: int = Field(16, ge=1, le=1024, description="examples the sanity, agreement and stability "
                                                                    "checks of the validation run on")
    method_params: Annotated[dict[str, dict[str, Any]], Flag(hidden=True)] = Field(
        default_factory=dict, description="parameters per method, {method: {parameter: value}}")


def table(entries: list[dict[str, Any]]) -> str:
    """A plain-text table of grounding results, baselines in the last columns."""
    columns = ["method", "n", "pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc",
               "random_pointing_game", "random_deletion_auc", "random_insertion_auc", "seconds"]
    rows = [[("-" if e.get(c) is None else str(e.get(c))) for c in columns] for e in entries]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _cli_text(result: ProbeResult, params: GroundingParams) -> str:
    entries = result.metrics["methods"]
    return table(entries if params.methods == "all" else entries[:1] + entries[-1:])


def _cli_json(result: ProbeResult, params: GroundingParams) -> Any:
    """One object for one method, a list (the methods, then ``random``) for several."""
    entries = result.metrics["methods"]
    return entries if params.methods == "all" or isinstance(params.methods, list) else entries[0]


@probe_kind(
    "grounding", title="Visual grounding and faithfulness", section="explain", params=GroundingParams,
    help="score grounding methods for faithfulness on a dataset", command="evaluate",
    present=_cli_text, as_json=_cli_json,
    glossary={
        "pointing_game": Metric("Pointing game", "share of images whose heatmap maximum lies inside the named object"),
        "energy_pointing_game": Metric("Energy pointing game", "share of the heatmap's mass inside the named object"),
        "deletion_auc": Metric("Deletion AUC", "area under the score curve as the top-ranked patches are removed "
                                               "(lower is more faithful)"),
        "insertion_auc": Metric("Insertion AUC", "area under the score curve as the top-ranked patches are added "
                                                 "(higher is more faithful)"),
        "random_pointing_game": Metric("Pointing game by chance", "the pointing game a random map scores"),
        "random_deletion_auc": Metric("Deletion AUC of a random order", "the deletion AUC of random patch orders"),
        "random_insertion_auc": Metric("Insertion AUC of a random order", "the insertion AUC of random patch orders"),
    })
def grounding_probe(model_dir: str, dataset_dir: str | None, params: GroundingParams, *, device: str = "cpu",
                    progress: Progress = no_progress) -> ProbeResult:
    """Pointing game, energy pointing game, deletion and insertion AUC of each method, beside the
    random baselines. ``dataset_dir``: a grounding dataset (``None``: the zoo's held-out split)."""
    methods = [m for m in method_names(params.methods) if m != RANDOM]
    dataset = dataset_for(dataset_dir, limit=params.limit, format=params.format,
                          prompt_template=params.prompt_template)
    adapter = load_dual_encoder(model_dir, device)
    results, extras = evaluate_methods(
        adapter, dataset, methods, batch_size=params.batch_size, steps=params.steps, baseline=params.baseline,
        seed=params.seed, tolerance_px=params.tolerance_px, method_params=params.method_params,
        score_batch_size=params.score_batch_size, figure_examples=params.figure_examples,
        strict=params.methods != "all", progress=progress)
    validated = None
    if params.validate_methods and methods:
        validated = validate_on_model(adapter, dataset, [r["method"] for r in results if r["method"] != RANDOM
                                                         and not r.get("error")], extras["per_example"],
                                      examples=params.validation_examples, batch_size=params.batch_size,
                                      seed=params.seed, method_params=params.method_params)
        order = {name: k for k, name in enumerate(validated["validated"] + validated["not_shown"])}
        results.sort(key=lambda r: order.get(r["method"], len(order)))  # validated methods first, random last
        for entry in results:
            verdict = next((v for v in validated["methods"] if v["method"] == entry["method"]), None)
            if verdict is not None:
                entry["verdict"] = verdict["verdict"]
    examples = extras["figure_examples"]
    figs = _curve_figures(extras)
    if examples["images"] and methods:
        scores = examples.get("scores") or []
        score_name = "probability" if extras["curve_score"] == "probability" else "score"
        titles = [f'"{prompt}" ({score_name} {scores[i]:.2f})' if i < len(scores) else f'"{prompt}"'
                  for i, prompt in enumerate(examples["prompts"])]
        figs.update(figures.paged("examples", figures.heatmap_grid_pages(
            examples["images"], examples["maps"], boxes=examples["boxes"], row_titles=titles,
            what="Example explanations of the model's score for each prompt",
            rows=f"one example each, headed by its prompt and the model's {score_name} for it")))
    lines = [f"{r['method']}: pointing {r['pointing_game']}, energy {r['energy_pointing_game']}, "
             f"deletion {r['deletion_auc']}, insertion {r['insertion_auc']}" for r in results]
    chance = results[0]
    summary = (f"{len(dataset)} examples; chance pointing {chance['random_pointing_game']}, random-order deletion "
               f"{chance['random_deletion_auc']}, insertion {chance['random_insertion_auc']}. " + "; ".join(lines))
    if validated is not None:
        summary += f". {validation.summary_line(validated)}."
    return ProbeResult(kind="grounding", metrics={"methods": results, "n": len(dataset), "steps": params.steps,
                                                  "baseline": params.baseline, "format": dataset.format,
                                                  **({"validation": validated} if validated is not None else {})},
                       summary=summary, figures=figs, findings=_grounding_findings(results), seed=params.seed,
                       dataset_hash=dataset.fingerprint())


def validate_on_model(adapter: DualEncoderAdapter, dataset: GroundingDataset, methods: Sequence[str],
                      per_example: dict[str, Any], *,
                      examples: int, batch_size: int, seed: int,
                      method_params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``validation.validate`` for a grounding evidence item: the per-example deletion/insertion and
    pointing already measured, plus, on the first ``examples`` examples, every method's maps on the
    trained model (method agreement) and on the same model with all weights randomised (sanity)."""
    sample = dataclasses.replace(dataset, examples=dataset.examples[:max(1, examples)])
    trained = {m: explain_dataset(adapter, sample, m, batch_size=batch_size, params=method_params.get(m) or {},
                                  seed=seed) for m in methods}
    randomised_maps = {}
    with sanity.randomised(adapter.model, on_change=lambda: sanity.forget_cached_outputs(adapter)):
        generator = torch.Generator().manual_seed(seed)
        sanity.randomise_(adapter.model, {name for name, _ in adapter.model.named_parameters()}, generator)
        sanity.forget_cached_outputs(adapter)
        for m in methods:
            randomised_maps[m] = explain_dataset(adapter, sample, m, batch_size=batch_size,
                                                  params=method_params.get(m) or {}, seed=seed)
    checks = {m: validation.randomisation_check(trained[m], randomised_maps[m], seed=seed) for m in methods}
    stable = _stability_under_corruptions(adapter, sample, methods, trained, batch_size=batch_size, seed=seed,
                                          method_params=method_params)
    per_method = {m: per_example[m] for m in methods}
    return validation.validate(per_method, per_example[RANDOM], maps=trained, sanity=checks, seed=seed,
                               stability=stable)


def _stability_under_corruptions(adapter: DualEncoderAdapter, sample: GroundingDataset, methods: Sequence[str],
                                 trained: dict[str, torch.Tensor], *, batch_size: int, seed: int,
                                 method_params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per method, the rank correlation of its maps on the clean and on corrupted images (the
    robustness probe's corruptions, at its middle severity), to report beside the maps."""
    from workers.probes import corruptions

    images = [example.load_image() for example in sample.examples]
    prompts = [example.prompt for example in sample.examples]
    corrupted: dict[str, dict[str, torch.Tensor]] = {m: {} for m in methods}
    for kind in corruptions.CORRUPTIONS:
        changed = [corruptions.corrupt(im, kind, 3, seed=seed * 100_003 + i) for i, im in enumerate(images)]
        for m in methods:
            corrupted[m][kind] = torch.cat([
                explain(adapter, m, model_inputs(adapter, changed[s:s + batch_size]), prompts[s:s + batch_size],
                        params=method_params.get(m) or {}, indices=range(s, min(s + batch_size, len(images))),
                        seed=seed)
                for s in range(0, len(images), batch_size)])
    return {m: validation.stability_under(trained[m], corrupted[m], seed=seed) for m in methods}
