"""Turn a report manifest into the template context: sections, tables, figures, findings.

The report shows what its manifest states and nothing else, so a PDF can always be traced back to
the JSON it embeds. Everything here works on plain data; the database is read only by
:mod:`governance.reports.manifest` (and by the caller that loads artifact files).

Each section names the provisions it *contributes evidence to* (``SECTIONS``); meeting them is for
the assessor to judge. Every probe kind's evidence has a home section, declared by the kind
(``report_section``) or by :data:`KIND_SECTIONS`. A section whose probe kinds produced no evidence
says so in words instead of disappearing, because an auditor must be able to tell "not tested" from
"tested, nothing found". Findings and their severities come from the case's declared acceptance
criteria (:mod:`governance.acceptance`); what a probe itself noted is shown as an ungraded
observation. Metric keys are shown through :mod:`governance.glossary`, never raw.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.utils.safestring import SafeString, mark_safe

from governance import acceptance, glossary
from governance.reports import coverage, figures
from governance.reports.url_fetcher import artifact_url
from workers.probes.captions import png_description

# Free text longer than this is cut in the PDF (the full text stays in the manifest and the export bundle);
# it keeps a hostile or careless 10 MB model card from turning a report into thousands of pages.
MAX_TEXT_CHARS = 8_000
MAX_COMMENT_CHARS = 2_000
# Unbroken runs longer than this get zero-width break opportunities: WeasyPrint's line breaking is
# quadratic in the length of a single word (we measured minutes for a 20 000-character word).
MAX_WORD_CHARS = 60
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")
MAX_METRIC_ROWS = 80
MAX_TABLE_ROWS = 40

KIND_TITLES = {
    "grounding": "Visual grounding and faithfulness",
    "sanity": "Sanity checks (model randomisation)",
    "stability": "Explanation stability and method agreement",
    "token_attribution": "Token attribution (generative models)",
    "attention": "Cross-modal attention statistics",
    "intervention": "Causal interventions",
    "tcav": "Concept tests (TCAV)",
    "shortcut": "Shortcut detection",
    "groups": "Performance for groups",
    "robustness": "Robustness probes",
    "patch_attack": "Adversarial patch attack",
    "prompt_injection": "Prompt injection",
}

# What each kind's evidence tells a non-specialist, shown above its evidence.
KIND_PLAIN = {
    "grounding": "Heatmaps show which parts of an image the model used for its answer. Faithfulness scores check "
                 "whether the heatmaps tell the truth: removing the parts a heatmap marks should change the answer "
                 "faster than removing random parts.",
    "sanity": "If the model's learned weights are replaced by random numbers, an honest explanation must change. "
              "A method whose heatmaps survive this does not show what the model learned. Only the methods named "
              "in the evidence were checked; maps of other methods elsewhere in this report are unchecked.",
    "stability": "Tiny changes to an image that a person cannot see, and that do not change the answer, should not "
                 "change the explanation. Different methods explaining the same answer should broadly agree.",
    "token_attribution": "For a model that writes text, each generated word is traced back to the image regions "
                         "it came from, and checked against where the named object really is.",
    "attention": "How the model's attention heads spread their focus over the image: on the objects, evenly, or "
                 "erratically. Attention is a clue to what the model looks at, not proof of what it uses.",
    "intervention": "Parts of the model or of the image are switched off or swapped, and the change in the answer "
                    "shows which parts actually cause it.",
    "tcav": "Concept tests ask whether a human idea (for example a watermark or a texture) pushes the model "
            "towards an answer more than random images do, with a statistical correction for testing many ideas.",
    "shortcut": "A shortcut is a feature that happens to accompany the right answer in the training data, such as "
                "a watermark, and that the model uses instead of the object itself. The probe adds and removes the "
                "suspected feature and runs concept tests on it.",
    "groups": "Accuracy measured separately for groups of inputs, so that a group the model serves worse is "
              "visible instead of hidden in an average.",
    "robustness": "How accuracy holds up when images are degraded (noise, blur, contrast), when the prompt is "
                  "reworded, and when misleading text is written into the image.",
    "patch_attack": "Whether a small printed patch placed in the image can steer the model's answer.",
    "prompt_injection": "Whether instructions hidden in the image or the text can override the intended task.",
}

# Default home section of each kind; a probe kind may declare its own (``report_section``), which wins.
KIND_SECTIONS = {
    "grounding": "explain", "sanity": "explain", "stability": "explain", "token_attribution": "explain",
    "attention": "explain", "intervention": "explain", "tcav": "bias", "shortcut": "bias", "groups": "bias",
    "robustness": "robustness", "patch_attack": "attacks", "prompt_injection": "attacks",
}
# Where evidence of a kind that declares no section goes (it must appear somewhere, labelled as such).
OTHER_SECTION = "explain"
# Kinds whose absence a section states in words ("not tested"), so an assessor can tell it from "tested, clean".
EXPECTED_KINDS = ("grounding", "sanity", "stability", "token_attribution", "attention", "intervention", "tcav",
                  "shortcut", "robustness")
GENERATIVE_ONLY_KINDS = ("token_attribution",)

CARD_TITLES = {
    "model_details": "Model details", "intended_uses": "Intended uses", "out_of_scope_uses": "Out-of-scope uses",
    "training_data": "Training data", "evaluation_data": "Evaluation data", "metrics": "Metrics",
    "limitations": "Limitations", "ethical_considerations": "Ethical considerations", "caveats": "Caveats",
}


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    requirement: str  # the provisions this section contributes evidence to (never "meets")
    plain: str = ""


SECTIONS = (
    Section("summary", "Summary and review decision", "Art. 13(3)(b)",
            "What was tested, what the declared acceptance criteria found, and what the reviewers decided."),
    Section("coverage", "Coverage of the technical documentation", "Art. 11; Annex IV points 1-9",
            "Which parts of the technical documentation the AI Act asks for are backed by Loupe's measurements, "
            "which the provider supplied as documents, and which are not covered by this report at all."),
    Section("criteria", "Acceptance criteria and verdicts", "Annex IV points 2(g) and 4",
            "Before looking at results, the case declares what it accepts for each measurement. Each measured value "
            "is compared with its criterion; a value that does not meet it becomes a finding whose severity the "
            "criterion declared."),
    Section("purpose", "Intended purpose and model card", "Art. 13(3)(a); Annex IV points 1 and 2(a)-(d)",
            "What the provider says the system is for and how it was built. These are the provider's statements; "
            "Loupe records them but does not verify them."),
    Section("explain", "Ability to explain outputs", "Art. 13(1), 13(3)(b)(iv), 13(3)(d); Annex IV point 2(g)",
            "Can a person see why the model gave an answer, and can those explanations be trusted? Each "
            "explanation method is scored for faithfulness, checked for sanity and for stability."),
    Section("bias", "Bias examination: concepts, shortcuts and groups", "Art. 10(2)(f)-(g); Annex IV point 2(g)",
            "Does the model rely on features it should not, such as a watermark or a background? Concept tests "
            "examine image features; they say nothing about groups of persons unless group evidence is shown."),
    Section("robustness", "Accuracy and robustness", "Art. 15(1), 15(4); Art. 13(3)(b)(ii); Annex IV point 3",
            "How well the model keeps its accuracy when inputs are degraded, reworded or attacked."),
    Section("attacks", "Resilience against attacks", "Art. 15(5); Annex IV point 2(h)",
            "Whether someone who controls part of the input (a printed patch, text hidden in the image) can steer "
            "the model's answer."),
    Section("generative", "Generative and general-purpose models", "Art. 50; Art. 53(1)(a); Annex XI",
            "Obligations that apply to systems that generate content and to general-purpose models, with what "
            "Loupe measured, what the provider stated, and what is not covered."),
    Section("oversight", "Human-oversight measures of the system", "Art. 14; Annex IV point 2(e)",
            "The measures built into the system, or prescribed to its deployers, that let a person understand, "
            "monitor and overrule it. They come from the provider's card and documents; the audit's own review "
            "is reported separately in the next section."),
    Section("review", "Review of this audit (four-eyes)", "Quality control of this report (not an AI Act measure)",
            "Who examined this report's evidence and what they decided. This is Loupe's review of the audit, not a "
            "human-oversight measure of the system."),
    Section("testlog", "Test log", "Annex IV point 2(g)",
            "Every probe run with its settings, data fingerprint and software versions, so that it can be repeated."),
    Section("limitations", "Limitations", "Art. 13(3)(b)(iii); Annex IV point 3",
            "What the evidence cannot show, and how far the explanation methods themselves can be trusted."),
    Section("appendix", "Appendix: hashes, libraries, glossary", "Annex IV point 2(g)",
            "File fingerprints that let anyone check the evidence was not changed, and the meaning of every term."),
)
EVIDENCE_SECTIONS = ("explain", "bias", "robustness", "attacks", "generative")

SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2, "info": 3}

GLOSSARY_EXTRA = [
    ("Acceptance criterion", "The value a measurement must reach for the case to accept it, declared before the "
                             "results are judged; its severity says how serious a miss is."),
    ("Confidence interval", "The range within which the true value lies with 95% confidence, given the number of "
                            "examples measured."),
    ("PAdES", "PDF Advanced Electronic Signatures (ETSI EN 319 142): signatures embedded in the PDF that detect "
              "any later change of the signed bytes."),
    ("PDF/A-3", "The archival PDF profile (ISO 19005-3) that allows machine-readable files, here the manifest, "
                "to be embedded."),
    ("SHA-256", "A fingerprint of a file: any change to the file changes it."),
]

LIBRARIES = ("loupe", "django", "weasyprint", "pydyf", "pyhanko", "matplotlib", "numpy", "torch", "transformers",
             "scipy")


def truncate(text: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """User text as the PDF shows it: cut at ``limit`` characters, long words made breakable."""
    text = "" if text is None else str(text)
    if len(text) > limit:
        text = text[:limit] + f" [... {len(text) - limit} more characters in the manifest]"
    return _LONG_WORD.sub(lambda m: "\u200b".join(m.group(0)[i:i + MAX_WORD_CHARS]
                                                  for i in range(0, len(m.group(0)), MAX_WORD_CHARS)), text)


def fmt(value: Any) -> str:
    """A metric value for a table cell."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            shown = ", ".join(fmt(v) for v in value[:6])
            return f"[{shown}{', ...' if len(value) > 6 else ''}] ({len(value)} values)"
        return f"list of {len(value)}"
    return truncate(value)[:300]


