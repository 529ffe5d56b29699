"""Verify a Loupe export bundle end to end, with nothing but the zip (no Django, no database).

Checks, each failure naming the file at fault:

1. ``SHA256SUMS.p7s``: a detached CMS signature of ``SHA256SUMS`` made with the issuer certificate
   (``certs/issuer.pem``: Loupe issuer policy), chained through ``certs/chain.pem`` to the trust root;
   every file's SHA-256 equals ``SHA256SUMS`` and nothing is unlisted or missing;
2. the report and each countersigned file (:func:`loupe_verify.pdf.verify_pdf`): issuer signature
   with the bundle's issuer certificate, later signatures by reviewers who approved the case
   (according to the manifest), nothing but signatures added after the issuer's revision; each
   countersigned file extends the previous one;
3. the manifest embedded in the report equals ``manifest.json`` byte for byte; each evidence entry's
   digest is recomputed (RFC 8785) and equals the ``content_digest`` its ``evidence.recorded`` audit
   event carries; every evidence file's SHA-256 equals the manifest's;
4. ``audit-log.json``: each row's hashes and links (:func:`loupe_verify.chain.excerpt_problems`); the
   ``report.issued`` row records the report's SHA-256, the manifest's SHA-256 and the anchor the
   manifest carries, and links to the anchored head.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import cms
from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509

from loupe_verify import chain
from loupe_verify.canonical import digest
from loupe_verify.pdf import PdfError, cert_role, cert_sha256, verify_pdf
from loupe_verify.pdfa import pdfa3b_problems

MANIFEST_ATTACHMENT = "loupe-manifest.json"
MAX_MEMBER_BYTES = 1 << 31  # refuse zip members that claim more than 2 GiB uncompressed
MAX_TOTAL_BYTES = 1 << 33


@dataclass
class BundleResult:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_pem_certs(data: bytes) -> list[asn1_x509.Certificate]:
    if not asn1_pem.detect(data):
        return [asn1_x509.Certificate.load(data)] if data else []
    return [asn1_x509.Certificate.load(der) for _, _, der in asn1_pem.unarmor(data, multiple=True)]


def _read_members(data: bytes, result: BundleResult) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        result.problems.append(f"the bundle is not a readable zip file ({exc})")
        return {}
    files: dict[str, bytes] = {}
    total = 0
    for info in archive.infolist():
        if info.is_dir():
            continue
        total += info.file_size
        if info.file_size > MAX_MEMBER_BYTES or total > MAX_TOTAL_BYTES:
            result.problems.append(f"{info.filename}: too large to check ({info.file_size} bytes)")
            continue
        if info.filename in files:
            result.problems.append(f"{info.filename}: appears twice in the zip")
            continue
        try:
            files[info.filename] = archive.read(info)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            result.problems.append(f"{info.filename}: unreadable in the zip ({exc})")
    return files


def _check_sums(files: dict[str, bytes], result: BundleResult) -> None:
    sums = files.get("SHA256SUMS")
    if sums is None:
        result.problems.append("SHA256SUMS: missing")
        return
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.decode("utf-8", "replace").splitlines(), 1):
        expected, sep, name = line.partition("  ")
        if not sep or len(expected) != 64:
            result.problems.append(f"SHA256SUMS: line {number} is not '<sha256>  <file>'")
            continue
        listed[name] = expected
    for name, expected in sorted(listed.items()):
        if name not in files:
            result.problems.append(f"{name}: listed in SHA256SUMS but missing from the bundle")
        elif hashlib.sha256(files[name]).hexdigest() != expected:
            result.problems.append(f"{name}: its SHA-256 differs from the one in SHA256SUMS (the file was changed)")
    for name in sorted(set(files) - set(listed) - {"SHA256SUMS", "SHA256SUMS.p7s"}):
        result.problems.append(f"{name}: not listed in SHA256SUMS (added to the bundle)")
    result.lines.append(f"SHA256SUMS: {len(listed)} files listed")


def _check_sums_signature(files: dict[str, bytes], issuer: asn1_x509.Certificate | None,
                          roots: list[asn1_x509.Certificate], result: BundleResult) -> None:
    from pyhanko.sign.validation.generic_cms import async_validate_detached_cms
    from pyhanko_certvalidator import ValidationContext

    sig = files.get("SHA256SUMS.p7s")
    if sig is None:
        result.problems.append("SHA256SUMS.p7s: missing: the bundle's checksum list is not signed")
        return
    try:
        content = cms.ContentInfo.load(sig)
        signed_data = content["content"]
        context = ValidationContext(trust_roots=roots, allow_fetching=False, other_certs=[])
        status = asyncio.run(async_validate_detached_cms(files.get("SHA256SUMS", b""), signed_data,
                                                         signer_validation_context=context))
    except Exception as exc:  # noqa: BLE001 - any parse failure means the signature is unusable
        result.problems.append(f"SHA256SUMS.p7s: not a readable CMS signature ({type(exc).__name__}: {exc})")
        return
    cert = status.signing_cert
    if not (status.intact and status.valid):
        result.problems.append("SHA256SUMS.p7s: the signature does not match SHA256SUMS")
    elif not status.trusted:
        result.problems.append("SHA256SUMS.p7s: the signer's certificate does not chain to the trust root")
    elif cert is None or cert_role(cert) != "issuer":
        result.problems.append("SHA256SUMS.p7s: not signed with a Loupe issuer certificate")
    elif issuer is not None and cert_sha256(cert) != cert_sha256(issuer):
        result.problems.append("SHA256SUMS.p7s: signed with another certificate than certs/issuer.pem")
    else:
        result.lines.append(f"SHA256SUMS.p7s: signed by the issuer ({cert.subject.human_friendly})")


def _embedded_manifest(pdf: bytes) -> bytes | None:
    from pypdf import PdfReader

    attachments = PdfReader(io.BytesIO(pdf), strict=False).attachments
    contents = attachments.get(MANIFEST_ATTACHMENT) or []
    return contents[0] if len(contents) == 1 else None


def _approving_reviewers(manifest: dict[str, Any]) -> set[str]:
    assigned = {(u or {}).get("username") for u in (manifest.get("case") or {}).get("reviewers", [])}
    latest: dict[str | None, str | None] = {}
    for signoff in sorted(manifest.get("signoffs", []), key=lambda s: (s.get("created_at") or "", s.get("id") or 0)):
        if signoff.get("evidence_id") is None and not signoff.get("report_section"):
            latest[(signoff.get("reviewer") or {}).get("username")] = signoff.get("decision")
    return {u for u in assigned if u and latest.get(u) == "approve"}


def _check_pdf(name: str, pdf: bytes, roots, issuer_pins, reviewers, result: BundleResult):
    try:
        checked = verify_pdf(pdf, roots, issuer_fingerprints=issuer_pins, accepted_reviewers=reviewers)
    except PdfError as exc:
        result.problems.append(f"{name}: {exc}")
        return None
    if not checked.signatures:
        result.problems.append(f"{name}: carries no signature")
    for check in checked.signatures:
        who = check.role + (f" {check.username}" if check.username else "")
        stamp = f" · timestamp {check.timestamp}" if check.timestamp else ""
        result.lines.append(f"{name}: signature {check.field_name}: {'OK' if check.ok else 'FAILED'} · {who} · "
                            f"{check.signer}{stamp}")
        result.problems += [f"{name}: signature {check.field_name}: {p}" for p in check.problems]
    result.problems += [f"{name}: {p}" for p in checked.problems]
    try:
        pdfa = pdfa3b_problems(pdf)
    except Exception as exc:  # noqa: BLE001 - reported, the signatures above decide validity
        pdfa = [f"not checked ({type(exc).__name__})"]
    result.lines += [f"{name}: PDF/A-3b: {p}" for p in pdfa] or [f"{name}: PDF/A-3b rules signing can break: OK"]
    return checked


def verify_bundle(data: bytes, trust_roots: list[asn1_x509.Certificate] | None = None) -> BundleResult:
    """Verify an export bundle (zip bytes). ``trust_roots``: the roots to trust (default: the self-signed
    certificates in the bundle's ``certs/chain.pem``, whose fingerprints are printed)."""
    result = BundleResult()
    files = _read_members(data, result)
    if not files:
        if not result.problems:
            result.problems.append("the bundle is empty")
        return result
    _check_sums(files, result)

    issuer_certs = load_pem_certs(files.get("certs/issuer.pem", b""))
    issuer = issuer_certs[0] if issuer_certs else None
    chain_certs = load_pem_certs(files.get("certs/chain.pem", b""))
    if trust_roots is None:
        trust_roots = [c for c in chain_certs if c.self_signed != "no"]
        for root in trust_roots:
            result.lines.append(f"trust root (from the bundle): {root.subject.human_friendly}, SHA-256 "
                                f"{cert_sha256(root)}: compare with the fingerprint Loupe's operator publishes")
    if issuer is None:
        result.problems.append("certs/issuer.pem: missing or unreadable")
    elif cert_role(issuer) != "issuer":
        result.problems.append("certs/issuer.pem: not a Loupe issuer certificate")
    _check_sums_signature(files, issuer, trust_roots, result)

    reports = sorted(n for n in files if n.startswith("report/") and n.endswith(".pdf")
                     and not n.startswith("report/countersigned/"))
    if not reports:
        result.lines.append("no report in the bundle")
        return result
    if len(reports) > 1:
        result.problems.append(f"report/: expected one report, found {len(reports)}")
    report_name = reports[0]
    pdf = files[report_name]
    manifest_bytes = files.get("manifest.json")
    try:
        manifest = json.loads(manifest_bytes) if manifest_bytes is not None else None
    except ValueError:
        manifest = None
    if manifest is None:
        result.problems.append("manifest.json: missing or not JSON")
        return result
    pins = {cert_sha256(issuer)} if issuer is not None else None
    reviewers = _approving_reviewers(manifest)
    checked = _check_pdf(report_name, pdf, trust_roots, pins, reviewers, result)
    try:
        embedded = _embedded_manifest(pdf)
    except Exception as exc:  # noqa: BLE001
        embedded = None
        result.problems.append(f"{report_name}: the embedded manifest cannot be read ({type(exc).__name__})")
    if embedded is not None and embedded != manifest_bytes:
        result.problems.append(f"manifest.json: differs from the manifest embedded in {report_name}")
    elif embedded is None:
        result.problems.append(f"{report_name}: has no single embedded {MANIFEST_ATTACHMENT}")
    _check_claims(manifest, result)
    _check_countersigned(files, pdf, trust_roots, pins, reviewers, result)

    rows = _audit_rows(files, result)
    _check_evidence(files, manifest, rows, result)
    _check_report_event(manifest, manifest_bytes, checked, rows, result)
    return result


def _check_claims(manifest: dict[str, Any], result: BundleResult) -> None:
    ref = manifest.get("report") or {}
    version, supersedes = ref.get("version"), ref.get("supersedes")
    if version == 1 and (supersedes is not None or [c.get("change") for c in ref.get("changelog", [])]
                         != ["first_version"]):
        result.problems.append("manifest.json: v1 claims to supersede an earlier version or carries a change log")
    elif isinstance(version, int) and version > 1 and supersedes != version - 1:
        result.problems.append(f"manifest.json: v{version} claims to supersede {supersedes!r}, not v{version - 1}")


def _check_countersigned(files, pdf, roots, pins, reviewers, result: BundleResult) -> None:
    listing = files.get("countersignatures.json")
    entries = json.loads(listing).get("countersignatures", []) if listing else []
    previous = pdf
    names = sorted((n for n in files if n.startswith("report/countersigned/")),
                   key=lambda n: int(n.rsplit("-", 1)[-1].split(".")[0]) if n.rsplit("-", 1)[-1][:-4].isdigit() else 0)
    if len(entries) != len(names):
        result.problems.append(f"countersignatures.json: lists {len(entries)} files, the bundle holds {len(names)}")
    for entry in entries:
        name = entry.get("file")
        body = files.get(name)
        if body is None:
            result.problems.append(f"{name}: listed in countersignatures.json but missing")
            continue
        if hashlib.sha256(body).hexdigest() != entry.get("sha256"):
            result.problems.append(f"{name}: its SHA-256 differs from countersignatures.json")
        if not body.startswith(previous) or hashlib.sha256(previous).hexdigest() != entry.get("previous_sha256"):
            result.problems.append(f"{name}: does not extend the previous file of the report")
        checked = _check_pdf(name, body, roots, pins, reviewers, result)
        if checked is not None:
            last = [c for c in checked.signatures if c.kind == "signature"][-1:]
            if last and (last[0].cert_sha256 != entry.get("cert_sha256") or last[0].username != entry.get("reviewer")):
                result.problems.append(f"{name}: its last signature is not the one countersignatures.json names")
        previous = body


def _audit_rows(files, result: BundleResult) -> list[dict[str, Any]]:
    try:
        rows = json.loads(files.get("audit-log.json", b"{}")).get("rows", [])
    except ValueError:
        result.problems.append("audit-log.json: not JSON")
        return []
    if not rows:
        result.problems.append("audit-log.json: missing or empty")
    try:
        problems = chain.excerpt_problems(rows)
    except (KeyError, TypeError, ValueError) as exc:
        result.problems.append(f"audit-log.json: malformed rows ({type(exc).__name__}: {exc})")
        return []
    result.problems += [f"audit-log.json: {p}" for p in problems]
    if not problems:
        result.lines.append(f"audit-log.json: {len(rows)} rows, each row's hashes and links verify")
    return rows


def _first_digest(rows, object_type: str, object_id: Any) -> str | None:
    for row in rows:
        if row.get("object_type") == object_type and row.get("object_id") == str(object_id):
            value = chain.payload(row).get("content_digest")
            if value:
                return value
    return None


def _check_evidence(files, manifest, rows, result: BundleResult) -> None:
    count = 0
    for entry in manifest.get("evidence", []):
        label = f"evidence #{entry.get('id')} ({entry.get('kind')})"
        content = {k: v for k, v in entry.items() if k != "digest"}
        if digest(content) != entry.get("digest"):
            result.problems.append(f"manifest.json: {label}: its digest does not match its content")
        logged = _first_digest(rows, "evidence", entry.get("id"))
        if logged is None:
            result.problems.append(f"audit-log.json: no evidence.recorded row carries the digest of {label}")
        elif logged != entry.get("digest"):
            result.problems.append(f"manifest.json: {label}: its digest differs from the one the audit log recorded")
        prefix = f"evidence/run-{entry.get('run_id')}-"
        for artifact in entry.get("artifacts", []):
            name = next((n for n in files if n.startswith(prefix) and n.endswith("/" + artifact.get("name", ""))),
                        None)
            if name is None:
                result.problems.append(f"{prefix}*/{artifact.get('name')}: missing from the bundle")
            elif hashlib.sha256(files[name]).hexdigest() != artifact.get("sha256"):
                result.problems.append(f"{name}: its SHA-256 differs from the manifest's")
            else:
                count += 1
    result.lines.append(f"evidence: {count} file(s) match the manifest")


def _check_report_event(manifest, manifest_bytes, checked, rows, result: BundleResult) -> None:
    ref = manifest.get("report") or {}
    issued = [r for r in rows if r.get("action") == "report.issued"
              and chain.payload(r).get("version") == ref.get("version")]
    if len(issued) != 1:
        result.problems.append(f"audit-log.json: expected one report.issued row for v{ref.get('version')}, "
                               f"found {len(issued)}")
        return
    row = issued[0]
    payload = chain.payload(row)
    if checked is not None and checked.issued_sha256 and payload.get("sha256") != checked.issued_sha256:
        result.problems.append(f"audit-log.json: the report.issued row (seq {row['seq']}) records SHA-256 "
                               f"{payload.get('sha256')}, the report's issued revision hashes to "
                               f"{checked.issued_sha256}")
    if payload.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest():
        result.problems.append(f"audit-log.json: the report.issued row (seq {row['seq']}) records another manifest")
    anchor = manifest.get("audit_log")
    if anchor:
        if payload.get("audit_anchor") != anchor:
            result.problems.append("audit-log.json: the report.issued row records another audit-log anchor")
        at_anchor = next((r for r in rows if r["seq"] == anchor.get("seq")), None)
        if at_anchor is not None and at_anchor["row_hash"] != anchor.get("row_hash"):
            result.problems.append(f"audit-log.json: row seq {anchor.get('seq')} is not the head the report anchors")
        if row["seq"] == anchor.get("seq", 0) + 1 and row["prev_hash"] != anchor.get("row_hash"):
            result.problems.append("audit-log.json: the report.issued row does not follow the anchored head")
    if not any(p.startswith("audit-log.json: the report") for p in result.problems):
        result.lines.append(f"audit-log.json: report.issued (seq {row['seq']}) records this report and its anchor")
