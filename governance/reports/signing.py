"""PAdES signatures on issued reports (pyHanko), and their verification.

Each signature is an *incremental update*: the bytes already signed stay untouched, so the
issuer's signature and then reviewers' countersignatures are added in turn and each earlier one
keeps verifying. Verification (who signed, in which role, and what every later revision changed)
lives in :mod:`loupe_verify.pdf`, shared with the offline verifier.

Keys: production keys come from settings (``LOUPE_SIGNING_KEY``, ``LOUPE_SIGNING_CERT``,
``LOUPE_SIGNING_CA_CHAIN``, the passphrase from the environment variable named by
``LOUPE_SIGNING_KEY_PASSPHRASE_ENV``) and verification trusts the certificates in
``LOUPE_SIGNING_TRUST_ROOTS``. The issuer certificate must carry the Loupe issuer policy
(:data:`loupe_verify.pdf.ISSUER_POLICY_OID`); reviewer certificates the reviewer policy and the
reviewer's username as subject UID. ``manage.py make_signing_key`` creates a development CA and
signer certificates that fit these settings; production keys are PEM files (optionally
passphrase-protected) issued by the organisation's CA with those policies, or a PKCS#11 token
(pyHanko's ``pkcs11.PKCS11Signer`` gives the same ``signers.Signer`` interface as
:func:`load_signer`; see ``docs/integrity.md``).
"""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path

from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from django.conf import settings
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers

from loupe_verify.pdf import (
    DOCUMENT_SIGNING_EKU,
    ISSUER_POLICY_OID,
    REVIEWER_POLICY_OID,
    PdfVerification,
    cert_sha256,
    verify_pdf,
)


class SigningError(Exception):
    """Signing is not configured or the key material is unusable."""


# --- key material ---------------------------------------------------------------------------

def _setting(name: str, default=None):
    return getattr(settings, name, default)


def configured_signer_paths() -> tuple[Path, Path] | None:
    """(key, cert) from settings, or ``None`` when signing at issue is not configured."""
    key, cert = _setting("LOUPE_SIGNING_KEY", ""), _setting("LOUPE_SIGNING_CERT", "")
    if not key or not cert:
        return None
    key_path, cert_path = Path(key), Path(cert)
    if not key_path.is_file() or not cert_path.is_file():
        return None
    return key_path, cert_path


def load_signer(key_path: str | Path, cert_path: str | Path, *, passphrase: bytes | None = None,
                ca_chain: list[str | Path] | None = None) -> signers.SimpleSigner:
    """Load a PEM key and certificate (and optional chain) into a pyHanko signer."""
    if passphrase is None:
        env_name = _setting("LOUPE_SIGNING_KEY_PASSPHRASE_ENV", "LOUPE_SIGNING_KEY_PASSPHRASE")
        value = os.environ.get(env_name or "")
        passphrase = value.encode() if value else None
    chain = [str(p) for p in (ca_chain if ca_chain is not None else _setting("LOUPE_SIGNING_CA_CHAIN", []) or [])]
    try:
        signer = signers.SimpleSigner.load(str(key_path), str(cert_path), ca_chain_files=chain or None,
                                           key_passphrase=passphrase or None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"cannot load signing key {key_path} / certificate {cert_path}: {exc}") from exc
    if signer is None:
        raise SigningError(f"cannot load signing key {key_path} / certificate {cert_path} (wrong passphrase?)")
    return signer


def load_certificates(paths: list[str | Path]) -> list[asn1_x509.Certificate]:
    """Read PEM or DER certificates (a PEM file may hold several)."""
    certs: list[asn1_x509.Certificate] = []
    for path in paths:
        data = Path(path).read_bytes()
        if asn1_pem.detect(data):
            for _, _, der in asn1_pem.unarmor(data, multiple=True):
                certs.append(asn1_x509.Certificate.load(der))
        else:
            certs.append(asn1_x509.Certificate.load(data))
    return certs


def trust_roots() -> list[asn1_x509.Certificate]:
    paths = list(_setting("LOUPE_SIGNING_TRUST_ROOTS", []) or [])
    return load_certificates([p for p in paths if Path(p).is_file()])


# --- signing --------------------------------------------------------------------------------

