"""The report manifest: the machine-readable statement of exactly what a report version covers.

It lists the model files' hashes, every probe run with its provenance, every evidence item with
its metrics and artifact hashes, and every sign-off. The PDF embeds it as a PDF/A-3 attachment
(``loupe-manifest.json``), its SHA-256 is printed on the cover, and the ``Report`` row stores it,
so three parties can check one another: the PDF, the database row and the evidence files.

:func:`check_against_database` is what ``manage.py verify_report`` uses.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from governance.canonical import canonical_json, digest
from governance.models import AuditCase, Evidence, ProbeRun, Report, Signoff

FORMAT = "loupe-report-manifest/1"
ATTACHMENT_NAME = "loupe-manifest.json"


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def _user(user) -> dict[str, str] | None:
    if user is None:
        return None
    return {"username": user.get_username(), "name": user.get_full_name() or user.get_username()}


def run_entry(run: ProbeRun) -> dict[str, Any]:
    return {
        "id": run.pk, "kind": run.kind, "status": run.status, "params": run.params, "dataset": run.dataset,
        "dataset_hash": run.dataset_hash, "seed": run.seed, "code_version": run.code_version,
        "device": run.device, "model_manifest_hash": run.model_manifest_hash,
        "library_versions": run.library_versions, "attempts": run.attempts,
        "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at), "error": run.error,
    }


def evidence_entry(evidence: Evidence) -> dict[str, Any]:
    """The evidence row's content plus ``digest``: its content digest, the one its ``evidence.recorded``
    audit event carries (:func:`governance.evidence.content_digest`)."""
    from governance.evidence import evidence_content

    entry = evidence_content(evidence)
    entry["digest"] = digest(entry)
    return entry


def signoff_entry(signoff: Signoff) -> dict[str, Any]:
    return {"id": signoff.pk, "reviewer": _user(signoff.reviewer), "decision": signoff.decision,
            "comment": signoff.comment, "digest": signoff.digest, "review_round": signoff.review_round,
            "evidence_id": signoff.evidence_id, "report_section": signoff.report_section,
            "created_at": _iso(signoff.created_at)}


def case_runs(case: AuditCase):
    return case.runs.order_by("created_at", "pk")


def case_evidence(case: AuditCase):
    return (Evidence.objects.filter(run__case=case).select_related("run")
            .prefetch_related("artifacts").order_by("run__created_at", "pk"))


def case_signoffs(case: AuditCase):
    return case.signoffs.select_related("reviewer").order_by("created_at", "pk")


def build_manifest(case: AuditCase, *, version: int, audit_anchor: dict[str, Any] | None = None,
                   report_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything report ``version`` of ``case`` states, as plain JSON (deterministic order).

    ``report_meta``: ``supersedes`` (the previous version number or None) and ``changelog`` (the
    change-log entries printed on the cover), stored under ``"report"`` so the cover's claims
    about earlier versions are signed with the rest and can be checked against them.

    ``audit_anchor``: the audit log's head when the report is issued (``audit_log.anchor()``),
    stored as ``"audit_log"``; renders that issue nothing (previews) leave it out, so that they
    depend on the case state alone."""
    mv = case.model_version
    ai_model = mv.ai_model
    runs = [run_entry(r) for r in case_runs(case)]
    evidence = [evidence_entry(e) for e in case_evidence(case)]
    signoffs = [signoff_entry(s) for s in case_signoffs(case)]
    timestamps = [case.created_at, case.submitted_at, case.state_changed_at]
    timestamps += [r.finished_at for r in case.runs.all()]
    timestamps += [s.created_at for s in case.signoffs.all()]
    timestamps += [e.created_at for e in Evidence.objects.filter(run__case=case)]
    timestamps += list(case.criteria.values_list("updated_at", flat=True))
    timestamps += list(mv.provider_documents.values_list("created_at", flat=True))
    as_of = max(t for t in timestamps if t is not None)
    manifest = {
        "format": FORMAT,
        "report": {"case_id": case.pk, "version": version,
                   "supersedes": (report_meta or {}).get("supersedes"),
                   "changelog": list((report_meta or {}).get("changelog") or [])},
        "as_of": as_of.isoformat(),
        "case": {"id": case.pk, "title": case.title, "scope": case.scope, "state": case.state,
                 "review_round": case.review_round, "required_approvals": case.required_approvals,
                 "probe_plan": case.probe_plan, "submitted_by": _user(case.submitted_by),
                 "reviewers": [_user(u) for u in case.reviewers.order_by("username")]},
        "model": {"id": ai_model.pk, "name": ai_model.name, "provider": ai_model.provider_name,
                  "risk_category": ai_model.risk_category, "annex_iii_area": ai_model.annex_iii_area,
                  "version_id": mv.pk, "version": mv.version, "source": mv.source,
                  "hub_id": mv.hub_id, "hub_revision": mv.hub_revision,
                  "architecture_family": mv.architecture_family,
                  "manifest_hash": mv.manifest_hash, "files": dict(sorted((mv.manifest or {}).items()))},
        "model_info": {"intended_purpose": ai_model.intended_purpose, "modality": ai_model.get_modality_display(),
                       "risk_category": ai_model.get_risk_category_display(),
                       "annex_iii_area": ai_model.get_annex_iii_area_display() if ai_model.annex_iii_area else "",
                       "provider_contact": ai_model.provider_contact,
                       "architecture": mv.get_architecture_family_display(),
                       "architecture_detail": mv.architecture_detail},
        "model_card": mv.card_dict(),
        "runs": runs,
        "evidence": evidence,
        "signoffs": signoffs,
        **report_content(case),
    }
    if audit_anchor is not None:
        manifest["audit_log"] = {"seq": audit_anchor["seq"], "row_hash": audit_anchor["row_hash"]}
    return manifest


