"""Signed reports: the issuer signs at issue, a reviewer and an approver countersign in turn, and
``verify_report`` passes only while every signature and the embedded manifest check out.

Keys come from ``make_signing_key`` into a temporary directory (a development CA plus signers).
One case is rendered once per module (the database is rolled back afterwards, the files stay).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import override_settings

from governance.reports import generate_report
from tests.report_fixtures import acme_case

# Every test touches the database; the mark also makes pytest-django create the test database
# before the module-scoped fixtures below use it (without it they would hit the real one).
pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("signing")
    with override_settings(LOUPE_SIGNING_DIR=directory):
        call_command("make_signing_key", stdout=io.StringIO())  # issuer
        call_command("make_signing_key", "--name", "Rita Reviewer", "--slug", "rita", stdout=io.StringIO())
        call_command("make_signing_key", "--name", "Rob Reviewer", "--slug", "rob", stdout=io.StringIO())
    return directory


def _signing_settings(keys):
    return override_settings(LOUPE_SIGNING_KEY=str(keys / "issuer-key.pem"),
                             LOUPE_SIGNING_CERT=str(keys / "issuer-cert.pem"),
                             LOUPE_SIGNING_CA_CHAIN=[str(keys / "dev-ca-cert.pem")],
                             LOUPE_SIGNING_TRUST_ROOTS=[str(keys / "dev-ca-cert.pem")])


@pytest.fixture(scope="module")
def signed_report(django_db_setup, django_db_blocker, keys, tmp_path_factory, test_probe_kind):
    """Report v1 of Acme's approved case, issued and signed by the service.

    Module-scoped because rendering takes seconds: the rows live in a transaction that is rolled
    back after the module's tests, the settings point at the module's keys and media directory.
    """
    tmp = tmp_path_factory.mktemp("signed")
    with (django_db_blocker.unblock(), _signing_settings(keys), override_settings(MEDIA_ROOT=str(tmp / "media")),
          transaction.atomic()):
        case, actors = acme_case(("grounding",))
        report = generate_report(case, author=actors["ada"])
        path = tmp / "v1.pdf"
        path.write_bytes(report.pdf.open("rb").read())
        yield {"report": report, "path": path, "case": case, "tmp": tmp}
        transaction.set_rollback(True)


def verify(path, *extra) -> str:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_report", str(path), *extra, stdout=out, stderr=err)
    except CommandError as exc:
        raise AssertionError(f"{exc}\n{err.getvalue()}") from exc
    return out.getvalue()


def verify_fails(path, *extra) -> str:
    err = io.StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command("verify_report", str(path), *extra, stdout=io.StringIO(), stderr=err)
    assert excinfo.value.returncode == 1
    return err.getvalue()


def test_it_signs_at_issue_and_countersigns_in_turn(signed_report, keys):
    v1 = signed_report["path"]
    assert "Loupe-issuer: OK · issuer" in verify(v1).replace("signature ", "")
    reviewed, approved = v1.with_name("reviewed.pdf"), v1.with_name("approved.pdf")
    call_command("sign_report", str(v1), str(reviewed), "--key", str(keys / "rita-key.pem"),
                 "--cert", str(keys / "rita-cert.pem"), "--record", "rita", stdout=io.StringIO())
    call_command("sign_report", str(reviewed), str(approved), "--key", str(keys / "rob-key.pem"),
                 "--cert", str(keys / "rob-cert.pem"), "--record", "rob", stdout=io.StringIO())
    out = verify(approved)
    for field, who in (("Loupe-issuer", "issuer"), ("Loupe-reviewer", "reviewer rita · Rita Reviewer"),
                       ("Loupe-reviewer-2", "reviewer rob · Rob Reviewer")):
        assert f"signature {field}: OK · {who}" in out
    assert "all 3 signature(s) and the manifest verify" in out
    anchored = signed_report["report"].manifest["audit_log"]["seq"]
    assert f"audit log: unchanged up to the head anchored at issue (seq {anchored}" in out
    # Earlier signatures are untouched bytes of the later file: incremental updates only.
    assert approved.read_bytes().startswith(v1.read_bytes())


def test_it_fails_a_report_with_one_changed_byte(signed_report, keys):
    data = bytearray(signed_report["path"].read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = signed_report["tmp"] / "tampered.pdf"
    tampered.write_bytes(bytes(data))
    err = verify_fails(tampered)
    assert "changed after signing" in err or "could not be parsed" in err


def test_it_fails_bytes_appended_after_the_last_signature(signed_report, keys):
    appended = signed_report["tmp"] / "appended.pdf"
    appended.write_bytes(signed_report["path"].read_bytes() + b"\n% appended\n")
    assert "appended after the last signature" in verify_fails(appended)


def test_it_fails_a_signature_from_an_untrusted_key(signed_report, keys, tmp_path_factory):
    other = tmp_path_factory.mktemp("other-ca")
    call_command("make_signing_key", "--dir", str(other), "--name", "Mallory", "--slug", "rita",
                 stdout=io.StringIO())
    forged = signed_report["tmp"] / "forged.pdf"
    call_command("sign_report", str(signed_report["path"]), str(forged), "--key", str(other / "rita-key.pem"),
                 "--cert", str(other / "rita-cert.pem"), stdout=io.StringIO())
    assert "does not chain to a trusted root" in verify_fails(forged)


def test_it_fails_an_unsigned_report_unless_asked_and_identical(signed_report, tmp_path):
    signed = signed_report["path"].read_bytes()
    # The issuer's signature is an incremental update: the unsigned render is the first revision.
    unsigned_bytes = signed[:signed.index(b"%%EOF") + len(b"%%EOF")]
    unsigned = tmp_path / "unsigned.pdf"
    unsigned.write_bytes(unsigned_bytes)
    assert "carries no signature" in verify_fails(unsigned)
    # Not byte-identical to the stored (signed) v1, so even --allow-unsigned refuses it.
    assert "not byte-identical" in verify_fails(unsigned, "--allow-unsigned")


def test_it_fails_when_the_stored_evidence_no_longer_matches(signed_report, keys):
    from governance.models import EvidenceArtifact

    artifact = EvidenceArtifact.objects.filter(evidence__run__case=signed_report["case"],
                                               content_type="image/png").first()
    original = Path(artifact.file.path).read_bytes()
    with open(artifact.file.path, "r+b") as handle:  # an attacker with file-system access
        handle.seek(40)
        handle.write(b"\x00\x01\x02")
    try:
        assert "no longer matches its SHA-256" in verify_fails(signed_report["path"])
    finally:
        Path(artifact.file.path).write_bytes(original)
    verify(signed_report["path"])