def flatten(metrics: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar metrics as ``(dotted.path, formatted value)`` rows; lists of records become tables instead."""
    rows: list[tuple[str, str]] = []
    if isinstance(metrics, dict):
        for key in metrics:
            value = metrics[key]
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                rows += flatten(value, path + ".")
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                continue  # rendered by record_tables()
            else:
                rows.append((path, fmt(value)))
    return rows[:MAX_METRIC_ROWS]


# Metrics a figure shows in full; their raw points in a table would only repeat it less readably.
FIGURE_ONLY = ("curves", "agreement")


def metric_rows(metrics: Any, kind: str | None = None) -> list[dict[str, str]]:
    """Scalar metrics as rows a person can read: human label, value, one-line meaning (no raw keys)."""
    if isinstance(metrics, dict):
        metrics = {k: v for k, v in metrics.items() if k not in FIGURE_ONLY}
    return [{"label": glossary.path_label(path, kind), "value": value, "meaning": glossary.path_meaning(path, kind)}
            for path, value in flatten(metrics)]


def record_tables(metrics: Any, prefix: str = "", kind: str | None = None) -> list[dict[str, Any]]:
    """Lists of dicts in the metrics (e.g. one row per method or concept) as small tables.

    ``title`` and ``columns`` keep the metric keys (for machine use); ``label``, ``column_labels`` and
    ``legend`` (label, meaning) are what a person reads."""
    tables: list[dict[str, Any]] = []
    if not isinstance(metrics, dict):
        return tables
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            tables += record_tables(value, path + ".", kind)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns: list[str] = []
            for record in value:
                for column, cell in record.items():
                    if column not in columns and not isinstance(cell, (dict, list)):
                        columns.append(column)
            columns = columns[:9]
            rows = [[fmt(record.get(c)) for c in columns] for record in value[:MAX_TABLE_ROWS]]
            tables.append({"title": path, "label": glossary.path_label(path, kind), "columns": columns,
                           "column_labels": [glossary.label(c, kind) for c in columns],
                           "legend": [(glossary.label(c, kind), glossary.meaning(c, kind)) for c in columns
                                      if glossary.meaning(c, kind)],
                           "rows": rows, "more": max(0, len(value) - MAX_TABLE_ROWS)})
    return tables


def markdown_html(text: str) -> SafeString:
    """Model-card Markdown as HTML, safely: raw HTML in the text is escaped (``html=False``), and links
    and images are not rendered as such (an image would make the renderer fetch a URL)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).disable(["image", "link", "autolink"])
    return mark_safe(md.render(text))  # noqa: S308 - markdown-it escapes every character of the input


