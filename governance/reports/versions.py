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
    run = runs.get(entry.get("run_id")) or {}
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
    if previous.get("model_card") != current.get("model_card") or previous.get("model_info") != current.get("model_info"):
        changes.append({"change": "model_card_changed", "detail": "The model card or inventory entry changed."})
    if not changes:
        changes.append({"change": "no_change", "detail": "No change in evidence, sign-offs or case state; "
                                                         "re-issued from the same case state."})
    return changes
