"""Verify a Loupe report PDF's signatures, who made them, and what each later revision changed.

A Loupe report is issued as one revision signed by the service's *issuer* certificate. Reviewers
may then countersign: each countersignature is an incremental update that may add a signature and
nothing else. This module checks, without any database:

- every signature's integrity, cryptographic validity and chain to the given trust roots;
- that the first signature was made with an issuer certificate (a certificate carrying
  :data:`ISSUER_POLICY_OID`, and, where the caller pins fingerprints, one of those);
- that every later signature was made with a reviewer certificate (:data:`REVIEWER_POLICY_OID`,
  the reviewer's username in the subject's ``UID``) whose username the caller accepts;
- what every revision after the issuer's changes, object by object (:func:`revision_problems`):
  only new signature fields (invisible), their entries in ``/AcroForm /Fields`` and ``/Annots``,
  and the document security store. The document information dictionary, the XMP metadata, page
  content and everything else must stay as issued. pyHanko's own difference policy is not enough
  for this: it accepts changes to ``/Info`` after a signature.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature, validate_pdf_timestamp
from pyhanko.sign.validation.status import DocumentTimestampStatus, PdfSignatureStatus
from pyhanko_certvalidator import ValidationContext

# Object identifiers under a UUID arc (ITU-T X.667 2.25.<uuid>), which needs no registration.
LOUPE_OID_ARC = "2.25.158032859881814695627439131405753714218"
ISSUER_POLICY_OID = f"{LOUPE_OID_ARC}.1"
"""Certificate policy marking a certificate as Loupe's report issuer (only the issuer's carries it)."""
REVIEWER_POLICY_OID = f"{LOUPE_OID_ARC}.2"
"""Certificate policy marking a certificate as a Loupe reviewer's (countersignatures)."""
DOCUMENT_SIGNING_EKU = "1.3.6.1.5.5.7.3.36"
"""id-kp-documentSigning (RFC 9336)."""

for _name in ("pyhanko", "pyhanko_certvalidator"):
    # pyHanko logs a traceback for every untrusted chain; the reasons are reported instead.
    logging.getLogger(_name).setLevel(logging.CRITICAL)


class PdfError(Exception):
    """The file cannot be parsed as a PDF."""


# --- certificates ------------------------------------------------------------------------------

def cert_sha256(cert: asn1_x509.Certificate) -> str:
    return hashlib.sha256(cert.dump()).hexdigest()


def cert_policies(cert: asn1_x509.Certificate) -> set[str]:
    value = cert.certificate_policies_value
    return {p["policy_identifier"].dotted for p in value} if value else set()


def cert_username(cert: asn1_x509.Certificate) -> str | None:
    """The Loupe username a reviewer certificate names (subject ``UID``), if any."""
    value = cert.subject.native.get("user_id")
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def cert_name(cert: asn1_x509.Certificate) -> str:
    """The subject's common name (the whole subject when it has none)."""
    value = cert.subject.native.get("common_name")
    return str(value[0] if isinstance(value, list) else value) if value else cert.subject.human_friendly


def cert_role(cert: asn1_x509.Certificate) -> str:
    policies = cert_policies(cert)
    if ISSUER_POLICY_OID in policies:
        return "issuer"
    if REVIEWER_POLICY_OID in policies:
        return "reviewer"
    return "unknown"


# --- what a revision changes -------------------------------------------------------------------

def _plain(obj: Any, depth: int = 0) -> Any:
    """A comparable Python value for a PDF object; indirect references stay references."""
    if depth > 12:
        return "..."
    if isinstance(obj, generic.IndirectObject):
        return ("ref", obj.idnum, obj.generation)
    if isinstance(obj, generic.StreamObject):
        return ("stream", {k: _plain(obj.raw_get(k), depth + 1) for k in obj if k != "/Length"},
                hashlib.sha256(obj.encoded_data or b"").hexdigest())
    if isinstance(obj, generic.DictionaryObject):
        return {k: _plain(obj.raw_get(k), depth + 1) for k in obj}
    if isinstance(obj, generic.ArrayObject):
        return [_plain(v, depth + 1) for v in obj.raw_iter()] if hasattr(obj, "raw_iter") \
            else [_plain(v, depth + 1) for v in list.__iter__(obj)]
    if isinstance(obj, generic.TextStringObject | generic.ByteStringObject):
        return ("str", bytes(obj.original_bytes))
    return repr(obj)


