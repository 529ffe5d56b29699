"""Grounding probe kinds: ``grounding`` (faithfulness of every method), ``sanity`` (model
randomisation) and ``stability`` (agreement and input sensitivity).

The commands ``evaluate``, ``sanity`` and ``explain`` and the Celery tasks all go through these
functions, so a report's evidence is exactly what the command line prints.

How an image reaches a method: it is resized to the model's ``S x S`` input (squashed, not
cropped) before the model's own image processor runs, so the map covers the whole stored image and
maps back onto it by a plain resize. (CLIP's processor would otherwise centre-crop non-square
images and cut away objects whose boxes we score.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.probes import faithfulness, figures, registry, sanity, stability, suite
from workers.probes.datasets import DEFAULT_PROMPT_TEMPLATE, GroundingDataset, GroundingExample, load_dataset
from workers.probes.errors import ProbeInputError
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress, probe_kind

RANDOM = "random"  # the pseudo-method that draws uniform noise maps: the chance baseline


# --------------------------------------------------------------------------- inputs


def load_dual_encoder(model: str, device: str = "cpu"):
    """Load ``model`` through ``suite.load_model`` and insist on a dual encoder."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProbeInputError(f"device {device!r} requested but CUDA is not available on this machine")
    adapter = suite.load_model(model, device)
    if getattr(adapter, "kind", None) != "dual_encoder":
        kind = getattr(adapter, "kind", None) or type(adapter).__name__
        raise ProbeInputError(f"{model}: grounding needs a dual encoder (CLIP-like image-text model); "
                              f"this model is a {kind} model")
    return adapter


def dataset_for(dataset_dir: str | None, params: dict[str, Any], default_split: str = "heldout") -> GroundingDataset:
    """The dataset named by ``dataset_dir`` (the zoo's ``default_split`` when ``None``)."""
    if dataset_dir is None:
        from workers.probes import zoo

        dataset_dir = str(zoo.dataset_dir(default_split))
    limit = None if params.get("limit") is None else _int(params, "limit", 1)
    return load_dataset(dataset_dir, format=params.get("format", "jsonl"), limit=limit,
                        prompt_template=params.get("prompt_template", DEFAULT_PROMPT_TEMPLATE))


