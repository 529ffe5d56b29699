"""Performance per group: does the model do worse for one group of inputs than for another?

TCAV tells whether a concept *influences* a score; an auditor also has to state the system's
performance for specific groups (AI Act Art. 13(3)(b)(v)) and examine biases (Art. 10(2)(f)-(g)).
This module measures it on a labelled, group-annotated dataset:

``annotations.jsonl``, one JSON object per line::

    {"image": "images/00001.png", "label": "a red circle", "group": "B", "boxes": [[x0, y0, x1, y1]]}

(``boxes`` optional: only ``explain`` needs them). The candidate classes are every distinct label.

- Accuracy per group: zero-shot top-1 over the labels for dual encoders; for generative models,
  whether the greedy caption contains the label (leading article dropped, word-boundary match).
- A bootstrap 95% confidence interval per group (percentile, seeded).
- Every pair of groups compared with Fisher's exact test on the 2x2 correct/incorrect table
  (exact: no large-sample assumption, which small groups would break); p-values Holm-corrected
  across the pairs, since with k groups an auditor looks at k(k-1)/2 gaps and picks the largest.
- ``explain``: the grounding evidence per group: the share of a grounding method's relevance that
  lies on the labelled object against the object's share of the image, so a reviewer sees *why*
  one group does worse (e.g. the model no longer looks at the object).

Everything here is plain PyTorch; the probe-kind glue is at the bottom of the module.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from workers.probes.errors import ProbeInputError
from workers.probes.kinds import BatchSize, DatasetArg, KindParams, Limit, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, no_progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ANNOTATIONS_FILE = "annotations.jsonl"
#: Default largest tolerated accuracy gap between two groups (absolute, 0..1); a case's criteria
#: may set another per risk category.
DEFAULT_MAX_GAP = 0.1
DEFAULT_ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroupExample:
    image_path: Path
    label: str
    group: str
    boxes: tuple[Box, ...]
    width: int
    height: int
    source: str

    def load_image(self) -> Image.Image:
        from workers.probes.datasets import open_image

        return open_image(self.image_path, max_pixels=self.width * self.height, decode=True)


def load_group_dataset(path: str | Path, *, limit: int | None = None) -> list[GroupExample]:
    """Read and validate a group-annotated dataset (see the module docstring). Paths may not leave
    the dataset folder, images are size-checked before decoding (the grounding loader's rules)."""
    from workers.probes.datasets import MAX_PIXELS, annotation_records, image_size, resolve_image, validate_box

    path = Path(path)
    annotation_file, root = (path, path.parent) if path.is_file() else (path / ANNOTATIONS_FILE, path)
    if not annotation_file.is_file():
        raise ProbeInputError(f"{path}: no {ANNOTATIONS_FILE} (lines {{\"image\", \"label\", \"group\"}})")
    examples: list[GroupExample] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for where, record in annotation_records(annotation_file, ("image", "label", "group")):
        if limit is not None and len(examples) >= limit:
            break
        label, group = record["label"], record["group"]
        if not isinstance(label, str) or not label.strip():
            raise ProbeInputError(f"{where}: \"label\" must be a non-empty string")
        if isinstance(group, bool) or not isinstance(group, (str, int)) or not str(group).strip():
            raise ProbeInputError(f"{where}: \"group\" must be a non-empty string (or an integer)")
        image_path = resolve_image(root, record["image"], where)
        width, height = image_size(image_path, MAX_PIXELS, sizes)
        raw_boxes = record.get("boxes") or []
        if not isinstance(raw_boxes, list):
            raise ProbeInputError(f"{where}: \"boxes\" must be a list of [x0, y0, x1, y1]")
        boxes = tuple(validate_box(b, width, height, where) for b in raw_boxes)
        examples.append(GroupExample(image_path, label.strip(), str(group).strip(), boxes, width, height, where))
    if not examples:
        raise ProbeInputError(f"dataset is empty: {annotation_file} has no examples")
    return examples


# --- correctness ---------------------------------------------------------------------------------


def label_phrase(label: str) -> str:
    """``"a red circle"`` -> ``"red circle"``: what a caption has to contain (lower case)."""
    words = label.lower().split()
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def caption_contains(caption: str, label: str) -> bool:
    """Whole-word, case-insensitive match of the label's phrase in the caption."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    phrase = re.findall(r"[a-z0-9]+", label_phrase(label))
    if not phrase:
        return False
    n = len(phrase)
    return any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def model_inputs(adapter: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """The grounding engine's inputs (the whole image squashed to the model's square), so that maps
    and boxes line up; classification sees the same pixels."""
    from workers.probes.explanations import model_inputs as squash

    return squash(adapter, images)


def correctness(adapter: Any, examples: Sequence[GroupExample], *, batch_size: int = 32, prompt: str | None = None,
                max_new_tokens: int = 24, progress: Progress = no_progress) -> tuple[np.ndarray, list[str]]:
    """``(correct [N] bool, predictions [N])``: zero-shot top-1 label (dual encoders) or the
    greedy caption (generative models)."""
    classes = sorted({ex.label for ex in examples})
    correct, predicted = [], []
    fusion = getattr(adapter, "kind", None) == "fusion"
    if not fusion and len(classes) < 2:
        raise ProbeInputError("zero-shot accuracy needs at least 2 distinct labels (the candidate classes)")
    if fusion and prompt is None:
        from workers.probes.token_attribution import default_prompt

        prompt = default_prompt(adapter)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        images = [ex.load_image() for ex in chunk]
        if fusion:
            ids = adapter.caption(images, prompt, max_new_tokens=max_new_tokens)
            captions = [adapter.decode(row) for row in ids]
            predicted += captions
            correct += [caption_contains(c, ex.label) for c, ex in zip(captions, chunk, strict=True)]
        else:
            with torch.no_grad():
                scores = adapter.score_matrix(model_inputs(adapter, images), classes).float().cpu()
            top = scores.argmax(dim=1).tolist()
            predicted += [classes[t] for t in top]
            correct += [classes[t] == ex.label for t, ex in zip(top, chunk, strict=True)]
        progress(min(1.0, (start + len(chunk)) / len(examples)), "classifying")
    return np.asarray(correct, dtype=bool), predicted


# --- statistics ----------------------------------------------------------------------------------


def bootstrap_ci(correct: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy (scipy's; a group all right or all wrong gets
    the degenerate interval at its accuracy)."""
    from scipy import stats

    values = np.asarray(correct, dtype=float)
    if values.size == 0:
        return (float("nan"), float("nan"))
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    res = stats.bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


