"""Reviewers' countersignatures on issued reports, stored immutably with the report.

A reviewer signs the report (or its latest countersigned file) with their own key, outside Loupe
(``manage.py sign_report`` or any PAdES tool), and hands the signed file to Loupe through the API
(``POST /api/reports/{id}/countersign/``) or the review workspace. Loupe keeps the file only if it
extends the latest stored file by exactly one revision holding one signature, made with a
certificate that names this reviewer, and the whole file verifies
(:mod:`governance.reports.verification`). The file, its SHA-256 and the certificate's fingerprint
become an immutable :class:`~governance.models.Countersignature` row and a ``report.countersigned``
audit event carrying its content digest.
"""

from __future__ import annotations

import hashlib

from django.core.files.base import ContentFile
from django.db import transaction

from governance import audit_log
from governance.evidence import content_digest
from governance.models import AuditCase, Countersignature, Report
from governance.reports import signing
from governance.reports.verification import approving_reviewers, issued_event
from governance.workflow import NotAllowed, WorkflowError
from loupe_verify.pdf import PdfError

MAX_BYTES = 64 * 1024 * 1024


class CountersignRejected(WorkflowError):
    """The uploaded file is not a valid countersignature of this report by this reviewer."""


def read_upload(upload) -> bytes:
    """The bytes of an uploaded file, refused before reading when missing or too large."""
    if upload is None:
        raise CountersignRejected("send the countersigned PDF as the multipart field 'file'")
    if upload.size > MAX_BYTES:
        raise CountersignRejected(f"the file is larger than {MAX_BYTES} bytes")
    return upload.read()


def latest_file(report: Report) -> tuple[bytes, int]:
    """(bytes, sequence) of the newest stored file of ``report``: its latest countersigned file, or the
    issued report (sequence 0)."""
    latest = report.countersignatures.order_by("-sequence").first()
    field, sequence = (latest.pdf, latest.sequence) if latest else (report.pdf, 0)
    with field.open("rb") as handle:
        return handle.read(), sequence


def countersign(report: Report, reviewer, pdf: bytes) -> Countersignature:
    """Store ``pdf`` as ``reviewer``'s countersignature of ``report`` (see the module docstring)."""
    if len(pdf) > MAX_BYTES:
        raise CountersignRejected(f"the file is larger than {MAX_BYTES} bytes")
    with transaction.atomic():
        AuditCase.objects.select_for_update().get(pk=report.case_id)  # one countersignature at a time per case
        case = report.case
        username = reviewer.get_username()
        if not case.reviewers.filter(pk=reviewer.pk).exists():
            raise NotAllowed(f"only reviewers assigned to case #{case.pk} may countersign its reports")
        if username not in approving_reviewers(case):
            raise NotAllowed(f"{username} has not approved case #{case.pk}; only approving reviewers countersign")
        base, sequence = latest_file(report)
        if not pdf.startswith(base) or len(pdf) == len(base):
            raise CountersignRejected("the file must be the latest stored file of this report with one signature "
                                      "appended (download it, sign it, upload the result)")
        event = issued_event(report)
        payload = event.data if event is not None else {}
        pins = {payload["signer_cert_sha256"]} if payload.get("signer_cert_sha256") else (
            signing.issuer_fingerprints() or None)
        try:
            checked = signing.verify_signatures(pdf, signing.trust_roots(), issuer_fingerprints=pins,
                                                accepted_reviewers=approving_reviewers(case))
        except PdfError as exc:
            raise CountersignRejected(str(exc)) from exc
        problems = [p for c in checked.signatures for p in c.problems] + checked.problems
        regular = [c for c in checked.signatures if c.kind == "signature"]
        if not problems and checked.issued_sha256 != report.sha256:
            problems.append("its first revision is not the issued report")
        if not problems and len(regular) != sequence + 2:
            problems.append(f"expected exactly one new signature after {sequence + 1}, found {len(regular)} in all")
        if problems:
            raise CountersignRejected("the countersigned file does not verify: " + "; ".join(problems))
        new = regular[-1]
        if new.username != username or new.cert_sha256 is None:
            raise NotAllowed(f"the new signature was made with {new.username or 'no reviewer'}'s certificate, "
                             f"not {username}'s")
        sha = hashlib.sha256(pdf).hexdigest()
        row = Countersignature(report=report, reviewer=reviewer, sequence=sequence + 1, sha256=sha,
                               previous_sha256=hashlib.sha256(base).hexdigest(), cert_sha256=new.cert_sha256,
                               signer=new.signer[:300])
        row.pdf.save(f"loupe-case-{case.pk}-report-v{report.version}-countersigned-{sequence + 1}.pdf",
                     ContentFile(pdf), save=False)
        try:
            row.save()
            audit_log.record(reviewer, "report.countersigned", row, {
                "report": report.pk, "version": report.version, "sequence": row.sequence, "sha256": sha,
                "previous_sha256": row.previous_sha256, "cert_sha256": row.cert_sha256, "signer": row.signer,
                "content_digest": content_digest(row)})
        except BaseException:
            if row.pdf.name:
                row.pdf.storage.delete(row.pdf.name)
            raise
    return row
