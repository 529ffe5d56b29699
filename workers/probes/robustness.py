"""Robustness probes: how a dual encoder's decisions and explanations hold up when the input degrades
or is attacked.

Three families, each measured against the clean input on a grounding dataset (prompts double as
class names; zero-shot classification picks the best-scoring class prompt):

- ``corruption``: ImageNet-C-style corruptions (Hendrycks & Dietterich 2019) at severities 1-5:
  Gaussian noise, Gaussian blur, JPEG compression, brightness, contrast. Parameters are
  ImageNet-C's (blur radius scaled to the image size); noise is seeded per image, so runs repeat.
- ``typographic``: the name of a wrong class written onto the image (Goh et al. 2021's
  "typographic attack" on CLIP), with a control that writes meaningless letters in the same box:
  what the control flips is occlusion, what only the attack flips is reading.
- ``prompt``: the class prompts reworded: other templates, typos, synonyms.

Metrics per probe and severity: zero-shot ``accuracy`` (and ``accuracy_drop`` from clean),
``flip_rate`` (share of decisions that changed), ``score_drop`` (mean fall of the true prompt's
score) and ``explanation_spearman`` (mean Spearman rank correlation between the chefer heatmaps of
the clean and the perturbed input; 1 = the explanation did not move). The typographic rows also
give ``relevance_on_text``: the share of the chefer relevance for the *written* class that lies on
the written label, next to the label's share of the input (``text_area``).

Accuracy: an image counts as correct when its prompt beats every class prompt that names nothing
in the image (other prompts annotated on the same image, or objects listed in the zoo's
``scenes.jsonl``, are not competitors: a picture of a red circle and a blue square is not
misclassified by saying "a blue square").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from workers.probes.adapters.base import DualEncoderAdapter
from workers.probes.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from workers.probes.errors import ProbeInputError
from workers.probes.kinds import BatchSize, DatasetArg, Flag, KindParams, Limit, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROMPT_PERTURBATIONS = ("templates", "typos", "synonyms")
TYPOGRAPHIC = ("typographic", "typographic_control")
FAMILIES = ("corruption", "typographic", "prompt")
TEMPLATES = ("a photo of {}.", "a picture of {}.", "this is {}.", "there is {} in the image.")
#: Small synonym table: words of the zoo world and common everyday classes. Prompts with no
#: listed word are left unchanged (and counted, so the report says how many were perturbed).
SYNONYMS = {
    "circle": "disk", "square": "box", "cross": "plus", "triangle": "wedge", "star": "asterisk",
    "photo": "picture", "picture": "photo", "dog": "puppy", "cat": "kitten", "car": "automobile",
    "red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden", "big": "large", "small": "little",
}


# --- corruptions (PIL in, PIL out) ---------------------------------------------------------------


# --- typographic attack ------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def text_box_position(width: int, height: int, boxes: Sequence[Sequence[float]], text_w: int,
                      text_h: int) -> tuple[int, int]:
    """Where to write: of a few candidate bands, the one overlapping the object boxes least
    (so the attack reads as a label, not as an occluder)."""
    margin = max(2, height // 40)
    candidates = [(margin, margin), (width - text_w - margin, margin), (margin, height - text_h - margin),
                  (width - text_w - margin, height - text_h - margin), ((width - text_w) // 2, margin),
                  ((width - text_w) // 2, height - text_h - margin), ((width - text_w) // 2, (height - text_h) // 2)]

    def overlap(pos: tuple[int, int]) -> float:
        x0, y0 = pos
        x1, y1 = x0 + text_w, y0 + text_h
        return sum(max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3]) - max(y0, b[1])) for b in boxes)

    return min(candidates, key=lambda pos: (overlap(pos), candidates.index(pos)))


def write_text(image: Image.Image, text: str, boxes: Sequence[Sequence[float]] = (), *,
               scale: float = 0.11) -> Image.Image:
    """``text`` in black on a white label (font height ``scale`` x image height) on a copy."""
    return write_text_box(image, text, boxes, scale=scale)[0]


def write_text_box(image: Image.Image, text: str, boxes: Sequence[Sequence[float]] = (), *,
                   scale: float = 0.11) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``write_text`` and the label's box ``(x0, y0, x1, y1)`` in the copy's pixels."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = _font(max(8, round(out.height * scale)))
    # whole pixels: the box is reported in them (Pillow types the bbox as floats)
    left, top, right, bottom = map(int, draw.textbbox((0, 0), text, font=font))
    pad = max(1, round(out.height * 0.01))
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    tw = min(tw, out.width)
    x, y = text_box_position(out.width, out.height, boxes, tw, th)
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=(255, 255, 255))
    draw.text((x + pad - left, y + pad - top), text, fill=(0, 0, 0), font=font)
    return out, (x, y, x + tw, y + th)


def relevance_on_text(adapter: DualEncoderAdapter, images: Sequence[Image.Image], boxes: Sequence[Sequence[float]],
                      prompts: Sequence[str], *, batch_size: int = 32) -> tuple[float, float]:
    """Mean share of the chefer relevance for ``prompts[i]`` (the written class) that lies on the
    written label ``boxes[i]`` of ``images[i]``, and the labels' mean share of the model's input
    (``region_relevance``; the boxes are mapped through the image processor's resize and crop)."""
    from workers.probes.region_relevance import cell_coverage, dual_maps, share_on_region

    shares, areas = [], []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        maps = dual_maps(adapter, adapter.preprocess(chunk), list(prompts[start:start + batch_size]))
        for image, box, grid_map in zip(chunk, boxes[start:start + batch_size], maps, strict=True):
            wx0, wy0, wx1, wy1 = adapter.input_window(image.size)
            sx, sy = adapter.image_size / (wx1 - wx0), adapter.image_size / (wy1 - wy0)
            in_box = ((box[0] - wx0) * sx, (box[1] - wy0) * sy, (box[2] - wx0) * sx, (box[3] - wy0) * sy)
            coverage = cell_coverage(adapter.grid, adapter.image_size, in_box)
            shares.append(share_on_region(grid_map, coverage))
            areas.append(float(coverage.mean()))
    return float(np.mean(shares)), float(np.mean(areas))


def class_name(prompt: str) -> str:
    """``"a red circle"`` -> ``"red circle"``: what a label on the image would say."""
    words = prompt.split()
    if len(words) > 1 and words[0].lower() in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def scramble(text: str, seed: int) -> str:
    """Meaningless letters with the same length and spacing as ``text`` (the attack's control)."""
    rng = np.random.default_rng(seed)
    letters = "bdfghjkmpqvwxz"
    return "".join(ch if not ch.isalpha() else letters[int(rng.integers(len(letters)))] for ch in text)


# --- prompt perturbations --------------------------------------------------------------------------


def typo(prompt: str, seed: int = 0) -> str:
    """Swap two adjacent letters inside the longest word (deterministic in ``seed``)."""
    words = prompt.split()
    if not words:
        return prompt
    index = max(range(len(words)), key=lambda k: (len(words[k]), -k))
    word = words[index]
    if len(word) < 3:
        return prompt
    j = int(np.random.default_rng(seed).integers(1, len(word) - 1))
    words[index] = word[:j - 1] + word[j] + word[j - 1] + word[j + 1:] if j >= 1 else word
    return " ".join(words)


def synonym(prompt: str) -> str:
    return " ".join(SYNONYMS.get(w.lower(), w) for w in prompt.split())


def template(prompt: str, index: int) -> str:
    return TEMPLATES[index % len(TEMPLATES)].format(prompt)


# --- the dataset -----------------------------------------------------------------------------------


@dataclass
class Example:
    image: Image.Image
    prompt: str
    label: int  # index into classes
    present: frozenset[int]  # class indices that name something in the image (not competitors)
    boxes: list[tuple[float, float, float, float]]  # every known object box


def load_examples(dataset_dir: str | Path, *, limit: int | None = None) -> tuple[list[Example], list[str]]:
    """Examples of a grounding dataset and its class prompts (the sorted distinct prompts)."""
    from workers.probes.datasets import load_dataset

    dataset = load_dataset(dataset_dir, limit=limit)
    classes = sorted({ex.prompt for ex in dataset})
    if len(classes) < 2:
        raise ProbeInputError(f"{dataset_dir}: zero-shot robustness needs at least 2 distinct prompts (classes), "
                              f"found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    annotated: dict[Path, set[int]] = {}
    boxes: dict[Path, list] = {}
    for ex in dataset:
        annotated.setdefault(ex.image_path.resolve(), set()).add(index[ex.prompt])
        boxes.setdefault(ex.image_path.resolve(), []).extend(ex.boxes)
    scene_words = _scene_objects(dataset.root)
    examples = []
    for ex in dataset:
        key = ex.image_path.resolve()
        present = set(annotated[key])
        for words, box in scene_words.get(key, []):
            boxes[key].append(box)
            present |= {i for c, i in index.items() if set(words) <= set(c.lower().split())}
        examples.append(Example(ex.load_image(), ex.prompt, index[ex.prompt], frozenset(present), boxes[key]))
    return examples, classes


def _scene_objects(root: Path) -> dict[Path, list[tuple[tuple[str, ...], tuple[float, ...]]]]:
    """``scenes.jsonl`` objects (zoo datasets) by resolved image path; ``{}`` if absent."""
    if not (root / "scenes.jsonl").is_file():
        return {}
    from workers.probes.scenes import read_scenes_jsonl

    return {path.resolve(): [(o.words, o.box) for o in objects] for path, objects in read_scenes_jsonl(root).items()}


# --- measurement -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Scores of every example against every class, and the chefer maps for its true class."""

    scores: torch.Tensor  # [N, C]
    maps: torch.Tensor | None  # [N, gh, gw]


def _competitor_mask(examples: Sequence[Example], n_classes: int) -> torch.Tensor:
    mask = torch.ones(len(examples), n_classes, dtype=torch.bool)
    for i, ex in enumerate(examples):
        for j in ex.present:
            if j != ex.label:
                mask[i, j] = False
    return mask


def measure(adapter: DualEncoderAdapter, images: Sequence[Image.Image], class_prompts: Sequence[str],
            true_prompts: Sequence[str], *, explain: bool = True, batch_size: int = 32) -> Outcome:
    """Zero-shot scores ``[N, C]`` and (optionally) chefer maps for each image's true prompt."""
    from workers.probes import registry

    scores, maps = [], []
    method = registry.get("chefer") if explain else None
    for start in range(0, len(images), batch_size):
        pixel_values = adapter.preprocess(list(images[start:start + batch_size]))
        with torch.no_grad():
            scores.append(adapter.score_matrix(pixel_values, list(class_prompts)).float().cpu())
        if method is not None:
            maps.append(method(adapter, pixel_values, list(true_prompts[start:start + batch_size])).float().cpu())
    return Outcome(torch.cat(scores), torch.cat(maps) if maps else None)


def decisions(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Predicted class per example, ignoring non-competitors (other objects in the image)."""
    return scores.masked_fill(~mask, -math.inf).argmax(dim=1)


def compare(clean: Outcome, perturbed: Outcome, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, float | None]:
    from workers.probes.stability import rank_correlation

    before, after = decisions(clean.scores, mask), decisions(perturbed.scores, mask)
    idx = torch.arange(len(labels))
    out: dict[str, float | None] = {
        "accuracy": float((after == labels).float().mean()),
        "accuracy_drop": float((before == labels).float().mean() - (after == labels).float().mean()),
        "flip_rate": float((after != before).float().mean()),
        "score_drop": float((clean.scores[idx, labels] - perturbed.scores[idx, labels]).mean()),
        "explanation_spearman": None,
    }
    if clean.maps is not None and perturbed.maps is not None:
        out["explanation_spearman"] = float(np.mean(rank_correlation(clean.maps, perturbed.maps)))
    return out


@dataclass
class RobustnessReport:
    n: int
    classes: list[str]
    clean_accuracy: float
    rows: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        corruption_rows = [r for r in self.rows if r["family"] == "corruption"]
        by_severity = {}
        for s in SEVERITIES:
            values = [r["accuracy"] for r in corruption_rows if r["severity"] == s]
            if values:
                by_severity[str(s)] = round(float(np.mean(values)), 6)
        curve = [self.clean_accuracy] + list(by_severity.values())
        monotonic = all(b <= a + 1e-9 for a, b in itertools.pairwise(curve)) if by_severity else None
        return {"n": self.n, "classes": self.classes, "clean_accuracy": round(self.clean_accuracy, 6),
                "mean_corruption_accuracy_by_severity": by_severity,
                "accuracy_falls_monotonically": monotonic,
                "probes": self.rows}


def select_probes(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, family names (``corruption``, ``typographic``, ``prompt``) or probe names."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    everything = [*CORRUPTIONS, *TYPOGRAPHIC, *PROMPT_PERTURBATIONS]
    family = {"corruption": list(CORRUPTIONS), "corruptions": list(CORRUPTIONS), "typographic": list(TYPOGRAPHIC),
              "prompt": list(PROMPT_PERTURBATIONS), "prompts": list(PROMPT_PERTURBATIONS)}
    chosen: list[str] = []
    for name in names or ["all"]:
        if name == "all":
            chosen += everything
        elif name in family:
            chosen += family[name]
        elif name in everything:
            chosen.append(name)
        else:
            raise ProbeInputError(f"unknown robustness probe {name!r}; use all, a family "
                                  f"({', '.join(FAMILIES)}) or one of: {', '.join(everything)}")
    return list(dict.fromkeys(chosen))


def run_robustness(adapter: DualEncoderAdapter, examples: Sequence[Example], classes: Sequence[str], *,
                   probes: str | Sequence[str] = "all", severities: Sequence[int] = SEVERITIES,
                   explain: bool = True, batch_size: int = 32, seed: int = 0,
                   progress: Progress = no_progress) -> RobustnessReport:
    """Every selected probe at every severity, against the clean input."""
    chosen = select_probes(probes)
    labels = torch.tensor([ex.label for ex in examples])
    mask = _competitor_mask(examples, len(classes))
    images = [ex.image for ex in examples]
    true_prompts = [ex.prompt for ex in examples]
    clean = measure(adapter, images, classes, true_prompts, explain=explain, batch_size=batch_size)
    clean_accuracy = float((decisions(clean.scores, mask) == labels).float().mean())
    jobs: list[tuple[str, str, int | None]] = []
    for name in chosen:
        if name in CORRUPTIONS:
            jobs += [("corruption", name, s) for s in severities]
        elif name in TYPOGRAPHIC:
            jobs.append(("typographic", name, None))
        else:
            jobs.append(("prompt", name, None))
    rows = []
    rng = np.random.default_rng(seed)
    # The wrong class written on each image: a random competitor (fixed by ``seed``).
    wrong = []
    for ex, row in zip(examples, mask, strict=True):
        options = [j for j in range(len(classes)) if row[j] and j != ex.label]
        wrong.append(int(rng.choice(options)) if options else ex.label)
    for done, (family, name, severity) in enumerate(jobs):
        extra: dict[str, Any] = {}
        if family == "corruption":
            assert severity is not None  # every corruption job has one (``jobs`` above)
            perturbed_images = [corrupt(im, name, severity, seed=seed * 100_003 + i) for i, im in enumerate(images)]
            outcome = measure(adapter, perturbed_images, classes, true_prompts, explain=explain, batch_size=batch_size)
        elif family == "typographic":
            texts = [class_name(classes[w]) for w in wrong]
            if name == "typographic_control":
                texts = [scramble(t, seed * 7919 + i) for i, t in enumerate(texts)]
            written = [write_text_box(ex.image, t, ex.boxes) for ex, t in zip(examples, texts, strict=True)]
            perturbed_images = [image for image, _ in written]
            outcome = measure(adapter, perturbed_images, classes, true_prompts, explain=explain, batch_size=batch_size)
            predicted = decisions(outcome.scores, mask)
            extra["attack_success"] = float((predicted == torch.tensor(wrong)).float().mean())
            if explain:
                # How much of the explanation of the written class lands on the writing: a model that
                # reads shows it here, far above the label's share of the image.
                share, area = relevance_on_text(adapter, perturbed_images, [box for _, box in written],
                                                [classes[w] for w in wrong], batch_size=batch_size)
                extra["relevance_on_text"], extra["text_area"] = share, area
        else:
            if name == "templates":
                variants = [[template(c, k) for c in classes] for k in range(len(TEMPLATES))]
            elif name == "typos":
                variants = [[typo(c, seed + k) for c in classes] for k in range(2)]
            else:
                variants = [[synonym(c) for c in classes]]
            extra["prompts_changed"] = float(np.mean([v != c for variant in variants
                                                      for v, c in zip(variant, classes, strict=True)]))
            results = []
            for variant in variants:
                lookup = dict(zip(classes, variant, strict=True))
                results.append(compare(clean, measure(adapter, images, variant, [lookup[p] for p in true_prompts],
                                                      explain=explain, batch_size=batch_size), labels, mask))
            row = {k: (None if any(r[k] is None for r in results) else float(np.mean([r[k] for r in results])))
                   for k in results[0]}
            rows.append({"probe": name, "family": family, "severity": None, **_rounded(row), **_rounded(extra),
                         "variants": len(variants)})
            progress((done + 1) / len(jobs), f"{name}")
            continue
        rows.append({"probe": name, "family": family, "severity": severity,
                     **_rounded(compare(clean, outcome, labels, mask)), **_rounded(extra)})
        progress((done + 1) / len(jobs), f"{name}" + (f" severity {severity}" if severity else ""))
    return RobustnessReport(n=len(examples), classes=list(classes), clean_accuracy=clean_accuracy, rows=rows)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}


# --- figures ---------------------------------------------------------------------------------------


def figure_curves(report: RobustnessReport) -> Figure:
    """Accuracy and explanation rank correlation by severity, one line per corruption, with the
    typographic and prompt probes as single points on the right."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from workers.probes.captions import describe
    from workers.probes.palette import colour

    fig = Figure(figsize=(7.4, 3.6), layout="constrained")  # the report's text column is as wide
    ax_acc, ax_exp, ax_other = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 2]})
    for name in CORRUPTIONS:
        rows = sorted((r for r in report.rows if r["probe"] == name), key=lambda r: r["severity"])
        if not rows:
            continue
        xs = [0] + [r["severity"] for r in rows]
        ax_acc.plot(xs, [report.clean_accuracy] + [r["accuracy"] for r in rows], marker="o", label=name,
                    color=colour(name))
        if rows[0]["explanation_spearman"] is not None:
            ax_exp.plot(xs, [1.0] + [r["explanation_spearman"] for r in rows], marker="o", label=name,
                        color=colour(name))
    for ax, label in ((ax_acc, "zero-shot accuracy"), (ax_exp, "explanation Spearman vs clean")):
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel(label)
        ax.set_xticks([0, *SEVERITIES])
        ax.set_ylim(-0.05 if ax is ax_acc else -0.2, 1.05)
    handles, labels = ax_acc.get_legend_handles_labels()
    if handles:  # one legend for both panels, below them: it covers no curve
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    others = [r for r in report.rows if r["family"] != "corruption"]
    if others:
        names = [r["probe"] for r in others]
        ax_other.barh(names, [r["flip_rate"] for r in others], color="C3")
        ax_other.set_xlim(0, 1)
        ax_other.set_xlabel("decision flip rate")
        ax_other.tick_params(axis="y", labelsize=7)
    else:
        ax_other.axis("off")
    fig.suptitle(f"Robustness on {report.n} examples (clean accuracy {report.clean_accuracy:.2f})", fontsize=9)
    return describe(fig, "Robustness to corruptions and attacks",
                    columns="left, accuracy by corruption severity (0 = clean); middle, rank correlation of the "
                            "explanation with the clean image's by severity; right, share of decisions flipped by "
                            "the typographic and prompt probes",
                    marks="one colour per corruption, the same in every figure")