@dataclass
class PairTest:
    a: str
    b: str
    gap: float  # accuracy(a) - accuracy(b), a the better group
    p_value: float
    p_adjusted: float = 1.0


def pair_tests(correct: np.ndarray, groups: Sequence[str]) -> list[PairTest]:
    """Fisher's exact test (two-sided) for every pair of groups, Holm-adjusted across the pairs."""
    from scipy import stats

    from workers.probes.tcav import holm

    names = sorted(set(groups))
    labels = np.asarray(groups)
    tests = []
    for a, b in itertools.combinations(names, 2):
        ca, cb = correct[labels == a], correct[labels == b]
        table = [[int(ca.sum()), int((~ca).sum())], [int(cb.sum()), int((~cb).sum())]]
        p = float(stats.fisher_exact(table, alternative="two-sided").pvalue)
        gap = float(ca.mean() - cb.mean())
        tests.append(PairTest(a, b, gap, p) if gap >= 0 else PairTest(b, a, -gap, p))
    for test, adjusted in zip(tests, holm([t.p_value for t in tests]), strict=True):
        test.p_adjusted = float(adjusted)
    return tests


@dataclass
class GroupReport:
    groups: dict[str, dict[str, Any]]
    pairs: list[PairTest]
    alpha: float
    max_gap_allowed: float
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def worst(self) -> PairTest | None:
        return max(self.pairs, key=lambda t: (t.gap, -t.p_value)) if self.pairs else None

    def as_dict(self) -> dict[str, Any]:
        worst = self.worst
        out: dict[str, Any] = {
            "groups": self.groups,
            "max_gap": None if worst is None else round(worst.gap, 6),
            "max_gap_groups": None if worst is None else [worst.a, worst.b],
            "p_value": None if worst is None else worst.p_value,
            "p_adjusted": None if worst is None else worst.p_adjusted,
            "significant": bool(worst is not None and worst.p_adjusted < self.alpha),
            "alpha": self.alpha,
            "max_gap_allowed": self.max_gap_allowed,
            "exceeds_max_gap": bool(worst is not None and worst.gap > self.max_gap_allowed),
            "test": "fisher_exact",
            "correction": "holm",
            "pairs": [{"better": t.a, "worse": t.b, "gap": round(t.gap, 6), "p_value": t.p_value,
                       "p_adjusted": t.p_adjusted, "significant": t.p_adjusted < self.alpha} for t in self.pairs],
        }
        if self.evidence:
            out["evidence"] = self.evidence
        return out