def model_inputs(adapter, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> ``[B, 3, S, S]``: squash to ``S x S`` first (see the module docstring)."""
    size = adapter.image_size
    return adapter.preprocess([image.resize((size, size), Image.Resampling.BICUBIC) for image in images])


@dataclass
class Batch:
    examples: list[GroundingExample]
    indices: list[int]  # position of each example in the dataset (seeds random maps and orders)
    images: list[Image.Image]
    pixel_values: torch.Tensor
    prompts: list[str]


def batches(adapter, dataset: GroundingDataset, batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(dataset), batch_size):
        examples = dataset.examples[start:start + batch_size]
        images = [example.load_image() for example in examples]
        yield Batch(examples, list(range(start, start + len(examples))), images, model_inputs(adapter, images),
                    [example.prompt for example in examples])


def random_maps(grid: tuple[int, int], indices: Sequence[int], seed: int) -> torch.Tensor:
    """``[B, gh, gw]`` uniform noise, one seeded generator per example (independent of batching)."""
    return torch.stack([torch.rand(grid, generator=g) for g in stability.example_generators(seed, indices)])


def explain(adapter, method: str, pixel_values: torch.Tensor, prompts: Sequence[str], *,
            params: dict[str, Any] | None = None, indices: Sequence[int] = (), seed: int = 0) -> torch.Tensor:
    """Run grounding ``method`` (or ``"random"``) -> ``[B, gh, gw]`` float32 on CPU."""
    if method == RANDOM:
        return random_maps(adapter.grid, indices or range(len(prompts)), seed)
    fn = registry.get(method)
    try:
        maps = fn(adapter, pixel_values, list(prompts), **(params or {}))
    except TypeError as exc:
        if params and "unexpected keyword" in str(exc):
            raise ProbeInputError(f"method {method!r}: {exc}") from None
        raise
    maps = maps.detach().float().cpu()
    expected = (len(prompts), *adapter.grid)
    if tuple(maps.shape) != expected:
        raise RuntimeError(f"method {method!r} returned maps of shape {tuple(maps.shape)}, expected {expected}")
    return maps


def method_names(requested: str | Sequence[str] | None) -> list[str]:
    """``"all"``/``None`` -> every registered method; otherwise the named ones (checked)."""
    if requested in (None, "all"):
        return registry.available()
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise ProbeInputError("no method given")
    for name in names:
        if name != RANDOM:
            registry.get(name)  # raises ProbeInputError naming the available methods
    return names


def _check_params(params: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ProbeInputError(f"probe {kind!r}: unknown parameter(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(allowed))}")


def _int(params: dict[str, Any], key: str, default: int, minimum: int = 1) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProbeInputError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProbeInputError(f"{key} must be a number, got {value!r}")
    return float(value)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# --------------------------------------------------------------------------- grounding


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
    return [row for row, ok in zip(curve.numpy(), torch.isfinite(auc).tolist()) if ok]


# Image-prompt pairs per explained batch, and masked copies per scoring forward: they size memory,
# not results (maps are per pair; the random maps are seeded per example), so suite.run may lower them.
BATCH_PARAMS = {"batch_size": 16, "score_batch_size": 128}
GROUNDING_PARAMS = {"methods", "limit", "batch_size", "format", "steps", "baseline", "seed", "prompt_template",
                    "method_params", "tolerance_px", "figure_examples", "score_batch_size"}


def evaluate_methods(adapter, dataset: GroundingDataset, methods: Sequence[str], *, batch_size: int = 16,
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
            for example, grid_map in zip(batch.examples, maps):
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
        keep = max(0, figure_examples - len(examples_for_figure["images"]))
        examples_for_figure["images"] += batch.images[:keep]
        examples_for_figure["boxes"] += [e.boxes for e in batch.examples[:keep]]
        examples_for_figure["prompts"] += batch.prompts[:keep]
    progress(1.0, "done")

    random_tally = tallies[RANDOM]
    baseline_keys = {
        "random_pointing_game": _round(float(np.mean(chance_hit))),
        "random_energy_pointing_game": _round(float(np.mean(chance_energy))),
        "random_deletion_auc": _round(faithfulness.nanmean(random_tally.deletion)),
        "random_insertion_auc": _round(faithfulness.nanmean(random_tally.insertion)),
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
                "pointing_game": _round(float(np.mean(tally.hits))),
                "energy_pointing_game": _round(float(np.mean(tally.energy))),
                "deletion_auc": _round(faithfulness.nanmean(tally.deletion)),
                "insertion_auc": _round(faithfulness.nanmean(tally.insertion)),
                "seconds": round(tally.seconds, 3),
            })
        entry.update(baseline_keys)
        entry["n_curves"] = int(np.isfinite(np.asarray(tally.deletion, dtype=float)).sum())
        entry["curve_score"] = curve_score
        results.append(entry)
    extras = {"figure_examples": examples_for_figure, "fractions": fractions, "curve_score": curve_score,
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


@probe_kind("grounding", batch_params=BATCH_PARAMS)
def grounding_probe(model_dir: str, dataset_dir: str | None, params: dict[str, Any], *, device: str = "cpu",
                    progress: Progress = no_progress) -> ProbeResult:
    """Pointing game, energy pointing game, deletion and insertion AUC of each method, beside the
    random baselines. ``params``: ``methods`` ("all" or a list), ``limit``, ``batch_size``, ``format``
    (jsonl|coco), ``steps`` (curve points), ``baseline`` (mean|blur), ``seed``, ``prompt_template``,
    ``method_params`` ({method: {param: value}}), ``tolerance_px``, ``figure_examples``,
    ``score_batch_size`` (masked copies per forward)."""
    _check_params(params, GROUNDING_PARAMS, "grounding")
    requested = params.get("methods", "all")
    methods = [m for m in method_names(requested) if m != RANDOM]
    batch_size = _int(params, "batch_size", BATCH_PARAMS["batch_size"])
    steps = _int(params, "steps", 32)
    seed = _int(params, "seed", 0, minimum=0)
    baseline = params.get("baseline", "mean")
    if baseline not in faithfulness.BASELINES:
        raise ProbeInputError(f"baseline must be one of {', '.join(faithfulness.BASELINES)}, got {baseline!r}")
    method_params = params.get("method_params") or {}
    if not isinstance(method_params, dict) or not all(isinstance(v, dict) for v in method_params.values()):
        raise ProbeInputError("method_params must map method names to parameter objects")
    dataset = dataset_for(dataset_dir, params)
    adapter = load_dual_encoder(model_dir, device)
    results, extras = evaluate_methods(
        adapter, dataset, methods, batch_size=batch_size, steps=steps, baseline=baseline, seed=seed,
        tolerance_px=_float(params, "tolerance_px", faithfulness.POINTING_TOLERANCE_PX),
        method_params=method_params,
        score_batch_size=_int(params, "score_batch_size", BATCH_PARAMS["score_batch_size"]),
        figure_examples=_int(params, "figure_examples", 4, minimum=0), strict=requested not in (None, "all"),
        progress=progress)
    examples = extras["figure_examples"]
    figs = _curve_figures(extras)
    if examples["images"] and methods:
        figs["examples"] = figures.heatmap_grid(examples["images"], examples["maps"], boxes=examples["boxes"],
                                                row_titles=examples["prompts"])
    lines = [f"{r['method']}: pointing {r['pointing_game']}, energy {r['energy_pointing_game']}, "
             f"deletion {r['deletion_auc']}, insertion {r['insertion_auc']}" for r in results]
    chance = results[0]
    summary = (f"{len(dataset)} examples; chance pointing {chance['random_pointing_game']}, random-order deletion "
               f"{chance['random_deletion_auc']}, insertion {chance['random_insertion_auc']}. " + "; ".join(lines))
    return ProbeResult(kind="grounding", metrics={"methods": results, "n": len(dataset), "steps": steps,
                                                  "baseline": baseline, "format": dataset.format},
                       summary=summary, figures=figs, findings=_grounding_findings(results), seed=seed,
                       dataset_hash=dataset.fingerprint())


# --------------------------------------------------------------------------- sanity

SANITY_PARAMS = {"method", "limit", "batch_size", "format", "seed", "prompt_template", "method_params",
                 "max_rank_correlation", "pointing_margin", "tolerance_px", "draws"}


def _explain_dataset(adapter, dataset: GroundingDataset, method: str, *, batch_size: int, params: dict[str, Any],
                     seed: int) -> torch.Tensor:
    maps = [explain(adapter, method, batch.pixel_values, batch.prompts, params=params, indices=batch.indices,
                    seed=seed) for batch in batches(adapter, dataset, batch_size)]
    return torch.cat(maps)


def _pointing(maps: torch.Tensor, dataset: GroundingDataset, tolerance_px: float) -> float:
    return float(np.mean([faithfulness.localisation(m, e.boxes, e.width, e.height, tolerance_px=tolerance_px).hit
                          for m, e in zip(maps, dataset.examples)]))


@probe_kind("sanity", batch_params={"batch_size": BATCH_PARAMS["batch_size"]})
def sanity_probe(model_dir: str, dataset_dir: str | None, params: dict[str, Any], *, device: str = "cpu",
                 progress: Progress = no_progress) -> ProbeResult:
    """Cascading model randomisation (Adebayo et al. 2018) for one ``method`` (default ``chefer``).

    Passes when, on the fully randomised model (averaged over ``draws`` randomisations, default 3),
    the mean Spearman correlation with the trained model's maps is below ``max_rank_correlation``
    (0.3) and the pointing game is within ``pointing_margin`` (0.1) of chance. Without a dataset it
    runs on the zoo's ``heldout-decoys`` split."""
    _check_params(params, SANITY_PARAMS, "sanity")
    method = params.get("method", "chefer")
    if not isinstance(method, str) or method in ("all", RANDOM):
        raise ProbeInputError("sanity needs one method name")
    method_names(method)
    batch_size = _int(params, "batch_size", BATCH_PARAMS["batch_size"])
    seed = _int(params, "seed", 0, minimum=0)
    threshold = _float(params, "max_rank_correlation", 0.3)
    margin = _float(params, "pointing_margin", 0.1)
    tolerance = _float(params, "tolerance_px", faithfulness.POINTING_TOLERANCE_PX)
    # A randomised model is one draw from a distribution: over ten draws its pointing game on the
    # zoo's heldout-decoys split (320 examples) ranged 0.05-0.31 around a mean of 0.20. The verdict
    # uses the mean of ``draws`` independent full randomisations; the first is the cascade, stage by stage.
    draws = _int(params, "draws", 3)
    method_params = params.get("method_params") or {}
    if not isinstance(method_params, dict):
        raise ProbeInputError("method_params must be an object of parameters for the method")
    # Default: the held-out scenes with grey decoys, where a map that finds whatever stands out (as a
    # random network's maps do, from contrast) lands on a decoy most of the time; in plain 2-4 object
    # scenes it would hit the named object a third of the time against 0.15 by area, and the pointing
    # part of the check could not pass for any input-sensitive method (``world.DECOY_SIDE``).
    dataset = dataset_for(dataset_dir, params, default_split="heldout-decoys")
    adapter = load_dual_encoder(model_dir, device)
    started = time.perf_counter()
    stages = sanity.randomisation_stages(adapter.model)
    total_steps = len(stages) + draws
    progress(0.0, f"{method} on the trained model")
    trained = _explain_dataset(adapter, dataset, method, batch_size=batch_size, params=method_params, seed=seed)
    trained_pointing = _pointing(trained, dataset, tolerance)
    chance = float(np.mean([faithfulness.localisation(torch.zeros(adapter.grid), e.boxes, e.width, e.height,
                                                      tolerance_px=tolerance).chance_hit for e in dataset.examples]))

    def explain_and_compare() -> tuple[torch.Tensor, dict[str, float | None]]:
        sanity.forget_cached_outputs(adapter)  # e.g. text embeddings of the trained text tower
        maps = _explain_dataset(adapter, dataset, method, batch_size=batch_size, params=method_params, seed=seed)
        return maps, {"rank_correlation": _round(float(stability.rank_correlation(trained, maps).mean())),
                      "pointing_game": _round(_pointing(maps, dataset, tolerance))}

    cascade: list[dict[str, Any]] = []
    last_maps = trained
    randomised_scalars = 0
    with sanity.randomised(adapter.model, on_change=lambda: sanity.forget_cached_outputs(adapter)):
        for step, (stage, scalars) in enumerate(sanity.cascade(adapter.model, seed=seed), start=1):
            progress(step / total_steps, f"randomised {stage.name}")
            randomised_scalars += scalars
            last_maps, scores = explain_and_compare()
            cascade.append({"stage": stage.name, "parameters": len(stage.parameters), "scalars": scalars, **scores})
    randomised_draws = [{"seed": seed, **{k: cascade[-1][k] for k in ("rank_correlation", "pointing_game")}}] \
        if cascade else []
    for extra in range(1, draws if cascade else 0):
        progress((len(stages) + extra) / total_steps, f"randomisation draw {extra + 1} of {draws}")
        with sanity.randomised(adapter.model, on_change=lambda: sanity.forget_cached_outputs(adapter)):
            for _ in sanity.cascade(adapter.model, seed=seed + extra):
                pass
            randomised_draws.append({"seed": seed + extra, **explain_and_compare()[1]})
    progress(1.0, "done")
    total_scalars = sum(p.numel() for p in adapter.model.parameters())
    if randomised_draws:
        final = {k: _round(float(np.mean([d[k] for d in randomised_draws])))
                 for k in ("rank_correlation", "pointing_game")}
    else:
        final = {"rank_correlation": 1.0, "pointing_game": trained_pointing}
    passed = final["rank_correlation"] < threshold and abs(final["pointing_game"] - chance) <= margin
    metrics = {
        "method": method, "n": len(dataset), "passed": bool(passed),
        "rank_correlation": final["rank_correlation"], "max_rank_correlation": threshold,
        "pointing_game": _round(trained_pointing), "randomized_pointing_game": final["pointing_game"],
        "random_pointing_game": _round(chance), "pointing_margin": margin,
        # What the trained weights add over a network that only sees the input: a map that still
        # localises after randomisation gets its hits from image contrast (Adebayo et al.'s "edge
        # detector" effect), and only this gap is evidence about the model.
        "pointing_gain_over_randomised": _round(trained_pointing - final["pointing_game"]),
        "randomized_parameters": randomised_scalars, "total_parameters": total_scalars,
        "randomisation_draws": randomised_draws, "cascade": cascade, "seconds": round(time.perf_counter() - started, 3), "seed": seed,
    }
    shown = min(4, len(dataset))
    grid_maps = {"trained": list(trained[:shown]), "randomised": list(last_maps[:shown])}
    figs = {"examples": figures.heatmap_grid([e.load_image() for e in dataset.examples[:shown]], grid_maps,
                                             boxes=[e.boxes for e in dataset.examples[:shown]],
                                             row_titles=[e.prompt for e in dataset.examples[:shown]])}
    figs["cascade"] = _cascade_figure(cascade, chance)
    findings = []
    if not passed:
        if final["rank_correlation"] >= threshold:
            detail = (f"after randomising every parameter the maps still correlate with the trained model's "
                      f"(Spearman {final['rank_correlation']}): the explanation reflects the input more than the model.")
        else:
            detail = (f"the maps change once every parameter is randomised (Spearman {final['rank_correlation']}), "
                      f"but the randomised network's maps still hit the named object in {final['pointing_game']} "
                      f"of cases against {chance:.3f} by chance: part of the localisation comes from image "
                      f"contrast, not from the model. Only the gain of the trained model over the randomised one "
                      f"({trained_pointing - final['pointing_game']:+.3f} pointing game) is evidence about the model.")
        findings.append(Finding("high", f"{method} fails the model-randomisation sanity check", detail))
    summary = (f"{method}: {'passed' if passed else 'FAILED'}; Spearman trained vs randomised "
               f"{final['rank_correlation']} (threshold {threshold}); pointing game {trained_pointing:.3f} trained, "
               f"{final['pointing_game']} randomised (mean of {len(randomised_draws)} draws), chance {chance:.3f}")
    return ProbeResult(kind="sanity", metrics=metrics, summary=summary, figures=figs, findings=findings, seed=seed,
                       dataset_hash=dataset.fingerprint(), arrays={"trained_maps": trained.numpy(),
                                                                   "randomised_maps": last_maps.numpy()})


def _cascade_figure(cascade: list[dict[str, Any]], chance: float):
    figure = figures.new_figure(6, 3.5)
    ax = figure.add_subplot()
    x = np.arange(len(cascade))
    ax.plot(x, [c["rank_correlation"] for c in cascade], marker="o", label="Spearman vs trained maps")
    ax.plot(x, [c["pointing_game"] for c in cascade], marker="s", label="pointing game")
    ax.axhline(chance, linestyle="--", color="grey", label="pointing game at chance")
    ax.set_xticks(x, [c["stage"] for c in cascade], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("randomised down to")
    ax.set_ylim(-0.2, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


# --------------------------------------------------------------------------- stability

STABILITY_PARAMS = {"methods", "limit", "batch_size", "format", "seed", "prompt_template", "method_params",
                    "epsilon", "samples"}


@probe_kind("stability", batch_params={"batch_size": BATCH_PARAMS["batch_size"]})
def stability_probe(model_dir: str, dataset_dir: str | None, params: dict[str, Any], *, device: str = "cpu",
                    progress: Progress = no_progress) -> ProbeResult:
    """Agreement between methods (mean Spearman on the same inputs) and each method's sensitivity to
    ``samples`` uniform input perturbations of radius ``epsilon`` (normalised pixel units, default
    0.03, about 2 grey levels for CLIP's normalisation). ``limit`` defaults to 32 examples."""
    _check_params(params, STABILITY_PARAMS, "stability")
    methods = [m for m in method_names(params.get("methods", "all")) if m != RANDOM]
    params = {"limit": 32, **params}
    batch_size = _int(params, "batch_size", BATCH_PARAMS["batch_size"])
    seed = _int(params, "seed", 0, minimum=0)
    epsilon = _float(params, "epsilon", 0.03)
    samples = _int(params, "samples", 3)
    if epsilon <= 0:
        raise ProbeInputError("epsilon must be positive")
    method_params = params.get("method_params") or {}
    dataset = dataset_for(dataset_dir, params)
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
            result = stability.input_sensitivity(run, batch.pixel_values, batch.prompts, epsilon=epsilon,
                                                 samples=samples, seed=seed, reference=reference,
                                                 indices=batch.indices)
            rho[name] += result.rank_correlation.tolist()
            sensitivity[name] += result.max_sensitivity.tolist()
    progress(1.0, "done")
    names, matrix = stability.method_agreement({m: torch.cat(v) for m, v in maps.items()})
    metrics = {
        "n": len(dataset), "epsilon": epsilon, "samples": samples, "methods": names,
        "agreement": [[_round(v) for v in row] for row in matrix],
        "perturbation": {m: {"rank_correlation": _round(float(np.mean(rho[m]))),
                             "worst_rank_correlation": _round(float(np.min(rho[m]))),
                             "max_sensitivity": _round(float(np.mean(sensitivity[m])))} for m in methods},
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
    findings = [Finding("medium", f"{m} is unstable under imperceptible noise",
                        f"mean Spearman {metrics['perturbation'][m]['rank_correlation']} between maps of an input and "
                        f"a copy perturbed by at most {epsilon}")
                for m in methods if np.mean(rho[m]) < 0.5]
    summary = "; ".join(f"{m}: Spearman under noise {metrics['perturbation'][m]['rank_correlation']}, "
                        f"max-sensitivity {metrics['perturbation'][m]['max_sensitivity']}" for m in methods)
    return ProbeResult(kind="stability", metrics=metrics, summary=summary, figures={"agreement": figure},
                       findings=findings, seed=seed, dataset_hash=dataset.fingerprint())


# --------------------------------------------------------------------------- one image


def explain_image(adapter, image: Image.Image, prompt: str, method: str, *,
                  params: dict[str, Any] | None = None) -> torch.Tensor:
    """``[gh, gw]`` map of ``method`` for one image and prompt."""
    return explain(adapter, method, model_inputs(adapter, [image]), [prompt], params=params)[0]

