"""The coverage matrix: for each Annex IV point and each article a report touches, who covers it.

Each point is either evidenced by Loupe (a report section built from measurements or records),
supplied by the provider (a typed, hashed provider document, see
:mod:`governance.provider_documents`), stated by the provider in the model card only, or not
covered. Loupe never marks a point covered on the strength of a section title: a point that needs
measurements counts as evidenced only when evidence of a kind that measures it is in the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Point:
    ref: str
    title: str
    sections: tuple[str, ...] = ()  # report sections that always contribute (built from records)
    measured_by: tuple[str, ...] = ()  # report section contributes only if one of these kinds has evidence
    measured_in: str = ""  # the section that holds those kinds' evidence
    documents: tuple[str, ...] = ()  # provider document types that supply it
    card: tuple[str, ...] = ()  # model card fields where the provider may state it
    group: str = "annex_iv"
    note: str = ""


VALIDATION_KINDS = ("grounding", "sanity", "stability", "tcav", "shortcut", "robustness", "token_attribution",
                    "attention", "intervention", "groups", "patch_attack", "prompt_injection")

POINTS: tuple[Point, ...] = (
    Point("Annex IV 1", "General description: intended purpose, provider, versions, hardware, deployment forms, "
          "instructions for use", sections=("purpose",), documents=("system_description", "instructions"),
          card=("model_details", "intended_uses"),
          note="Loupe records the intended purpose, provider, version and file hashes; hardware, deployment forms "
               "and instructions for use come from the provider."),
    Point("Annex IV 2(a)-(c)", "Development methods, design choices and system architecture",
          sections=("purpose",), documents=("system_description",), card=("model_details",),
          note="Loupe detects the model architecture; the design rationale is the provider's."),
    Point("Annex IV 2(d)", "Data requirements and data sheets (training, validation and test data)",
          documents=("data_sheet",), card=("training_data", "evaluation_data")),
    Point("Annex IV 2(e)", "Human-oversight measures of the system (Art. 14)",
          documents=("oversight", "instructions"), card=("intended_uses", "out_of_scope_uses"),
          note="The audit's own four-eyes review is not a measure of the system and is not counted here."),
    Point("Annex IV 2(f)", "Pre-determined changes to the system and its performance", documents=("change_log",)),
    Point("Annex IV 2(g)", "Validation and testing procedures, metrics and test logs",
          sections=("criteria", "testlog"), measured_by=VALIDATION_KINDS, measured_in="explain"),
    Point("Annex IV 2(h)", "Cybersecurity measures", measured_by=("patch_attack", "prompt_injection"),
          measured_in="attacks", documents=("cybersecurity",),
          note="Adversarial probes, where run, measure part of it; security of the deployment is the provider's."),
    Point("Annex IV 3", "Monitoring, functioning and control: capabilities, limitations, accuracy for persons "
          "or groups, foreseeable unintended outcomes", sections=("limitations",),
          measured_by=("robustness", "groups"), measured_in="robustness", card=("limitations", "caveats")),
    Point("Annex IV 4", "Appropriateness of the performance metrics", sections=("criteria",)),
    Point("Annex IV 5", "Risk-management system (Art. 9)", documents=("risk_management",)),
    Point("Annex IV 6", "Relevant changes made through the life cycle", documents=("change_log",),
          note="Each report version lists the changes since the previous version of this report only."),
    Point("Annex IV 7", "Harmonised standards and other specifications applied", documents=("standards",)),
    Point("Annex IV 8", "EU declaration of conformity (Art. 47)", documents=("declaration",)),
    Point("Annex IV 9", "Post-market monitoring system and plan (Art. 72)", documents=("post_market",)),
    # Articles
    Point("Art. 9", "Risk-management system", documents=("risk_management",), group="articles"),
    Point("Art. 10(2)(f)-(g)", "Examination and mitigation of possible biases in the data", group="articles",
          measured_by=("tcav", "shortcut", "groups"), measured_in="bias", documents=("data_sheet",)),
    Point("Art. 11", "Technical documentation (Annex IV)", sections=("coverage",), group="articles",
          note="This matrix shows which parts exist; it is not the documentation itself."),
    Point("Art. 12", "Record-keeping: automatic logs of the system in operation", group="articles",
          documents=("system_description",),
          note="Loupe logs its own audit, not the system's operation."),
    Point("Art. 13(3)(b)(iv)", "Information to explain the system's output", group="articles",
          measured_by=("grounding", "sanity", "stability", "token_attribution", "attention", "intervention"),
          measured_in="explain", documents=("instructions",)),
    Point("Art. 13(3)(b)(v)", "Performance regarding specific persons or groups", group="articles",
          measured_by=("groups",), measured_in="bias",
          note="Concept tests (TCAV) examine features, not groups of persons; they do not cover this point."),
    Point("Art. 14", "Human oversight by design", documents=("oversight", "instructions"), group="articles",
          note="Loupe measures no oversight measure; section 'Human-oversight measures of the system' shows what the "
               "provider supplied."),
    Point("Art. 15", "Accuracy, robustness and cybersecurity", group="articles",
          measured_by=("robustness", "stability", "patch_attack", "prompt_injection"), measured_in="robustness",
          documents=("cybersecurity",)),
    # Generative and general-purpose models
    Point("Art. 50(2)", "Machine-readable marking of synthetic output as artificially generated",
          measured_by=("synthetic_marking",), measured_in="generative", documents=("synthetic_content",),
          group="generative"),
    Point("Art. 50(4)", "Disclosure of generated or manipulated content to those exposed to it",
          documents=("synthetic_content", "instructions"), group="generative"),
    Point("Art. 53(1)(a), Annex XI 1", "Technical documentation of a general-purpose model: tasks, architecture, "
          "parameters, modalities, licence, acceptable use", sections=("purpose",),
          documents=("gpai_documentation",), card=("model_details", "intended_uses", "out_of_scope_uses"),
          group="generative"),
    Point("Annex XI 2", "Evaluation strategies and results, including adversarial testing", group="generative",
          measured_by=VALIDATION_KINDS, measured_in="explain", documents=("gpai_documentation",)),
    Point("Art. 53(1)(c)-(d)", "Copyright policy and summary of training content", documents=("copyright_policy",),
          card=("training_data",), group="generative"),
)

STATUS_TEXT = {
    "evidenced": "Evidenced by Loupe",
    "supplied": "Supplied by the provider",
    "both": "Evidenced by Loupe and supplied by the provider",
    "statement": "Provider's statement in the model card only",
    "not_covered": "Not covered",
}


def matrix(*, present_kinds: Iterable[str], documents: Iterable[Mapping[str, Any]], card: Mapping[str, Any],
           section_numbers: Mapping[str, int], kind_sections: Mapping[str, str], group: str | None = None
           ) -> list[dict[str, Any]]:
    """Rows of the coverage matrix (``group`` narrows to "annex_iv", "articles" or "generative")."""
    present = set(present_kinds)
    by_type = {d["doc_type"]: d for d in documents}
    rows = []
    for point in POINTS:
        if group is not None and point.group != group:
            continue
        sections = [s for s in point.sections if s in section_numbers]
        measured = sorted(present & set(point.measured_by))
        for kind in measured:
            section = kind_sections.get(kind, point.measured_in)
            if section in section_numbers and section not in sections:
                sections.append(section)
        docs = [by_type[t] for t in point.documents if t in by_type]
        stated = [f for f in point.card if str(card.get(f) or "").strip()]
        loupe = bool(sections) and (bool(measured) or not point.measured_by)
        if loupe and docs:
            status = "both"
        elif loupe:
            status = "evidenced"
        elif docs:
            status = "supplied"
        elif stated:
            status = "statement"
        else:
            status = "not_covered"
        if not loupe:
            sections = []  # a section that holds no measurement for this point is not cited for it
        rows.append({"ref": point.ref, "title": point.title, "group": point.group, "status": status,
                     "status_text": STATUS_TEXT[status],
                     "sections": [{"key": s, "number": section_numbers[s]} for s in sections],
                     "measured": measured, "documents": docs, "card_fields": stated, "note": point.note,
                     "wanted_documents": [t for t in point.documents if t not in by_type]})
    return rows