def _changed_keys(old: generic.DictionaryObject, new: generic.DictionaryObject) -> set[str]:
    keys = set(old) | set(new)
    return {k for k in keys if (k in old) != (k in new) or _plain(old.raw_get(k)) != _plain(new.raw_get(k))}


def _is_invisible_signature(obj: Any) -> bool:
    """A signature field or widget that shows nothing: zero-area rectangle or hidden."""
    if isinstance(obj, generic.IndirectObject):
        obj = obj.get_object()
    if not isinstance(obj, generic.DictionaryObject):
        return False
    ft = obj.get("/FT")
    if ft is None and "/Parent" in obj:
        ft = obj["/Parent"].get("/FT")
    if ft != "/Sig":
        return False
    if "/Rect" not in obj:
        return "/Subtype" not in obj  # a pure field without a widget shows nothing
    flags = int(obj.get("/F", 0))
    if flags & 2 or flags & 32:  # Hidden, NoView
        return True
    x1, y1, x2, y2 = (float(v) for v in obj["/Rect"])
    return abs(x2 - x1) * abs(y2 - y1) == 0


def _additions_ok(old: list, new: generic.ArrayObject) -> tuple[bool, str]:
    new_raw = list(list.__iter__(new))
    if [_plain(v) for v in new_raw[:len(old)]] != old:
        return False, "removes or reorders existing entries"
    for item in new_raw[len(old):]:
        if not _is_invisible_signature(item):
            return False, "adds an entry that is not an invisible signature field"
    return True, ""


def _describe(obj: Any) -> str:
    if isinstance(obj, generic.DictionaryObject):
        for key in ("/Type", "/Subtype", "/FT"):
            if key in obj:
                return f"{key[1:]} {obj[key]}"
        return "dictionary"
    return type(obj).__name__


