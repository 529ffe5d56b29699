"""The export bundle verified offline by ``loupe-verify``: genuine, then edited.

One approved case is issued, countersigned by rita through the API and exported once per module.
``loupe-verify`` runs as a separate process with a clean environment (no ``DJANGO_SETTINGS_MODULE``,
no database URL) and must not import Django at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings
from rest_framework.test import APIClient

from governance.models import AuditEvent, Countersignature
from governance.reports import generate_report, signing
from loupe_verify.bundle import verify_bundle
from tests.report_fixtures import acme_case
from tests.signing_fixtures import signing_settings

pytestmark = [pytest.mark.slow, pytest.mark.django_db]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(django_db_setup, django_db_blocker, keys, tmp_path_factory, test_probe_kind):
    tmp = tmp_path_factory.mktemp("bundle")
    with (django_db_blocker.unblock(), signing_settings(keys), override_settings(MEDIA_ROOT=str(tmp / "media")),
          transaction.atomic()):
        case, actors = acme_case(("grounding",))
        report = generate_report(case, author=actors["ada"])
        signed = signing.sign_pdf(report.pdf.open("rb").read(), signing.load_signer(
            keys / "rita-key.pem", keys / "rita-cert.pem"), role="reviewer", reason="countersigned")
        client = APIClient()
        client.force_authenticate(actors["rita"])
        response = client.post(f"/api/reports/{report.pk}/countersign/",
                               {"file": io.BytesIO(signed)}, format="multipart")
        assert response.status_code == 201, response.content
        bundle = tmp / "bundle.zip"
        call_command("export_case", str(case.pk), "--output", str(bundle), stdout=io.StringIO())
        yield {"bundle": bundle, "tmp": tmp, "report": report, "response": response.json(), "case": case,
               "signed": signed, "actors": actors}
        transaction.set_rollback(True)


def loupe_verify(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``loupe-verify`` in a clean process: no Django settings, no database, and Django never imported."""
    code = ("import sys; from loupe_verify.cli import main; rc = main(sys.argv[1:]); "
            "assert not [m for m in sys.modules if m == 'django' or m.startswith('django.')], 'Django was imported'; "
            "sys.exit(rc)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_countersignature_is_stored_logged_and_downloadable(exported, keys):
    report = exported["report"]
    row = Countersignature.objects.get(report=report)
    assert row.sequence == 1 and row.reviewer.username == "rita"
    assert row.sha256 == hashlib.sha256(exported["signed"]).hexdigest() == exported["response"]["sha256"]
    event = AuditEvent.objects.get(action="report.countersigned", object_id=str(row.pk))
    assert event.case_id == report.case_id and event.data["sha256"] == row.sha256
    client = APIClient()
    client.force_authenticate(exported["actors"]["alice"])
    body = b"".join(client.get(f"/api/reports/{report.pk}/countersigned/1/").streaming_content)
    assert body == exported["signed"]
    call_command("verify_audit_log", stdout=io.StringIO(), stderr=io.StringIO())


def test_a_countersignature_by_a_reviewer_who_did_not_approve_or_by_someone_else_is_refused(exported, keys,
                                                                                          tmp_path):
    report, actors = exported["report"], exported["actors"]
    client = APIClient()
    latest = Countersignature.objects.get(report=report).pdf.open("rb").read()
    # rob's key, uploaded by alice (the submitter): not a reviewer of the case
    signed = signing.sign_pdf(latest, signing.load_signer(keys / "rob-key.pem", keys / "rob-cert.pem"),
                              role="reviewer", reason="x")
    client.force_authenticate(actors["alice"])
    assert client.post(f"/api/reports/{report.pk}/countersign/", {"file": io.BytesIO(signed)},
                       format="multipart").status_code == 403
    # rita uploading rob's signature: the certificate names rob
    client.force_authenticate(actors["rita"])
    response = client.post(f"/api/reports/{report.pk}/countersign/", {"file": io.BytesIO(signed)}, format="multipart")
    assert response.status_code == 403 and "rob" in response.json()["detail"]
    # a file that does not extend the stored one
    client.force_authenticate(actors["rob"])
    response = client.post(f"/api/reports/{report.pk}/countersign/", {"file": io.BytesIO(signed[:-10])},
                           format="multipart")
    assert response.status_code == 400
    assert Countersignature.objects.filter(report=report).count() == 1


def test_the_genuine_bundle_verifies_offline_without_django(exported, tmp_path):
    run = loupe_verify(exported["bundle"], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SHA256SUMS.p7s: signed by the issuer" in run.stdout
    assert "signature Loupe-issuer: OK · issuer" in run.stdout
    assert "signature Loupe-reviewer: OK · reviewer rita · Rita Reviewer" in run.stdout
    assert "report.issued (seq" in run.stdout and "OK: the bundle verifies" in run.stdout
    readme = zipfile.ZipFile(exported["bundle"]).read("README.txt").decode()
    assert "loupe-verify THIS-BUNDLE.zip" in readme and "REFERENCED BY HASH ONLY" in readme


def _edit(bundle: Path, out: Path, name: str, change, *, fix_sums: bool = False) -> Path:
    source = zipfile.ZipFile(bundle)
    files = {n: source.read(n) for n in source.namelist()}
    files[name] = change(files[name])
    if fix_sums:
        files["SHA256SUMS"] = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in sorted(files.items())
                                      if n not in ("SHA256SUMS", "SHA256SUMS.p7s")).encode()
    with zipfile.ZipFile(out, "w") as target:
        for n, body in files.items():
            target.writestr(n, body)
    return out


def test_an_edited_bundle_fails_naming_the_file(exported, tmp_path):
    evidence = next(n for n in zipfile.ZipFile(exported["bundle"]).namelist() if n.endswith(".png"))
    flipped = _edit(exported["bundle"], tmp_path / "edited.zip", evidence, lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    run = loupe_verify(flipped, tmp_path)
    assert run.returncode == 1
    assert f"FAIL: {evidence}: its SHA-256 differs from the one in SHA256SUMS" in run.stderr, run.stderr

    # Recomputing SHA256SUMS does not help: its signature no longer matches, and the manifest disagrees.
    resummed = _edit(exported["bundle"], tmp_path / "resummed.zip", evidence,
                     lambda b: b[:-1] + bytes([b[-1] ^ 1]), fix_sums=True)
    run = loupe_verify(resummed, tmp_path)
    assert run.returncode == 1
    assert "FAIL: SHA256SUMS.p7s: the signature does not match SHA256SUMS" in run.stderr, run.stderr
    assert f"FAIL: {evidence}: its SHA-256 differs from the manifest's" in run.stderr


def test_edited_manifest_metrics_or_audit_log_fail(exported):
    data = exported["bundle"].read_bytes()

    def edit(name, change):
        buffer = io.BytesIO()
        _edit(exported["bundle"], buffer, name, change, fix_sums=True)
        return verify_bundle(buffer.getvalue())

    assert verify_bundle(data).ok
    result = edit("manifest.json", lambda b: b.replace(b'"pointing_game":', b'"pointing_game":0.99,"x":', 1))
    assert any(p.startswith("manifest.json: differs from the manifest embedded in report/") for p in result.problems)
    log = json.loads(zipfile.ZipFile(exported["bundle"]).read("audit-log.json"))
    log["rows"][0]["actor_label"] = "mallory"
    result = edit("audit-log.json", lambda b: json.dumps(log).encode())
    assert any("audit-log.json: audit-log row seq" in p and "row hash" in p for p in result.problems), result.problems


def test_a_reviewer_countersigns_in_the_review_workspace_and_the_result_verifies(exported, keys, tmp_path):
    from django.test import Client
    from django.urls import reverse

    from tests.review_fixtures import admit

    report, rob = exported["report"], exported["actors"]["rob"]
    admit(rob)
    latest = Countersignature.objects.get(report=report).pdf.open("rb").read()
    signed = signing.sign_pdf(latest, signing.load_signer(keys / "rob-key.pem", keys / "rob-cert.pem"),
                              role="reviewer", reason="countersigned in the workspace")
    client = Client()
    client.force_login(rob)
    upload = io.BytesIO(signed)
    upload.name = "signed.pdf"
    with signing_settings(keys):
        response = client.post(reverse("admin:governance_auditcase_review_report_countersign",
                                       args=[report.case_id, report.pk]), {"file": upload})
        assert response.status_code == 302 and response["Location"].endswith("/review/"), response["Location"]
        row = Countersignature.objects.get(report=report, sequence=2)
        assert row.reviewer == rob and row.previous_sha256 == hashlib.sha256(latest).hexdigest()
        path = tmp_path / "countersigned-2.pdf"
        path.write_bytes(signed)
        out = io.StringIO()
        call_command("verify_report", str(path), stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    assert "reviewer rita · Rita Reviewer" in text and "reviewer rob · Rob Reviewer" in text
    assert "all 3 signature(s) and the manifest verify" in text
