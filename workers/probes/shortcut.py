"""Shortcut detection: does the model's score for a class ride on an artefact (a watermark, a
hospital marker) rather than on the class itself? (DeGrave et al. 2021.)

Three independent lines of evidence, each with its own threshold, combined into one verdict:

1. **Concept sensitivity (TCAV).** The artefact concept (a folder of images showing it) against
   random images, Holm-corrected across layers: significant, with a reliable CAV and a TCAV score
   above the random baseline (the artefact *raises* the target's score) at one layer at least.
2. **Intervention.** The artefact pasted onto otherwise identical images (its region first
   cleared, so "with" and "without" differ only there): the mean score change for the target,
   on the target inputs and on random images (the dangerous case: the artefact alone makes
   the model see the class). Evidence when the change on random images is positive, significant
   (one-sample t-test) and at least ``MIN_EFFECT`` of the score gap between target inputs and
   random images.
3. **Grounding.** Chefer relevance for the target on the stamped target inputs: the share of
   positive relevance inside the artefact's box divided by the box's share of the image. Evidence
   when the ratio is at least ``MIN_RELEVANCE_RATIO`` (the artefact draws that many times its
   fair share of the explanation).

Verdict: **flagged** when at least two of the three agree. One line alone is not enough: TCAV can
be significant for a direction the score merely correlates with, the intervention can move
scores through occlusion, and relevance maps can be unfaithful; agreement between a
representation test, a causal test and an explanation is what a reviewer can act on.

The artefact is described by two files next to the concept folder: ``<concept>.stamp.png`` (the
artefact as it appears) and ``<concept>.stamp.json``: ``{"image": "<concept>.stamp.png", "box":
[x0, y0, x1, y1], "image_size": [w, h]}`` (where it sits, in pixels of a ``w x h`` image; scaled
to each input). Without them only the TCAV line is measured and the verdict says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from workers.probes import tcav
from workers.probes.adapters.base import DualEncoderAdapter
from workers.probes.errors import ProbeInputError
from workers.probes.kinds import BatchSize, DatasetArg, KindParams, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Intervention evidence: the artefact moves random images at least this share of the way towards
#: the target inputs' score.
MIN_EFFECT = 0.1
#: Grounding evidence: the artefact's box gets at least this multiple of its area share of relevance.
MIN_RELEVANCE_RATIO = 2.0
DEFAULT_CONCEPT = "watermark"


@dataclass
class Stamp:
    image: Image.Image
    box: tuple[float, float, float, float]
    image_size: tuple[int, int]

    def box_for(self, width: int, height: int) -> tuple[int, int, int, int]:
        sx, sy = width / self.image_size[0], height / self.image_size[1]
        x0, y0, x1, y1 = self.box
        return (round(x0 * sx), round(y0 * sy), max(round(x0 * sx) + 1, round(x1 * sx)),
                max(round(y0 * sy) + 1, round(y1 * sy)))


def load_stamp(concepts_dir: str | Path, concept: str) -> Stamp | None:
    """``<concept>.stamp.json`` + its image next to the concept folders; ``None`` if absent."""
    from workers.probes.datasets import open_image

    root = Path(concepts_dir)
    spec_path = root / f"{concept}.stamp.json"
    if not spec_path.is_file():
        return None
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        box = tuple(float(v) for v in spec["box"])
        size = tuple(int(v) for v in spec["image_size"])
        name = str(spec.get("image", f"{concept}.stamp.png"))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ProbeInputError(f"{spec_path}: expected {{\"image\", \"box\": [x0, y0, x1, y1], "
                              f"\"image_size\": [w, h]}} ({exc})") from None
    if len(box) != 4 or len(size) != 2 or not (0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]):
        raise ProbeInputError(f"{spec_path}: box {list(box)} must lie inside image_size {list(size)}")
    image_path = (root / name)
    if "/" in name or "\\" in name or not image_path.is_file():
        raise ProbeInputError(f"{spec_path}: stamp image {name!r} not found next to it")
    return Stamp(open_image(image_path, decode=True), box, size)


def clear(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Fill ``box`` with the median colour of a thin ring around it (the local background)."""
    out = image.convert("RGB").copy()
    a = np.asarray(out)
    x0, y0, x1, y1 = box
    pad = max(2, (x1 - x0) // 4)
    ring = a[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad].reshape(-1, 3)
    inner = a[y0:y1, x0:x1].reshape(-1, 3)
    pixels = ring if len(ring) > len(inner) else a.reshape(-1, 3)
    colour = tuple(int(v) for v in np.median(pixels, axis=0))
    out.paste(colour, box)
    return out


def paste(image: Image.Image, stamp: Stamp) -> Image.Image:
    """``image`` with its stamp region cleared and the stamp drawn there."""
    box = stamp.box_for(*image.size)
    out = clear(image, box)
    out.paste(stamp.image.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR), box[:2])
    return out