def revision_problems(reader: PdfFileReader, after_revision: int) -> list[str]:
    """Every change made by revisions after ``after_revision`` (0-based) beyond adding invisible
    signature fields, their form and annotation entries, and document security store data."""
    problems: list[str] = []
    total = reader.xrefs.total_revisions
    for rev in range(after_revision + 1, total):
        old, new = reader.get_historical_resolver(rev - 1), reader.get_historical_resolver(rev)
        label = f"revision {rev + 1}"
        if new.refs_freed_in_revision():
            problems.append(f"{label} deletes objects")
        old_trailer, new_trailer = old.trailer_view, new.trailer_view
        old_root_ref, new_root_ref = old_trailer.raw_get("/Root"), new_trailer.raw_get("/Root")
        if _plain(old_root_ref) != _plain(new_root_ref):
            problems.append(f"{label} replaces the document catalog")
            continue
        old_info = old_trailer.raw_get("/Info") if "/Info" in old_trailer else None
        new_info = new_trailer.raw_get("/Info") if "/Info" in new_trailer else None
        if _plain(old_info) != _plain(new_info):
            problems.append(f"{label} replaces the document information dictionary (/Info)")
        old_root = old.get_object(old_root_ref.reference if isinstance(old_root_ref, generic.IndirectObject)
                                  else old_root_ref)
        acroform_ref = old_root.raw_get("/AcroForm") if "/AcroForm" in old_root else None
        dss_ref = old_root.raw_get("/DSS") if "/DSS" in old_root else None
        info_id = old_info.idnum if isinstance(old_info, generic.IndirectObject) else None
        for ref in sorted(new.explicit_refs_in_revision(), key=lambda r: r.idnum):
            new_obj = new.get_object(ref)
            try:
                old_obj = old.get_object(ref)
            except Exception:  # noqa: BLE001 - pyHanko raises several kinds for "not in that revision"
                old_obj = None
            if old_obj is None or isinstance(old_obj, generic.NullObject):
                continue  # a new object shows nothing unless an existing object is changed to use it
            if _plain(old_obj) == _plain(new_obj):
                continue
            where = f"{label} changes object {ref.idnum} ({_describe(old_obj)})"
            if ref.idnum == info_id:
                keys = sorted(_changed_keys(old_obj, new_obj)) if isinstance(new_obj, generic.DictionaryObject) else []
                problems.append(f"{label} changes the document information dictionary ({', '.join(keys)})")
            elif ref.idnum == old_root_ref.idnum:
                bad = _changed_keys(old_obj, new_obj) - {"/AcroForm", "/DSS"}
                if bad:
                    problems.append(f"{label} changes the document catalog ({', '.join(sorted(bad))})")
            elif isinstance(acroform_ref, generic.IndirectObject) and ref.idnum == acroform_ref.idnum:
                bad = _changed_keys(old_obj, new_obj) - {"/Fields", "/SigFlags"}
                if bad:
                    problems.append(f"{label} changes the interactive form ({', '.join(sorted(bad))})")
                elif "/Fields" in new_obj and not isinstance(new_obj.raw_get("/Fields"), generic.IndirectObject):
                    old_fields = [_plain(v) for v in list.__iter__(old_obj.get("/Fields", generic.ArrayObject()))]
                    ok, why = _additions_ok(old_fields, new_obj["/Fields"])
                    if not ok:
                        problems.append(f"{label}: the form's field list {why}")
            elif isinstance(dss_ref, generic.IndirectObject) and ref.idnum == dss_ref.idnum:
                continue  # long-term validation data (certificates, OCSP, CRLs)
            elif isinstance(old_obj, generic.DictionaryObject) and old_obj.get("/Type") == "/Page":
                bad = _changed_keys(old_obj, new_obj) - {"/Annots"}
                if bad:
                    problems.append(f"{where}: {', '.join(sorted(bad))}")
                elif not isinstance(new_obj.raw_get("/Annots"), generic.IndirectObject):
                    old_annots = [_plain(v) for v in list.__iter__(old_obj.get("/Annots", generic.ArrayObject()))]
                    ok, why = _additions_ok(old_annots, new_obj["/Annots"])
                    if not ok:
                        problems.append(f"{label}: page annotations: {why}")
            elif isinstance(old_obj, generic.ArrayObject) and isinstance(new_obj, generic.ArrayObject):
                ok, why = _additions_ok([_plain(v) for v in list.__iter__(old_obj)], new_obj)
                if not ok:
                    problems.append(f"{where}: {why}")
            elif (isinstance(old_obj, generic.DictionaryObject) and old_obj.get("/FT") == "/Sig"
                  and "/V" not in old_obj and _changed_keys(old_obj, new_obj) <= {"/V", "/AP"}
                  and _is_invisible_signature(new_obj)):
                continue  # an empty signature field being filled
            else:
                problems.append(where)
    return problems


# --- signatures --------------------------------------------------------------------------------

@dataclass
class SignatureCheck:
    field_name: str
    kind: str  # "signature" or "timestamp"
    signer: str
    role: str  # issuer, reviewer, unknown, timestamp
    username: str | None
    cert_sha256: str | None
    signed_at: str | None
    timestamp: str | None
    revision: int  # 1-based revision this signature completes
    signed_bytes_end: int
    intact: bool = False
    valid: bool = False
    trusted: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class PdfVerification:
    signatures: list[SignatureCheck]
    issued_sha256: str | None  # SHA-256 of the bytes the issuer signed (the issued file)
    issued_length: int | None
    problems: list[str]

    @property
    def issuer(self) -> SignatureCheck | None:
        return next((s for s in self.signatures if s.kind == "signature"), None)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.signatures)