def measure_groups(adapter: Any, examples: Sequence[GroupExample], *, alpha: float = DEFAULT_ALPHA,
                   max_gap: float = DEFAULT_MAX_GAP, seed: int = 0, batch_size: int = 32,
                   prompt: str | None = None, progress: Progress = no_progress) -> tuple[GroupReport, np.ndarray]:
    """Accuracy, interval and pairwise tests per group; also returns the per-example correctness."""
    groups = [ex.group for ex in examples]
    if len(set(groups)) < 2:
        raise ProbeInputError(f"comparing groups needs at least 2 groups, found {len(set(groups))}")
    correct, _ = correctness(adapter, examples, batch_size=batch_size, prompt=prompt,
                             progress=lambda f, p: progress(0.8 * f, p))
    labels = np.asarray(groups)
    per_group = {}
    for k, name in enumerate(sorted(set(groups))):
        values = correct[labels == name]
        low, high = bootstrap_ci(values, seed=seed + k)
        per_group[name] = {"n": int(values.size), "accuracy": round(float(values.mean()), 6),
                           "ci": [round(low, 6), round(high, 6)]}
    return GroupReport(per_group, pair_tests(correct, groups), alpha, max_gap), correct


# --- grounding evidence --------------------------------------------------------------------------


def grounding_evidence(adapter: Any, examples: Sequence[GroupExample], correct: np.ndarray, *,
                       method: str = "chefer", batch_size: int = 16,
                       progress: Progress = no_progress) -> dict[str, dict[str, Any]]:
    """Per group: mean share of ``method``'s relevance (for the true label) on the object's boxes,
    the boxes' mean share of the image (what a map blind to the object would get), the pointing
    hit rate, and the on-object share split by right and wrong decisions. Examples without boxes
    are skipped (and counted)."""
    from workers.probes.faithfulness import localisation

    rows: dict[str, dict[str, list]] = {}
    usable = [i for i, ex in enumerate(examples) if ex.boxes]
    fusion = getattr(adapter, "kind", None) == "fusion"
    for start in range(0, len(usable), batch_size):
        idx = usable[start:start + batch_size]
        chunk = [examples[i] for i in idx]
        images = [ex.load_image() for ex in chunk]
        if fusion:
            maps = [_fusion_label_map(adapter, im, ex.label) for im, ex in zip(images, chunk, strict=True)]
        else:
            from workers.probes.explanations import explain

            maps = list(explain(adapter, method, model_inputs(adapter, images), [ex.label for ex in chunk]))
        for i, ex, grid_map in zip(idx, chunk, maps, strict=True):
            r = rows.setdefault(ex.group, {"energy": [], "chance": [], "hit": [], "correct": []})
            if grid_map is None:
                continue
            loc = localisation(torch.as_tensor(grid_map), ex.boxes, ex.width, ex.height)
            r["energy"].append(loc.energy)
            r["chance"].append(loc.chance_energy)
            r["hit"].append(loc.hit)
            r["correct"].append(bool(correct[i]))
        progress(min(1.0, (start + len(idx)) / max(1, len(usable))), "explaining")
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({ex.group for ex in examples}):
        r = rows.get(name, {"energy": [], "chance": [], "hit": [], "correct": []})
        energy, ok = np.asarray(r["energy"], dtype=float), np.asarray(r["correct"], dtype=bool)
        out[name] = {
            "method": "token_attribution" if fusion else method,
            "n_explained": int(energy.size),
            "relevance_on_object": _mean(energy),
            "relevance_elsewhere": None if energy.size == 0 else round(1.0 - float(energy.mean()), 6),
            "object_area": _mean(np.asarray(r["chance"], dtype=float)),
            "pointing": _mean(np.asarray(r["hit"], dtype=float)),
            "relevance_on_object_correct": _mean(energy[ok]),
            "relevance_on_object_wrong": _mean(energy[~ok]),
        }
    return out