@dataclass
class RenderInputs:
    """What the renderer needs besides the template context: figure bytes by URL id."""

    artifacts: dict[str, Callable[[], tuple[bytes, str]]] = field(default_factory=dict)
    generated: dict[str, bytes] = field(default_factory=dict)


def _generated(inputs: RenderInputs, key: str, png: bytes) -> str:
    # Generated figures are served like artifacts, under a name that cannot collide with an id.
    name = f"gen-{key}"
    inputs.generated[name] = png
    inputs.artifacts[name] = lambda: (png, "image/png")
    return artifact_url(name)


def _tcav_rows(metrics: Any) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """TCAV results (a list of ``{"concept", "layer", "tcav_score", "p_adjusted", ...}`` under any key,
    e.g. ``results``), top level or one level down; the shortcut probe embeds them as ``tcav``."""
    candidates = [metrics] + [v for v in metrics.values() if isinstance(v, dict)] if isinstance(metrics, dict) else []
    for block in candidates:
        for value in block.values():
            if isinstance(value, list) and value and all(isinstance(r, dict) and "tcav_score" in r for r in value):
                thresholds = metrics.get("thresholds") if isinstance(metrics.get("thresholds"), dict) else {}
                return value, {"alpha": block.get("alpha") or thresholds.get("alpha"),
                               "correction": block.get("correction", "Holm")}
    return None