def figure_examples(example: Example, classes: Sequence[str], seed: int = 0) -> Figure:
    """One image under every corruption at severity 3 and under the typographic attack."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = [("clean", example.image)] + [(f"{c} s3", corrupt(example.image, c, 3, seed=seed)) for c in CORRUPTIONS]
    wrong = next((c for j, c in enumerate(classes) if j not in example.present), classes[0])
    panels.append(("typographic", write_text(example.image, class_name(wrong), example.boxes)))
    from workers.probes.captions import describe

    side = min(1.2, 7.2 / len(panels))  # the row no wider than the report's text column
    fig = Figure(figsize=(side * len(panels), side + 0.4), layout="constrained")
    for ax, (title, image) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    return describe(fig, "One test image as the robustness probe changed it",
                    columns="the clean image, then each corruption at severity 3 (s3), then the typographic attack "
                            "(a wrong class name written on the image)")


def findings_for(report: RobustnessReport) -> list[Finding]:
    findings = []
    for r in report.rows:
        if r["probe"] == "typographic" and r["flip_rate"] >= 0.1:
            findings.append(Finding("medium", "typographic attack changes decisions",
                                    f"writing a wrong class name flips {r['flip_rate']:.0%} of decisions "
                                    f"({r.get('attack_success', 0):.0%} now predict the written class)"))
        if r["family"] == "corruption" and r["severity"] == 3 and r["accuracy_drop"] >= 0.2:
            findings.append(Finding("low", f"{r['probe']} at severity 3 costs {r['accuracy_drop']:.0%} accuracy"))
        if r["family"] == "prompt" and r["flip_rate"] >= 0.2:
            findings.append(Finding("low", f"prompt {r['probe']} flip {r['flip_rate']:.0%} of decisions"))
    return findings


class RobustnessParams(KindParams):
    probes: str | list[str] = Field("all", description="'all', a family (corruption, typographic, prompt) or "
                                                       "probe names (a list, or comma-separated)")
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(list(SEVERITIES), min_length=1,
                                                                description="corruption severities, 1..5")
    explain: Annotated[bool, Flag(negative="--no-explanations")] = Field(
        True, description="measure the chefer explanation drift too")
    limit: Limit = None
    batch_size: BatchSize = 32
    seed: Seed = 0


def _cli_text(result: ProbeResult, params: RobustnessParams) -> str:
    lines = [result.summary]
    for r in result.metrics["probes"]:
        sev = "" if r["severity"] is None else f" s{r['severity']}"
        drift = "-" if r["explanation_spearman"] is None else f"{r['explanation_spearman']:.2f}"
        lines.append(f"{r['probe'] + sev:<24} acc {r['accuracy']:.3f}  flips {r['flip_rate']:.3f}  "
                     f"score drop {r['score_drop']:+.2f}  explanation rho {drift}")
    return "\n".join(lines)


@probe_kind(
    "robustness", title="Robustness probes", section="robustness", params=RobustnessParams,
    help="corruption, typographic and prompt-perturbation probes", present=_cli_text,
    dataset=DatasetArg(help="grounding dataset folder; default: the zoo's held-out split"),
    glossary={
        "clean_accuracy": Metric("Clean accuracy", "zero-shot accuracy on the unchanged images"),
        "accuracy": Metric("Accuracy", "zero-shot accuracy under the perturbation"),
        "accuracy_drop": Metric("Accuracy drop", "clean accuracy minus accuracy under the perturbation"),
        "flip_rate": Metric("Flip rate", "share of decisions the perturbation changes"),
        "score_drop": Metric("Score drop", "mean fall of the true class's score"),
        "explanation_spearman": Metric("Explanation drift (Spearman)", "rank correlation between the explanation "
                                       "of the clean and of the perturbed image", limitation=True),
        "mean_corruption_accuracy_by_severity": Metric("Corruption accuracy by severity",
                                                       "mean accuracy over the corruptions at each severity"),
    })
def robustness_kind(model_dir: str, dataset_dir: str | None, params: RobustnessParams, *, device: str = "cpu",
                    progress: Progress = no_progress) -> ProbeResult:
    """``dataset_dir``: a grounding dataset (``None``: the zoo's held-out split); its prompts
    double as the class names."""
    from workers.probes import suite

    if dataset_dir is None:
        from workers.probes import zoo

        dataset_dir = str(zoo.dataset_dir("heldout"))
    adapter = suite.load_model(model_dir, device, family="dual_encoder")
    examples, classes = load_examples(dataset_dir, limit=params.limit)
    seed = params.seed
    report = run_robustness(adapter, examples, classes, probes=params.probes, severities=list(params.severities),
                            explain=params.explain, batch_size=params.batch_size, seed=seed, progress=progress)
    metrics = report.as_dict()
    figures = {"robustness_curves": figure_curves(report),
               "robustness_examples": figure_examples(examples[0], classes, seed)}
    typo_row = next((r for r in report.rows if r["probe"] == "typographic"), None)
    summary = (f"Robustness on {report.n} examples: clean accuracy {report.clean_accuracy:.2f}; mean corruption "
               f"accuracy by severity {metrics['mean_corruption_accuracy_by_severity']}"
               + (f"; typographic attack flips {typo_row['flip_rate']:.0%} of decisions" if typo_row else "") + ".")
    return ProbeResult(kind="robustness", metrics=metrics, summary=summary, figures=figures,
                       findings=findings_for(report), seed=seed)