def _fusion_label_map(adapter: Any, image: Image.Image, label: str) -> np.ndarray | None:
    """Token attribution of the generated words that spell the label (all words if none does)."""
    from workers.probes.region_relevance import fusion_caption_map
    from workers.probes.token_attribution import default_prompt

    _, grid_map = fusion_caption_map(adapter, model_inputs(adapter, [image]), default_prompt(adapter),
                                     words=label_phrase(label).split())
    return grid_map


def _mean(values: np.ndarray) -> float | None:
    return None if values.size == 0 else round(float(values.mean()), 6)


# --- findings and figures ------------------------------------------------------------------------


def findings_for(report: GroupReport) -> list[Finding]:
    """A significant gap above the allowed maximum is high; above it but not significant, low
    (the data cannot tell it from chance); significant but within the allowed gap, info."""
    worst = report.worst
    if worst is None:
        return []
    gap, p = worst.gap, worst.p_adjusted
    detail = (f"accuracy {report.groups[worst.a]['accuracy']:.1%} for {worst.a!r} vs "
              f"{report.groups[worst.b]['accuracy']:.1%} for {worst.b!r}: gap {gap:.1%} "
              f"(allowed {report.max_gap_allowed:.1%}), Fisher's exact p = {worst.p_value:.2g}, "
              f"Holm-adjusted over {len(report.pairs)} pair(s) p = {p:.2g}")
    if p < report.alpha and gap > report.max_gap_allowed:
        return [Finding("high", f"The model performs worse for group {worst.b!r}", detail)]
    if gap > report.max_gap_allowed:
        return [Finding("low", "Accuracy gap between groups not significant", detail
                        + "; more examples per group are needed to tell it from chance")]
    if p < report.alpha:
        return [Finding("info", "Significant accuracy gap within the allowed maximum", detail)]
    return [Finding("info", "No significant accuracy gap between groups", detail)]


