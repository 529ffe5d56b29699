"""Regulatory reports: versioned, signed, tamper-evident PDF reports and the case export bundle.

Public entry points (the API, the admin and the management commands call only these):

- :func:`generate_report` issues the next immutable report version of a case;
- :func:`render_case` renders a case state to PDF bytes without storing anything;
- :func:`export_case_zip` builds the export bundle of a case.

Modules: :mod:`.manifest` (what a report covers), :mod:`.context` (manifest -> template context),
:mod:`.figures` (summary figures), :mod:`.url_fetcher` (the only thing WeasyPrint may read),
:mod:`.render` (tagged PDF/A-3b), :mod:`.signing` (PAdES B-T/B-LTA), :mod:`.versions` (numbering and
change log), :mod:`.verification` (a PDF against what was issued), :mod:`.countersign` (reviewers'
countersignatures), :mod:`.export` (zip bundle, verified offline by :mod:`loupe_verify`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from governance.models import AuditCase, Report
    from governance.reports.render import RenderedPDF


def render_case(case: AuditCase, *, version: int, report_meta: dict[str, Any] | None = None,
                audit_anchor: dict[str, Any] | None = None) -> tuple[RenderedPDF, dict[str, Any]]:
    """Render the current state of ``case`` as report ``version``; returns (rendered PDF, manifest).

    Pure with respect to the database (reads only). The same case state and version (and
    ``audit_anchor``, the audit-log head an issued report records) give a byte-identical PDF.
    """
    import datetime as dt

    from governance.models import EvidenceArtifact
    from governance.reports import context as ctx
    from governance.reports import manifest as mf
    from governance.reports.render import render_html, render_pdf
    from governance.reports.url_fetcher import SafeURLFetcher

    meta = {"version": version, "supersedes": None, "changelog": []} | (report_meta or {})
    # What the cover states about this version (what it supersedes, the change log) is part of the
    # embedded, signed manifest, so it can be checked against the issued versions it names.
    manifest = mf.build_manifest(case, version=version, audit_anchor=audit_anchor, report_meta=meta)
    meta = {**manifest["report"], "author": meta.get("author")}
    files = {a.pk: a for a in EvidenceArtifact.objects.filter(evidence__run__case=case)}

    def load_artifact(entry: dict[str, Any]) -> tuple[bytes, str]:
        artifact = files[entry["id"]]
        with artifact.file.open("rb") as handle:
            return handle.read(), artifact.content_type

    sha = mf.manifest_sha256(manifest)
    context, inputs = ctx.build_context(manifest, manifest_sha256=sha, report=meta, load_artifact=load_artifact)
    fetcher = SafeURLFetcher(artifacts=inputs.artifacts)
    rendered = render_pdf(render_html(context), fetcher=fetcher, manifest=mf.manifest_bytes(manifest),
                          created=dt.datetime.fromisoformat(manifest["as_of"]))
    return rendered, manifest


def _refuse_stale_approval(case: AuditCase) -> None:
    """An approved case whose approvals no longer match what it is now (its digest changed) must not
    be reported as approved: the report would print APPROVED over conclusions nobody signed."""
    from governance import workflow
    from governance.models import AuditCase as Case

    if case.state != Case.State.APPROVED:
        return
    status = workflow.review_status(case)
    if len(status.approved_by) < case.required_approvals:
        raise workflow.WorkflowError(
            f"case #{case.pk} is approved, but {len(status.stale_approvals)} of its approvals are stale: the case "
            "changed after they were given. No report is issued until it is reviewed again.")


def generate_report(case: AuditCase, *, author, sign: bool = True) -> Report:
    """Issue the next report version of ``case`` (v1, v2, ...) and return the new ``Report`` row.

    Renders the case state to a PDF/A-3b with the manifest embedded, signs it with the service's
    issuer key when ``settings.LOUPE_SIGNING_KEY``/``LOUPE_SIGNING_CERT`` are configured (and
    ``sign`` is true), stores it through Django's storage, records what it supersedes and the
    change log against the previous version, and writes a ``report.issued`` audit event, all in
    one transaction. The row is immutable afterwards.

    ``author`` is the user who requested it (any user who can see the case; the API decides who may).
    """
    import hashlib

    from django.core.files.base import ContentFile
    from django.db import transaction

    from governance import audit_log, notifications
    from governance.evidence import DigestMismatch, content_digest, unbound_case_rows
    from governance.models import AuditCase as Case
    from governance.models import Report as ReportModel
    from governance.reports import signing, versions
    from governance.reports.manifest import build_manifest, manifest_sha256

    written: list = []  # files stored before the row is; removed again if the transaction fails
    refused = unbound_case_rows(case)
    if refused:
        # The refusal is itself recorded (in its own transaction: the caller's may roll back).
        with transaction.atomic():
            audit_log.record(author, "report.refused", case, {"reason": "evidence_digest_mismatch",
                                                              "problems": refused[:50]})
        logger.error("report for case #%s refused: %s", case.pk, "; ".join(refused))
        raise DigestMismatch(f"refusing to issue a report for case #{case.pk}: " + "; ".join(refused))
    try:
        with transaction.atomic():
            # Lock the case so two concurrent requests cannot both compute version n+1.
            locked = Case.objects.select_for_update(of=("self",), no_key=True).get(pk=case.pk)  # workflow.LOCK_ORDER
            refused = unbound_case_rows(locked)  # again, under the lock
            if refused:
                raise DigestMismatch(f"refusing to issue a report for case #{case.pk}: " + "; ".join(refused))
            _refuse_stale_approval(locked)
            previous = versions.latest(locked)
            version = previous.version + 1 if previous else 1
            changes = versions.changelog(previous.manifest if previous else None,
                                         build_manifest(locked, version=version))
            meta = {"version": version, "supersedes": previous.version if previous else None, "changelog": changes,
                    "author": author.get_full_name() or author.get_username()}
            # The log's head as of now goes into the signed manifest: whoever holds the PDF can later
            # show that the log up to here was not rewritten (audit_log.check_anchor).
            anchor = audit_log.anchor()
            rendered, manifest = render_case(locked, version=version, report_meta=meta, audit_anchor=anchor)
            pdf = rendered.pdf
            signed_by = signer_cert_sha256 = None
            paths = signing.configured_signer_paths() if sign else None
            if paths is not None:
                signer = signing.load_signer(*paths)
                assert signer.signing_cert is not None  # load_signer reads the certificate with the key
                pdf = signing.sign_pdf(pdf, signer, role="issuer",
                                       reason=f"Loupe report v{version} of case #{case.pk} issued")
                signed_by = signer.signing_cert.subject.human_friendly
                signer_cert_sha256 = signing.cert_sha256(signer.signing_cert)
            report = ReportModel(case=locked, version=version, sha256=hashlib.sha256(pdf).hexdigest(),
                                 manifest=manifest, author=author, supersedes=previous, changelog=changes)
            report.pdf.save(f"loupe-case-{case.pk}-report-v{version}.pdf", ContentFile(pdf), save=False)
            written.append(report.pdf.name)
            report.save()
            audit_log.record(author, "report.issued", report, {
                "version": version, "sha256": report.sha256, "pages": rendered.pages,
                "manifest_sha256": manifest_sha256(manifest),
                "supersedes": previous.version if previous else None, "signed_by": signed_by,
                "signer_cert_sha256": signer_cert_sha256, "audit_anchor": anchor,
                "refused_urls": rendered.refused_urls[:20], "content_digest": content_digest(report)})
            notifications.notify("report.issued", locked, author, {
                "report": report.pk, "version": version, "sha256": report.sha256})
    except BaseException:
        from django.core.files.storage import default_storage

        for name in written:
            default_storage.delete(name)
        raise
    return report


def export_case_zip(case: AuditCase) -> bytes:
    """The export bundle of ``case`` as zip bytes: latest report, manifest, evidence artifacts,
    the model card in Hugging Face format and the case's audit-log excerpt with its hash chain.

    The caller checks that the requesting user may see the case (same visibility as the case).
    """
    from governance.reports.export import build_bundle

    return build_bundle(case)


__all__ = ["export_case_zip", "generate_report", "render_case"]
