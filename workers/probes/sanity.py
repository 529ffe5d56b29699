"""Model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

An explanation that does not change when the model's learned weights are destroyed explains the
input (edges, colours), not the model. The *cascading* test randomises the model stage by stage from
the top (projection heads and final norms) down through each transformer layer to the embeddings,
explains the same inputs after each stage, and compares with the trained model's explanations by
Spearman rank correlation.

*Every* parameter is randomised, not only modules that have ``reset_parameters``: attention
projections, layer norms, position and patch embeddings, class tokens, the logit scale. Each
tensor is replaced by Gaussian noise with that tensor's own mean and standard deviation, so
activations keep a plausible scale (a tensor of all-zero init would otherwise silence the network,
and the check would test the numerics, not the method). Scalars (logit scale/bias) have no spread of
their own and get ``N(value, max(|value|, 1e-2))``. Buffers (position ids) are not weights and are kept.

The model is restored exactly afterwards (``randomised`` is a context manager).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, field_validator

from workers.probes import faithfulness, figures
from workers.probes.explanations import (
    RANDOM,
    DatasetParams,
    dataset_for,
    explain_dataset,
    load_dual_encoder,
    method_names,
    pointing,
    rounded,
)
from workers.probes.kinds import DatasetArg, Flag, Metric, probe_kind
from workers.probes.stability import rank_correlation
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

# "<tower>.<...>.layers.<i>." / ".layer.<i>." / ".blocks.<i>." / ".h.<i>.": a transformer block.
_LAYER = re.compile(r"^(?P<tower>.*?)\.(?:layers|layer|blocks|h)\.(?P<index>\d+)\.")
# Parameters below the first block: embeddings and the norm applied before the blocks.
_BOTTOM = ("embed", "pre_layrnorm", "pre_layernorm", "class_token", "cls_token", "patch_proj")


@dataclass(frozen=True)
class Stage:
    """One step of the cascade: the parameters randomised in addition to all earlier stages."""

    name: str
    parameters: tuple[str, ...]


def randomisation_stages(model: torch.nn.Module) -> list[Stage]:
    """Every parameter of ``model`` in cascade order: ``head``, ``block -1`` (each tower's top
    block), ``block -2``, ..., ``embeddings``. Towers of different depth are aligned at the top."""
    names = [name for name, _ in model.named_parameters()]
    depth: dict[str, int] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            depth[match["tower"]] = max(depth.get(match["tower"], -1), int(match["index"]))
    head: list[str] = []
    bottom: list[str] = []
    blocks: dict[int, list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            from_top = depth[match["tower"]] - int(match["index"])
            blocks.setdefault(from_top, []).append(name)
        elif any(marker in name for marker in _BOTTOM):
            bottom.append(name)
        else:
            head.append(name)
    stages = [Stage("head", tuple(head))] if head else []
    stages += [Stage(f"block -{k + 1}", tuple(blocks[k])) for k in sorted(blocks)]
    if bottom:
        stages.append(Stage("embeddings", tuple(bottom)))
    return stages


@torch.no_grad()
def randomise_(model: torch.nn.Module, names: set[str] | tuple[str, ...], generator: torch.Generator) -> int:
    """Replace the named parameters in place by noise with each tensor's mean and std. Returns the
    number of scalars changed."""
    wanted = set(names)
    changed = 0
    for name, param in model.named_parameters():
        if name not in wanted:
            continue
        data = param.detach().float()
        mean = data.mean()
        std = data.std() if data.numel() > 1 else torch.tensor(0.0)
        if not torch.isfinite(std) or std <= 0:
            std = torch.clamp(mean.abs(), min=1e-2)
        noise = torch.randn(param.shape, generator=generator) * std.cpu() + mean.cpu()
        param.copy_(noise.to(param.device, param.dtype))
        changed += param.numel()
    return changed


def forget_cached_outputs(adapter: Any) -> None:
    """Drop whatever the adapter cached from the model's outputs (CLIP's adapter caches text
    embeddings): after randomising, they belong to another model. Uses the adapter's public
    ``clear_caches()`` where it has one."""
    clear = getattr(adapter, "clear_caches", None)
    if callable(clear):
        clear()
        return
    cache = getattr(adapter, "_text_cache", None)
    if isinstance(cache, dict):
        cache.clear()


@contextmanager
def randomised(model: torch.nn.Module, *, on_change: Callable[[], None] | None = None) -> Iterator[None]:
    """Snapshot every parameter; restore them all on exit, whatever happened inside.

    ``on_change`` runs after the restore (e.g. ``forget_cached_outputs``), so nothing computed from
    the randomised weights outlives the check: a worker may keep this model cached for later probes.
    """
    snapshot = {name: param.detach().clone() for name, param in model.named_parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(snapshot[name])
        if on_change is not None:
            on_change()


def cascade(model: torch.nn.Module, *, seed: int = 0) -> Iterator[tuple[Stage, int]]:
    """Randomise ``model`` stage by stage (cumulatively), yielding ``(stage, scalars changed)`` after
    each. Use inside ``randomised(model)`` so the trained weights come back."""
    generator = torch.Generator().manual_seed(seed)
    for stage in randomisation_stages(model):
        yield stage, randomise_(model, stage.parameters, generator)


# --------------------------------------------------------------------------- the probe kind


class SanityParams(DatasetParams):
    method: str = Field("chefer", min_length=1, description="the grounding method to test")
    max_rank_correlation: float = Field(0.3, ge=-1, le=1, description="pass only if the mean Spearman correlation "
                                                                      "with the trained model's maps falls below this")
    pointing_margin: float = Field(0.1, ge=0, le=1, description="pass only if the randomised pointing game is "
                                                                "this close to chance")
    tolerance_px: float = Field(faithfulness.POINTING_TOLERANCE_PX, ge=0, le=1000,
                                description="pixels around a box that still count as a hit")
    draws: int = Field(3, ge=1, le=100, description="independent full randomisations averaged for the verdict")
    method_params: Annotated[dict[str, Any], Flag(hidden=True)] = Field(
        default_factory=dict, description="parameters of the method")

    @field_validator("method")
    @classmethod
    def _one_method(cls, value: str) -> str:
        if value in ("all", RANDOM):
            raise ValueError("needs one method name")
        return value


@probe_kind(
    "sanity", title="Sanity checks (model randomisation)", section="explain", params=SanityParams,
    help="cascading model-randomisation sanity check",
    dataset=DatasetArg(help="dataset folder; default: the zoo's held-out scenes with grey decoys (heldout-decoys)"),
    glossary={
        "passed": Metric("Passed", "whether the maps change once the model's weights are randomised"),
        "rank_correlation": Metric("Spearman, trained vs randomised", "rank correlation between the trained and the "
                                   "randomised model's maps (low is good)", limitation=True),
        "pointing_game": Metric("Pointing game (trained)", "share of maps whose maximum lies in the named object"),
        "randomized_pointing_game": Metric("Pointing game (randomised)", "the same on the randomised model"),
        "random_pointing_game": Metric("Pointing game by chance", "the pointing game a random map scores"),
        "pointing_gain_over_randomised": Metric("Gain over the randomised model", "what the trained weights add "
                                                "to the pointing game over a network that only sees the input"),
    })
def sanity_probe(model_dir: str, dataset_dir: str | None, params: SanityParams, *, device: str = "cpu",
                 progress: Progress = no_progress) -> ProbeResult:
    """Cascading model randomisation (Adebayo et al. 2018) for one ``method``.

    Passes when, on the fully randomised model (averaged over ``draws`` randomisations), the mean
    Spearman correlation with the trained model's maps is below ``max_rank_correlation`` and the
    pointing game is within ``pointing_margin`` of chance. Without a dataset it runs on the zoo's
    ``heldout-decoys`` split."""
    method, batch_size, seed = params.method, params.batch_size, params.seed
    threshold, margin, tolerance = params.max_rank_correlation, params.pointing_margin, params.tolerance_px
    # A randomised model is one draw from a distribution, so the verdict uses the mean of ``draws``
    # independent full randomisations; the first is the cascade, stage by stage.
    draws = params.draws
    method_params = params.method_params
    method_names(method)
    # Default: the held-out scenes with grey decoys, where a map that finds whatever stands out (as a
    # random network's maps do, from contrast) lands on a decoy most of the time; in plain 2-4 object
    # scenes the pointing part of the check could not pass for any input-sensitive method
    # (``world.DECOY_SIDE``).
    dataset = dataset_for(dataset_dir, limit=params.limit, format=params.format,
                          prompt_template=params.prompt_template, default_split="heldout-decoys")
    adapter = load_dual_encoder(model_dir, device)
    started = time.perf_counter()
    stages = randomisation_stages(adapter.model)
    total_steps = len(stages) + draws
    progress(0.0, f"{method} on the trained model")
    trained = explain_dataset(adapter, dataset, method, batch_size=batch_size, params=method_params, seed=seed)
    trained_pointing = pointing(trained, dataset, tolerance)
    chance = float(np.mean([faithfulness.localisation(torch.zeros(adapter.grid), e.boxes, e.width, e.height,
                                                      tolerance_px=tolerance).chance_hit for e in dataset.examples]))

    def explain_and_compare() -> tuple[torch.Tensor, dict[str, float | None]]:
        forget_cached_outputs(adapter)  # e.g. text embeddings of the trained text tower
        maps = explain_dataset(adapter, dataset, method, batch_size=batch_size, params=method_params, seed=seed)
        return maps, {"rank_correlation": rounded(float(rank_correlation(trained, maps).mean())),
                      "pointing_game": rounded(pointing(maps, dataset, tolerance))}

    rows: list[dict[str, Any]] = []
    last_maps = trained
    randomised_scalars = 0
    with randomised(adapter.model, on_change=lambda: forget_cached_outputs(adapter)):
        for step, (stage, scalars) in enumerate(cascade(adapter.model, seed=seed), start=1):
            progress(step / total_steps, f"randomised {stage.name}")
            randomised_scalars += scalars
            last_maps, scores = explain_and_compare()
            rows.append({"stage": stage.name, "parameters": len(stage.parameters), "scalars": scalars, **scores})
    randomised_draws = [{"seed": seed, **{k: rows[-1][k] for k in ("rank_correlation", "pointing_game")}}] \
        if rows else []
    for extra in range(1, draws if rows else 0):
        progress((len(stages) + extra) / total_steps, f"randomisation draw {extra + 1} of {draws}")
        with randomised(adapter.model, on_change=lambda: forget_cached_outputs(adapter)):
            for _ in cascade(adapter.model, seed=seed + extra):
                pass
            randomised_draws.append({"seed": seed + extra, **explain_and_compare()[1]})
    progress(1.0, "done")
    total_scalars = sum(p.numel() for p in adapter.model.parameters())
    if randomised_draws:
        final = {k: round(float(np.mean([d[k] for d in randomised_draws])), 4)
                 for k in ("rank_correlation", "pointing_game")}
    else:
        final = {"rank_correlation": 1.0, "pointing_game": trained_pointing}
    passed = final["rank_correlation"] < threshold and abs(final["pointing_game"] - chance) <= margin
    metrics = {
        "method": method, "n": len(dataset), "passed": bool(passed),
        "rank_correlation": final["rank_correlation"], "max_rank_correlation": threshold,
        "pointing_game": rounded(trained_pointing), "randomized_pointing_game": final["pointing_game"],
        "random_pointing_game": rounded(chance), "pointing_margin": margin,
        # What the trained weights add over a network that only sees the input: a map that still
        # localises after randomisation gets its hits from image contrast (Adebayo et al.'s "edge
        # detector" effect), and only this gap is evidence about the model.
        "pointing_gain_over_randomised": rounded(trained_pointing - final["pointing_game"]),
        "randomized_parameters": randomised_scalars, "total_parameters": total_scalars,
        "randomisation_draws": randomised_draws, "cascade": rows,
        "seconds": round(time.perf_counter() - started, 3), "seed": seed,
    }
    shown = min(4, len(dataset))
    grid_maps = {"trained": list(trained[:shown]), "randomised": list(last_maps[:shown])}
    figs = figures.paged("examples", figures.heatmap_grid_pages(
        [e.load_image() for e in dataset.examples[:shown]], grid_maps,
        boxes=[e.boxes for e in dataset.examples[:shown]], row_titles=[e.prompt for e in dataset.examples[:shown]],
        what=f"{method} maps of the trained model beside those of the same model with every parameter randomised",
        rows="one example each, headed by its prompt"))
    figs["cascade"] = _cascade_figure(rows, chance, method)
    findings = []
    if not passed:
        if final["rank_correlation"] >= threshold:
            detail = (f"after randomising every parameter the maps still correlate with the trained model's "
                      f"(Spearman {final['rank_correlation']}): the explanation reflects the input more than "
                      "the model.")
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


def _cascade_figure(rows: list[dict[str, Any]], chance: float, method: str) -> Any:
    """Two measures on two labelled axes (they have different meanings and scales), stages shared;
    both lines in the method's colour, the one it has in every figure."""
    from workers.probes.palette import REFERENCE, colour

    figure = figures.new_figure(6.4, 4.6)
    top, bottom = figure.subplots(2, 1, sharex=True)
    x = np.arange(len(rows))
    top.plot(x, [c["rank_correlation"] for c in rows], marker="o", color=colour(method),
             label=f"{method}: rank agreement")
    top.set_ylabel("rank agreement with\ntrained maps (Spearman)", fontsize=8)
    top.set_ylim(-0.2, 1.05)
    top.grid(alpha=0.3)
    bottom.plot(x, [c["pointing_game"] for c in rows], marker="s", color=colour(method),
                label=f"{method}: pointing game")
    bottom.axhline(chance, linestyle="--", color=REFERENCE, linewidth=0.8, label="pointing game at chance")
    bottom.set_ylabel("pointing game", fontsize=8)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xticks(x, [c["stage"] for c in rows], rotation=45, ha="right", fontsize=8)
    bottom.set_xlabel("layers randomised, from the output down to")
    bottom.grid(alpha=0.3)
    figure.legend(*bottom.get_legend_handles_labels(), fontsize=8, loc="outside right upper", frameon=False)
    return figures.describe(
        figure, f"Sanity check cascade of {method}: its maps as more and more layers are randomised, from the "
                "output down (left to right); agreement with the trained model's maps should fall",
        rows=f"top, rank agreement (Spearman) of the randomised model's {method} maps with the trained model's; "
             "bottom, the randomised model's pointing game, with chance as a dashed line",
        axes="x, the last layer randomised at each stage")


