"""Verify a report PDF against what Loupe issued: ``manage.py verify_report`` and countersigning use it.

On top of :func:`loupe_verify.pdf.verify_pdf` (signatures, signer roles, what later revisions
change) it binds the file to the database and the audit log:

- revision 1 (the bytes the issuer signed) hashes to the ``Report`` row's SHA-256 and to the
  SHA-256 in that report's ``report.issued`` audit event;
- the issuer signature was made with the certificate recorded in that event (or, for reports
  issued before events recorded it, the configured issuer certificate);
- each later signature is a countersignature of a reviewer assigned to the case whose latest
  case-level decision is an approval;
- the embedded manifest equals the stored one, what it says it supersedes and its change log
  agree with the issued versions, and the evidence, sign-offs and audit log it names are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import x509 as asn1_x509

from governance.models import AuditEvent, Report, Signoff
from governance.reports import manifest as mf
from governance.reports import signing
from loupe_verify.pdf import PdfError, PdfVerification


@dataclass
class ReportVerification:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: Report | None = None
    pdf: PdfVerification | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def issued_event(report: Report) -> AuditEvent | None:
    return (AuditEvent.objects.filter(action="report.issued", object_type="report", object_id=str(report.pk))
            .order_by("seq").first())


def approving_reviewers(case) -> set[str]:
    """Usernames of the case's assigned reviewers whose latest case-level decision is an approval."""
    assigned = set(case.reviewers.values_list("username", flat=True))
    latest: dict[str, str] = {}
    for username, decision in (Signoff.objects.filter(case=case, evidence__isnull=True, report_section="")
                               .order_by("created_at", "pk").values_list("reviewer__username", "decision")):
        latest[username] = decision
    return {u for u in assigned if latest.get(u) == Signoff.Decision.APPROVE}


def verify_report_pdf(pdf: bytes, roots: list[asn1_x509.Certificate] | None = None, *,
                      allow_unsigned: bool = False, check_files: bool = True) -> ReportVerification:
    result = ReportVerification()
    roots = signing.trust_roots() if roots is None else roots
    try:
        manifest = mf.extract_from_pdf(pdf)
    except mf.ManifestError as exc:
        manifest = None
        result.problems.append(f"manifest: {exc}")
    report = event = None
    if manifest is not None:
        ref: Any = manifest.get("report") or {}  # JSON from the file under verification
        report = Report.objects.filter(case_id=ref.get("case_id"), version=ref.get("version")).select_related(
            "case").first()
        result.report = report
        event = issued_event(report) if report is not None else None
        if report is not None and event is None:
            result.problems.append(f"report v{report.version} of case #{report.case_id} has no report.issued "
                                   "event in the audit log")
    payload = json.loads(event.payload) if event is not None else {}

    pins = {payload["signer_cert_sha256"]} if payload.get("signer_cert_sha256") else (
        signing.issuer_fingerprints() or None)
    reviewers = approving_reviewers(report.case) if report is not None else set()
    try:
        checked = signing.verify_signatures(pdf, roots, issuer_fingerprints=pins, accepted_reviewers=reviewers)
    except PdfError as exc:
        checked = None
        result.problems.append(f"signatures: {exc}")
    result.pdf = checked
    whole_sha = hashlib.sha256(pdf).hexdigest()
    if checked is not None:
        for check in checked.signatures:
            who = f"{check.role}" + (f" {check.username}" if check.username else "")
            stamp = f" · timestamp {check.timestamp}" if check.timestamp else ""
            signed = f" · signed {check.signed_at}" if check.signed_at else ""
            result.lines.append(f"signature {check.field_name}: {'OK' if check.ok else 'FAILED'} · {who} · "
                                f"{check.signer}{signed}{stamp}")
            result.problems += [f"signature {check.field_name}: {p}" for p in check.problems]
        result.problems += [f"revisions: {p}" for p in checked.problems if p != "no trust root given"]
        if "no trust root given" in checked.problems and checked.signatures:
            result.problems.append("no trust root configured (LOUPE_SIGNING_TRUST_ROOTS or --trust-root)")
        issued_sha = checked.issued_sha256
        if not checked.signatures:
            if allow_unsigned and report is not None and whole_sha == report.sha256:
                result.lines.append(f"unsigned, byte-identical to stored report v{report.version} of case "
                                    f"#{report.case_id}")
                issued_sha = whole_sha
            elif allow_unsigned:
                result.problems.append("unsigned, and not byte-identical to any stored report")
            else:
                result.problems.append("the PDF carries no signature (use --allow-unsigned to check an unsigned issue)")
        if issued_sha is not None and report is not None:
            if issued_sha != report.sha256:
                result.problems.append(f"revision 1 (the issued file) hashes to {issued_sha}, not to the SHA-256 "
                                       f"stored for report v{report.version} ({report.sha256})")
            elif event is not None and payload.get("sha256") != issued_sha:
                result.problems.append(f"revision 1 hashes to {issued_sha}, not to the SHA-256 in the report.issued "
                                       f"audit event (seq {event.seq}: {payload.get('sha256')})")
            else:
                result.lines.append(f"revision 1: the issued report v{report.version} of case #{report.case_id} "
                                    f"(SHA-256 {issued_sha[:16]}..., audit-log seq {event.seq if event else '?'})")
        if report is not None and len(checked.signatures) > 1:
            result.problems += _countersignature_problems(report, pdf, checked)

    if manifest is not None:
        try:
            _check_manifest(result, manifest, event, payload, check_files)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # The embedded manifest is input under verification: a changed one is a finding, never a crash.
            result.problems.append(f"manifest: malformed ({type(exc).__name__}: {exc}); it was changed after "
                                   "issue or not written by Loupe")
    return result


def _check_manifest(result: ReportVerification, manifest: dict[str, Any], event: Any, payload: dict[str, Any],
                    check_files: bool) -> None:
    """The embedded manifest against the database: report, evidence, sign-offs, artifacts, audit log."""
    ref = manifest["report"]
    result.lines.append(f"manifest: case #{ref['case_id']} report v{ref['version']}, "
                        f"SHA-256 {mf.manifest_sha256(manifest)}")
    db_problems, notes = mf.check_against_database(manifest, check_files=check_files)
    result.problems += [f"manifest: {p}" for p in db_problems]
    result.notes += notes
    anchored = manifest.get("audit_log")
    if anchored and not any(p.startswith("audit log:") for p in db_problems):
        result.lines.append(f"audit log: unchanged up to the head anchored at issue (seq {anchored['seq']}, "
                            f"{str(anchored['row_hash'])[:16]}...)")
    if anchored and event is not None and payload.get("audit_anchor") != anchored:
        result.problems.append(f"the report.issued event (seq {event.seq}) records another audit-log anchor "
                               "than the report")


def _countersignature_problems(report: Report, pdf: bytes, checked: PdfVerification) -> list[str]:
    """Later signatures must be countersignatures Loupe accepted: each revision's bytes stored as one."""
    stored = {c.sha256: c for c in report.countersignatures.select_related("reviewer")}
    problems = []
    for check in checked.signatures[1:]:
        if check.kind != "signature":
            continue
        prefix = hashlib.sha256(pdf[:check.signed_bytes_end]).hexdigest()
        match = stored.get(prefix)
        if match is None:
            problems.append(f"signature {check.field_name}: not a countersignature recorded by Loupe for report "
                            f"v{report.version} (no stored countersigned file has these bytes)")
        elif match.cert_sha256 != check.cert_sha256 or match.reviewer.get_username() != check.username:
            problems.append(f"signature {check.field_name}: differs from the countersignature Loupe recorded")
    return problems