def verify_pdf(pdf: bytes, roots: list[asn1_x509.Certificate], *, issuer_fingerprints: set[str] | None = None,
               accepted_reviewers: set[str] | None = None) -> PdfVerification:
    """Verify ``pdf`` as a Loupe report (see the module docstring).

    ``issuer_fingerprints``: SHA-256 of the certificates allowed to issue (None: any certificate
    with the issuer policy). ``accepted_reviewers``: usernames allowed to countersign (assigned to
    the case and approved it); None skips that check (the caller must then do it).
    """
    try:
        reader = PdfFileReader(io.BytesIO(pdf), strict=False)
        embedded = list(reader.embedded_signatures)
    except Exception as exc:  # a damaged file can fail anywhere inside the parser
        raise PdfError(f"the PDF could not be parsed ({type(exc).__name__}: {exc})") from exc
    context = ValidationContext(trust_roots=list(roots), allow_fetching=False)
    problems: list[str] = []
    checks: list[SignatureCheck] = []
    if not roots:
        problems.append("no trust root given")
    for index, sig in enumerate(embedded):
        is_timestamp = sig.sig_object_type == "/DocTimeStamp"
        byte_range = list(sig.byte_range)
        end = int(byte_range[2]) + int(byte_range[3])
        status: DocumentTimestampStatus | PdfSignatureStatus
        try:
            if is_timestamp:
                status = validate_pdf_timestamp(sig, validation_context=context, skip_diff=True)
            else:
                status = validate_pdf_signature(sig, context, ts_validation_context=context, skip_diff=True)
        except Exception as exc:  # noqa: BLE001
            check = SignatureCheck(sig.field_name, "timestamp" if is_timestamp else "signature", "?", "unknown", None,
                                   None, None, None, sig.signed_revision + 1, end)
            check.problems.append(f"cannot be validated ({type(exc).__name__}: {exc})")
            checks.append(check)
            continue
        cert = status.signing_cert
        ts_status, timestamp, signed_at = None, None, None
        if isinstance(status, DocumentTimestampStatus):
            timestamp = status.timestamp.isoformat() if status.timestamp else None
        else:
            ts_status = status.timestamp_validity
            if ts_status is not None and ts_status.timestamp is not None:
                timestamp = ts_status.timestamp.isoformat()
            signed_at = status.signer_reported_dt.isoformat() if status.signer_reported_dt else None
        check = SignatureCheck(
            field_name=sig.field_name, kind="timestamp" if is_timestamp else "signature",
            signer=cert_name(cert) if cert is not None else "?",
            role="timestamp" if is_timestamp else (cert_role(cert) if cert is not None else "unknown"),
            username=cert_username(cert) if cert is not None else None,
            cert_sha256=cert_sha256(cert) if cert is not None else None,
            signed_at=signed_at,
            timestamp=timestamp, revision=sig.signed_revision + 1, signed_bytes_end=end,
            intact=bool(status.intact), valid=bool(status.valid), trusted=bool(status.trusted))
        if not status.intact:
            check.problems.append("the signed bytes were changed after signing (digest mismatch)")
        elif not status.valid:
            check.problems.append("the cryptographic signature does not verify")
        elif not status.trusted:
            check.problems.append("the signer's certificate does not chain to a trusted root")
        if ts_status is not None and not (ts_status.intact and ts_status.valid and ts_status.trusted):
            check.problems.append("its timestamp token does not verify or is not trusted")
        if index == len(embedded) - 1 and end != len(pdf):
            check.problems.append("bytes were appended after the last signature")
        checks.append(check)

    regular = [c for c in checks if c.kind == "signature"]
    issued_sha = issued_len = None
    if regular:
        issuer = regular[0]
        issued_len = issuer.signed_bytes_end
        issued_sha = hashlib.sha256(pdf[:issued_len]).hexdigest()
        if issuer.role != "issuer":
            issuer.problems.append(f"the first signature was not made with Loupe's issuer certificate "
                                   f"(signed by {issuer.signer}, a {issuer.role} certificate)")
        elif issuer_fingerprints is not None and issuer.cert_sha256 not in issuer_fingerprints:
            issuer.problems.append(f"the issuer signature's certificate (SHA-256 {issuer.cert_sha256}) is not the "
                                   "certificate this report was issued with")
        for later in regular[1:]:
            if later.role != "reviewer":
                later.problems.append(f"a later signature must be a reviewer's countersignature; {later.signer} "
                                      f"signed with a {later.role} certificate")
            elif not later.username:
                later.problems.append("the reviewer certificate names no Loupe username (subject UID)")
            elif accepted_reviewers is not None and later.username not in accepted_reviewers:
                later.problems.append(f"{later.username} is not a reviewer of this case who approved it")
        issuer_revision = issuer.revision - 1
        try:
            problems += revision_problems(reader, issuer_revision)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the revisions after the issuer's could not be compared ({type(exc).__name__}: {exc})")
    return PdfVerification(checks, issued_sha, issued_len, problems)
