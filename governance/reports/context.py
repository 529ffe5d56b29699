"""Turn a report manifest into the template context: sections, tables, figures, findings.

The report shows what its manifest states and nothing else, so a PDF can always be traced back to
the JSON it embeds. Everything here works on plain data; the database is read only by
:mod:`governance.reports.manifest` (and by the caller that loads artifact files).

Sections are tied to the EU AI Act requirement they serve (``SECTIONS``). A section whose probe
kinds produced no evidence says so in words instead of disappearing, because an auditor must be
able to tell "not tested" from "tested, nothing found".
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from governance.reports import figures
from governance.reports.url_fetcher import artifact_url
from workers.probes import kinds as probe_kinds
from workers.probes.errors import ProbeInputError
from workers.probes.kinds import KindSpec

# Free text longer than this is cut in the PDF (the full text stays in the manifest and the export bundle);
# it keeps a hostile or careless 10 MB model card from turning a report into thousands of pages.
MAX_TEXT_CHARS = 8_000
MAX_COMMENT_CHARS = 2_000
# Unbroken runs longer than this get zero-width break opportunities: WeasyPrint's line breaking is
# quadratic in the length of a single word (we measured minutes for a 20 000-character word).
MAX_WORD_CHARS = 60
_LONG_WORD = re.compile(r"\S{%d,}" % (MAX_WORD_CHARS + 1))
MAX_METRIC_ROWS = 80
MAX_TABLE_ROWS = 40

CARD_TITLES = {
    "model_details": "Model details", "intended_uses": "Intended uses", "out_of_scope_uses": "Out-of-scope uses",
    "training_data": "Training data", "evaluation_data": "Evaluation data", "metrics": "Metrics",
    "limitations": "Limitations", "ethical_considerations": "Ethical considerations", "caveats": "Caveats",
}


@dataclass(frozen=True)
class Section:
    """A report section. Which probe kinds' evidence it shows is declared by each kind
    (``section=`` in ``workers.probes.kinds.probe_kind``), see :func:`section_kinds`."""

    key: str
    title: str
    requirement: str


SECTIONS = (
    Section("summary", "Executive summary", "Art. 13(1), 13(3)(b): transparency of the system's characteristics"),
    Section("purpose", "Intended purpose and model card", "Art. 13(3)(a), 13(3)(b)(i); Annex IV point 1"),
    Section("explain", "Ability to explain outputs", "Art. 13(3)(b)(iv), Art. 13(3)(d)"),
    Section("bias", "Performance for groups and bias examination", "Art. 10(2)(f)-(g), Art. 13(3)(b)(v)"),
    Section("robustness", "Accuracy and robustness", "Art. 15; Art. 13(3)(b)(ii)"),
    Section("attacks", "Resilience against attacks", "Art. 15(5): resilience against attempts to exploit vulnerabilities"),
    Section("oversight", "Human oversight", "Art. 14; Annex IV point 2(e)"),
    Section("testlog", "Test log", "Annex IV point 2(g)"),
    Section("limitations", "Limitations", "Art. 13(3)(b)(iii); Annex IV point 3"),
    Section("appendix", "Appendix: hashes, libraries, glossary", "Annex IV points 2(g), 4"),
)

def section_kinds() -> dict[str, list[KindSpec]]:
    """``{section key: [the kinds whose evidence it shows]}``, in the kinds' declaration order.

    A kind that names a section this report does not define raises: its evidence would otherwise
    never reach a report, and nobody would notice."""
    keys = {section.key for section in SECTIONS}
    out: dict[str, list[KindSpec]] = {key: [] for key in keys}
    for spec in probe_kinds.all_kinds():
        if spec.section is None:
            continue
        if spec.section not in keys:
            raise ValueError(f"probe kind {spec.name!r} declares report section {spec.section!r}, which the report "
                             f"does not define (sections: {', '.join(sorted(keys))})")
        out[spec.section].append(spec)
    return out


def kind_titles() -> dict[str, str]:
    """Title of every kind whose evidence the report shows (section order, then declaration order)."""
    by_section = section_kinds()
    return {spec.name: spec.title for section in SECTIONS for spec in by_section[section.key]}


def kind_title(kind: str | None) -> str:
    return kind_titles().get(kind or "", kind or "")


SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2, "info": 3}

GLOSSARY = [
    ("Grounding / saliency map", "A heatmap of how much each image region contributed to the model's score for a text."),
    ("Faithfulness", "Whether an explanation reflects what the model actually uses: deleting the regions it marks "
                     "as important should lower the score quickly (deletion), inserting them should raise it (insertion)."),
    ("Deletion / insertion AUC", "Area under the score curve as pixels are removed (lower is better) or added "
                                 "(higher is better) in the order an explanation ranks them."),
    ("Pointing game", "The share of images where the heatmap's maximum lies inside the annotated object."),
    ("Sanity check", "Randomising the model's weights layer by layer must change an explanation; one that stays the "
                     "same does not depend on what the model learned (Adebayo et al., 2018)."),
    ("TCAV", "Testing with Concept Activation Vectors: how often a human concept (e.g. a watermark) pushes the "
             "model towards a class, compared with random concepts (Kim et al., 2018)."),
    ("Corrected p-value", "A p-value adjusted for testing many concepts at once (Holm), so that chance findings "
                          "are not reported as effects."),
    ("Accuracy gap between groups", "The largest difference in accuracy between two groups of inputs, tested "
                                    "with Fisher's exact test and Holm-corrected across every pair of groups."),
    ("Adversarial patch", "A small image region optimised to steer the model toward a chosen output wherever it "
                          "is placed; its share of the explanation's relevance shows whether it captures the model."),
    ("Visual prompt injection", "Instructions written as text inside an image that make a generative model "
                                "output something else than what the image shows."),
    ("Shortcut", "A feature that predicts the label in the training data but is not the intended cause, such as "
                 "a watermark or a background."),
    ("Explanation instability", "How much an explanation changes under small input changes that do not change "
                                "the prediction."),
    ("Method disagreement", "How much different explanation methods disagree about the same prediction (rank "
                            "correlation of their heatmaps)."),
    ("PAdES", "PDF Advanced Electronic Signatures (ETSI EN 319 142): signatures embedded in the PDF that detect "
              "any later change of the signed bytes."),
    ("PDF/A-3", "The archival PDF profile (ISO 19005-3) that allows machine-readable files, here the manifest, "
                "to be embedded."),
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


def record_tables(metrics: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Lists of dicts in the metrics (e.g. one row per method or concept) as small tables."""
    tables: list[dict[str, Any]] = []
    if not isinstance(metrics, dict):
        return tables
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            tables += record_tables(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns: list[str] = []
            for record in value:
                for column, cell in record.items():
                    if column not in columns and not isinstance(cell, (dict, list)):
                        columns.append(column)
            columns = columns[:9]
            rows = [[fmt(record.get(c)) for c in columns] for record in value[:MAX_TABLE_ROWS]]
            tables.append({"title": path, "columns": columns, "rows": rows,
                           "more": max(0, len(value) - MAX_TABLE_ROWS)})
    return tables


@dataclass
class RenderInputs:
    """What the renderer needs besides the template context: figure bytes by URL id."""

    artifacts: dict[str, Callable[[], tuple[bytes, str]]] = field(default_factory=dict)
    generated: dict[str, bytes] = field(default_factory=dict)


def _generated(inputs: RenderInputs, key: str, png: bytes) -> str:
    # Generated figures are served like artifacts, under a name that cannot collide with an id.
    name = f"gen-{key}"
    inputs.generated[name] = png
    inputs.artifacts[name] = lambda png=png: (png, "image/png")
    return artifact_url(name)


def _tcav_rows(metrics: Any) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """TCAV results (``{"results": [{"concept", "layer", "tcav_score", "p_adjusted", ...}]}``), top level or
    nested one level down (the shortcut probe embeds a TCAV report)."""
    candidates = [metrics] + [v for v in metrics.values() if isinstance(v, dict)] if isinstance(metrics, dict) else []
    for block in candidates:
        results = block.get("results")
        if isinstance(results, list) and results and all(isinstance(r, dict) and "tcav_score" in r for r in results):
            return results, block
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


FAITHFULNESS_METRICS = (("deletion_auc", "deletion AUC (lower is better)"),
                        ("insertion_auc", "insertion AUC (higher is better)"),
                        ("pointing_game", "pointing game (higher is better)"),
                        ("energy_pointing_game", "energy pointing game (higher is better)"))


def summary_figures(entry: dict[str, Any], inputs: RenderInputs) -> list[dict[str, str]]:
    """Figures drawn from the metrics of one evidence item, where a picture reads faster than a table."""
    out = []
    metrics = entry.get("metrics") or {}
    if not isinstance(metrics, dict):
        return out
    kind = entry.get("kind")
    eid = entry.get("id")
    tcav = _tcav_rows(metrics)
    if tcav:
        results, block = tcav
        rows = [{"concept": f"{r.get('concept')} (L{r.get('layer')})", "score": r.get("tcav_score"),
                 "score_std": r.get("tcav_score_std"), "p_corrected": r.get("p_adjusted")} for r in results[:24]]
        png = figures.tcav_bars("TCAV scores", rows, alpha=float(block.get("alpha") or 0.05))
        out.append({"url": _generated(inputs, f"{eid}-tcav", png),
                    "caption": f"TCAV score per concept and layer (evidence #{eid}); the dashed line is chance "
                               f"(0.5). p-values are {block.get('correction', 'multiplicity')}-corrected."})
    records = _method_records(metrics)
    for metric, label in FAITHFULNESS_METRICS:
        values = {str(r["method"]): r.get(metric) for r in records if isinstance(r.get(metric), (int, float))}
        if not values:
            continue
        random = next((r.get(f"random_{metric}") for r in records if isinstance(r.get(f"random_{metric}"), (int, float))),
                      None)
        png = figures.bar_chart(label, values, ylabel=metric.replace("_", " "), reference=random,
                                reference_label="random baseline" if random is not None else "")
        out.append({"url": _generated(inputs, f"{eid}-{metric}", png),
                    "caption": f"{label[0].upper()}{label[1:]} per explanation method (evidence #{eid})"
                               + ("; the dashed line is the random baseline." if random is not None else ".")})
    by_severity = metrics.get("mean_corruption_accuracy_by_severity")
    if isinstance(by_severity, dict) and by_severity:
        xs = [0.0] + [float(k) for k in by_severity]
        ys = [metrics.get("clean_accuracy")] + list(by_severity.values())
        png = figures.curves("Accuracy under corruption", {"mean over corruptions": (xs, ys)},
                             xlabel="severity (0 = clean)", ylabel="accuracy")
        out.append({"url": _generated(inputs, f"{eid}-robustness", png),
                    "caption": f"Mean accuracy over corruption families by severity (evidence #{eid})."})
    # Generic curves: {"curves": {name: {"x": [...], "y": [...]}}}.
    curves = metrics.get("curves")
    if isinstance(curves, dict) and curves:
        series = {str(name): (c["x"], c["y"]) for name, c in list(curves.items())[:8]
                  if isinstance(c, dict) and isinstance(c.get("x"), list) and isinstance(c.get("y"), list)}
        if series:
            png = figures.curves(kind_title(kind), series, xlabel=str(metrics.get("curve_x", "fraction")),
                                 ylabel=str(metrics.get("curve_y", "score")))
            out.append({"url": _generated(inputs, f"{eid}-curves", png),
                        "caption": f"Curves recorded by evidence #{eid} ({kind_title(kind)})."})
    return out


def evidence_view(entry: dict[str, Any], run: dict[str, Any] | None, inputs: RenderInputs,
                  load_artifact: Callable[[dict[str, Any]], tuple[bytes, str]]) -> dict[str, Any]:
    figures_out = summary_figures(entry, inputs)
    files = []
    for artifact in entry.get("artifacts", []):
        files.append(artifact)
        if artifact.get("content_type") in ("image/png", "image/jpeg"):
            key = str(artifact["id"])
            inputs.artifacts[key] = lambda a=artifact: load_artifact(a)
            figures_out.append({"url": artifact_url(key), "caption": f"{artifact['name']} (evidence #{entry['id']}, "
                                f"stored artifact, SHA-256 {artifact['sha256'][:16]}...)"})
    return {
        "id": entry.get("id"), "kind": entry.get("kind"), "title": kind_title(entry.get("kind")),
        "summary": truncate(entry.get("summary")), "metric_rows": flatten(entry.get("metrics") or {}),
        "tables": record_tables(entry.get("metrics") or {}), "findings": entry.get("findings") or [],
        "figures": figures_out, "files": files, "run": run, "digest": entry.get("digest"),
    }


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
    return {"state": state, "label": labels.get(state, f"NOT DECIDED ({state})"), "approvals": len(approvers),
            "required": case.get("required_approvals"), "open_rejection": rejected, "changes_requested": changes}


def limitations(evidence: list[dict[str, Any]], present_kinds: set[str]) -> dict[str, Any]:
    """Measured disagreement/instability values (the metrics each kind's glossary marks as
    ``limitation``), and the gaps the evidence leaves."""
    measured = []
    for entry in evidence:
        kind = str(entry.get("kind") or "")
        try:
            quoted = {key for key, metric in probe_kinds.glossary(kind)[kind].items() if metric.limitation}
        except ProbeInputError:  # evidence of a kind no longer declared: its numbers stay in the manifest
            quoted = set()
        for path, value in flatten(entry.get("metrics") or {}):
            if path.rsplit(".", 1)[-1] in quoted:
                measured.append({"evidence": entry.get("id"), "kind": kind, "metric": path, "value": value})
    titles = kind_titles()
    gaps = [f"No {title.lower()} evidence was recorded, so this report makes no statement about it."
            for kind, title in titles.items() if kind not in present_kinds]
    # What the per-audit validation of the explanation methods says in words (methods shown but not
    # validated on this model, maps a common corruption reorders): ``workers.probes.validation``.
    stated = []
    for entry in evidence:
        block = (entry.get("metrics") or {}).get("validation") if isinstance(entry.get("metrics"), dict) else None
        for text in (block or {}).get("limitations") or [] if isinstance(block, dict) else []:
            stated.append({"evidence": entry.get("id"), "kind": entry.get("kind"), "text": str(text)})
    return {"measured": measured[:60], "gaps": gaps, "stated": stated[:40]}


def glossary() -> list[tuple[str, str]]:
    """The report's glossary: general terms, then the metrics each probe kind declares."""
    terms = list(GLOSSARY)
    known = {term for term, _ in terms}
    by_section = section_kinds()
    for section in SECTIONS:
        for spec in by_section[section.key]:
            for metric in spec.glossary.values():
                if metric.label not in known:
                    known.add(metric.label)
                    terms.append((metric.label, f"{metric.meaning[:1].upper()}{metric.meaning[1:]} ({spec.title})."))
    return terms


def library_versions() -> list[tuple[str, str]]:
    rows = []
    for name in LIBRARIES:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return rows


def build_context(manifest: dict[str, Any], *, manifest_sha256: str, report: dict[str, Any],
                  load_artifact: Callable[[dict[str, Any]], tuple[bytes, str]]) -> tuple[dict[str, Any], RenderInputs]:
    """The template context for ``templates/reports/report.html`` and the figures it references.

    ``report``: ``version``, ``supersedes`` (version number or None), ``changelog`` (list of
    ``{"change", "detail"}``), ``author`` (display name). ``load_artifact(artifact_entry)`` returns
    ``(bytes, content_type)`` for a stored evidence artifact.
    """
    inputs = RenderInputs()
    runs = {r["id"]: r for r in manifest.get("runs", [])}
    evidence = [evidence_view(e, runs.get(e.get("run_id")), inputs, load_artifact) for e in manifest.get("evidence", [])]
    present = {e["kind"] for e in evidence}
    sections = []
    by_section = section_kinds()
    for section in SECTIONS:
        kinds = []
        for spec in by_section[section.key]:
            items = [e for e in evidence if e["kind"] == spec.name]
            kinds.append({"kind": spec.name, "title": spec.title, "evidence": items})
        sections.append({"key": section.key, "title": section.title, "requirement": section.requirement,
                         "kinds": kinds, "number": len(sections) + 1})
    findings = []
    for e in evidence:
        for f in e["findings"]:
            findings.append({"severity": f.get("severity", "info"), "title": truncate(f.get("title"))[:500],
                             "detail": truncate(f.get("detail"), MAX_COMMENT_CHARS), "kind": e["kind"], "evidence": e["id"]})
    findings.sort(key=lambda f: (SEVERITY_ORDER.get(f["severity"], 9), f["evidence"] or 0))
    flags = [f for f in findings if f["kind"] in ("shortcut", "tcav") and f["severity"] in ("high", "medium")]
    as_of = dt.datetime.fromisoformat(manifest["as_of"])
    test_log = []
    for run in manifest.get("runs", []):
        started = run.get("started_at") and dt.datetime.fromisoformat(run["started_at"])
        finished = run.get("finished_at") and dt.datetime.fromisoformat(run["finished_at"])
        test_log.append({**run, "duration": f"{(finished - started).total_seconds():.1f} s" if started and finished else "n/a",
                         "params_json": truncate(json.dumps(run.get("params"), sort_keys=True, indent=1))[:2000],
                         "libraries": ", ".join(f"{k} {v}" for k, v in sorted((run.get("library_versions") or {}).items()))})
    card = manifest.get("model_card") or {}
    artifacts = [{"evidence": e["id"], "kind": e["kind"], **a} for e in evidence for a in e["files"]]
    context = {
        "manifest": manifest, "manifest_sha256": manifest_sha256, "report": report,
        "as_of": as_of, "as_of_iso": as_of.replace(microsecond=0).isoformat(),
        "case": manifest["case"], "model": manifest["model"],
        "model_card": [{"key": k, "title": t, "text": truncate(card.get(k))} for k, t in CARD_TITLES.items()],
        "model_info": {k: truncate(v) for k, v in (manifest.get("model_info") or {}).items()},
        "sections": sections, "section_by_key": {s["key"]: s for s in sections},
        "evidence": evidence, "findings": findings, "flags": flags, "decision": decision(manifest),
        "signoffs": [{**s, "comment": truncate(s.get("comment"), MAX_COMMENT_CHARS)} for s in manifest.get("signoffs", [])],
        "test_log": test_log, "limitations": limitations(manifest.get("evidence", []), present),
        "artifacts": artifacts, "model_files": sorted((manifest["model"].get("files") or {}).items()),
        "libraries": library_versions(), "glossary": glossary(),
        "missing_kinds": [title for kind, title in kind_titles().items() if kind not in present],
    }
    return context, inputs
