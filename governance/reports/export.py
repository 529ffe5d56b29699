"""The export bundle of a case: one zip a provider can hand to a notified body.

Contents::

    README.txt                     what is inside and how to check it
    SHA256SUMS                     SHA-256 of every other file in the bundle
    SHA256SUMS.p7s                 detached CMS signature of SHA256SUMS by the issuer (when signing is set up)
    certs/issuer.pem               the issuer's certificate
    certs/chain.pem                its CA chain up to the root
    report/<latest report>.pdf     the latest issued report (signed if signing is configured)
    report/countersigned/*.pdf     each stored countersigned file of that report, in order
    countersignatures.json         who countersigned, with each file's and certificate's SHA-256
    manifest.json                  that report's manifest (also embedded in the PDF)
    evidence/run-<id>-<kind>/...   every evidence artifact, byte for byte as stored
    model-card/README.md           the model card in Hugging Face format (YAML metadata + sections)
    audit-log.json                 every audit-log row about the case, with prev/row hashes

``loupe-verify BUNDLE.zip`` (:mod:`loupe_verify.bundle`) checks all of it without a database.
Entries are sorted and dated from the case state, so the same state gives the same zip (the CMS
signature, which carries its signing time, aside).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from typing import Any

from governance.canonical import canonical_json
from governance.models import AuditCase, EvidenceArtifact
from governance.reports import manifest as mf
from governance.reports.versions import latest


def _model_card(case: AuditCase) -> str:
    from governance.modelcard import export_card

    return export_card(case.model_version)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:40]


def build_bundle(case: AuditCase) -> bytes:
    from governance import audit_log

    report = latest(case)
    files: dict[str, bytes] = {}
    notes = []
    if report is not None:
        with report.pdf.open("rb") as handle:
            files[f"report/loupe-case-{case.pk}-report-v{report.version}.pdf"] = handle.read()
        manifest = report.manifest
        files["manifest.json"] = mf.manifest_bytes(manifest)
        countersigned = []
        for row in report.countersignatures.select_related("reviewer").order_by("sequence"):
            name = (f"report/countersigned/loupe-case-{case.pk}-report-v{report.version}"
                    f"-countersigned-{row.sequence}.pdf")
            with row.pdf.open("rb") as handle:
                files[name] = handle.read()
            countersigned.append({"sequence": row.sequence, "file": name, "reviewer": row.reviewer.get_username(),
                                  "sha256": row.sha256, "previous_sha256": row.previous_sha256,
                                  "cert_sha256": row.cert_sha256, "signer": row.signer,
                                  "created_at": row.created_at.isoformat()})
        files["countersignatures.json"] = canonical_json({"report_version": report.version,
                                                          "countersignatures": countersigned})
    else:
        manifest = mf.build_manifest(case, version=0)
        files["manifest-unreported.json"] = mf.manifest_bytes(manifest)
        notes.append("No report has been issued for this case yet; manifest-unreported.json describes the "
                     "current case state and is not signed or embedded in any report.")
    artifacts = EvidenceArtifact.objects.filter(evidence__run__case=case).select_related("evidence__run")
    for artifact in artifacts.order_by("evidence__run_id", "name"):
        with artifact.file.open("rb") as handle:
            content = handle.read()
        if hashlib.sha256(content).hexdigest() != artifact.sha256:
            notes.append(f"WARNING: artifact #{artifact.pk} {artifact.name} no longer matches its recorded SHA-256.")
        run = artifact.evidence.run
        files[f"evidence/run-{run.pk}-{_slug(run.kind)}/{artifact.name}"] = content
    files["model-card/README.md"] = _model_card(case).encode("utf-8")
    rows = audit_log.excerpt(case)
    problems = audit_log.verify_rows(rows) if hasattr(audit_log, "verify_rows") else []
    # An excerpt is not contiguous: "deleted"/"inserted" gaps between case rows are expected; only
    # a row whose own hashes fail is a problem inside the excerpt.
    own = [str(p) for p in problems if p.kind == "modified"]
    files["audit-log.json"] = json.dumps({"case": case.pk, "rows": rows, "rows_with_bad_hashes": own},
                                         indent=1, sort_keys=True, default=str).encode("utf-8")
    signer = _bundle_signer()
    if signer is not None:
        files["certs/issuer.pem"] = _pem(signer.signing_cert)
        files["certs/chain.pem"] = b"".join(_pem(c) for c in signer.cert_registry if c != signer.signing_cert)
    files["README.txt"] = readme(case, report, signer, notes).encode("utf-8")
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(body).hexdigest()}  {name}\n"
                                  for name, body in sorted(files.items())).encode("ascii", "replace")
    if signer is not None:
        files["SHA256SUMS.p7s"] = sign_detached(files["SHA256SUMS"], signer)
    stamp = dt.datetime.fromisoformat(manifest["as_of"]).astimezone(dt.UTC)
    date_time = (max(stamp.year, 1980), stamp.month, stamp.day, stamp.hour, stamp.minute, stamp.second)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    return buffer.getvalue()


def _bundle_signer():
    from governance.reports import signing

    paths = signing.configured_signer_paths()
    return signing.load_signer(*paths) if paths is not None else None


def _pem(cert) -> bytes:
    from asn1crypto import pem

    return pem.armor("CERTIFICATE", cert.dump())


def sign_detached(data: bytes, signer) -> bytes:
    """A detached CMS (PKCS#7) signature of ``data`` by ``signer``, DER-encoded (``openssl cms -verify``
    and ``loupe-verify`` read it)."""
    import asyncio

    content_info = asyncio.run(signer.async_sign_general_data(data, "sha256", detached=True))
    return content_info.dump()


def readme(case: AuditCase, report, signer, notes: list[str]) -> str:
    from governance.reports.signing import cert_sha256

    lines = [
        f"Loupe export bundle of audit case #{case.pk}: {case.title}",
        f"Model: {case.model_version.ai_model.name} {case.model_version.version}",
        f"Latest report: v{report.version} (SHA-256 {report.sha256})" if report else "Latest report: none issued",
        "",
        "HOW TO VERIFY (needs only this zip and Loupe installed; no database, no server, no network).",
        "The verifier is the loupe_verify package of Loupe; it needs pyHanko, pypdf and rfc8785, not Django.",
        "",
        "    loupe-verify THIS-BUNDLE.zip [--trust-root ROOT.pem]",
        "",
        "It checks, and names the file at fault if anything fails:",
        "  1. SHA256SUMS.p7s is a valid CMS signature of SHA256SUMS by Loupe's issuer certificate",
        "     (certs/issuer.pem, chained through certs/chain.pem to the trust root), and every file",
        "     in the zip has the SHA-256 that SHA256SUMS lists (no file added, removed or changed);",
        "  2. the report PDF and each countersigned PDF: every signature, the issuer's made with the",
        "     issuer certificate, later ones by reviewers who approved the case (their certificate's",
        "     subject UID), and later revisions adding signatures only (no visible or metadata change);",
        "  3. the manifest embedded in the PDF equals manifest.json, every evidence entry's digest",
        "     (RFC 8785 canonical JSON, SHA-256) is the one the audit log recorded, and every evidence",
        "     file's SHA-256 equals the manifest's;",
        "  4. audit-log.json: every row's payload and row hash, the links between consecutive rows, and",
        "     the report.issued row: it records this report's SHA-256 and the audit-log head the report",
        "     anchors (manifest.json \"audit_log\").",
        "",
        "Trust: by default loupe-verify trusts the root in certs/chain.pem and prints its SHA-256;",
        "compare it with the fingerprint your Loupe operator publishes, or pass --trust-root with the",
        "root obtained from them. Anyone can build a self-consistent bundle with their own root.",
    ]
    if signer is not None:
        roots = [c for c in signer.cert_registry if c.self_signed != "no"]
        lines += [f"Issuer certificate SHA-256: {cert_sha256(signer.signing_cert)}"]
        lines += [f"Root certificate SHA-256:   {cert_sha256(c)}" for c in roots]
    else:
        lines += ["", "WARNING: this service has no signing key configured: the bundle is unsigned and",
                  "loupe-verify will report it as such."]
    lines += [
        "",
        "REFERENCED BY HASH ONLY (not in this bundle): the model's weights and files (manifest.json",
        "\"model\" \"files\" and \"manifest_hash\"), the datasets the probes ran on (each run's",
        "\"dataset\" and \"dataset_hash\"), the code version and library versions of each run, and",
        "audit-log rows of other cases (links to them are by hash: \"prev_hash\").",
        "",
        *notes,
    ]
    return "\n".join(lines) + "\n"


def bundle_filename(case: AuditCase) -> str:
    return f"loupe-case-{case.pk}-export.zip"


__all__: list[Any] = ["build_bundle", "bundle_filename"]