def report_content(case: AuditCase) -> dict[str, Any]:
    """Acceptance criteria, acknowledged findings and provider documents (see governance.acceptance)."""
    from governance import acceptance, provider_documents

    return {
        "criteria": [acceptance.entry_of(spec, row) for spec, row in acceptance.case_specs(case)],
        "acknowledgements": [{"id": a.pk, "signoff_id": a.signoff_id, "finding": a.finding, "reason": a.reason,
                              "reviewer": _user(a.reviewer), "review_round": a.review_round,
                              "created_at": _iso(a.created_at)}
                             for a in case.acknowledgements.select_related("reviewer").order_by("created_at", "pk")],
        "provider_documents": [provider_documents.entry(d)
                               for d in provider_documents.latest_documents(case.model_version)],
        # The discussion of the findings (governance/comments.py), as it stood at issuance.
        "comments": [{"id": c.pk, "finding": c.finding, "evidence_id": c.evidence_id, "author": _user(c.author),
                      "body": c.body, "reply_to": c.reply_to_id, "created_at": _iso(c.created_at),
                      "resolved_by": _user(c.resolved_by) if c.resolved_by_id else None,
                      "resolved_at": _iso(c.resolved_at) if c.resolved_at else None}
                     for c in case.comments.select_related("author", "resolved_by").order_by("created_at", "pk")],
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes embedded in the PDF and hashed on its cover (canonical JSON)."""
    return canonical_json(manifest)


def manifest_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


# --- reading it back --------------------------------------------------------------------------

class ManifestError(Exception):
    """The PDF carries no readable Loupe manifest."""


def extract_from_pdf(pdf: bytes) -> dict[str, Any]:
    """Read the embedded ``loupe-manifest.json`` from a (possibly signed) report PDF."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(pdf), strict=False)
        attachments = reader.attachments
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"not a readable PDF: {exc}") from exc
    contents = attachments.get(ATTACHMENT_NAME)
    if not contents:
        raise ManifestError(f"the PDF has no embedded {ATTACHMENT_NAME}")
    if len(contents) != 1:
        raise ManifestError(f"the PDF embeds {len(contents)} files named {ATTACHMENT_NAME}; expected one")
    try:
        data = json.loads(contents[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"the embedded manifest is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"the embedded manifest is not a {FORMAT} document")
    return data


def check_against_database(manifest: dict[str, Any], *, check_files: bool = True) -> tuple[list[str], list[str]]:
    """Compare an embedded manifest with the database and the stored evidence files.

    Returns ``(problems, notes)``. Problems mean the report and the records disagree. Notes are
    facts a reader should know that do not invalidate this version (e.g. newer evidence exists).
    """
    problems: list[str] = []
    notes: list[str] = []
    ref: Any = manifest.get("report") or {}  # JSON from the file under verification
    case = AuditCase.objects.filter(pk=ref.get("case_id")).select_related("model_version__ai_model").first()
    if case is None:
        return [f"case #{ref.get('case_id')} named by the manifest does not exist in this database"], notes
    report = Report.objects.filter(case=case, version=ref.get("version")).first()
    if report is None:
        problems.append(f"report v{ref.get('version')} of case #{case.pk} was never issued by this service")
    else:
        problems += claims_problems(manifest, report)
    if report is not None and digest(report.manifest) != digest(manifest):
        problems.append(f"the embedded manifest differs from the one stored for report v{report.version}")
    elif report is not None:
        latest = case.reports.order_by("-version").first()
        if latest and latest.version > report.version:
            notes.append(f"a newer version (v{latest.version}) of this report exists")

    current = build_manifest(case, version=int(ref.get("version") or 0))
    if current["model"]["manifest_hash"] != (manifest.get("model") or {}).get("manifest_hash"):
        problems.append("the model version's file manifest hash differs from the one in the report")

    stored_evidence = {e["id"]: e for e in current["evidence"]}
    for entry in manifest.get("evidence", []):
        now = stored_evidence.get(entry.get("id"))
        if now is None:
            problems.append(f"evidence #{entry.get('id')} ({entry.get('kind')}) is missing from the database")
        elif now["digest"] != entry.get("digest") or digest(now) != digest(entry):
            problems.append(f"evidence #{entry.get('id')} ({entry.get('kind')}) differs from the stored record")
    added = sorted(set(stored_evidence) - {e.get("id") for e in manifest.get("evidence", [])})
    if added:
        notes.append(f"evidence recorded after this report: {', '.join(f'#{i}' for i in added)}")

    stored_signoffs = {s["id"]: s for s in current["signoffs"]}
    for entry in manifest.get("signoffs", []):
        now = stored_signoffs.get(entry.get("id"))
        if now is None or digest(now) != digest(entry):
            problems.append(f"sign-off #{entry.get('id')} differs from or is missing in the database")
    later = sorted(set(stored_signoffs) - {s.get("id") for s in manifest.get("signoffs", [])})
    if later:
        notes.append(f"sign-offs recorded after this report: {', '.join(f'#{i}' for i in later)}")

    anchored = manifest.get("audit_log")
    if anchored:
        from governance import audit_log

        problems += [f"audit log: {p}" for p in audit_log.check_anchor(anchored)]
    elif report is not None:
        notes.append("this report carries no audit-log anchor (issued before reports recorded one)")

    if check_files:
        problems += check_artifact_files(manifest)
    return problems, notes


def claims_problems(manifest: dict[str, Any], report: Report) -> list[str]:
    """Check what the report states about earlier versions against the issued versions: the version
    it supersedes and the change log printed on its cover (recomputed from that version's manifest)."""
    from governance.reports.versions import changelog

    claims = manifest.get("report") or {}
    previous = report.supersedes
    expected = previous.version if previous is not None else None
    problems = []
    if claims.get("supersedes") != expected:
        problems.append(f"the report claims to supersede {_version_text(claims.get('supersedes'))} "
                        f"but v{report.version} of case #{report.case_id} was issued superseding "
                        f"{_version_text(expected)}")
    recomputed = changelog(previous.manifest if previous is not None else None, manifest)
    if claims.get("changelog") != recomputed:
        problems.append("the change log printed on the report is not the one recomputed from "
                        f"{_version_text(expected)}")
    return problems


def _version_text(version: Any) -> str:
    return f"v{version}" if version else "no earlier version"


def check_artifact_files(manifest: dict[str, Any]) -> list[str]:
    """Re-hash every evidence artifact file in storage against the manifest."""
    from governance.models import EvidenceArtifact

    problems = []
    # The manifest is read from a file under verification: any entry may have been altered.
    wanted: dict[int, dict[str, Any]] = {
        a["id"]: a for e in manifest.get("evidence", []) if isinstance(e, dict)
        for a in e.get("artifacts", []) if isinstance(a, dict) and isinstance(a.get("id"), int)}
    for artifact in EvidenceArtifact.objects.filter(pk__in=list(wanted)):
        expected = wanted[artifact.pk].get("sha256")
        if not isinstance(expected, str):
            problems.append(f"artifact #{artifact.pk} {artifact.name}: the manifest gives no SHA-256 for it")
            continue
        try:
            with artifact.file.open("rb") as handle:
                sha = hashlib.sha256()
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    sha.update(chunk)
        except OSError as exc:
            problems.append(f"artifact #{artifact.pk} {artifact.name}: file unreadable ({exc})")
            continue
        if sha.hexdigest() != expected:
            problems.append(f"artifact #{artifact.pk} {artifact.name}: stored file no longer matches its SHA-256")
    missing = set(wanted) - set(EvidenceArtifact.objects.filter(pk__in=list(wanted)).values_list("pk", flat=True))
    problems += [f"artifact #{pk} named by the manifest is missing" for pk in sorted(missing)]
    return problems