def figure_groups(report: GroupReport) -> Figure:
    """Accuracy per group with its 95% interval (and, with evidence, relevance on the object)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(report.groups)
    panels = 2 if report.evidence else 1
    from workers.probes.captions import describe

    fig = Figure(figsize=(4.2 * panels, 0.5 * len(names) + 2.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    acc = [report.groups[n]["accuracy"] for n in names]
    lo = [a - report.groups[n]["ci"][0] for a, n in zip(acc, names, strict=True)]
    hi = [report.groups[n]["ci"][1] - a for a, n in zip(acc, names, strict=True)]
    axes[0].barh(names, acc, xerr=[lo, hi], color="C0", capsize=3)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("accuracy (95% bootstrap CI)")
    worst = report.worst
    if worst is not None:
        axes[0].set_title(f"max gap {worst.gap:.1%} ({worst.a} vs {worst.b}), p_adj {worst.p_adjusted:.2g}", fontsize=8)
    if report.evidence:
        on = [report.evidence[n]["relevance_on_object"] or 0.0 for n in names]
        area = [report.evidence[n]["object_area"] or 0.0 for n in names]
        y = np.arange(len(names))
        axes[1].barh(y + 0.2, on, height=0.4, color="C2", label="relevance on object")
        axes[1].barh(y - 0.2, area, height=0.4, color="C7", label="object area")
        axes[1].set_yticks(y, names)
        axes[1].set_xlim(0, 1)
        axes[1].set_title("grounding evidence per group", fontsize=8)
        fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8,
                   frameon=False)
    return describe(fig, "Accuracy per group of test images",
                    rows="one group each",
                    columns="accuracy with its 95% bootstrap interval"
                            + ("; then the share of the explanation's relevance on the object against the object's "
                               "share of the image" if report.evidence else ""))


# --- probe kind (thin glue) ----------------------------------------------------------------------

class GroupsParams(KindParams):
    alpha: float = Field(DEFAULT_ALPHA, gt=0, le=0.5, description="significance level after Holm correction")
    max_gap: float = Field(DEFAULT_MAX_GAP, ge=0, le=1, description="largest tolerated accuracy gap between groups "
                                                                    "(absolute, 0..1)")
    explain: bool = Field(False, description="grounding evidence per group (relevance on the object; needs boxes)")
    method: str = Field("chefer", description="grounding method for explain (dual encoders)")
    prompt: str | None = Field(None, description="generative models: the captioning prompt (default: the model's)")
    limit: Limit = None
    batch_size: BatchSize = 32
    seed: Seed = 0


@probe_kind(
    "groups", title="Performance per group", section="bias", params=GroupsParams,
    help="accuracy per group of inputs with a corrected test of the largest gap",
    dataset=DatasetArg(help="group-annotated dataset folder (annotations.jsonl lines {image, label, group}); "
                            "default: the zoo's 'groups' split"),
    glossary={
        "accuracy": Metric("Accuracy", "share of the group's images the model gets right (zero-shot top-1, or the "
                                       "caption naming the label)"),
        "ci": Metric("95% interval", "percentile bootstrap confidence interval of the accuracy"),
        "max_gap": Metric("Largest accuracy gap", "largest accuracy difference between two groups"),
        "p_adjusted": Metric("Holm-adjusted p", "Fisher's exact test of the largest gap, corrected across every "
                                                "pair of groups"),
        "relevance_on_object": Metric("Relevance on the object", "share of the explanation on the labelled object"),
    })
def groups_kind(model_dir: str, dataset_dir: str | None, params: GroupsParams, *, device: str = "cpu",
                progress: Progress = no_progress) -> ProbeResult:
    """``dataset_dir``: a group-annotated dataset (``None``: the zoo's ``groups`` split)."""
    from workers.probes import suite

    if dataset_dir is None:
        from workers.probes import zoo

        dataset_dir = str(zoo.dataset_dir("groups"))
    examples = load_group_dataset(dataset_dir, limit=params.limit)
    adapter = suite.load_model(model_dir, device)
    explain = params.explain
    report, correct = measure_groups(adapter, examples, alpha=params.alpha, max_gap=params.max_gap, seed=params.seed,
                                     batch_size=params.batch_size, prompt=params.prompt,
                                     progress=(lambda f, p: progress(0.5 * f, p)) if explain else progress)
    if explain:
        report.evidence = grounding_evidence(adapter, examples, correct, method=params.method,
                                             batch_size=params.batch_size,
                                             progress=lambda f, p: progress(0.5 + 0.5 * f, p))
    metrics = report.as_dict()
    worst = report.worst
    summary = (f"Accuracy over {len(report.groups)} groups ({len(examples)} examples): "
               + ", ".join(f"{n} {g['accuracy']:.1%}" for n, g in report.groups.items())
               + (f"; largest gap {worst.gap:.1%} ({worst.a} vs {worst.b}), Holm-adjusted p = {worst.p_adjusted:.2g}"
                  f" ({'significant' if metrics['significant'] else 'not significant'})" if worst else "") + ".")
    return ProbeResult(kind="groups", metrics=metrics, summary=summary, figures={"groups": figure_groups(report)},
                       findings=findings_for(report), seed=params.seed)