def _method_records(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-method rows: ``{"methods": [{"method": name, metric: value}]}`` (the grounding probe) or
    ``{"methods": {name: {metric: value}}}``."""
    methods = metrics.get("methods")
    if isinstance(methods, list) and all(isinstance(m, dict) and "method" in m for m in methods):
        return methods
    if isinstance(methods, dict) and all(isinstance(v, dict) for v in methods.values()):
        return [{"method": name, **values} for name, values in methods.items()]
    return []


FAITHFULNESS_METRICS = ("deletion_auc", "insertion_auc", "pointing_game", "energy_pointing_game")
BETTER = {"deletion_auc": "lower is better", "insertion_auc": "higher is better", "pointing_game": "higher is better",
          "energy_pointing_game": "higher is better"}


def summary_figures(entry: dict[str, Any], inputs: RenderInputs) -> list[dict[str, str]]:
    """Figures drawn from the metrics of one evidence item, where a picture reads faster than a table."""
    out: list[dict[str, str]] = []
    metrics = entry.get("metrics") or {}
    if not isinstance(metrics, dict):
        return out
    kind = entry.get("kind")
    eid = entry.get("id")
    tcav = _tcav_rows(metrics)
    if tcav:
        results, block = tcav
        rows = [{"concept": f"{r.get('concept')} (layer {r.get('layer')})", "score": r.get("tcav_score"),
                 "score_std": r.get("tcav_score_std"), "p_corrected": r.get("p_adjusted")} for r in results[:24]]
        png = figures.tcav_bars("Concept influence (TCAV)", rows, alpha=float(block.get("alpha") or 0.05))
        out.append({"url": _generated(inputs, f"{eid}-tcav", png),
                    "caption": f"Concept influence per concept and layer (evidence #{eid}). Bars: the share of "
                               f"examples pushed towards the target by the concept (0.5 = no influence, dashed); "
                               f"solid bars are significant after {block.get('correction', 'multiple-testing')} "
                               f"correction, hatched bars are not; whiskers: spread over repeated concept vectors."})
    records = _method_records(metrics)
    panels: list[tuple[str, dict[str, float], float | None]] = []
    described: list[str] = []
    for metric in FAITHFULNESS_METRICS:
        # The random ranking is drawn as the dashed reference line, not as a method's bar.
        values = {str(r["method"]): value for r in records if isinstance(value := r.get(metric), (int, float))
                  and r.get("method") not in acceptance.BASELINES}
        if not values:
            continue
        random = next((value for r in records if isinstance(value := r.get(f"random_{metric}"), (int, float))),
                      None)
        panels.append((f"{glossary.label(metric)} ({BETTER[metric]})", values, random))
        described.append(f"{glossary.label(metric)}: {glossary.meaning(metric)}")
    if panels:
        png = figures.bar_panels(panels, reference_label="what a random ranking scores")
        out.append({"url": _generated(inputs, f"{eid}-faithfulness", png),
                    "caption": f"Faithfulness and localisation per explanation method (evidence #{eid}); one colour "
                               f"per method, the same in every figure; dashed lines: what a random ranking scores. "
                               + " ".join(described)})
    agreement, names = metrics.get("agreement"), metrics.get("methods")
    if isinstance(agreement, list) and isinstance(names, list) and len(agreement) == len(names) \
            and all(isinstance(n, str) for n in names):
        png = figures.heatmap("Method agreement (mean rank correlation)", agreement, row_labels=names,
                              col_labels=names, cmap="coolwarm", value_range=(-1.0, 1.0),
                              colorbar_label="mean Spearman correlation")
        out.append({"url": _generated(inputs, f"{eid}-agreement", png),
                    "caption": f"Agreement between explanation methods on the same inputs (evidence #{eid}). Rows "
                               f"and columns are methods; each cell is the mean rank correlation of their heatmaps "
                               f"(1 = same ranking of regions, 0 = unrelated, negative = opposite)."})
    by_severity = metrics.get("mean_corruption_accuracy_by_severity")
    if isinstance(by_severity, dict) and by_severity:
        xs = [0.0] + [float(k) for k in by_severity]
        ys = [metrics.get("clean_accuracy")] + list(by_severity.values())
        png = figures.curves("Accuracy under corruption", {"mean over corruptions": (xs, ys)},
                             xlabel="severity (0 = clean)", ylabel="accuracy")
        out.append({"url": _generated(inputs, f"{eid}-robustness", png),
                    "caption": f"Accuracy averaged over corruption families at each severity, 0 being the clean "
                               f"images (evidence #{eid})."})
    # Generic curves: {"curves": {name: {"x": [...], "y": [...]}}}.
    curves = metrics.get("curves")
    if isinstance(curves, dict) and curves:
        series = {str(name): (c["x"], c["y"]) for name, c in list(curves.items())[:8]
                  if isinstance(c, dict) and isinstance(c.get("x"), list) and isinstance(c.get("y"), list)}
        if series:
            title = kind_title(kind)
            png = figures.curves(title, series, xlabel=str(metrics.get("curve_x", "share of the image changed")),
                                 ylabel=str(metrics.get("curve_y", "model score")))
            out.append({"url": _generated(inputs, f"{eid}-curves", png),
                        "caption": f"Curves recorded by evidence #{eid} ({title}); one colour per method, the same "
                                   f"in every figure of this report."})
    return out


def _artifact_caption(artifact: dict[str, Any], entry: dict[str, Any], described: str | None = None) -> str:
    """Words for a stored probe figure: what its rows and columns are. ``described`` is the
    description the probe stored in the figure's PNG; figures stored without one are worded by their
    name."""
    name = str(artifact.get("name", ""))
    stem = name.rsplit(".", 1)[0].lower()
    kind = entry.get("kind")
    if described:
        text = truncate(" ".join(described.split()), MAX_COMMENT_CHARS)
    elif "example" in stem or "grid" in stem:
        text = ("Example explanations. Rows: images, each with its prompt and the model's score; first column: the "
                "image with the annotated object boxed in green; other columns: one explanation method each, warmer "
                "colours marking regions that raised the score (colour bar on the right).")
    elif "curve" in stem or "deletion" in stem or "insertion" in stem:
        text = ("Score curves as regions are removed (deletion) or added (insertion) in the order each method ranks "
                "them; dashed lines are random orders.")
    elif "cascade" in stem:
        text = ("Sanity check cascade: as more layers are randomised (left to right), the agreement with the "
                "trained model's heatmaps should fall.")
    elif "agreement" in stem:
        text = "Agreement between explanation methods (rows and columns are methods)."
    elif "shortcut_evidence" in stem:
        text = ("Shortcut check. Top left: the suspected artefact's concept influence (TCAV score) per layer, red, "
                "against random concepts, grey (0.5 = no influence; * significant after Holm correction). Top right: "
                "mean change of the class score when the artefact is pasted into images of the class and into random "
                "images. Bottom: the grounding method's relevance on images of the class with the artefact pasted "
                "in, its box outlined in green (colour bar on the right).")
    else:
        text = (f"{kind_title(kind)}: figure “{stem}”. The probe stored no description of its rows and columns; "
                f"its panels and axes are labelled in the figure itself.")
    return f"{text} Evidence #{entry.get('id')}, file {name}, SHA-256 {str(artifact.get('sha256', ''))[:16]}..."


def evidence_view(entry: dict[str, Any], run: dict[str, Any] | None, inputs: RenderInputs,
                  load_artifact: Callable[[dict[str, Any]], tuple[bytes, str]]) -> dict[str, Any]:
    figures_out = summary_figures(entry, inputs)
    # The report draws TCAV results itself, with corrected p-values; the probe's own bar chart of the
    # same numbers is listed (and hashed) in the appendix instead of being shown a second time.
    drawn_tcav = _tcav_rows(entry.get("metrics") or {}) is not None
    files = []
    for artifact in entry.get("artifacts", []):
        files.append(artifact)
        if drawn_tcav and "tcav_bars" in str(artifact.get("name", "")):
            continue
        if artifact.get("content_type") in ("image/png", "image/jpeg"):
            key = str(artifact["id"])
            inputs.artifacts[key] = functools.partial(load_artifact, artifact)
            described = png_description(load_artifact(artifact)[0])
            figures_out.append({"url": artifact_url(key), "caption": _artifact_caption(artifact, entry, described)})
    metrics = entry.get("metrics") or {}
    kind = entry.get("kind")
    return {
        "id": entry.get("id"), "kind": kind, "title": kind_title(kind),
        "plain": KIND_PLAIN.get(kind or "", ""), "summary": truncate(entry.get("summary")),
        "metric_rows": metric_rows(metrics, kind), "tables": record_tables(metrics, kind=kind),
        "observations": [{"title": truncate(f.get("title"))[:500],
                          "detail": truncate(f.get("detail"), MAX_COMMENT_CHARS),
                          "rating": f.get("severity", "info")} for f in entry.get("findings") or []],
        "findings": entry.get("findings") or [], "figures": figures_out, "files": files, "run": run,
        "digest": entry.get("digest"), "embedded_kinds": sorted(acceptance._embedded_kinds(entry) - {kind}),
    }


DECISION_MEANING = {
    "approved": "APPROVED means the assigned reviewers accept the evidence in this report as complete and correct "
                "for the stated scope. It is not a certification of the model and not a conformity assessment.",
    "rejected": "REJECTED means a reviewer found the evidence shows a problem, or is incomplete or incorrect, for the "
                "stated scope.",
    "changes_requested": "CHANGES REQUESTED means a reviewer asked for more or different evidence before deciding.",
}
DISCLAIMER = ("This report is not a conformity assessment under the AI Act (Art. 43) and does not state that the "
              "system complies with it. It records evidence that contributes to the technical documentation "
              "(Annex IV) for the scope stated above, and shows which points it does not cover.")


def decision(manifest: dict[str, Any]) -> dict[str, Any]:
    case = manifest["case"]
    current = [s for s in manifest["signoffs"] if s.get("review_round") == case.get("review_round")
               and not s.get("evidence_id") and not s.get("report_section")]
    approvers = {s["reviewer"]["username"] for s in current if s["decision"] == "approve"}
    rejected = any(s["decision"] == "reject" for s in current)
    changes = any(s["decision"] == "request_changes" for s in current)
    state = case.get("state")
    labels = {"approved": "APPROVED", "rejected": "REJECTED", "changes_requested": "CHANGES REQUESTED",
              "in_review": "IN REVIEW (not yet decided)", "evidence_ready": "AWAITING REVIEW",
              "archived": "ARCHIVED"}
    meaning = DECISION_MEANING.get(state, "No decision has been taken yet; the evidence below has not been accepted "
                                          "by the reviewers. If APPROVED, it would mean the reviewers accept the "
                                          "evidence as complete and correct for the stated scope.")
    return {"state": state, "label": labels.get(state, f"NOT DECIDED ({state})"), "approvals": len(approvers),
            "required": case.get("required_approvals"), "open_rejection": rejected, "changes_requested": changes,
            "meaning": meaning}


def limitations(evidence: list[dict[str, Any]], missing: list[str]) -> dict[str, Any]:
    """Measured disagreement/instability values (settings left out), and the gaps the evidence leaves."""
    measured = []
    words = ("disagree", "agreement", "stabil", "rank_corr", "spearman", "kendall", "consisten", "ssim", "sensitivity")
    for entry in evidence:
        declared = _limitation_keys(entry.get("kind"))
        for path, value in flatten(entry.get("metrics") or {}):
            leaf = path.rsplit(".", 1)[-1]
            if leaf.startswith("max_rank") or "(setting)" in glossary.label(leaf):
                continue  # a threshold the probe was given, not a measurement
            if (leaf in declared) if declared else any(w in path.lower() for w in words):
                measured.append({"evidence": entry.get("id"), "kind": kind_title(entry.get("kind")),
                                 "metric": glossary.path_label(path, entry.get("kind")),
                                 "meaning": glossary.path_meaning(path, entry.get("kind")),
                                 "value": value})
        measured.extend(_validation_measures(entry))
    gaps = [f"No {title.lower()} evidence was recorded, so this report makes no statement about it."
            for title in missing]
    # What the per-audit validation of the explanation methods says in words (methods shown but not
    # validated on this model, maps a common corruption reorders): ``workers.probes.validation``.
    stated = []
    for entry in evidence:
        block = (entry.get("metrics") or {}).get("validation") if isinstance(entry.get("metrics"), dict) else None
        for text in (block or {}).get("limitations") or [] if isinstance(block, dict) else []:
            stated.append({"evidence": entry.get("id"), "kind": kind_title(entry.get("kind")), "text": str(text)})
    return {"measured": measured[:60], "gaps": gaps, "stated": stated[:40]}


def _validation_measures(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The disagreement and instability the per-audit validation measured (``workers.probes.validation``):
    every two methods' rank agreement, and each method's worst rank correlation under a corruption."""
    metrics = entry.get("metrics")
    block = metrics.get("validation") if isinstance(metrics, dict) else None
    if not isinstance(block, dict):
        return []
    kind = kind_title(entry.get("kind"))
    rows = []
    for pair in block.get("agreement") or []:
        mean = ((pair or {}).get("rank_correlation") or {}).get("mean")
        if mean is not None and len(pair.get("methods") or []) == 2:
            a, b = pair["methods"]
            rows.append({"evidence": entry.get("id"), "kind": kind, "metric": f"Rank agreement of {a} and {b}",
                         "meaning": "How alike the two methods' maps of the same examples are (1 = same order).",
                         "value": round(float(mean), 4)})
    for method in block.get("methods") or []:
        stability = (method or {}).get("stability") or {}
        if stability.get("min") is not None:
            rows.append({"evidence": entry.get("id"), "kind": kind,
                         "metric": f"Stability of {method.get('method')} under {stability.get('least_stable_under')}",
                         "meaning": "Rank correlation of the maps of the clean and the corrupted image, under the "
                                    "corruption that reorders them most (1 = unchanged).",
                         "value": round(float(stability["min"]), 4)})
    return rows


def library_versions() -> list[tuple[str, str]]:
    rows = []
    for name in LIBRARIES:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return rows


def _declared_kinds() -> dict[str, Any]:
    """``{name: KindSpec}`` of every declared probe kind (empty where the probe library is unavailable)."""
    try:
        from workers.probes import kinds as probe_kinds

        return {spec.name: spec for spec in probe_kinds.all_kinds()}
    except Exception:  # the report must render where the probe library cannot be imported
        return {}


def kind_section(kind: str) -> str | None:
    """The report section that is the home of ``kind``'s evidence: the section the kind declares
    (``section=`` in ``workers.probes.kinds.probe_kind``; ``None`` for a diagnostic kind, listed in
    the test log only), else Loupe's default, else :data:`OTHER_SECTION`."""
    spec = _declared_kinds().get(kind)
    keys = {s.key for s in SECTIONS}
    if spec is not None:
        if spec.section is None:
            return None
        if spec.section not in keys:
            raise ValueError(f"probe kind {kind!r} declares report section {spec.section!r}, which the report does "
                             f"not define (sections: {', '.join(sorted(keys))})")
        return spec.section
    return KIND_SECTIONS.get(kind, OTHER_SECTION)


def section_kinds() -> dict[str, list[Any]]:
    """``{section key: [KindSpec of every kind whose evidence it shows]}``, in declaration order.

    A kind that names a section this report does not define raises: its evidence would otherwise
    never reach a report, and nobody would notice."""
    keys = [s.key for s in SECTIONS]
    out: dict[str, list[Any]] = {key: [] for key in keys}
    for name, spec in _declared_kinds().items():
        if spec.section is None:
            continue
        if spec.section not in out:
            raise ValueError(f"probe kind {name!r} declares report section {spec.section!r}, which the report does "
                             f"not define (sections: {', '.join(sorted(keys))})")
        out[spec.section].append(spec)
    return out


def kind_titles() -> dict[str, str]:
    """Title of every kind whose evidence the report shows (section order, then declaration order)."""
    by_section = section_kinds()
    return {spec.name: spec.title for section in SECTIONS for spec in by_section[section.key]}


def kind_title(kind: str | None) -> str:
    spec = _declared_kinds().get(kind or "")
    return spec.title if spec is not None else KIND_TITLES.get(kind or "", glossary.humanise(kind or ""))


def expected_kinds() -> list[str]:
    """Kinds whose absence the report states: Loupe's list, then every declared kind with a section."""
    declared = [name for name, spec in _declared_kinds().items() if spec.section is not None]
    return list(EXPECTED_KINDS) + [k for k in declared if k not in EXPECTED_KINDS]


def _limitation_keys(kind: str | None) -> set[str] | None:
    """Metric keys the kind's glossary marks as limitations (``Metric.limitation``), or ``None``
    when the kind declares no glossary (the report then falls back to recognising the keys by name)."""
    spec = _declared_kinds().get(kind or "")
    if spec is None or not spec.glossary:
        return None
    return {key for key, metric in spec.glossary.items() if getattr(metric, "limitation", False)}


def _criteria(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[acceptance.Verdict]]:
    specs = [acceptance.Spec(c["kind"], c["metric"].split("@", 1)[0], c["comparator"], c.get("threshold"),
                             c.get("reference") or "", c.get("severity", "medium"), c.get("where") or {},
                             c.get("rationale") or "", c.get("source") or "default")
             for c in manifest.get("criteria") or []]
    verdicts = acceptance.evaluate(specs, manifest.get("evidence", []))
    rows = []
    for v in verdicts:
        if v.value is None:
            measured = "not measured"
        else:
            measured = fmt(v.value)
            if v.reference_value is not None:
                measured += f" vs {fmt(v.reference_value)}"
            if v.interval:
                measured += f" (95% CI {fmt(v.interval[0])} to {fmt(v.interval[1])})"
        rows.append({"criterion": v.criterion.describe(),
                     "meaning": glossary.meaning(v.criterion.metric, v.criterion.kind),
                     "kind": kind_title(v.criterion.kind), "evidence": v.evidence,
                     "subject": v.subject, "measured": measured, "ci": v.interval, "verdict": v.verdict,
                     "met": v.met, "severity": v.criterion.severity, "source": v.criterion.source,
                     "rationale": truncate(v.criterion.rationale, 600)})
    acks: dict[str, list[dict[str, Any]]] = {}
    for ack in manifest.get("acknowledgements") or []:
        acks.setdefault(ack["finding"], []).append({"reviewer": (ack.get("reviewer") or {}).get("name"),
                                                    "reason": truncate(ack.get("reason"), MAX_COMMENT_CHARS),
                                                    "round": ack.get("review_round")})
    found = [f | {"kind_title": kind_title(f["kind"]), "acknowledgements": acks.get(f["key"], [])}
             for f in acceptance.findings(verdicts)]
    return rows, found, verdicts


def _grouped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Verdict rows under their criterion (criterion, why, severity once; then one row per measured value)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault((row["kind"], row["criterion"]), {
            "criterion": row["criterion"], "kind": row["kind"], "rationale": row["rationale"],
            "meaning": row["meaning"], "severity": row["severity"], "source": row["source"], "rows": []})
        group["rows"].append(row)
    for group in groups.values():
        verdicts = [r["met"] for r in group["rows"]]
        group["summary"] = ("not measured" if all(v is None for v in verdicts) else
                            f"{verdicts.count(True)} meet, {verdicts.count(False)} do not meet")
    return list(groups.values())


def build_context(manifest: dict[str, Any], *, manifest_sha256: str, report: dict[str, Any],
                  load_artifact: Callable[[dict[str, Any]], tuple[bytes, str]]) -> tuple[dict[str, Any], RenderInputs]:
    """The template context for ``templates/reports/report.html`` and the figures it references.

    ``report``: ``version``, ``supersedes`` (version number or None), ``changelog`` (list of
    ``{"change", "detail"}``), ``author`` (display name). ``load_artifact(artifact_entry)`` returns
    ``(bytes, content_type)`` for a stored evidence artifact.
    """
    inputs = RenderInputs()
    runs = {r["id"]: r for r in manifest.get("runs", [])}
    evidence = [evidence_view(e, runs.get(e.get("run_id")), inputs, load_artifact)
                for e in manifest.get("evidence", [])]
    present = {e["kind"] for e in evidence}
    embedded = {k: [e["id"] for e in evidence if k in e["embedded_kinds"]]
                for e in evidence for k in e["embedded_kinds"]}
    measured_kinds = present | set(embedded)
    generative = manifest["model"].get("architecture_family") == "generative_fusion"
    gpai = manifest["model"].get("risk_category") == "gpai"
    expected = expected_kinds()
    homes = {kind: kind_section(kind) for kind in set(expected) | present}
    not_applicable = [] if generative else [k for k in GENERATIVE_ONLY_KINDS if k not in present]
    missing = [k for k in expected if k not in measured_kinds and k not in not_applicable]

    sections: list[dict[str, Any]] = []
    for section in SECTIONS:
        groups = []
        if section.key in EVIDENCE_SECTIONS:
            kinds = [k for k in expected if homes.get(k) == section.key]
            kinds += sorted(k for k in present if homes.get(k) == section.key and k not in kinds)
            for kind in kinds:
                items = [e for e in evidence if e["kind"] == kind]
                groups.append({"kind": kind, "title": kind_title(kind),
                               "plain": KIND_PLAIN.get(kind, "Evidence of a probe kind that declares no plain-language "
                                                             "description or report section."), "evidence": items,
                               "inside": embedded.get(kind, []), "not_applicable": kind in not_applicable})
        sections.append({"key": section.key, "title": section.title, "requirement": section.requirement,
                         "plain": section.plain, "kinds": groups, "present": [g for g in groups if g["evidence"]],
                         "absent": [g for g in groups if not g["evidence"]], "number": len(sections) + 1})
    numbers = {s["key"]: s["number"] for s in sections}

    criteria_rows, findings, _ = _criteria(manifest)
    checked = sorted({str((e.get("metrics") or {}).get("method")) for e in manifest.get("evidence", [])
                      if e.get("kind") == "sanity" and isinstance(e.get("metrics"), dict)
                      and e["metrics"].get("method")})
    shown = sorted({str(r["method"]) for e in manifest.get("evidence", []) if isinstance(e.get("metrics"), dict)
                    for r in _method_records(e["metrics"]) if r.get("method") not in acceptance.BASELINES})
    sanity_note = {"checked": checked, "unchecked": [m for m in shown if m not in checked]} if shown else None
    blocking_open = [f for f in findings if f["severity"] in acceptance.BLOCKING and not f["acknowledgements"]]
    observations = [{"kind": e["kind"], "kind_title": e["title"], "evidence": e["id"], **o}
                    for e in evidence for o in e["observations"]]
    flags = [f for f in findings if f["kind"] in ("shortcut", "tcav", "groups")]
    as_of = dt.datetime.fromisoformat(manifest["as_of"])
    test_log = []
    for run in manifest.get("runs", []):
        started = run.get("started_at") and dt.datetime.fromisoformat(run["started_at"])
        finished = run.get("finished_at") and dt.datetime.fromisoformat(run["finished_at"])
        test_log.append({**run, "title": kind_title(run.get("kind")),
                         "duration": f"{(finished - started).total_seconds():.1f} s" if started and finished else "n/a",
                         "params_json": truncate(json.dumps(run.get("params"), sort_keys=True))[:2000],
                         "libraries": ", ".join(f"{k} {v}"
                                                for k, v in sorted((run.get("library_versions") or {}).items()))})
    card = manifest.get("model_card") or {}
    documents = manifest.get("provider_documents") or []
    coverage_args: dict[str, Any] = {"present_kinds": measured_kinds, "documents": documents, "card": card,
                     "section_numbers": numbers, "kind_sections": homes}
    artifacts = [{"evidence": e["id"], "kind": e["kind"], **a} for e in evidence for a in e["files"]]
    glossary_keys = sorted({path.rsplit(".", 1)[-1] for e in manifest.get("evidence", [])
                            for path, _ in flatten(e.get("metrics") or {})}
                           | {c for e in evidence for t in e["tables"] for c in t["columns"]}
                           | {c["metric"].split("@", 1)[0] for c in manifest.get("criteria") or []})
    oversight_docs = [d for d in documents if d["doc_type"] in ("oversight", "instructions")]
    context = {
        "manifest": manifest, "manifest_sha256": manifest_sha256, "report": report,
        "as_of": as_of, "as_of_iso": as_of.replace(microsecond=0).isoformat(),
        "case": manifest["case"], "model": manifest["model"],
        "model_card": [{"key": k, "title": t, "text": truncate(card.get(k)),
                        "html": markdown_html(truncate(card.get(k))) if str(card.get(k) or "").strip() else ""}
                       for k, t in CARD_TITLES.items()],
        "model_info": {k: truncate(v) for k, v in (manifest.get("model_info") or {}).items()},
        "sections": sections, "section_by_key": {s["key"]: s for s in sections},
        "evidence": evidence, "findings": findings, "blocking_open": blocking_open, "observations": observations,
        "flags": flags, "decision": decision(manifest), "disclaimer": DISCLAIMER,
        "sanity_note": sanity_note, "criteria_rows": criteria_rows,
        "criteria_measured": sum(1 for r in criteria_rows if r["met"] is not None),
        "criteria_groups": _grouped(criteria_rows),
        "criteria_custom": [c | {"kind_title": kind_title(c["kind"])}
                            for c in manifest.get("criteria") or [] if c.get("source") == "admin"],
        "coverage": coverage.matrix(group="annex_iv", **coverage_args),
        "coverage_articles": coverage.matrix(group="articles", **coverage_args),
        "coverage_generative": coverage.matrix(group="generative", **coverage_args),
        "generative": generative, "gpai": gpai, "documents": documents, "oversight_docs": oversight_docs,
        "oversight_card": [c for c in (
            {"title": "Intended uses", "html": markdown_html(truncate(card.get("intended_uses")))},
            {"title": "Out-of-scope uses", "html": markdown_html(truncate(card.get("out_of_scope_uses")))},
            {"title": "Limitations", "html": markdown_html(truncate(card.get("limitations")))},
        ) if str(c["html"]).strip()],
        "signoffs": [{**s, "comment": truncate(s.get("comment"), MAX_COMMENT_CHARS)}
                     for s in manifest.get("signoffs", [])],
        "comments": [{**c, "body": truncate(c.get("body"), MAX_COMMENT_CHARS)}
                     for c in manifest.get("comments") or []],
        "test_log": test_log, "limitations": limitations(manifest.get("evidence", []),
                                                         [kind_title(k) for k in missing]),
        "artifacts": artifacts, "model_files": sorted((manifest["model"].get("files") or {}).items()),
        "libraries": library_versions(), "glossary": glossary.entries(glossary_keys) + GLOSSARY_EXTRA,
        "missing_kinds": [kind_title(k) for k in missing],
        "not_applicable_kinds": [kind_title(k) for k in not_applicable],
        "embedded": [{"kind": kind_title(k), "inside": ids} for k, ids in sorted(embedded.items())
                     if k not in present],
    }
    return context, inputs
