"""PAdES signatures on issued reports (pyHanko), and their verification.

Each signature is an *incremental update*: the bytes already signed stay untouched, so the
issuer's signature, a reviewer's and an approver's can be added in turn and each earlier one
keeps verifying (pyHanko's difference analysis confirms that later revisions only added
signatures).

Keys: production keys come from settings (``LOUPE_SIGNING_KEY``, ``LOUPE_SIGNING_CERT``,
``LOUPE_SIGNING_CA_CHAIN``, the passphrase from the environment variable named by
``LOUPE_SIGNING_KEY_PASSPHRASE_ENV``) and verification trusts the certificates in
``LOUPE_SIGNING_TRUST_ROOTS``. ``manage.py make_signing_key`` creates a development CA and
signer certificates that fit these settings.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.diff_analysis import ModificationLevel
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.sign.validation.status import SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext


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

def existing_signature_fields(pdf: bytes) -> list[str]:
    reader = PdfFileReader(io.BytesIO(pdf), strict=False)
    return [sig.field_name for sig in reader.embedded_signatures]


def sign_pdf(pdf: bytes, signer: signers.SimpleSigner, *, role: str, reason: str, name: str | None = None,
             location: str | None = None) -> bytes:
    """Append a PAdES baseline-B signature for ``role`` (e.g. "issuer", "reviewer", "approver").

    The signature lives in a new field ``Loupe-<role>[-n]`` added by an incremental update, so
    signatures already present stay valid.
    """
    taken = set(existing_signature_fields(pdf))
    base = f"Loupe-{role.strip().replace(' ', '-') or 'signer'}"
    field_name, n = base, 1
    while field_name in taken:
        n += 1
        field_name = f"{base}-{n}"
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    meta = signers.PdfSignatureMetadata(
        field_name=field_name,
        subfilter=fields.SigSeedSubFilter.PADES,
        md_algorithm="sha256",
        reason=reason,
        name=name,
        location=location,
    )
    out = signers.sign_pdf(writer, meta, signer=signer)
    return out.getvalue()


# --- verification ---------------------------------------------------------------------------

@dataclass
class SignatureCheck:
    field_name: str
    signer: str
    signed_at: str | None
    intact: bool
    valid: bool
    trusted: bool
    covers_whole_file: bool
    later_changes_ok: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_signatures(pdf: bytes, roots: list[asn1_x509.Certificate] | None = None) -> list[SignatureCheck]:
    """Check every signature: integrity, validity, chain to ``roots``, and what came after it.

    The last signature must cover the whole file; earlier ones may only be followed by
    revisions that add signatures (pyHanko's diff policy decides what is harmless).
    """
    roots = trust_roots() if roots is None else roots
    context = ValidationContext(trust_roots=roots, allow_fetching=False)
    reader = PdfFileReader(io.BytesIO(pdf), strict=False)
    embedded = list(reader.embedded_signatures)
    checks: list[SignatureCheck] = []
    for index, sig in enumerate(embedded):
        status = validate_pdf_signature(sig, context)
        is_last = index == len(embedded) - 1
        whole_file = status.coverage == SignatureCoverageLevel.ENTIRE_FILE
        # Only extra signatures (and their form fields) may follow an earlier signature.
        level = status.modification_level
        later_ok = whole_file or (status.coverage == SignatureCoverageLevel.ENTIRE_REVISION
                                  and level is not None and level <= ModificationLevel.FORM_FILLING
                                  and status.docmdp_ok is not False)
        signer = status.signing_cert.subject.human_friendly if status.signing_cert is not None else "?"
        signed_at = status.signer_reported_dt.isoformat() if status.signer_reported_dt else None
        check = SignatureCheck(sig.field_name, signer, signed_at, bool(status.intact), bool(status.valid),
                               bool(status.trusted), whole_file, later_ok)
        if not status.intact:
            check.problems.append("the signed bytes were changed after signing (digest mismatch)")
        elif not status.valid:
            check.problems.append("the cryptographic signature does not verify")
        if status.intact and status.valid and not status.trusted:
            check.problems.append("the signer's certificate does not chain to a configured trust root")
        if is_last and not whole_file:
            check.problems.append("bytes were appended after the last signature")
        if not is_last and not later_ok:
            check.problems.append("a later revision made changes other than adding signatures")
        checks.append(check)
    return checks


# --- development keys -----------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Loupe development (NOT FOR PRODUCTION)"),
    ])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None) -> None:
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)


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
                            days: int = 825) -> tuple[Path, Path]:
    """Issue a signer key + certificate from the development CA; returns (key, cert)."""
    ca_key_path, ca_cert_path = make_development_ca(directory)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # pyHanko requires non-repudiation (content commitment) on document signing keys.
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = directory / f"{slug}-key.pem", directory / f"{slug}-cert.pem"
    _write_key(key_path, key, passphrase)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
