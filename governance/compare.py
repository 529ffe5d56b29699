"""Side-by-side comparisons for the review workspace: two versions of one model, two report versions.

- :func:`compare_versions`: model-card fields and inventory facts, the metrics of each probe kind
  (from the latest evidence of that kind among the version's cases the user can see) and the
  findings, each marked as in both versions, only in the earlier one or only in the later one.
- :func:`report_diff`: what changed between two issued report versions of one case, from their
  embedded manifests, with the same change log a new version prints
  (:func:`governance.reports.versions.changelog`).

Nothing here decides visibility: callers pass objects the user may see, and the evidence is
narrowed with ``visible_to`` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from governance import glossary
from governance import models as m
from governance.reports.context import flatten
from governance.reports.versions import changelog


@dataclass
class Row:
    label: str
    before: str
    after: str
    key: str = ""
    delta: str = ""

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass
class KindBlock:
    kind: str
    evidence_a: int | None
    evidence_b: int | None
    rows: list[Row] = field(default_factory=list)


def _latest_evidence(version: m.ModelVersion, user: Any) -> dict[str, m.Evidence]:
    """The newest evidence of each probe kind among the version's cases the user can see."""
    latest: dict[str, m.Evidence] = {}
    rows = (m.Evidence.objects.visible_to(user).filter(run__case__model_version=version)
            .select_related("run").order_by("pk"))
    for evidence in rows:
        latest[evidence.kind] = evidence
    return latest


def _delta(before: str, after: str) -> str:
    try:
        difference = float(after) - float(before)
    except ValueError:
        return ""
    return f"{difference:+.4g}" if difference else "0"


def _finding_rows(evidence: dict[str, m.Evidence]) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, item in evidence.items():
        for finding in item.findings or []:
            if isinstance(finding, dict):
                found[(kind, str(finding.get("title", "")))] = {**finding, "kind": kind, "evidence": item.pk}
    return found


def _verbose_name(name: str) -> str:
    field = m.ModelVersion._meta.get_field(name)
    return str(getattr(field, "verbose_name", name)).capitalize()


def compare_versions(a: m.ModelVersion, b: m.ModelVersion, user: Any) -> dict[str, Any]:
    """Version ``a`` (shown left) against version ``b`` (right); both of one model."""
    if a.ai_model_id != b.ai_model_id:
        raise ValueError("only versions of one model are compared")
    facts = [Row("Version", a.version, b.version),
             Row("Architecture", a.get_architecture_family_display(), b.get_architecture_family_display()),
             Row("Manifest SHA-256", a.manifest_hash or "not computed", b.manifest_hash or "not computed"),
             Row("Files", str(len(a.manifest or {})), str(len(b.manifest or {}))),
             Row("Registered", f"{a.created_at:%Y-%m-%d}", f"{b.created_at:%Y-%m-%d}")]
    card = [Row(_verbose_name(name), getattr(a, name), getattr(b, name), key=name)
            for name in m.ModelVersion.CARD_FIELDS if getattr(a, name) or getattr(b, name)]
    evidence_a, evidence_b = _latest_evidence(a, user), _latest_evidence(b, user)
    kinds: list[KindBlock] = []
    for kind in sorted(set(evidence_a) | set(evidence_b)):
        left, right = evidence_a.get(kind), evidence_b.get(kind)
        before = dict(flatten(left.metrics)) if left else {}
        after = dict(flatten(right.metrics)) if right else {}
        block = KindBlock(kind, left.pk if left else None, right.pk if right else None)
        for key in list(before) + [k for k in after if k not in before]:
            old, new = before.get(key, "not measured"), after.get(key, "not measured")
            block.rows.append(Row(glossary.path_label(key), old, new, key=key,
                                  delta=_delta(old, new) if key in before and key in after else ""))
        kinds.append(block)
    findings_a, findings_b = _finding_rows(evidence_a), _finding_rows(evidence_b)
    findings = []
    for fkey in list(findings_a) + [k for k in findings_b if k not in findings_a]:
        finding = findings_b.get(fkey) or findings_a[fkey]
        presence = ("both" if fkey in findings_a and fkey in findings_b
                    else ("only_a" if fkey in findings_a else "only_b"))
        findings.append({**finding, "presence": presence,
                         "evidence_a": findings_a.get(fkey, {}).get("evidence"),
                         "evidence_b": findings_b.get(fkey, {}).get("evidence")})
    return {"facts": facts, "card": card, "kinds": kinds, "findings": findings,
            "changed_card_fields": sum(1 for row in card if row.changed)}


def report_diff(older: m.Report, newer: m.Report) -> list[dict[str, Any]]:
    """The changes from report ``older`` to report ``newer`` (same case; ``older`` has the lower version)."""
    if older.case_id != newer.case_id:
        raise ValueError("only reports of one case are compared")
    if older.version > newer.version:
        older, newer = newer, older
    return changelog(older.manifest or None, newer.manifest)