class PdfA3IncrementalWriter(IncrementalPdfFileWriter):
    """An incremental writer that keeps an issued PDF/A-3 a PDF/A-3.

    pyHanko's writer, left alone, bumps the catalog to ``/Version /2.0`` and declares the ISO/TS
    32002 extension when it signs with an ECDSA key (PDF/A-3 is PDF 1.7, ISO 19005-3 6.1.2), and
    rewrites ``/Info`` and the XMP ``pdf:Producer``/``xmp:ModifyDate`` on save, which breaks their
    equivalence (6.6.2.3.1) and would be a change to the issued metadata after the issuer signed.
    A signature revision therefore writes the signature only: metadata stays as issued and the
    version never goes past 1.7 (ECDSA P-256 with SHA-256 is already usable in PDF 1.7/PAdES).
    """

    def ensure_output_version(self, version):
        if tuple(version) > (1, 7):
            return
        super().ensure_output_version(version)

    def register_extension(self, ext):
        if str(ext.base_version).lstrip("/") not in ("1.7", "1.6", "1.5", "1.4"):
            return  # an extension of PDF 2.0 (ISO/TS 32002) has no place in a PDF/A-3 file
        super().register_extension(ext)

    def _update_meta(self):
        return None


def existing_signature_fields(pdf: bytes) -> list[str]:
    reader = PdfFileReader(io.BytesIO(pdf), strict=False)
    return [sig.field_name for sig in reader.embedded_signatures]


def timestamper():
    """The RFC 3161 timestamp authority from ``LOUPE_TSA_URL`` (PAdES B-T), or None."""
    url = _setting("LOUPE_TSA_URL", "")
    if not url:
        return None
    from pyhanko.sign.timestamps.requests_client import RequestsHTTPTimeStamper

    return RequestsHTTPTimeStamper(url, timeout=int(_setting("LOUPE_TSA_TIMEOUT", 10)))


def sign_pdf(pdf: bytes, signer: signers.SimpleSigner, *, role: str, reason: str, name: str | None = None,
             location: str | None = None, timestamp: bool = True) -> bytes:
    """Append a PAdES signature for ``role`` (``issuer`` or ``reviewer``) as an incremental update.

    The signature lives in a new, invisible field ``Loupe-<role>[-n]`` so signatures already present
    stay valid. With ``LOUPE_TSA_URL`` set (and ``timestamp``), the signature carries an RFC 3161
    signature timestamp: PAdES B-T.
    """
    taken = set(existing_signature_fields(pdf))
    base = f"Loupe-{role.strip().replace(' ', '-') or 'signer'}"
    field_name, n = base, 1
    while field_name in taken:
        n += 1
        field_name = f"{base}-{n}"
    writer = PdfA3IncrementalWriter(io.BytesIO(pdf), strict=False)
    meta = signers.PdfSignatureMetadata(
        field_name=field_name,
        subfilter=fields.SigSeedSubFilter.PADES,
        md_algorithm="sha256",
        reason=reason,
        name=name,
        location=location,
    )
    out = signers.sign_pdf(writer, meta, signer=signer, timestamper=timestamper() if timestamp else None)
    return out.getvalue()


def add_archival_timestamp(pdf: bytes, roots: list[asn1_x509.Certificate] | None = None) -> bytes:
    """PAdES B-LTA: append the validation data of every signature (certificates, into the document
    security store) and a document timestamp from ``LOUPE_TSA_URL`` covering all of it, in one
    incremental revision that keeps the file PDF/A-3b. Run it again before the newest timestamp's
    certificate expires to extend the archive."""
    from pyhanko.sign.signers.pdf_signer import PdfTimeStamper
    from pyhanko.sign.validation.dss import DocumentSecurityStore
    from pyhanko_certvalidator import ValidationContext

    stamper = timestamper()
    if stamper is None:
        raise SigningError("an archival timestamp needs LOUPE_TSA_URL")
    roots = trust_roots() if roots is None else roots
    context = ValidationContext(trust_roots=roots, allow_fetching=False, revocation_mode="soft-fail")
    reader = PdfFileReader(io.BytesIO(pdf), strict=False)
    writer = PdfA3IncrementalWriter(io.BytesIO(pdf), strict=False)
    for sig in reader.embedded_signatures:
        certs = list(sig.signed_data["certificates"]) if sig.signed_data["certificates"].native else []
        DocumentSecurityStore.supply_dss_in_writer(
            writer, sig.pkcs7_content, certs=[c.chosen for c in certs] + roots, validation_context=context)
    # No validation context here: pyHanko would then add the timestamp authority's validation data in
    # a further revision through its own writer (rewriting the metadata). That data belongs to the
    # next archival timestamp, which covers this one.
    out = PdfTimeStamper(stamper).timestamp_pdf(writer, "sha256")
    return out.getvalue()