def box_weights(box: tuple[int, int, int, int], width: int, height: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[gh, gw]``: the fraction of each patch cell covered by ``box``."""
    gh, gw = grid
    ys = np.linspace(0, height, gh + 1)
    xs = np.linspace(0, width, gw + 1)
    x0, y0, x1, y1 = box
    w = np.zeros((gh, gw))
    for i in range(gh):
        oy = max(0.0, min(y1, ys[i + 1]) - max(y0, ys[i])) / (ys[i + 1] - ys[i])
        for j in range(gw):
            ox = max(0.0, min(x1, xs[j + 1]) - max(x0, xs[j])) / (xs[j + 1] - xs[j])
            w[i, j] = oy * ox
    return torch.tensor(w, dtype=torch.float32)


@dataclass
class ShortcutReport:
    target: str
    concept: str
    tcav: tcav.TCAVReport
    intervention: dict[str, Any] | None
    relevance: dict[str, Any] | None
    evidence: dict[str, bool | None]
    flagged: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "concept": self.concept,
            "flagged": self.flagged,
            "evidence": self.evidence,
            "tcav": self.tcav.as_dict()["results"],
            "intervention": self.intervention,
            "relevance": self.relevance,
            "thresholds": {"alpha": self.tcav.alpha, "min_effect": MIN_EFFECT,
                           "min_relevance_ratio": MIN_RELEVANCE_RATIO, "min_cav_accuracy": tcav.MIN_CAV_ACCURACY},
        }


def _scores(adapter: DualEncoderAdapter, images: Sequence[Image.Image], target: str, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            out.append(adapter.score(adapter.preprocess(batch), [target] * len(batch)).float().cpu())
    return torch.cat(out)


def intervention(adapter: DualEncoderAdapter, target: str, inputs: Sequence[Image.Image],
                 random_images: Sequence[Image.Image], stamp: Stamp, *, batch_size: int = 32,
                 alpha: float = 0.05) -> dict[str, Any]:
    """Score change for ``target`` when the stamp is added to otherwise identical images."""
    from scipy import stats

    def deltas(images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        without = [clear(im, stamp.box_for(*im.size)) for im in images]
        with_stamp = [paste(im, stamp) for im in without]
        base = _scores(adapter, without, target, batch_size)
        return _scores(adapter, with_stamp, target, batch_size) - base, base

    d_in, base_in = deltas(inputs)
    d_rand, base_rand = deltas(random_images)
    gap = float(base_in.mean() - base_rand.mean())

    def summary(d: torch.Tensor) -> dict[str, float | None]:
        values = d.numpy().astype(float)
        p = float(stats.ttest_1samp(values, 0.0).pvalue) if values.std() > 0 else (1.0 if values.mean() == 0 else 0.0)
        return {"mean_change": round(float(values.mean()), 6), "share_raised": round(float((values > 0).mean()), 6),
                "p_value": p, "relative_to_gap": round(float(values.mean()) / gap, 6) if gap > 0 else None}

    result: dict[str, Any] = {"target_inputs": summary(d_in), "random_images": summary(d_rand),
              "score_gap_target_vs_random": round(gap, 6), "n_inputs": len(inputs), "n_random": len(random_images)}
    r = result["random_images"]
    result["evidence"] = bool(r["p_value"] < alpha and r["mean_change"] > 0
                              and (r["relative_to_gap"] or 0) >= MIN_EFFECT)
    return result


def relevance_share(adapter: DualEncoderAdapter, target: str, inputs: Sequence[Image.Image], stamp: Stamp, *,
                    method: str = "chefer",
                    batch_size: int = 32) -> tuple[dict[str, Any], list[Image.Image], torch.Tensor]:
    """Share of positive relevance inside the stamp's box on stamped target inputs."""
    from workers.probes import registry

    explain = registry.get(method)
    stamped = [paste(clear(im, stamp.box_for(*im.size)), stamp) for im in inputs]
    maps = []
    for start in range(0, len(stamped), batch_size):
        batch = stamped[start:start + batch_size]
        maps.append(explain(adapter, adapter.preprocess(batch), [target] * len(batch)).float().cpu())
    heat = torch.cat(maps).clamp_min(0)
    shares, areas = [], []
    for im, m in zip(stamped, heat, strict=True):
        weights = box_weights(stamp.box_for(*im.size), im.width, im.height, tuple(m.shape))
        total = float(m.sum())
        shares.append(float((m * weights).sum()) / total if total > 0 else 0.0)
        areas.append(float(weights.sum()) / weights.numel())
    share, area = float(np.mean(shares)), float(np.mean(areas))
    ratio = share / area if area > 0 else math.inf
    result = {"method": method, "share_in_box": round(share, 6), "box_area_share": round(area, 6),
              "ratio": round(ratio, 6), "evidence": bool(ratio >= MIN_RELEVANCE_RATIO)}
    return result, stamped, heat


def run_shortcut(adapter: DualEncoderAdapter, target: str, inputs: Sequence[Image.Image],
                 concept_images: Sequence[Image.Image], random_images: Sequence[Image.Image], stamp: Stamp | None, *,
                 concept: str = DEFAULT_CONCEPT, layers: str | Sequence[int] | None = "auto",
                 runs: int = tcav.DEFAULT_RANDOM_RUNS, null_concepts: int = tcav.DEFAULT_NULL_CONCEPTS,
                 alpha: float = tcav.DEFAULT_ALPHA, seed: int = 0,
                 batch_size: int = 32, method: str = "chefer",
                 progress: Progress = no_progress) -> tuple[ShortcutReport, dict[str, Any]]:
    """All three lines of evidence and the verdict; returns ``(report, extras for figures)``."""
    report = tcav.run_tcav(adapter, target, inputs, {concept: concept_images}, random_images, layers=layers,
                           runs=runs, null_concepts=null_concepts, alpha=alpha, seed=seed, batch_size=batch_size,
                           progress=lambda f, phase: progress(0.6 * f, f"tcav: {phase}"))
    tcav_evidence = any(r.significant and r.tcav_score > r.random_score for r in report.results)
    extras: dict[str, Any] = {}
    inter = rel = None
    if stamp is not None:
        progress(0.7, "intervention")
        inter = intervention(adapter, target, inputs, random_images, stamp, batch_size=batch_size, alpha=alpha)
        progress(0.85, "relevance")
        rel, stamped, heat = relevance_share(adapter, target, inputs, stamp, method=method, batch_size=batch_size)
        extras.update(stamped=stamped, heat=heat, stamp=stamp)
    evidence = {"tcav": tcav_evidence, "intervention": None if inter is None else inter["evidence"],
                "relevance": None if rel is None else rel["evidence"]}
    flagged = sum(bool(v) for v in evidence.values()) >= 2
    progress(1.0, "done")
    return ShortcutReport(target, concept, report, inter, rel, evidence, flagged), extras


def figure_evidence(report: ShortcutReport, extras: dict[str, Any]) -> Figure:
    """The shortcut check at a glance, readable at the width of a page.

    Top: the artefact's TCAV score per layer against random concepts (``*``: significant after
    Holm), and the mean change of the class score when the artefact is pasted into images of the
    class and into random images. Bottom: the grounding method's relevance on class images with the
    artefact pasted in, its box outlined, on one colour scale with a colour bar. Legends sit below
    the panels, never over the bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from workers.probes.figures import HEATMAP_CMAP, draw_overlay

    shown = list(extras.get("stamped", []))[:3]
    heats = list(extras.get("heat", []))
    stamp: Stamp | None = extras.get("stamp")
    # As wide as the report's text column and low enough to print there at the size it is drawn.
    fig = Figure(figsize=(7.4, 5.3 if shown else 2.8), layout="constrained")
    grid = fig.add_gridspec(2 if shown else 1, 3, height_ratios=[1.0, 1.15] if shown else [1.0])
    tcav_ax, change_ax = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2])
    rows = report.tcav.results
    xs = np.arange(len(rows))
    tcav_ax.bar(xs - 0.2, [r.tcav_score for r in rows], 0.4, yerr=[r.tcav_score_std for r in rows], capsize=3,
                color="C3")
    tcav_ax.bar(xs + 0.2, [r.random_score for r in rows], 0.4, yerr=[r.random_score_std for r in rows], capsize=3,
                color="0.7")
    for x, r in zip(xs, rows, strict=True):
        if r.significant:
            tcav_ax.text(x - 0.2, min(1.02, r.tcav_score + r.tcav_score_std + 0.02), "*", ha="center", fontsize=14)
    tcav_ax.axhline(0.5, color="0.4", lw=0.8, ls=":")
    tcav_ax.set_xticks(xs, [f"layer {r.layer}" for r in rows])
    tcav_ax.set_ylim(0, 1.12)
    tcav_ax.set_ylabel("TCAV score (0.5 = no influence)")
    tcav_ax.set_title(f"Concept influence of {report.concept!r}\n(* significant after Holm)", fontsize=9)
    handles: list[Any] = [Patch(color="C3", label=f"concept {report.concept!r}"),
                          Patch(color="0.7", label="random concepts")]
    if report.intervention is not None:
        i = report.intervention
        change_ax.bar([0, 1], [i["target_inputs"]["mean_change"], i["random_images"]["mean_change"]],
                      color=["C0", "C1"])
        change_ax.set_xticks([0, 1], ["class\nimages", "random\nimages"])
        change_ax.axhline(0, color="k", lw=0.8)
        change_ax.set_ylabel("mean change of the class score")
        change_ax.set_title("Artefact pasted in", fontsize=9)
    else:
        change_ax.text(0.5, 0.5, "no stamp: intervention\nnot measured", ha="center", va="center",
                       transform=change_ax.transAxes)
        change_ax.set_axis_off()
    if shown:
        method = str((report.relevance or {}).get("method", "relevance"))
        overlay_axes = [fig.add_subplot(grid[1, column]) for column in range(3)]
        for index, (ax, image) in enumerate(zip(overlay_axes, shown, strict=False)):
            box = [stamp.box_for(*image.size)] if stamp is not None else []
            heat = heats[index] if index < len(heats) else np.zeros((1, 1))
            draw_overlay(ax, image, heat, boxes=box, title=f"class image {index + 1} + artefact")
        for ax in overlay_axes[len(shown):]:
            ax.set_axis_off()
        fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=HEATMAP_CMAP), ax=overlay_axes, shrink=0.8,
                     label=f"{method} relevance (min-max scaled per map)")
        if stamp is not None:
            handles.append(Line2D([], [], color="lime", linewidth=2, label="pasted artefact"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9)
    verdict = "FLAGGED" if report.flagged else "not flagged"
    fig.suptitle(f"Shortcut check: {report.concept!r} for {report.target!r}: {verdict}", fontsize=11)
    from workers.probes.captions import describe

    return describe(
        fig, f"Shortcut check of {report.concept!r} for {report.target!r}",
        rows="top, the artefact's concept influence (TCAV score) per layer, red, against random concepts, grey "
             "(0.5 = no influence; * significant after Holm correction), and the mean change of the class score "
             "when the artefact is pasted into images of the class and into random images"
             + ("; bottom, the grounding method's relevance on images of the class with the artefact pasted in"
                if shown else ""),
        colour="relevance, min-max scaled per map (colour bar on the right)" if shown else None,
        marks="the green box is the pasted artefact" if shown and stamp is not None else None)


class ShortcutParams(KindParams):
    inputs: str | None = Field(None, min_length=1, description="folder of images of the class (default: the "
                                                              "shortcut zoo's)")
    target: str | None = Field(None, min_length=1, description="the class text, e.g. 'a red circle' (default: the "
                                                              "shortcut zoo's)")
    concept: str = Field(DEFAULT_CONCEPT, min_length=1, description="the artefact's concept folder")
    layers: str | list[int] = Field("auto", description="'auto' or the layers, e.g. [2, 4] or '2,4'")
    random_runs: int = Field(tcav.DEFAULT_RANDOM_RUNS, ge=2, le=500,
                             description="concept-vs-random and random-vs-random CAVs per layer")
    null_concepts: int = Field(tcav.DEFAULT_NULL_CONCEPTS, ge=1, le=500,
                               description="random concepts forming the null")
    alpha: float = Field(tcav.DEFAULT_ALPHA, gt=0, lt=1, description="family-wise error rate after Holm")
    method: str = Field("chefer", min_length=1, description="grounding method for the relevance share")
    seed: Seed = 0
    batch_size: BatchSize = 32


@probe_kind(
    "shortcut", title="Shortcut detection", section="bias", params=ShortcutParams,
    help="detect a shortcut concept (e.g. a watermark)",
    dataset=DatasetArg(flag="--concepts", help="folder with the artefact concept folder, random/ and "
                                               "<concept>.stamp.json/.png (default: the shortcut zoo's)"),
    glossary={
        "flagged": Metric("Flagged", "the class score relies on the artefact by at least two kinds of evidence"),
        "tcav": Metric("TCAV of the artefact", "whether the artefact concept significantly moves the class score"),
        "intervention": Metric("Pasting the artefact", "score change when the artefact is pasted onto otherwise "
                                                       "identical images"),
        "relevance": Metric("Relevance on the artefact", "share of the grounding method's relevance on the artefact"),
    })
def shortcut_kind(model_dir: str, dataset_dir: str | None, params: ShortcutParams, *, device: str = "cpu",
                  progress: Progress = no_progress) -> ProbeResult:
    """``dataset_dir``: the concepts folder (``<concept>/``, ``random/`` and optionally the
    ``<concept>.stamp.*`` files); ``None``, like a missing ``inputs`` or ``target``, uses the
    shortcut zoo's data."""
    from workers.probes import suite

    inputs, target = params.inputs, params.target
    if dataset_dir is None or inputs is None or target is None:
        from workers.probes.zoo import shortcut as zoo_shortcut

        data = zoo_shortcut.probe_data()
        dataset_dir = dataset_dir or str(data / "concepts")
        inputs = inputs or str(data / "inputs")
        target = target or zoo_shortcut.TARGET
    concept = params.concept
    input_paths = tcav.load_image_folder(inputs, minimum=tcav.MIN_TARGET_IMAGES, what="target inputs")
    concept_paths, random_paths = tcav.load_concepts_dir(dataset_dir, [concept])
    stamp = load_stamp(dataset_dir, concept)
    adapter = suite.load_model(model_dir, device, family="dual_encoder")
    tcav.resolve_layers(params.layers, adapter.num_layers)
    seed = params.seed
    report, extras = run_shortcut(
        adapter, target, tcav.load_images(input_paths), tcav.load_images(concept_paths[concept]),
        tcav.load_images(random_paths), stamp, concept=concept, layers=params.layers, runs=params.random_runs,
        null_concepts=params.null_concepts, alpha=params.alpha, seed=seed, batch_size=params.batch_size,
        method=params.method, progress=progress)
    metrics = report.as_dict()
    lines = ", ".join(f"{k}: {'yes' if v else ('not measured' if v is None else 'no')}"
                      for k, v in report.evidence.items())
    summary = (f"Shortcut check of {concept!r} for {report.target!r}: "
               f"{'FLAGGED' if report.flagged else 'not flagged'} (evidence: {lines}).")
    findings = []
    if report.flagged:
        findings.append(Finding("high", f"the score for {report.target!r} relies on {concept!r}", summary))
    elif stamp is None:
        findings.append(Finding("info", "shortcut intervention and grounding not measured",
                                f"no {concept}.stamp.json next to the concept folders"))
    return ProbeResult(kind="shortcut", metrics=metrics, summary=summary,
                       figures={"shortcut_evidence": figure_evidence(report, extras),
                                "shortcut_tcav_bars": tcav.figure_bars(report.tcav)},
                       findings=findings, seed=seed)
