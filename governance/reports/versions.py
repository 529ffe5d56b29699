"""Report versions: numbering, what a version supersedes, and the change log against it.

Issued reports are immutable (``Report`` is an append-only model, and PostgreSQL triggers refuse
raw updates); a new generation is always a new row, v(n+1), pointing at v(n).
"""

from __future__ import annotations

from typing import Any

from governance.canonical import digest
from governance.models import AuditCase, Report


def latest(case: AuditCase) -> Report | None:
    return case.reports.order_by("-version").first()


def _evidence_key(entry: dict[str, Any], runs: dict[int, dict[str, Any]]) -> str:
    """What a piece of evidence answers: its kind with its run's parameters and dataset.

    A re-run of the same planned probe produces new evidence for the same key: "replaced".
    """
    run_id = entry.get("run_id")
    run = (runs.get(run_id) if run_id is not None else None) or {}
    return digest({"kind": entry.get("kind"), "params": run.get("params"), "dataset": run.get("dataset")})


def changelog(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[dict[str, Any]]:
    """Differences between two manifests, as ``{"change": code, "detail": sentence, ...}`` entries."""
    if previous is None:
        return [{"change": "first_version", "detail": "First version of this report."}]
    changes: list[dict[str, Any]] = []
    prev_runs = {r["id"]: r for r in previous.get("runs", [])}
    cur_runs = {r["id"]: r for r in current.get("runs", [])}
    prev_ev = {_evidence_key(e, prev_runs): e for e in previous.get("evidence", [])}
    cur_ev = {_evidence_key(e, cur_runs): e for e in current.get("evidence", [])}
    for key, entry in cur_ev.items():
        old = prev_ev.get(key)
        if old is None:
            changes.append({"change": "evidence_added", "evidence": entry["id"], "kind": entry["kind"],
                            "detail": f"Evidence #{entry['id']} ({entry['kind']}) added."})
        elif old["digest"] != entry["digest"]:
            changes.append({"change": "evidence_replaced", "evidence": entry["id"], "replaces": old["id"],
                            "kind": entry["kind"],
                            "detail": f"Evidence #{entry['id']} ({entry['kind']}) replaces evidence #{old['id']}."})
            changes += _metric_changes(old, entry)
    for key, old in prev_ev.items():
        if key not in cur_ev:
            changes.append({"change": "evidence_removed", "evidence": old["id"], "kind": old["kind"],
                            "detail": f"Evidence #{old['id']} ({old['kind']}) is no longer part of the case."})
    prev_signoffs = {s["id"] for s in previous.get("signoffs", [])}
    for signoff in current.get("signoffs", []):
        if signoff["id"] not in prev_signoffs:
            changes.append({"change": "signoff_added", "signoff": signoff["id"],
                            "detail": f"Sign-off #{signoff['id']}: {signoff['reviewer']['name']} "
                                      f"({signoff['decision'].replace('_', ' ')})."})
    if previous["case"].get("state") != current["case"].get("state"):
        changes.append({"change": "state_changed", "detail": f"Case state changed from "
                        f"{previous['case'].get('state')} to {current['case'].get('state')}."})
    if previous["model"].get("manifest_hash") != current["model"].get("manifest_hash"):
        changes.append({"change": "model_changed", "detail": "The model files' manifest hash changed."})
    changes += _field_changes(previous, current)
    changes += _criteria_changes(previous, current)
    changes += _document_changes(previous, current)
    changes += _comment_changes(previous, current)
    if not changes:
        changes.append({"change": "no_change", "detail": "No change in evidence, sign-offs or case state; "
                                                         "re-issued from the same case state."})
    return changes


MAX_METRIC_CHANGES = 12


def _metric_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Metric values that differ between a replaced evidence item and its replacement."""
    from governance import glossary
    from governance.reports.context import flatten

    before, after = dict(flatten(old.get("metrics") or {})), dict(flatten(new.get("metrics") or {}))
    out = []
    for path in [p for p in after if p in before and before[p] != after[p]] + [p for p in after if p not in before]:
        detail = (f"{glossary.path_label(path)} ({new['kind']}): {before[path]} -> {after[path]}" if path in before
                  else f"{glossary.path_label(path)} ({new['kind']}): new, {after[path]}")
        out.append({"change": "metric_changed", "evidence": new["id"], "metric": path, "before": before.get(path),
                    "after": after[path], "detail": detail})
    removed = [p for p in before if p not in after]
    out += [{"change": "metric_changed", "evidence": new["id"], "metric": p, "before": before[p], "after": None,
             "detail": f"{glossary.path_label(p)} ({new['kind']}): no longer recorded"} for p in removed]
    if len(out) > MAX_METRIC_CHANGES:
        more = len(out) - MAX_METRIC_CHANGES
        out = out[:MAX_METRIC_CHANGES] + [{"change": "metric_changed", "evidence": new["id"],
                                           "detail": f"... and {more} more metric changes in evidence #{new['id']}."}]
    return out


_CARD_TITLES = {"model_details": "Model details", "intended_uses": "Intended uses",
                "out_of_scope_uses": "Out-of-scope uses", "training_data": "Training data",
                "evaluation_data": "Evaluation data", "metrics": "Metrics", "limitations": "Limitations",
                "ethical_considerations": "Ethical considerations", "caveats": "Caveats"}


def _field_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for block, label in (("model_card", "Model card"), ("model_info", "Inventory entry")):
        before, after = previous.get(block) or {}, current.get(block) or {}
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                title = _CARD_TITLES.get(name, name.replace("_", " "))
                out.append({"change": "model_card_changed", "field": f"{block}.{name}",
                            "detail": f"{label}: '{title}' changed."})
    return out


def _criterion_key(entry: dict[str, Any]) -> str:
    return f"{entry.get('kind')}:{entry.get('metric')}:{digest(entry.get('where') or {})}"


def _criteria_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    from governance import acceptance

    def spec(entry):
        return acceptance.Spec(entry["kind"], entry["metric"].split("@", 1)[0], entry["comparator"],
                               entry.get("threshold"), entry.get("reference") or "", entry.get("severity", "medium"),
                               entry.get("where") or {})

    fields = ("comparator", "threshold", "reference", "severity", "where")
    before = {_criterion_key(c): c for c in previous.get("criteria") or []}
    after = {_criterion_key(c): c for c in current.get("criteria") or []}
    if "criteria" not in previous:
        return []  # a version issued before criteria were recorded: nothing to compare
    out = []
    for key, entry in after.items():
        old = before.get(key)
        if old is None:
            out.append({"change": "criterion_added", "detail": f"Criterion added: {spec(entry).describe()}."})
        elif any(old.get(f) != entry.get(f) for f in fields):
            reason = f" Reason: {entry.get('rationale')}" if entry.get("source") == "admin" else ""
            out.append({"change": "criterion_changed", "detail": f"Criterion changed from '{spec(old).describe()}' "
                        f"({old.get('severity')}) to '{spec(entry).describe()}' ({entry.get('severity')}).{reason}"})
    out += [{"change": "criterion_removed", "detail": f"Criterion removed: {spec(old).describe()}."}
            for key, old in before.items() if key not in after]
    return out


def _document_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    before = {d["doc_type"]: d for d in previous.get("provider_documents") or []}
    out = []
    for document in current.get("provider_documents") or []:
        old = before.get(document["doc_type"])
        if old is None or old["sha256"] != document["sha256"]:
            out.append({"change": "document_added", "document": document["id"],
                        "detail": f"Provider document '{document['type_label']}' v{document['version']} "
                                  f"(SHA-256 {document['sha256'][:16]}...)"
                                  + (f" replaces v{old['version']}." if old else " added.")})
    return out


def _comment_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """Comments added and comments resolved since the previous version (governance/comments.py)."""
    before = {c["id"]: c for c in previous.get("comments") or []}
    out = []
    for comment in current.get("comments") or []:
        old = before.get(comment["id"])
        who = (comment.get("author") or {}).get("name", "")
        if old is None:
            out.append({"change": "comment_added", "comment": comment["id"],
                        "detail": f"Comment #{comment['id']} by {who} on finding {comment['finding']}."})
        if comment.get("resolved_at") and not (old or {}).get("resolved_at"):
            resolver = (comment.get("resolved_by") or {}).get("name", "")
            out.append({"change": "comment_resolved", "comment": comment["id"],
                        "detail": f"Comment #{comment['id']} resolved by {resolver}."})
    return out