# --- verification ---------------------------------------------------------------------------

def issuer_fingerprints() -> set[str]:
    """SHA-256 of the configured issuer certificate (``LOUPE_SIGNING_CERT``), if readable."""
    cert = _setting("LOUPE_SIGNING_CERT", "")
    if cert and Path(cert).is_file():
        return {cert_sha256(c) for c in load_certificates([cert])[:1]}
    return set()


def verify_signatures(pdf: bytes, roots: list[asn1_x509.Certificate] | None = None, *,
                      issuer_fingerprints: set[str] | None = None,
                      accepted_reviewers: set[str] | None = None) -> PdfVerification:
    """Verify ``pdf``'s signatures, signers' roles and later revisions (:func:`loupe_verify.pdf.verify_pdf`)
    against ``roots`` (default ``LOUPE_SIGNING_TRUST_ROOTS``)."""
    return verify_pdf(pdf, trust_roots() if roots is None else roots, issuer_fingerprints=issuer_fingerprints,
                      accepted_reviewers=accepted_reviewers)


# --- development keys -----------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Loupe development (NOT FOR PRODUCTION)"),
    ])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, passphrase: bytes | None) -> None:
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # make_development_ca writes an EC key
        raise ValueError(f"{path}: the development CA key is not an elliptic-curve key")
    return key


def make_development_ca(directory: Path, *, days: int = 3650) -> tuple[Path, Path]:
    """Create (or reuse) a self-signed development CA in ``directory``; returns (key, cert)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "dev-ca-key.pem", directory / "dev-ca-cert.pem"
    if key_path.is_file() and cert_path.is_file():
        return key_path, cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name("Loupe development CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key, None)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_development_signer(directory: Path, common_name: str, *, slug: str, passphrase: bytes | None = None,
                            days: int = 825, role: str = "issuer", username: str | None = None) -> tuple[Path, Path]:
    """Issue a signer key + certificate from the development CA; returns (key, cert).

    ``role="issuer"``: the certificate carries :data:`~loupe_verify.pdf.ISSUER_POLICY_OID`, which only
    the service's issuer certificate may carry. ``role="reviewer"``: it carries the reviewer policy
    and names ``username`` (the Loupe account) in the subject's UID, which is how a countersignature
    is tied to a reviewer. Both get the document-signing extended key usage (RFC 9336).
    """
    if role not in ("issuer", "reviewer"):
        raise ValueError(f"role must be 'issuer' or 'reviewer', not {role!r}")
    if role == "reviewer" and not username:
        raise ValueError("a reviewer certificate must name the reviewer's Loupe username")
    ca_key_path, ca_cert_path = make_development_ca(directory)
    ca_key = _load_ca_key(ca_key_path)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Loupe (development)")]
    if username:
        attributes.append(x509.NameAttribute(NameOID.USER_ID, username))
    policy = ISSUER_POLICY_OID if role == "issuer" else REVIEWER_POLICY_OID
    cert = (x509.CertificateBuilder().subject_name(x509.Name(attributes)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # pyHanko requires non-repudiation (content commitment) on document signing keys.
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(DOCUMENT_SIGNING_EKU)]), critical=False)
            .add_extension(x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier(policy), None)]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = directory / f"{slug}-key.pem", directory / f"{slug}-cert.pem"
    _write_key(key_path, key, passphrase)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_development_tsa(directory: Path, *, days: int = 825) -> tuple[Path, Path]:
    """A timestamp authority key + certificate from the development CA (extended key usage
    timeStamping, critical, as RFC 3161 requires); returns (key, cert). For tests and local runs of a
    development TSA; production uses a qualified or organisational TSA at ``LOUPE_TSA_URL``."""
    ca_key_path, ca_cert_path = make_development_ca(directory)
    ca_key = _load_ca_key(ca_key_path)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    # RSA: pyHanko's DummyTimeStamper, which tests and local development TSAs run on, signs with RSA only.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("Loupe development TSA")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = directory / "tsa-key.pem", directory / "tsa-cert.pem"
    _write_key(key_path, key, None)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
